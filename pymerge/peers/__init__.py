"""The peers pymerge is compared with, each wrapped once: the tests' oracles and the benchmarks' baselines.

One module per peer, each running the peer's own code the way the peer runs it (or, where the peer's code cannot
be installed, a faithful re-implementation of its arithmetic):
  mergekit.py       mergekit 0.1.5's registered merge methods (task_arithmetic, ties, dare_*, linear)
  fusionbench.py    FusionBench 0.2.33: TSV-M, Iso-C, Iso-CTS, TIES and task arithmetic
  official_cart.py  the official CART merge (JH-GEECS/CART src/merging.py), re-implemented: it is not installable
mergekit.py and fusionbench.py import their peer inside their functions, so importing them (and `import pymerge`)
never needs the peer: installed() says whether it is there. Test and benchmark support, not API: nothing in the
library imports this package (tests/test_import_graph.py), and making the peers call pymerge is the other
direction, not done here.
"""
