"""DivMerge (Touayouch et al., arXiv 2509.02108; docs/METHODS.md §DivMerge): merge coefficients learned by
minimising the divergence between each fine-tuned model and the merged model on unlabelled data of its task.

    Gamma* = argmin_Gamma sum_t E_{x ~ X_t} [ D( p_{theta_t}(.|x) || p_{Phi_Gamma}(.|x) ) ],
    Phi_Gamma = theta_0 + sum_t Gamma_t tau_t         (Gamma unconstrained, init 1/T)

D = Jensen-Shannon (default; generalised with ``beta``, 0.5 = JS, bounded by log 2) or forward KL
(teacher || merged), both on the fused pymerge.ops kernels with the teacher's log-probabilities cached once
(``teacher_is_logits=False``), in memory and on disk (pymerge.teachers). Two model kinds:
  - classification (DivergenceObjective): the merged body with task t's own head is compared with
    fine-tuned model t on task-t inputs;
  - causal LM (GenerativeObjective): fine-tuned model t greedily continues each prompt x with ŷ, its
    per-token distributions over ŷ are cached (top-k + tail for large vocabularies), and the merged model is
    run teacher-forced on x+ŷ; the token divergence is averaged over ŷ, then over sequences.
The machinery (parameterisation, functional calls, optimiser, result) is pymerge.learn.pipeline.learn, the
teachers pymerge.teachers; this file holds the objectives, the model kinds and the options (SPEC: their
Params, the paper's defaults).
"""
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ..learn.model_sources import architectures, is_model_dir
from ..learn.pipeline import learn
from ..teachers.cache import CachedTargets
from ..teachers.classification import LogProbTeacher
from ..teachers.divergence import DIVERGENCES, dense_divergence, sequence_divergence
from ..teachers.generative import generative_targets, prompt_list
from . import learned_params as lp
from .learned_starts import pop_learned_start
from .params import Param, boolean, int_at_least, integer, number_in, path_like
from .spec import LearnedMethodSpec

KINDS = ("auto", "classification", "causal-lm")
# lr=None / lr_schedule=None: Adam's learning rate on Γ and its schedule per model kind (the paper: 1e-2,
# constant). Classification: 0.5 decayed to 0 by half a cosine won on the validation split of a 3-task set (and of
# the six tasks), and held on a 3-task set the choice never saw and at six tasks over three batch orders
# (docs/RESULTS.md "The learning-rate schedule", benchmarks/divmerge_study.py). Causal LM: 0.2, constant, which
# won the same way among constant rates on classifiers; 0.5 with the cosine kept less of the experts' perplexity
# on the generative suite (RPS 0.865 vs 0.876 at three domains).
DEFAULT_LR = {"classification": 0.5, "causal-lm": 0.2}
DEFAULT_LR_SCHEDULE = {"classification": "cosine", "causal-lm": "constant"}
# examples_per_task=None: paper Table 9's 200 (task level) / 400 (layer level) unlabelled examples per task
EXAMPLES_PER_TASK = {"task": 200, "layer": 400}
# batch_size=None: this many examples per task and step (batch_size = that x T). Classification: 8, not the
# paper's 4: on the six text tasks 4 per step moved the result by 6.6 points over three batch orders, 8 by 0.5,
# and 8 was as good or better on validation and on a task set the choice never saw (docs/RESULTS.md, "At six
# tasks"). Causal LM: the paper's 4 (its setting; no evidence here for another).
BATCH_PER_TASK = {"classification": 8, "causal-lm": 4}
CLASSIFICATION, CAUSAL_LM = ("classification",), ("causal-lm",)


def _eos_token_id(v):
    if v == "auto" or integer(v) is None:
        return None
    if isinstance(v, (list, tuple)) and all(integer(e) is None for e in v):
        return None
    return "must be 'auto', None, an int or a list of ints"


