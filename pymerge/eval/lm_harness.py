"""The generative evaluation harness: merge causal-LM experts of several text domains with each method and
measure the merged model's held-out perplexity on every domain it covers.

    base = LMBase.default()
    domains = [load_domain(n) for n in DEFAULT_DOMAINS]
    suite = lm_suite_from_experts(build_lm_experts(domains, base=base), domains, base)
    result = run_lm_evaluation(suite, lm_variants(["task_arithmetic", "ties", "divmerge"]), subset_sizes=(2, 3))
    result.rows  ->  one LMRow per (subset of domains, variant): per-domain test perplexity, RPS, gain kept

For each subset size k: a fixed, seeded sample of k-domain subsets (harness.subsets); for each subset and
variant, every weight of the subset's experts is merged (base: the pretrained LM; no key is domain-specific)
and the one merged model is measured on each domain of the subset. Scores, per subset (means over its
domains d; ppl = perplexity on the first `test_limit` test texts of d, lm_data.domain_perplexity):

  RPS (relative perplexity score) = mean_d ppl(expert_d, d) / ppl(merged, d): 1 = every expert's own
      perplexity kept, above 1 = better than the experts; the base scores mean_d ppl(expert_d) / ppl(base).
      It plays the role of ANP in the text suite (a ratio of the expert's metric to the merged model's).
  gain kept = mean_d (ln ppl(base, d) - ln ppl(merged, d)) / (ln ppl(base, d) - ln ppl(expert_d, d)): the
      share of each expert's fine-tuning gain in log-perplexity (nats per token) that the merge keeps; base 0,
      expert 1.
  gap closed = (RPS - RPS_TA) / (1 - RPS_TA), TA = task arithmetic at its tuned λ (as the text suite's).

Static methods with a grid (DEFAULT_LM_GRIDS) are tuned on the validation split (highest validation RPS,
ties to the first grid point). DivMerge runs its causal-LM path (methods/divmerge.py): each expert greedily
continues prompts made of the start of `unlabelled_per_domain` train texts (at most half of each text, at
most `prompt_tokens` tokens), its top-k teacher rows are cached on disk (pymerge.teachers), and Γ is learned
teacher-forced on prompt + continuation; it never reads validation or test texts. AdaMerging (entropy of
class predictions) does not apply to causal LMs. Deterministic for a seed.
"""
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..methods import available, get as method_spec
from .harness import Variant, subsets, variants
from .lm_data import Domain, encode, pad_id, token_nll
from .lm_experts import LMBase, load_lm_state, safetensors_shapes, safetensors_state
from .resume import SubsetLog, run_key, run_subsets
from .tuning import LEARNED, SuiteResult, TunedRun, checked_sizes, grids_and_variants, mean

logger = logging.getLogger("pymerge.eval")

# The learned method's cost here: DivMerge on a 135M LM takes seconds per step on a CPU.
DEFAULT_LM_LEARNED = {"divmerge": {"steps": 100, "max_new_tokens": 32, "top_k": 64}}
DEFAULT_LM_UNLABELLED = 100   # train texts per domain whose starts are DivMerge's prompts
DEFAULT_PROMPT_TOKENS = 32
REFERENCE_ROWS = ("expert", "base")
# The text suite's grids (harness.DEFAULT_GRIDS) widened upward: on LM experts the reduced run chose task
# arithmetic's and CART's largest λ (docs/RESULTS.md "The generative suite").
DEFAULT_LM_GRIDS = {
    "task_arithmetic": {"lam": (0.3, 0.5, 0.7, 1.0, 1.5)},
    "ties": {"lam": (0.6, 1.0, 1.4, 2.0)},
    "cart": {"lam": (1.0, 2.0, 3.0), "rank_ratio": (0.04, 0.08, 0.16)},
}


# ------------------------------------------------------------------------------------------------- models
@dataclass
class LMMember:
    """One domain's fine-tuned causal LM: state() gives its weights (tied copies optional), max_length the
    tokens per text it is measured with, source where it comes from."""
    domain: Domain
    state: Callable[[], dict]
    max_length: int
    source: str


