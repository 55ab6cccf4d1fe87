"""pymerge inside the tools users already run: each module makes one peer call pymerge (the other direction from
pymerge/peers, where pymerge calls the peers as test oracles and benchmark baselines).

  mergekit.py      pymerge's methods in mergekit 0.1.5's merge-method registry (`merge_method: pymerge_cart`)
  fusionbench.py   FusionBench 0.2.33 BaseAlgorithm subclasses, the static ones (CART, TSV-M, Iso-C/CTS, TIES)
  fusionbench_learned.py  the learned ones (DivMerge, AdaMerging-CART) and the reading of the pool's datasets
  lora.py          merging LoRA adapters of one base: materialise, merge, optionally re-factor to a LoRA
pymerge.functional (a module of its own, beside this package) is the peft-style functional API.
Each module imports its peer inside its functions (fusionbench.py and fusionbench_learned.py at their own import:
their classes subclass FusionBench's BaseAlgorithm), so `import pymerge` never needs the peer; install it with
the extra of the same name (`pip install pymerge[mergekit]`, `[fusionbench]`, `[peft]`).
"""
