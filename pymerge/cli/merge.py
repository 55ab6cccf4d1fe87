"""`pymerge merge`: a static merge of models on disk into a Hugging Face directory, never holding a whole model.

    pymerge merge CONFIG.yaml [OUT | --out DIR]         mergekit's YAML schema (as `mergekit-yaml config.yml out/`)
    pymerge merge --method NAME --base DIR --model DIR [--model DIR ...] [--param NAME=VALUE ...] --out DIR
    common: [--dtype D] [--max-shard-size 5GB] [--max-group-size 512MiB] [--task-specific-keys REGEX]
            [--copy-from DIR] [--tokenizer-source DIR] [--overwrite] [--dry-run] [--quiet] [--threads N]
            [--device cpu|cuda] [--seed N]

Inputs are read through pymerge.io (validated headers, memory-mapped tensors, checkpoints with
weights_only=True only); every model is checked against the base (keys, shapes, dtypes, tied keys; keys
matching --task-specific-keys exempt) and all mismatches are reported at once, before any tensor is read.
The merge is pymerge.merge's plan (plan_merge) run group by group: each group's merged tensors go straight
into their planned place in the output shards and its input pages are released. The output directory is
written atomically (pymerge.io.AtomicDirectory): sharded safetensors + index json with mergekit's file names,
config / generation / tokenizer / chat-template files from the base (or --copy-from, tokenizer_source),
in the base's dtype unless --dtype; the math runs in fp32 (fp64 for fp64 inputs).

The YAML and its mergekit compatibility: pymerge/cli/merge_config.py.

Exit status: 0 done, 2 bad input (the message names the file, key or parameter), 1 internal error,
128 + N on signal N (SIGINT, SIGTERM); a failed or interrupted merge leaves no output and no debris.
"""
import argparse
import re
import resource
import sys
import time
from pathlib import Path

from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..merge import DEFAULT_MAX_GROUP_BYTES
from .common import CLIError, check_device, check_writable
from .merge_config import dtype_name, job_from_flags, job_from_yaml