@dataclass
class LMSuite:
    """What the harness merges: the base (its weights are θ_0 of every key) and one LMMember per domain."""
    base: LMBase
    members: dict

    def tokenizer(self):
        return self.base.tokenizer


def lm_suite_from_experts(experts: Mapping, domains: Sequence[Domain], base: LMBase) -> LMSuite:
    """An LMSuite of pymerge's cached experts ({domain name: LMExpert}, fine-tuned from `base`)."""
    by_name = {d.name: d for d in domains}
    missing = [n for n in experts if n not in by_name]
    if missing:
        raise ValueError(f"experts {missing} have no domain among {list(by_name)}")
    return LMSuite(base, {n: LMMember(by_name[n], e.state_dict, e.settings.max_length, str(e.path))
                          for n, e in experts.items()})


def lm_suite_from_model_dirs(base: LMBase, model_dirs: Mapping, domains: Sequence[Domain],
                             max_length: int = 128) -> LMSuite:
    """An LMSuite of a user's own causal LMs ({domain name: Hugging Face directory}), each fine-tuned from
    `base`; their safetensors keys and shapes must be the base's (ValueError naming the directory)."""
    by_name = {d.name: d for d in domains}
    expected = base.weight_shapes()
    members = {}
    for name, path in model_dirs.items():
        path = Path(path)
        if name not in by_name:
            raise ValueError(f"model {name}={path}: no domain named {name!r} (give its data)")
        if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
            raise ValueError(f"model {name}={path}: not a Hugging Face model directory with safetensors weights")
        shapes = safetensors_shapes(path)
        bad = sorted(k for k in set(expected) | set(shapes) if expected.get(k) != shapes.get(k))
        if bad:
            raise ValueError(f"model {name}={path}: key(s) {bad[:3]} missing or of another shape than in the "
                             f"base {base.path} (not fine-tuned from it?)")
        members[name] = LMMember(by_name[name], lambda p=path: safetensors_state(p), max_length, str(path))
    return LMSuite(base, members)


def lm_variants(methods: Sequence[str], *, with_variants: bool = True, grids: Mapping | None = None,
                learned: Mapping | None = None) -> list:
    """The rows for `methods` (as harness.variants; "all": every static method and DivMerge). A method that
    cannot merge causal LMs (AdaMerging) is a ValueError naming it. learned: DivMerge's options (default
    DEFAULT_LM_LEARNED)."""
    lm_kinds = [m for m in available("all") if m not in LEARNED or "causal-lm" in method_spec(m).model_kinds]
    if list(methods) == ["all"]:
        methods = lm_kinds
    unsupported = [m for m in methods if m in available("all") and m not in lm_kinds]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} does not merge causal LMs (the generative suite's methods: "
                         f"{', '.join(lm_kinds)})")
    options = {m: {**DEFAULT_LM_LEARNED.get(m, {}), **((learned or {}).get(m, {}))} for m in LEARNED}
    return variants(methods, with_variants=with_variants, grids=DEFAULT_LM_GRIDS if grids is None else grids,
                    learned=options)


# ----------------------------------------------------------------------------------------------- results
@dataclass
class LMRow:
    """One (subset, variant): per-domain test perplexity, RPS, gain kept, gap closed, seconds."""
    size: int
    subset: tuple
    variant: str
    method: str
    params: dict
    perplexity: dict
    rps: float
    gain_kept: float
    gap_closed: float = float("nan")
    merge_seconds: float = 0.0
    tune_seconds: float = 0.0
    validation_rps: float = float("nan")
    note: str = ""


@dataclass
class LMEvalResult(SuiteResult):
    rows: list
    experts: dict   # {domain: {"test_ppl", "validation_ppl", "base_test_ppl", "test_texts", "test_tokens", ...}}
    config: dict

    MEANS = ("rps", "gain_kept", "gap_closed", "merge_seconds")


