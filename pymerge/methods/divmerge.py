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
teachers pymerge.teachers; this file holds the objectives, the model kinds and the paper's defaults.
"""
from collections.abc import Mapping

import torch
from torch import nn

from ..learn.pipeline import learn, method_options
from ..teachers.cache import CachedTargets
from ..teachers.classification import LogProbTeacher
from ..teachers.divergence import DIVERGENCES, dense_divergence, sequence_divergence
from ..teachers.generative import generative_targets, prompt_list
from .learned_starts import pop_learned_start

KINDS = ("auto", "classification", "causal-lm")

# Paper Table 9 (docs/METHODS.md §DivMerge): Adam lr 1e-2, batch 4 x T mixed across tasks, 4 epochs, 200 (task
# level) / 400 (layer level) unlabelled examples per task, init 1/T, temperature 1. Options of both kinds.
DEFAULTS = dict(lr=1e-2, batch_size=None, epochs=4, steps=None, examples_per_task=None, init=None,
                layer_groups=None, start="pretrained", cart_rank_ratio=None, cart_keys=None, cart_svd="exact",
                init_from=None, init_from_params=None, temperature=1.0, beta=0.5, seed=0, progress=True,
                backend="auto", teacher_batch_size=32, pad_value=0, teacher_cache=True, cache_dir=None,
                gather_embeddings=True, batch_tasks=True, task_names=None)
EXAMPLES_PER_TASK = {"task": 200, "layer": 400}
# Options of the classification kind only (the causal-LM kind batches and pads its teachers itself).
CLASSIFICATION_ONLY = ("teacher_batch_size", "pad_value")
# Generation and teacher-cache options of the causal-LM kind (GenerativeObjective's).
CAUSAL_LM_DEFAULTS = dict(max_new_tokens=32, top_k=64, eos_token_id="auto", pad_token_id=None,
                          generation_batch_size=8, tokenizer=None, use_generate=None)


class DivergenceObjective(LogProbTeacher):
    """D(teacher || merged) per row of the logits' last dim, averaged over rows (examples, or tokens); the
    teacher is fine-tuned model t's log-probabilities at the temperature (LogProbTeacher), cached."""

    def __init__(self, divergence="js", temperature=1.0, beta=0.5, backend="auto"):
        if divergence not in DIVERGENCES:
            raise ValueError(f"divmerge: divergence = {divergence!r}; expected one of {DIVERGENCES}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"divmerge: temperature = {temperature} must be a positive number")
        if divergence == "js" and not 0.0 < beta < 1.0:
            raise ValueError(f"divmerge: beta = {beta} must lie in (0, 1)")
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
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1:
            raise ValueError(f"divmerge: max_new_tokens = {max_new_tokens} must be >= 1")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"divmerge: top_k = {top_k} must be >= 1 (or None for the dense teacher)")
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
    models that are modules (loaders are not called), then of the base; "classification" when none tells.
    (The command line reads the same names from config.json files: pymerge.cli.kind_from_configs.)"""
    entries = list(models.values()) if isinstance(models, Mapping) else \
        list(models) if isinstance(models, (list, tuple)) else []
    for m in [*entries, base]:
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
    head. data: per task the unlabelled data (a sequence of T, or {task: iterable} with the models' names).
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

    opts (defaults: docs/METHODS.md §DivMerge, from the paper's Table 9):
      lr=1e-2 (Adam); batch_size=4*T (mixed: batch_size // T examples of every task per step);
      epochs=4, or steps=N (overrides epochs); examples_per_task=200 (task) / 400 (layer): the first N of each
      task's data, or all of it when shorter; init=1/T (scalar, [T] or [G, T]); layer_groups=None;
      temperature=1.0; beta=0.5 (JS weight);
      start="pretrained" | "cart": theta_avg + sum_t Gamma_t lowrank(theta_t - theta_avg), with
        cart_rank_ratio=None (pymerge.methods.cart's default, 0.08), cart_keys=None (regex; default: every 2-D
        merged key except embeddings and what pymerge.methods.cart excludes by default: heads, poolers),
        cart_svd="exact" | "randomized";
      init_from=None: a static method name for pymerge.merge (with init_from_params), a merged state dict, or
        f(base_sd, model_sds, **init_from_params) -> state dict; the starting point, Gamma then starts at 0;
      teacher_cache=True: the teachers are cached on disk (safetensors under cache_dir/teachers, default
        $PYMERGE_CACHE or ~/.cache/pymerge; keyed by model fingerprint + data hash + settings), so a rerun
        starts at the optimisation; result.config["teacher_cache_hits"] counts the tasks read from it;
      seed=0; progress=True (tqdm bar, running loss); backend="auto" (pymerge.ops backend of the divergence);
      gather_embeddings=True, batch_tasks=True (fast paths, verified once against the plain path);
      task_names=None;
      classification only: teacher_batch_size=32; pad_value=0 (right-padding when examples of different
        lengths share a batch; a dict maps input names to pad values);
      causal-lm only: max_new_tokens=32, top_k=64 (teacher top-k log-probs + tail mass; None: dense; see
        pymerge.ops.topk_divergence for the approximation and its bound), eos_token_id="auto",
        pad_token_id=None, generation_batch_size=8, tokenizer=None, use_generate=None.
    The fine-tuned models run once (or not at all on a cache hit); only theta_0, the task vectors, the heads
    and the cached teacher outputs stay in memory during the optimisation.
    """
    if kind not in KINDS:
        raise ValueError(f"divmerge: kind = {kind!r}; expected one of {KINDS}")
    if kind == "auto":
        kind = infer_kind(base, models)
    if kind == "causal-lm":
        defaults = {k: v for k, v in DEFAULTS.items() if k not in CLASSIFICATION_ONLY}
        defaults.update(CAUSAL_LM_DEFAULTS)
    else:
        defaults = DEFAULTS
    o = method_options(f"divmerge ({kind})", defaults, opts, granularity)
    if kind == "causal-lm":
        generation = {k: o.pop(k) for k in CAUSAL_LM_DEFAULTS}
        objective = GenerativeObjective(divergence, o.pop("temperature"), o.pop("beta"), o["backend"], **generation)
    else:
        generation = {}
        objective = DivergenceObjective(divergence, o.pop("temperature"), o.pop("beta"), o["backend"])
    if o["examples_per_task"] is None:
        o["examples_per_task"] = EXAMPLES_PER_TASK[granularity]
    start = pop_learned_start(o, "divmerge")
    result = learn(base, models, data, objective, method="divmerge", task_specific_keys=task_specific_keys,
                   granularity=granularity, start=start, **o)
    result.config.update(kind=kind, divergence=divergence, temperature=objective.temperature, beta=objective.beta)
    result.config.update({k: generation[k] for k in ("max_new_tokens", "top_k") if k in generation})
    return result