# Paper Table 9 (docs/METHODS.md §DivMerge): batch 4 x T mixed across tasks, 4 epochs, 200 (task level) / 400
# (layer level) unlabelled examples per task, init 1/T, temperature 1; Adam lr 1e-2 constant there, DEFAULT_LR
# with DEFAULT_LR_SCHEDULE and (classification) BATCH_PER_TASK here.
SPEC = LearnedMethodSpec(
    name="divmerge",
    description="DivMerge (learned): Γ minimising the divergence (JS or KL) of θ_0 + Σ_t Γ_t τ_t from each "
                "fine-tuned model on unlabelled data of its task; run by pymerge.divmerge(base, models, data, "
                "...), on the command line by `pymerge divmerge --help`",
    run="pymerge.divmerge",
    model_kinds=("classification", "causal-lm"),
    params=(
        Param("kind", "auto", "model kind: 'classification', 'causal-lm', or 'auto': causal-lm when a fine-tuned "
              "model (else the base) is a Hugging Face causal LM (…ForCausalLM, …LMHeadModel)", type=str,
              choices=KINDS),
        Param("divergence", "js", "'js' (Jensen-Shannon, weighted by beta) or 'kl' (forward, teacher || merged)",
              type=str, choices=DIVERGENCES),
        lp.GRANULARITY,
        lp.TASK_SPECIFIC_KEYS,
        lp.LAYER_GROUPS,
        lp.INIT,
        # not the paper's constant 1e-2: chosen on validation (DEFAULT_LR, DEFAULT_LR_SCHEDULE; docs/RESULTS.md)
        replace(lp.LR, default=None, help=lp.LR.help + "; None = {classification} (classification) / {causal-lm} "
                "(causal LM)".format(**DEFAULT_LR)),
        replace(lp.LR_SCHEDULE, default=None, help=lp.LR_SCHEDULE.help + "; None = {classification!r} "
                "(classification) / {causal-lm!r} (causal LM)".format(**DEFAULT_LR_SCHEDULE)),
        replace(lp.BATCH_SIZE, help=lp.BATCH_SIZE.help.replace(
            "None = 4 * T", "None = {classification} * T (classification) / {causal-lm} * T (causal LM)".format(
                **BATCH_PER_TASK))),
        lp.EPOCHS,
        lp.STEPS,
        replace(lp.EXAMPLES_PER_TASK, help=lp.EXAMPLES_PER_TASK.help.replace(
            "None = all", "None = {task} (task level) / {layer} (layer level)".format(**EXAMPLES_PER_TASK))),
        lp.CLAMP,
        lp.TEMPERATURE,
        Param("beta", 0.5, "JS weight of the teacher, in (0, 1); 0.5 = Jensen-Shannon (bounded by log 2)",
              check=number_in(0, 1, low_open=True, high_open=True)),
        *lp.START_PARAMS,
        lp.SEED,
        lp.PROGRESS,
        lp.LOG_EVERY,
        lp.BACKEND,
        Param("teacher_cache", True, "cache the teachers on disk (safetensors under cache_dir/teachers, keyed by "
              "model fingerprint + data hash + settings), so a rerun starts at the optimisation", type=bool,
              check=boolean),
        Param("cache_dir", None, "teacher cache directory; None = $PYMERGE_CACHE or ~/.cache/pymerge", type=str,
              check=path_like),
        lp.GATHER_EMBEDDINGS,
        lp.BATCH_TASKS,
        lp.TASK_NAMES,
        lp.MODEL_FACTORY,
        lp.TOKENIZER,
        replace(lp.TEXT_MAX_LENGTH, model_kinds=CLASSIFICATION),
        Param("teacher_batch_size", 32, "examples per teacher forward", type=int, check=int_at_least(1),
              model_kinds=CLASSIFICATION),
        replace(lp.PAD_VALUE, model_kinds=CLASSIFICATION),
        Param("max_new_tokens", 32, "teacher continuation length (greedy)", type=int, check=int_at_least(1),
              model_kinds=CAUSAL_LM),
        Param("top_k", 64, "teacher rows cached as top-k log-probs + tail mass (pymerge.ops.topk_divergence "
              "bounds the approximation); 0 or None = dense", type=int, check=int_at_least(0), optional=True,
              model_kinds=CAUSAL_LM),
        Param("eos_token_id", "auto", "token(s) ending a continuation: 'auto' (the model's generation_config / "
              "config), an int or a list; None = never stop early", type=object, check=_eos_token_id, optional=True,
              model_kinds=CAUSAL_LM),
        Param("pad_token_id", None, "pad token of the generation batches; None = the model's pad, else its eos, "
              "else 0", type=int, check=integer, model_kinds=CAUSAL_LM),
        Param("generation_batch_size", 8, "prompts per generation batch", type=int, check=int_at_least(1),
              model_kinds=CAUSAL_LM),
        Param("use_generate", None, "generate with model.generate (True) or a plain greedy loop (False); None = "
              "model.generate when the model has one", type=object, check=boolean, model_kinds=CAUSAL_LM),
    ),
)
# the causal-LM kind's options that configure the teachers' generation (GenerativeObjective's keywords)
GENERATION_OPTIONS = tuple(p.name for p in SPEC.params if p.model_kinds == CAUSAL_LM)