# ------------------------------------------------------------------------------------------ running
class _MergeView:
    """The keys of one model that the merge sees (tied aliases and task-specific keys left out), read lazily
    from the pymerge.io reader, tensors moved to `device`."""

    def __init__(self, model, keys, device):
        self.model, self._keys, self._set, self.device = model, list(keys), set(keys), device

    def keys(self):
        return list(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._set

    def key_info(self, key):
        return self.model.key_info(key)

    def __getitem__(self, key):
        value = self.model[key]
        return value if self.device.type == "cpu" else value.to(self.device)


def _size(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _open(path, what):
    from ..io import ModelFileError, open_model
    try:
        return open_model(path)
    except ModelFileError as e:
        raise CLIError(f"{what}: {e}") from None


def _check_out(out, overwrite, inputs):
    from ..io import ModelFileError, refuse_overlap
    out = Path(out)
    if out.exists() and not overwrite:
        raise CLIError(f"--out {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    try:
        refuse_overlap(out, inputs)
    except ModelFileError as e:
        raise CLIError(str(e)) from None
    check_writable(out.parent, "--out", out)
    return out


def cmd_merge(args):
    from ..io import Interrupted, ModelFileError
    from ..io.distributed import RankFailed, Session
    try:
        session = Session.from_env()
    except ValueError as e:
        raise CLIError(f"torchrun environment: {e}") from None
    opened = []
    try:
        if session is None:
            return _run(args, opened)
        session.start("cuda" if str(args.device).startswith("cuda") else "cpu")
        return _run_distributed(args, opened, session)
    except ModelFileError as e:
        raise CLIError(str(e)) from None
    except Interrupted as e:
        print(f"pymerge merge: {e}; no output written", file=sys.stderr)
        return 128 + e.signum
    except RankFailed as e:
        print(f"pymerge merge: rank {session.rank}: {e}; no output written", file=sys.stderr)
        return 1
    except OSError as e:
        if e.filename is None:
            raise
        print(f"pymerge merge: error: {e.filename}: {e.strerror or e}; no output written", file=sys.stderr)
        return 1
    finally:
        for m in opened:
            m.close()
        if session is not None:
            session.stop()


def _job(args):
    flags_given = [f for f, v in (("--method", args.method), ("--base", args.base), ("--model", args.model),
                                  ("--param", args.param)) if v]
    if args.config is not None:
        if flags_given:
            raise CLIError(f"give a CONFIG.yaml or {', '.join(flags_given)}, not both")
        job = job_from_yaml(args.config)
    else:
        job = job_from_flags(args)
    if args.dtype is not None:
        job.dtype = dtype_name(args.dtype, "--dtype")
    if args.tokenizer_source is not None:
        job.tokenizer_source = args.tokenizer_source
    if args.task_specific_keys is not None:
        job.task_specific_keys = args.task_specific_keys
    if job.task_specific_keys is not None:
        try:
            re.compile(job.task_specific_keys)
        except (re.error, TypeError) as e:
            raise CLIError(f"task_specific_keys {job.task_specific_keys!r}: not a regular expression ({e})") from None
    return job


class _Prepared:
    """Everything decided before the first tensor is read: the job, the opened models, the merge plan, the
    output's shard layout and where its non-weight files come from."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def prepare(args, opened, session=None):
    """The checks and the plan of `pymerge merge` for parsed `args` (no tensor read, nothing written): a
    _Prepared. The opened readers are appended to `opened` (the caller closes them). session: this rank's
    pymerge.io.distributed.Session under torchrun (its GPU is cuda:LOCAL_RANK), else None."""
    import torch

    from .. import methods
    from ..io import ModelFileError, check_against_base, parse_size, plan_shards
    from ..merge import plan_merge
    start = time.perf_counter()
    job = _job(args)
    out = args.out or args.out_dir
    if args.out and args.out_dir:
        raise CLIError(f"output given twice ({args.out_dir} and --out {args.out})")
    if out is None and not args.dry_run:
        raise CLIError("no output directory: pass --out DIR (or OUT after the config)")
    try:
        max_shard = parse_size(args.max_shard_size)
        max_group = parse_size(args.max_group_size)
    except ValueError as e:
        raise CLIError(f"--max-shard-size / --max-group-size: {e}") from None
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    if session is not None and device.type == "cuda":
        device = torch.device("cuda", session.local_rank % torch.cuda.device_count())   # one GPU per rank
        torch.cuda.set_device(device)
    spec = methods.get(job.method)
    if args.seed is not None:
        torch.manual_seed(args.seed)
        if any(p.name == "seed" for p in spec.params):
            job.params.setdefault("seed", args.seed)
    try:
        spec.resolve_params(dict(job.params), len(job.models))   # parameters first: no file is read for a typo
    except ValueError as e:
        raise CLIError(str(e)) from None
    copy_from = Path(args.copy_from) if args.copy_from else None
    inputs = [("base", job.base)] + [(f"model {i + 1}", m) for i, m in enumerate(job.models)]
    inputs += [(flag, p) for flag, p in (("--copy-from", copy_from), ("tokenizer_source", job.tokenizer_source))
               if p is not None]
    for label, p in inputs:
        if not Path(p).exists():
            raise CLIError(f"{label} {p}: does not exist")
    if out is not None:
        out = _check_out(out, args.overwrite, inputs)

    base = _open(job.base, "base")
    opened.append(base)
    models = []
    for i, path in enumerate(job.models):
        models.append(_open(path, f"model {i + 1}"))
        opened.append(models[-1])
    exempt = re.compile(job.task_specific_keys) if job.task_specific_keys else None
    try:
        check_against_base(base, models, [str(p) for p in job.models], str(job.base), exempt)
    except ModelFileError as e:
        raise CLIError(str(e)) from None
    aliases = base.aliases()
    specific = [k for k in base.keys() if exempt is not None and exempt.search(k) and k not in aliases]
    merged_keys = [k for k in base.keys() if k not in aliases and k not in specific]
    views = [_MergeView(m, merged_keys, device) for m in (base, *models)]
    out_dtype = getattr(torch, job.dtype) if job.dtype else None
    try:
        plan = plan_merge(spec, views[0], views[1:], out_dtype=out_dtype, max_group_bytes=max_group, **job.params)
    except ValueError as e:
        raise CLIError(str(e)) from None

    def specific_info(key):
        info = base.key_info(key)
        cast = out_dtype is not None and info.dtype.is_floating_point
        return info.shape, out_dtype if cast else info.dtype
    written = set(merged_keys) | set(specific)
    entries = [(k, *((plan.output_info(k).shape, plan.output_info(k).dtype) if k in plan.infos
                     else specific_info(k))) for k in base.keys() if k in written]
    shards = plan_shards(entries, max_shard)
    config_dir = copy_from or base.directory
    tok_dir = Path(job.tokenizer_source) if job.tokenizer_source else config_dir
    if copy_from is not None and not (copy_from / "config.json").is_file():
        raise CLIError(f"--copy-from {copy_from}: no config.json")
    if job.tokenizer_source and not tok_dir.is_dir():
        raise CLIError(f"tokenizer source {tok_dir}: not a directory")
    return _Prepared(start=start, job=job, out=out, base=base, models=models, plan=plan, specific=specific,
                     aliases=aliases, entries=entries, shards=shards, out_dtype=out_dtype, config_dir=config_dir,
                     tok_dir=tok_dir)


def _write_keys(p, writer, groups, passthrough, bar=None):
    """Merge `groups` (and, with passthrough, the non-float and task-specific keys) into `writer`.

    Largest outputs first (stable): the writer's write-behind then ends on small groups, so little is left to
    write once the arithmetic is done. The files do not depend on the order (every offset is planned)."""
    groups = sorted(groups, key=lambda g: -p.plan.output_bytes(g))
    if passthrough:
        for key, value in p.plan.merge_passthrough().items():
            writer.write(key, value)
        for key in p.specific:
            value = p.base[key]
            writer.write(key, value.to(p.out_dtype) if p.out_dtype is not None and value.is_floating_point()
                         else value)
            p.base.release([key])
    for group in groups:
        try:
            result = p.plan.merge_group(group)
        except ValueError as e:
            raise CLIError(str(e)) from None
        for key in group:
            writer.write(key, result[key])
        del result
        for m in (p.base, *p.models):
            m.release(group)
        if bar is not None:
            bar.update(p.plan.input_bytes(group))


def _copy_files(p, tmp):
    from ..io import CONFIG_FILES, TOKENIZER_FILES, copy_model_files
    sources = [(d, names) for d, names in ((p.config_dir, CONFIG_FILES), (p.tok_dir, TOKENIZER_FILES))
               if d is not None]
    return copy_model_files(sources, tmp, dtype=p.out_dtype)


def _bar(args, total):
    from tqdm import tqdm
    show = not args.quiet and sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, disable=not show, desc="pymerge merge", file=sys.stderr)


def _summary(p, copied, read, written, peak, ranks=""):
    note = "" if "config.json" in copied else " (no config.json copied: the base is not a model directory)"
    print(f"pymerge merge: {p.job.method} of {len(p.models)} model(s) -> {p.out}{ranks}: {len(p.entries)} tensors "
          f"in {len(p.shards.shards)} shard(s), {time.perf_counter() - p.start:.1f} s, peak RSS {_size(peak)}, "
          f"read {_size(read)}, wrote {_size(written)}{note}")


def _peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(args, opened):
    from ..io import AtomicDirectory, ShardWriter
    p = prepare(args, opened)
    if args.dry_run:
        _print_plan(p.job, p.plan, p.shards, p.specific, p.aliases, p.out, T=len(p.models))
        return 0
    bar = _bar(args, p.plan.input_bytes(p.plan.float_keys))
    with AtomicDirectory(p.out, overwrite=args.overwrite) as tmp:
        writer = ShardWriter(tmp, p.shards, write_behind=True).open()
        try:
            _write_keys(p, writer, p.plan.groups, passthrough=True, bar=bar)
            writer.finish()
        finally:
            writer.close()
            bar.close()
        copied, extra = _copy_files(p, tmp)
    read = sum(m.bytes_read for m in (p.base, *p.models))
    _summary(p, copied, read, writer.bytes_written + extra, _peak_rss())
    return 0


def rank_groups(plan, world_size):
    """The plan's groups per rank (lists of key lists) for a world of world_size processes: pymerge.io's
    assign_groups on each group's estimated cost (bytes read and written; SVD flops for the SVD methods)."""
    from ..io.distributed import SVD_METHODS, assign_groups, group_cost
    svd = plan.spec.name in SVD_METHODS
    costs = [group_cost([plan.infos[k].shape for k in g], plan.input_bytes(g) + plan.output_bytes(g),
                        plan.num_models, svd) for g in plan.groups]
    return [[plan.groups[i] for i in idx] for idx in assign_groups(costs, world_size)]


def _step(session, work):
    """Run work() on this rank, then agree with every rank: its result when all succeeded; this rank's own
    exception re-raised when it failed; RankFailed when only others did. Every rank passes through the same
    _step calls in the same order, whatever fails, so no rank waits for a collective another never reaches."""
    from ..io.distributed import RankFailed
    error, result = None, None
    try:
        result = work()
    except BaseException as e:      # noqa: B902 (re-raised below, after telling the other ranks)
        error = e
    failed = session.agree(error is None)
    if error is not None:
        raise error
    if failed:
        who = "a rank that stopped" if failed == [-1] else "rank(s) " + ", ".join(map(str, failed))
        raise RankFailed(f"stopping: {who} failed (see its message)")
    return result


def _run_distributed(args, opened, session):
    """`torchrun --nproc-per-node N -m pymerge merge ...`: every rank plans the same merge; rank 0 creates
    the temporary output directory and every shard file at its final size; each rank merges its share of the
    groups (rank_groups) into those files; when all ranks have written and fsynced their keys, rank 0 writes
    the index and the config / tokenizer files and renames the directory into place. A failure on any rank
    (an error, a signal, a rank that dies) leaves no output: see _step and pymerge.io.distributed."""
    from contextlib import ExitStack

    from ..io import AtomicDirectory, ShardWriter
    p = _step(session, lambda: prepare(args, opened, session))
    if args.dry_run:
        if session.is_main:
            _print_plan(p.job, p.plan, p.shards, p.specific, p.aliases, p.out, T=len(p.models))
            loads = [p.plan.input_bytes([k for g in gs for k in g]) for gs in rank_groups(p.plan, session.world_size)]
            print(f"  ranks: {session.world_size}, inputs read per rank: {', '.join(_size(b) for b in loads)}")
        return 0
    mine = rank_groups(p.plan, session.world_size)[session.rank]
    my_keys = [k for g in mine for k in g]
    if session.is_main:
        my_keys += list(p.plan.passthrough) + list(p.specific)
    bar = _bar(args, p.plan.input_bytes([k for g in mine for k in g])) if session.is_main else None
    with ExitStack() as stack:
        def open_writer(directory, create):
            writer = ShardWriter(directory, p.shards, keys=my_keys, write_behind=True)
            stack.callback(writer.close)
            return writer.open(create=create)

        def create():                               # rank 0: the temporary directory and every shard file
            if session.is_main:
                tmp = stack.enter_context(AtomicDirectory(p.out, overwrite=args.overwrite))
                return str(tmp), open_writer(tmp, create=True)
            return None, None
        tmp, writer = _step(session, create)
        tmp = Path(session.broadcast(tmp))

        def fill():                                 # every rank: its own keys, fsynced
            w = writer or open_writer(tmp, create=False)
            _write_keys(p, w, mine, passthrough=session.is_main, bar=bar)
            w.finish(write_index=False)
            return sum(m.bytes_read for m in (p.base, *p.models)), w.bytes_written, _peak_rss()
        try:
            stats = session.gather(_step(session, fill))
        finally:
            if bar is not None:
                bar.close()

        def publish():                              # rank 0, once every rank has written: index, files, rename
            if session.is_main:
                index = writer.write_index()
                copied, extra = _copy_files(p, tmp)
                stack.close()                       # the shard files closed, then AtomicDirectory renames
                return copied, index + extra
            return (), 0
        copied, extra = _step(session, publish)
    if session.is_main:
        _summary(p, copied, sum(s[0] for s in stats), sum(s[1] for s in stats) + extra, max(s[2] for s in stats),
                 ranks=f" ({session.world_size} ranks)")
    return 0


def _print_plan(job, plan, shards, specific, aliases, out, T):
    biggest = max(plan.groups, key=plan.input_bytes, default=[])

    def peak(g):
        numel = sum(plan.infos[k].shape.numel() for k in g)
        return plan.input_bytes(g) + (T + 2) * numel * 4 + plan.output_bytes(g)
    estimate = max((peak(g) for g in plan.groups), default=0)
    read = plan.input_bytes(plan.keys)
    print(f"pymerge merge (dry run): {job.method}, base {job.base}, {T} model(s) -> {out or '(no output given)'}")
    print(f"  parameters: {plan.params}")
    print(f"  keys: {len(plan.float_keys)} merged in {len(plan.groups)} group(s) (largest: {len(biggest)} key(s), "
          f"{_size(plan.input_bytes(biggest))} of inputs), {len(plan.passthrough)} passed through (non-float), "
          f"{len(specific)} task-specific (base's value), {len(aliases)} tied (written once)")
    names = ", ".join(shards.file_names[:3]) + (" ..." if len(shards.shards) > 3 else "")
    print(f"  read: {_size(read)} (base + {T} models); write: {_size(shards.total_size)} in "
          f"{len(shards.shards)} shard(s): {names}")
    print(f"  estimated peak memory: {_size(estimate)} (the largest group's inputs mapped, its fp32 working set "
          f"and its output; beyond the interpreter's own)")


def _methods_epilog():
    """Each static method's parameters (--param NAME=VALUE), from its spec; `pymerge methods` has their help."""
    from .. import methods
    lines = ["methods and their parameters (--param NAME=VALUE; `pymerge methods` describes them):"]
    for name in methods.available("static"):
        lines.append(f"  {name}: {', '.join(p.name for p in methods.get(name).params)}")
    return "\n".join(lines)


def add_parsers(sub):
    p = sub.add_parser("merge", help="merge models on disk (mergekit-style YAML or flags) into a Hugging Face "
                                     "directory", description=__doc__.split("\n\n")[0], epilog=_methods_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="mergekit-style YAML (see the module doc)")
    p.add_argument("out_dir", nargs="?", metavar="OUT", help="output directory (as mergekit-yaml's; or --out)")
    p.add_argument("--out", metavar="DIR", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--method", help="a static method (pymerge methods) when no CONFIG is given")
    p.add_argument("--base", metavar="DIR", help="the base model (theta_0): a directory or a weights file")
    p.add_argument("--model", action="append", metavar="DIR", help="a fine-tuned model (repeat)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a method parameter (repeat); per-model ones take a,b,c")
    p.add_argument("--dtype", help="output dtype (float32, bfloat16, float16, float64); default: the base's")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help=f"largest output shard (default {DEFAULT_MAX_SHARD_SIZE}; 500MB, 2GiB ...)")
    p.add_argument("--max-group-size", default=DEFAULT_MAX_GROUP_BYTES, metavar="SIZE",
                   help=f"largest inputs (base + models) of one group of same-shape keys merged at once (default "
                        f"{DEFAULT_MAX_GROUP_BYTES >> 20}MiB)")
    p.add_argument("--task-specific-keys", metavar="REGEX",
                   help="keys not merged and exempt from the checks (per-task heads); the base's value is kept")
    p.add_argument("--copy-from", metavar="DIR", help="copy config and tokenizer files from DIR (default: the base)")
    p.add_argument("--tokenizer-source", metavar="DIR", help="copy the tokenizer files from DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--seed", type=int, help="seed of the randomized methods (their seed parameter)")
    p.set_defaults(func=cmd_merge)