# ------------------------------------------------------------------------------------------------ running
class _Perplexity:
    """Perplexity of a state on the first `limits[split]` texts of a domain's split; one module reloaded,
    tokens computed once."""

    def __init__(self, suite, limits, batch_size, device):
        self.suite, self.limits, self.batch_size, self.device = suite, limits, batch_size, device
        self.tokenizer = suite.base.tokenizer
        self.pad = pad_id(self.tokenizer)
        self.module = suite.base.model().to(device)
        self.tokens = {}

    def ids(self, name, split):
        if (name, split) not in self.tokens:
            member = self.suite.members[name]
            self.tokens[name, split] = encode(self.tokenizer, member.domain.split(split, self.limits[split]),
                                              member.max_length)
        return self.tokens[name, split]

    def __call__(self, state, name, split) -> float:
        load_lm_state(self.module, state, f"merged model for {name}")
        nll, n = token_nll(self.module, self.ids(name, split), pad=self.pad, batch_size=self.batch_size,
                           device=self.device)
        return math.exp(nll / n)


class _SubsetRun(TunedRun):
    """The variants of one subset of domains: every weight of the experts merged, scored by RPS."""

    def __init__(self, h, names):
        super().__init__(h, names, h.base_state, {n: h.states[n] for n in names})

    def score(self, state, split):
        return mean(self.h.reference[n][split] / self.h.ppl(state, n, split) for n in self.names)

    def learned_row(self, v):
        from ..methods.divmerge import divmerge
        params = self.learned_params(v)
        h, base = self.h, self.h.suite.base
        loaders = {n: (lambda n=n: base.model(h.states[n]).to(h.device)) for n in self.names}
        data = {n: h.prompts(n) for n in self.names}
        start = time.perf_counter()
        result = divmerge(base.model().to(h.device), loaders, data, kind="causal-lm", progress=False,
                          examples_per_task=h.unlabelled, **params)
        return self.learned_result(params, result, time.perf_counter() - start)