class DivergenceObjective(LogProbTeacher):
    """D(teacher || merged) per row of the logits' last dim, averaged over rows (examples, or tokens); the
    teacher is fine-tuned model t's log-probabilities at the temperature (LogProbTeacher), cached."""

    def __init__(self, divergence="js", temperature=1.0, beta=0.5, backend="auto"):
        SPEC.check_values(dict(divergence=divergence, temperature=temperature, beta=beta, backend=backend))
        super().__init__(temperature)
        self.divergence, self.beta, self.backend = divergence, float(beta), backend

    def loss(self, t, logits, targets):
        if logits.shape != targets.shape:
            raise ValueError(f"divmerge: task {t}: merged logits {tuple(logits.shape)} do not match the fine-tuned "
                             f"model's {tuple(targets.shape)} (mismatched heads?)")
        return dense_divergence(logits, targets, divergence=self.divergence, beta=self.beta,
                                temperature=self.temperature, backend=self.backend)


class GenerativeObjective(DivergenceObjective):
    """DivMerge for causal LMs: mean over sequences of the per-sequence mean token divergence
    D(teacher || merged) over the ŷ positions (docs/METHODS.md §DivMerge, generative).

    examples(): a task's data as prompts (pymerge.teachers.prompt_list: token lists, 1-D tensors, [B, L]
    tensors, {"input_ids", "attention_mask"} batches, or strings with tokenizer=). prepare(): fine-tuned model
    t generates ŷ and its teacher rows are cached (pymerge.teachers.generative_targets, on disk when
    options.cache); the inputs are x+ŷ, {"input_ids": [p+r], "attention_mask": [p+r]}, padded with the
    model's pad token (pad_value). loss() reads the collated targets: target_mask [B, L] (0-padded) and the
    teacher rows [B, R, ...] right-padded to the longest ŷ, of which the first target_mask[b].sum() are real.
    """

    def __init__(self, divergence="js", temperature=1.0, beta=0.5, backend="auto", *, max_new_tokens=32,
                 top_k=64, eos_token_id="auto", pad_token_id=None, generation_batch_size=8, tokenizer=None,
                 use_generate=None, chunk_rows=None):
        super().__init__(divergence, temperature, beta, backend)
        SPEC.check_values(dict(max_new_tokens=max_new_tokens, top_k=top_k, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, generation_batch_size=generation_batch_size,
                               tokenizer=tokenizer, use_generate=use_generate), "causal-lm")
        top_k = None if top_k == 0 else top_k  # 0: the dense teacher, as None
        self.generation = dict(max_new_tokens=int(max_new_tokens), top_k=top_k, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, batch_size=generation_batch_size,
                               use_generate=use_generate)
        self.tokenizer, self.chunk_rows = tokenizer, chunk_rows

    def examples(self, task, source, limit):
        try:
            prompts = prompt_list(source, self.tokenizer)
        except ValueError as e:
            raise ValueError(f"divmerge: data for task {task!r}: {e}") from None
        return prompts[:limit] if limit is not None else prompts

    def prepare(self, t, module, prompts, options):
        tg = generative_targets(module, prompts, temperature=self.temperature, cache=options.cache,
                                cache_dir=options.cache_dir, progress=options.progress, **self.generation)
        if t == 0:  # the first model's pad token pads every task's x+ŷ (masked: its value does not matter)
            self.pad_value = {"input_ids": tg.pad_token_id}
        inputs, targets = tg.examples()
        return inputs, CachedTargets(targets, tg.cache_path, tg.loaded_from_cache)

    def teacher_settings(self):
        return None  # prepare() caches the generated continuations and teacher rows itself

    def loss(self, t, logits, targets):
        mask = targets["target_mask"].bool()
        if logits.dim() == 3 and logits.shape[0] == mask.shape[0] and logits.shape[1] > mask.shape[1]:
            # all tasks ran as one batch (MergedModel.forward_tasks): padded to the longest of any task
            mask = nn.functional.pad(mask, (0, logits.shape[1] - mask.shape[1]))
        if logits.dim() != 3 or logits.shape[:2] != mask.shape:
            raise ValueError(f"divmerge: task {t}: merged logits {tuple(logits.shape)} do not match the batch "
                             f"[B, L] = {tuple(mask.shape)}")
        counts = mask.sum(1)
        fields = [k for k in ("teacher_log_probs", "top_log_probs", "top_indices", "tail_log_mass") if k in targets]
        R = targets[fields[0]].shape[1]
        valid = torch.arange(R, device=mask.device)[None] < counts[:, None]
        teacher = {k: targets[k][valid] for k in fields}   # row-major: example by example, token by token
        seq = sequence_divergence(logits, mask, teacher, divergence=self.divergence, beta=self.beta,
                                  temperature=self.temperature, backend=self.backend, chunk_rows=self.chunk_rows)
        return seq.mean()


