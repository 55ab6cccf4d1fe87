"""`torchrun --nproc-per-node 2 -m pymerge merge ...` (gloo, CPU) on a tiny sharded Llama with tied embeddings:
the output is byte-identical to the single-process merge (every file), both ranks merge a share, and a failure
on one rank leaves no output directory and no temporary debris. Also the rank assignment (pymerge.io.distributed)
against a brute-force optimum, and torchrun's environment parsing."""
import hashlib
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pymerge.cli import build_parser
from pymerge.cli.merge import prepare, rank_groups
from pymerge.io.distributed import SVD_METHODS, Session, assign_groups, group_cost

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.utils.logging.set_verbosity_error()
T = 3
LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
# Small shards and groups: several shards, and enough groups for both ranks to get work.
SIZES = ["--max-shard-size", "20KB", "--max-group-size", "4KB"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    base.save_pretrained(root / "base")
    for t in range(1, T + 1):
        m = LlamaForCausalLM(LlamaConfig(**LLAMA))
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"m{t}", max_shard_size="20KB")
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _single(argv, cwd):
    return subprocess.run([sys.executable, "-P", "-m", "pymerge", "merge", *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _torchrun(argv, cwd, n=2):
    # PYTHONSAFEPATH=1 (the -P of the workers torchrun starts) keeps the working directory off sys.path.
    return subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "pymerge",
                           "merge", *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _files(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir())}


def _tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(Path(root).rglob("*"))}


def _flags(llama, method, *params):
    argv = ["--method", method, "--base", str(llama / "base")]
    for t in range(1, T + 1):
        argv += ["--model", str(llama / f"m{t}")]
    for p in params:
        argv += ["--param", p]
    return argv + SIZES + ["--quiet"]


def _rank_keys(argv, world_size):
    """The merged keys each rank gets for `pymerge merge argv` (the CLI's own plan and assignment)."""
    args = build_parser().parse_args(["merge", *argv])
    opened = []
    try:
        p = prepare(args, opened)
        return [[k for g in groups for k in g] for groups in rank_groups(p.plan, world_size)]
    finally:
        for m in opened:
            m.close()


@pytest.mark.parametrize("method,params", [("cart", ["rank_ratio=0.5", "seed=3"]),   # randomized SVD, per-key seeds
                                           ("ties", ["density=0.5", "lam=0.8"])])
def test_two_ranks_write_the_single_process_output_byte_for_byte(llama, tmp_path, method, params):
    argv = _flags(llama, method, *params)
    ranks = _rank_keys(argv + ["--dry-run"], 2)
    assert all(ranks), f"a rank has no work: {ranks}"           # the comparison below exercises both ranks
    one = _single(argv + ["--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(argv + ["--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    files = _files(tmp_path / "one")
    assert "model.safetensors.index.json" in files and len(files) >= 4     # sharded, with the index and config
    assert _files(tmp_path / "two") == files
    assert "(2 ranks)" in two.stdout
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]                    # no temporary directory left


def test_yaml_config_under_torchrun_matches_single_process(llama, tmp_path):
    config = tmp_path / "merge.yaml"
    models = "\n".join(f"  - model: {llama / f'm{t}'}\n    parameters:\n      weight: {0.3 + 0.1 * t}"
                       for t in range(1, T + 1))
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {llama / 'base'}\nmodels:\n{models}\n"
                      f"dtype: float32\n")
    one = _single([str(config), "--out", str(tmp_path / "one"), *SIZES, "--quiet"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun([str(config), "--out", str(tmp_path / "two"), *SIZES, "--quiet"], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_a_failing_rank_leaves_no_output_and_no_debris(llama, tmp_path):
    """A NaN in one key of model 2 that rank 1 merges: rank 1 fails with the key's name, rank 0 (which holds
    the temporary directory) stops too, and nothing is left; the inputs are unchanged."""
    bad = tmp_path / "inputs" / "m2"
    bad.mkdir(parents=True)
    for f in (llama / "m2").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    argv = _flags(llama, "task_arithmetic", "lam=0.5")
    argv[argv.index(str(llama / "m2"))] = str(bad)
    key = _rank_keys(argv + ["--dry-run"], 2)[1][0]
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        if key in tensors:
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
    inputs = {p: _tree(p) for p in (llama, bad)}
    out = tmp_path / "work" / "merged"
    out.parent.mkdir()
    run = _torchrun(argv + ["--out", str(out)], tmp_path)
    assert run.returncode != 0
    assert key in run.stderr and "NaN" in run.stderr, run.stderr
    assert "rank 0: stopping: rank(s) 1 failed" in run.stderr, run.stderr
    assert os.listdir(out.parent) == []                                   # no output, no temporary directory
    assert {p: _tree(p) for p in (llama, bad)} == inputs


def test_bad_input_under_torchrun_is_exit_2_on_every_rank(llama, tmp_path):
    argv = _flags(llama, "ties", "density=0.5", "lamda=1")                      # misspelled parameter
    run = _torchrun(argv + ["--out", str(tmp_path / "out")], tmp_path)
    assert run.returncode != 0
    assert "lamda" in run.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ assignment
def _best_makespan(costs, world):
    best = float("inf")
    for owners in itertools.product(range(world), repeat=len(costs)):
        loads = [0.0] * world
        for c, r in zip(costs, owners):
            loads[r] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_assign_groups_is_a_partition_within_graham_bound(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    world = int(torch.randint(1, 4, (1,), generator=g))
    costs = (torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 10).tolist()
    owned = assign_groups(costs, world)
    assert len(owned) == world
    assert sorted(i for o in owned for i in o) == list(range(n))
    assert all(o == sorted(o) for o in owned)
    makespan = max(sum(costs[i] for i in o) for o in owned)
    assert makespan <= 4 / 3 * _best_makespan(costs, world) + 1e-12
    assert assign_groups(costs, world) == owned                          # deterministic: every rank agrees


def test_assign_groups_balances_equal_costs_and_refuses_no_ranks():
    assert assign_groups([1.0] * 6, 3) == [[0, 3], [1, 4], [2, 5]]
    assert assign_groups([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        assign_groups([1.0], 0)


def test_group_cost_counts_svd_flops_only_for_svd_methods():
    shapes = [(4096, 11008), (4096,)]
    io = 9 * 2 * (4096 * 11008 + 4096)
    plain = group_cost(shapes, io, 8, svd=False)
    svd = group_cost(shapes, io, 8, svd=True)
    assert plain == pytest.approx(io / 1e9)
    assert svd - plain == pytest.approx(8 * 4096 * 11008 * 4096 / 2e10)   # T m n min(m, n); vectors none
    assert {"cart", "tsv_m", "iso_c", "iso_cts"} <= SVD_METHODS


def test_session_from_torchrun_environment():
    assert Session.from_env({}) is None
    assert Session.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    s = Session.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (s.rank, s.world_size, s.local_rank, s.is_main) == (1, 2, 1, False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        Session.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        Session.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
