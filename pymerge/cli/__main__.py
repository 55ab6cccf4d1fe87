"""`python -m pymerge.cli ...`: the same as `pymerge ...`."""
import sys

from . import main

sys.exit(main())