class _Harness:
    def __init__(self, suite, grids, seed, unlabelled, prompt_tokens, limits, batch_size, device):
        self.suite, self.grids, self.seed, self.device = suite, grids, seed, device
        self.unlabelled, self.prompt_tokens = unlabelled, prompt_tokens
        self.ppl = _Perplexity(suite, limits, batch_size, device)
        self.base_state = suite.base.state_dict()
        self.states, self.reference = {}, {}

    def prompts(self, name):
        """The starts of the first `unlabelled` train texts (start token + at most half of each text's tokens,
        at most prompt_tokens, at least one), 1-D int64 tensors."""
        member = self.suite.members[name]
        ids = encode(self.ppl.tokenizer, member.domain.split("train", self.unlabelled), member.max_length)
        return [torch.tensor(t[:1 + max(1, min(self.prompt_tokens, (len(t) - 1) // 2))]) for t in ids]

    def load_member(self, name):
        state = self.suite.members[name].state()
        missing = [k for k in self.base_state if k not in state]
        if missing:
            raise ValueError(f"model for {name} ({self.suite.members[name].source}) lacks the base's key(s) "
                             f"{missing[:3]}")
        self.states[name] = {k: state[k] for k in self.base_state}


def run_lm_evaluation(suite: LMSuite, rows: Sequence[Variant], subset_sizes: Sequence[int] = (2, 3), *,
                      subsets_per_size: int = 3, seed: int = 0, test_limit: int | None = 200,
                      validation_limit: int | None = 100, unlabelled_per_domain: int = DEFAULT_LM_UNLABELLED,
                      prompt_tokens: int = DEFAULT_PROMPT_TOKENS, grids: Mapping | None = None, batch_size: int = 8,
                      device="cpu", on_row=None, checkpoint=None) -> LMEvalResult:
    """Merge and measure every variant on `subsets_per_size` seeded subsets of each size (see the module
    docstring). test_limit / validation_limit: the first N texts of each domain's test / validation split
    (None: all); unlabelled_per_domain, prompt_tokens: DivMerge's prompts; grids: {method: grid} (default
    DEFAULT_LM_GRIDS); on_row(row): called as each subset's rows finish; checkpoint: a file that keeps each
    finished subset's rows, so a run with the same settings resumes (pymerge.eval.resume). Reports:
    pymerge.eval.report."""
    names = list(suite.members)
    sizes = checked_sizes(subset_sizes, names, "domains")
    unknown = [v.method for v in rows
               if v.method in LEARNED and "causal-lm" not in method_spec(v.method).model_kinds]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} does not merge causal LMs")
    grids = DEFAULT_LM_GRIDS if grids is None else grids
    h = _Harness(suite, grids, seed, unlabelled_per_domain, prompt_tokens,
                 {"test": test_limit, "validation": validation_limit}, batch_size, device)
    experts = {}
    for n in names:
        h.load_member(n)
        ref = {s: h.ppl(h.states[n], n, s) for s in ("test", "validation")}
        base_ref = {s: h.ppl(h.base_state, n, s) for s in ("test", "validation")}
        h.reference[n] = {**ref, "base_test": base_ref["test"]}
        test_ids = h.ppl.ids(n, "test")
        experts[n] = {"test_ppl": ref["test"], "validation_ppl": ref["validation"],
                      "base_test_ppl": base_ref["test"], "base_validation_ppl": base_ref["validation"],
                      "test_texts": len(test_ids), "test_tokens": sum(len(t) - 1 for t in test_ids),
                      "source": suite.members[n].source}
        logger.info("LM expert %s: test perplexity %.3f on %d texts (validation %.3f), base %.3f", n, ref["test"],
                    experts[n]["test_texts"], ref["validation"], base_ref["test"])

    def gain(ppl, n):
        span = math.log(h.reference[n]["base_test"]) - math.log(h.reference[n]["test"])
        return (math.log(h.reference[n]["base_test"]) - math.log(ppl)) / span if abs(span) > 1e-12 else float("nan")

    def row(size, subset, variant, method, params, ppl, **kw):
        return LMRow(size, subset, variant, method, params, ppl,
                     mean(h.reference[n]["test"] / ppl[n] for n in subset), mean(gain(ppl[n], n) for n in subset),
                     **kw)

    def subset_run(size, subset):
        """The rows of one subset: expert, base, then each variant, with the gap each closes."""
        run = _SubsetRun(h, subset)
        subset_rows = [row(size, subset, "expert", "expert", {}, {n: h.reference[n]["test"] for n in subset},
                           note="each domain's own fine-tuned model"),
                       row(size, subset, "base", "base", {}, {n: h.reference[n]["base_test"] for n in subset},
                           note="the pretrained model")]
        for v in rows:
            params, merged, seconds, score, tuning = run.row(v)
            ppl = {n: h.ppl(merged, n, "test") for n in subset}
            del merged
            r = row(size, subset, v.label, v.method, params, ppl, merge_seconds=seconds, tune_seconds=tuning,
                    validation_rps=score, note=v.note)
            subset_rows.append(r)
            logger.info("%d domains %s: %s RPS %.4f, gain kept %.4f (merge %.1f s, tuning %.1f s) %s", size,
                        "+".join(subset), v.label, r.rps, r.gain_kept, seconds, tuning,
                        json.dumps(params, default=str))
        ta = next((r.rps for r in subset_rows if r.variant == "task_arithmetic"), float("nan"))
        for r in subset_rows:
            r.gap_closed = (r.rps - ta) / (1 - ta) if abs(1 - ta) > 1e-12 else float("nan")
        return subset_rows

    config = {"suite": "generative", "seed": seed, "subset_sizes": sizes, "subsets_per_size": subsets_per_size,
              "test_limit": test_limit, "validation_limit": validation_limit,
              "unlabelled_per_domain": unlabelled_per_domain, "prompt_tokens": prompt_tokens,
              **grids_and_variants(grids, rows),
              "base": str(suite.base.path), "torch_threads": torch.get_num_threads(), "device": str(device)}
    log = None if checkpoint is None else SubsetLog(checkpoint, run_key(config, experts), LMRow)
    pairs = [(size, subset) for size in sizes for subset in subsets(names, size, subsets_per_size, seed)]
    out = run_subsets(pairs, subset_run, log, on_row)
    return LMEvalResult(out, experts, config)
