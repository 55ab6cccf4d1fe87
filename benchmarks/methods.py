"""Ratio tables of every merging method against its baseline, measured side by side in one run (1 thread).

    python benchmarks/methods.py [--quick | --full]

Runs benchmarks/methods_cart.py (CART vs the official merge), methods_ties_ta.py (TIES / task arithmetic vs
mergekit and FusionBench) and methods_svd.py (TSV-M / Iso-C / Iso-CTS vs FusionBench) in turn, each in its own
process, passing --quick / --full on. Each prints its own table; the headline lines are repeated at the end.
Default run: ~15 minutes on the development machine; --quick: ~3; --full: over an hour (complete CART baseline on
the 7B block, 4096 x 4096 keys for the SVD methods).
"""
import argparse
import sys

from measure import run_scripts

SCRIPTS = ("methods_cart.py", "methods_ties_ta.py", "methods_svd.py")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest cases of every script")
    size.add_argument("--full", action="store_true", help="largest cases of every script")
    args = ap.parse_args(argv)
    return run_scripts(SCRIPTS, ["--quick"] if args.quick else ["--full"] if args.full else [])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
