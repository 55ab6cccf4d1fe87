"""Several processes merging one model (`torchrun ... -m pymerge merge`): who merges which key group, and the
few collectives that keep the ranks in step.

    session = Session.from_env()        # None unless torchrun's RANK / WORLD_SIZE (> 1) are set
    session.start(device)               # torch.distributed: gloo on CPU; cpu:gloo,cuda:nccl on GPU
    mine = assign_groups(costs, session.world_size)[session.rank]
    ok = session.agree(local_ok)        # True only when every rank says True (one all_gather)

Work split: every rank builds the same MergePlan from the same headers, so the groups (and the output's
shard layout) are the same everywhere and need no exchange; assign_groups() gives whole groups to ranks by
the longest-processing-time rule on estimated costs (group_cost: the bytes read and written at a nominal disk
rate, plus, for the SVD methods, T * m * n * min(m, n) flops per matrix key at a nominal flop rate). A key's
merged value does not depend on its group's rank (randomized methods are seeded per key name, see
methods/spec.py key_seed), so the output is byte-identical to one process's. Only control data (flags, a
path, counters) goes through torch.distributed; tensors go straight from each rank into the shared,
pre-planned output shards (ShardWriter with its own keys), so all ranks must see one file system for the
output directory (one node, or a shared file system across nodes).
"""
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence

# Methods that run an SVD per matrix key (cart, tsv_m, iso_c, iso_cts): their cost grows like m * n * min(m, n)
# per task, not only with the bytes. A name list rather than a MethodSpec field, since io does not import
# the methods (tests/test_import_graph.py); a method missing here is still balanced, by bytes alone.
SVD_METHODS = frozenset({"cart", "tsv_m", "iso_c", "iso_cts"})
# Nominal rates that weigh bytes against flops in group_cost (one core; benchmarks/large_merge.py measures
# the machine's own, docs/SCALING.md). Only their ratio matters for the balance.
BYTES_PER_SECOND = 1.0e9
FLOPS_PER_SECOND = 2.0e10
TIMEOUT = timedelta(minutes=30)   # a collective waiting longer than this for a rank gives up


def group_cost(shapes: Sequence[Sequence[int]], io_bytes: int, num_models: int, svd: bool) -> float:
    """Estimated seconds to merge one group: io_bytes (inputs read + output written) at BYTES_PER_SECOND, and
    for an SVD method T * m * n * min(m, n) flops per matrix key (the last two dimensions) at FLOPS_PER_SECOND."""
    flops = 0
    if svd:
        for shape in shapes:
            if len(shape) >= 2:
                m, n = shape[-2], shape[-1]
                rest = 1
                for s in shape[:-2]:
                    rest *= s
                flops += num_models * rest * m * n * min(m, n)
    return io_bytes / BYTES_PER_SECOND + flops / FLOPS_PER_SECOND


def assign_groups(costs: Sequence[float], world_size: int) -> List[List[int]]:
    """Group indices per rank: the costliest group first, each to the least loaded rank (ties: the lower
    rank; equal costs: the earlier group), each rank's list then in plan order. Deterministic, so every rank
    computes the same split; the load of the busiest rank is at most 4/3 of the optimum (Graham's bound)."""
    if world_size < 1:
        raise ValueError(f"assign_groups: world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owned = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda q: (loads[q], q))
        owned[r].append(i)
        loads[r] += costs[i]
    return [sorted(o) for o in owned]


class RankFailed(RuntimeError):
    """Another rank reported a failure (its own message is on its stderr); this rank stops without output."""


@dataclass
class Session:
    """This process's place in a torchrun job; see the module doc."""
    rank: int
    world_size: int
    local_rank: int
    started: bool = False

    @classmethod
    def from_env(cls, environ=None) -> Optional["Session"]:
        """A Session when torchrun's variables describe more than one process, else None (one process)."""
        env = os.environ if environ is None else environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ValueError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                             f"LOCAL_RANK={env.get('LOCAL_RANK')!r}: expected integers (as torchrun sets them)")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
        if world == 1:
            return None
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in env:
                raise ValueError(f"RANK and WORLD_SIZE are set but {name} is not: run under torchrun "
                                 f"(torchrun --nproc-per-node N -m pymerge merge ...)")
        return cls(rank, world, local)

    @property
    def is_main(self):
        return self.rank == 0

    def start(self, device_type="cpu"):
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://", rank=self.rank,
                                    world_size=self.world_size, timeout=TIMEOUT)
        self.started = True
        return self

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order."""
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def agree(self, ok: bool) -> List[int]:
        """The ranks that report not ok (empty: all agree to go on). A rank whose peer died gets an error from
        the collective, taken as that peer's failure."""
        try:
            flags = self.gather(bool(ok))
        except Exception:       # a peer is gone (connection closed) or timed out
            return [-1]
        return [r for r, f in enumerate(flags) if not f]

    def broadcast(self, value, src=0):
        """rank src's `value` (picklable) on every rank."""
        import torch.distributed as dist
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def stop(self):
        import torch.distributed as dist
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        self.started = False