def kind_of_architecture(name):
    """"causal-lm" for a Hugging Face causal-LM class name (…ForCausalLM, …LMHeadModel), "classification"
    for …ForSequenceClassification, else None."""
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    return None


def kind_of_architectures(names):
    """The kind of the first of `names` (class names, config.architectures) that tells one, else None."""
    for name in names:
        kind = kind_of_architecture(str(name))
        if kind is not None:
            return kind
    return None


def infer_kind(base, models):
    """The model kind for kind="auto": from the class names and config.architectures of the fine-tuned
    models that are modules or model directories (loaders are not called, state dicts tell nothing), then of
    the base; "classification" when none tells.
    (The command line reads the same names from config.json files: pymerge.cli.kind_from_configs.)"""
    entries = list(models.values()) if isinstance(models, Mapping) else \
        list(models) if isinstance(models, (list, tuple)) else []
    for m in [*entries, base]:
        if is_model_dir(m):      # a Hugging Face directory: its config.json's architectures
            kind = kind_of_architectures(architectures(m))
            if kind is not None:
                return kind
            continue
        if not isinstance(m, nn.Module) or getattr(getattr(m, "config", None), "is_encoder_decoder", False):
            continue
        kind = kind_of_architectures([type(m).__name__,
                                      *(getattr(getattr(m, "config", None), "architectures", None) or [])])
        if kind is not None:
            return kind
    return "classification"


