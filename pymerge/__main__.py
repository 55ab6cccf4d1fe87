"""`python -m pymerge ...`: the `pymerge` command line (pymerge.cli)."""
import sys

from .cli import main

sys.exit(main())
