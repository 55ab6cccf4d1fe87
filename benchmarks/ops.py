"""Ratio tables of every op against its torch baseline, measured side by side in one run (1 thread).

    python benchmarks/ops.py [--quick]

Runs benchmarks/ops_center.py, ops_randomized_svd.py and ops_divergence.py in turn, each in its own process
(so one op's peak memory never colours another's); each prints its own table, headline ratio last, and the
headlines are repeated at the end.
"""
import sys

from measure import run_scripts

SCRIPTS = ("ops_center.py", "ops_randomized_svd.py", "ops_divergence.py")

if __name__ == "__main__":
    sys.exit(run_scripts(SCRIPTS, sys.argv[1:]))