def divmerge(base, models, data, *, task_specific_keys=None, granularity="layer", divergence="js", kind="auto",
             **opts):
    """Learn merge coefficients with DivMerge; returns a pymerge.learn.LearnedMerge.

    base: nn.Module or state dict (theta_0). models: T fine-tuned nn.Modules (a sequence, or {task: module};
    zero-argument loaders are accepted and keep one model in memory at a time), each complete with its own
    head. What a caller holds also works (pymerge.learn.model_sources): the base and the models as local
    Hugging Face model directories (loaded offline, one at a time; a base whose keys lack or carry the models'
    prefix, e.g. a BertModel for BertForSequenceClassification models, is aligned), or as state dicts with
    model_factory=f(state_dict) -> nn.Module; a task's data as a list of texts with tokenizer= (or the
    directories' own tokenizer), each text truncated to text_max_length. data: per task the unlabelled data (a sequence of T, or {task: iterable} with the models' names).
    task_specific_keys: regex of keys not merged, task t uses its own (e.g. r"^classifier\\."); None: every key
    is merged, heads included, so they must agree. granularity: "layer" (one Gamma per task per key, or per
    ``layer_groups`` match) or "task". divergence: "js" or "kl" (forward, teacher || merged).
    kind: "classification", "causal-lm", or "auto": causal-lm when a fine-tuned model (or else the base)
    is a Hugging Face causal LM (class or config.architectures ending in ForCausalLM / LMHeadModel),
    classification otherwise (also when every model is a loader and the base is a state dict).

    classification: data[t] is an iterable of unlabelled batches; a dict batch is passed as model(**batch), a
    tuple as model(*batch), a tensor as model(batch); outputs with .logits use them. The fine-tuned models'
    log-probabilities are the teachers.
    causal-lm: data[t] holds prompts (token lists, 1-D tensors, [B, L] tensors, {"input_ids",
    "attention_mask"} batches, or strings with tokenizer=); each fine-tuned model greedily continues its
    prompts and its per-token distributions over the continuation are the teachers (pymerge.teachers).

    opts: the options below (SPEC, printed by pymerge.methods.get("divmerge").describe(); defaults from the
    paper's Table 9 but the learning rate, its schedule and the classification batch, docs/METHODS.md §DivMerge). The
    teachers are cached on disk unless teacher_cache=False;
    result.config["teacher_cache_hits"] counts the tasks read from the cache.
    The fine-tuned models run once (or not at all on a cache hit); only theta_0, the task vectors, the heads
    and the cached teacher outputs stay in memory during the optimisation.
    """
    SPEC.check_values({"kind": kind})
    if kind == "auto":
        kind = infer_kind(base, models)
    o = SPEC.resolve_params(dict(opts, task_specific_keys=task_specific_keys, granularity=granularity,
                                 divergence=divergence, kind=kind), kind)
    del o["kind"]
    if kind == "causal-lm":
        generation = {k: o.pop(k) for k in GENERATION_OPTIONS}   # the tokenizer goes to learn() (o["tokenizer"])
        objective = GenerativeObjective(o.pop("divergence"), o.pop("temperature"), o.pop("beta"), o["backend"],
                                        **generation)
    else:
        generation = {}
        objective = DivergenceObjective(o.pop("divergence"), o.pop("temperature"), o.pop("beta"), o["backend"])
    # options whose None default depends on the granularity or the model kind
    by_setting = {"examples_per_task": EXAMPLES_PER_TASK[granularity], "batch_size": BATCH_PER_TASK[kind] * len(models),
                  "lr": DEFAULT_LR[kind], "lr_schedule": DEFAULT_LR_SCHEDULE[kind]}
    o.update({k: v for k, v in by_setting.items() if o[k] is None})
    start = pop_learned_start(o, "divmerge")
    result = learn(base, models, data, objective, method="divmerge", start=start, **o)
    result.config.update(kind=kind, divergence=divergence, temperature=objective.temperature, beta=objective.beta)
    if generation:
        result.config.update({k: objective.generation[k] for k in ("max_new_tokens", "top_k")})
    return result


if divmerge.__doc__:  # None under python -OO
    divmerge.__doc__ += "\n    " + "\n    ".join(SPEC.describe().splitlines()[1:]) + "\n"
