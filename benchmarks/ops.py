"""Ratio tables of every op against its torch baseline, measured side by side in one run (1 thread).

    python benchmarks/ops.py [--quick]

Runs benchmarks/ops_center.py, ops_randomized_svd.py and ops_divergence.py in turn, each in its own process
(so one op's peak memory never colours another's); each prints its own table, headline ratio last.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("ops_center.py", "ops_randomized_svd.py", "ops_divergence.py")


def main(argv):
    failed = []
    for script in SCRIPTS:
        print(f"\n=== {script} ===", flush=True)
        if subprocess.call([sys.executable, os.path.join(HERE, script), *argv]) != 0:
            failed.append(script)
    if failed:
        print(f"failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
