"""AdaMerging (Yang et al., ICLR 2024; docs/METHODS.md §AdaMerging): merge coefficients learned by minimising the
entropy of the merged model's predictions on unlabelled test-time batches of each task (task t's head).

    Gamma* = argmin_Gamma sum_t E_{x ~ X_t} [ H( p_{Phi_Gamma}(.|x) ) ],   Phi_Gamma = theta_0 + sum_t Gamma_t tau_t

Official defaults (EnnengYang/AdaMerging): init 0.3, Adam lr 1e-3, 500 steps, batch 16 per task, Gamma clamped
to [0, 1] after every step; task-wise and layer-wise. The baseline DivMerge compares with; the same machinery
(pymerge.learn), the entropy on the fused pymerge.ops kernel. No teacher: the fine-tuned models are only
read for their task vectors and heads.
"""
from dataclasses import replace

from ..learn.objective import Objective
from ..learn.pipeline import learn
from ..ops import entropy
from . import learned_params as lp
from .learned_starts import pop_learned_start
from .spec import LearnedMethodSpec

BATCH_PER_TASK = 16


# The official code's defaults (EnnengYang/AdaMerging, docs/METHODS.md §AdaMerging).
SPEC = LearnedMethodSpec(
    name="adamerging",
    description="AdaMerging (learned): Γ minimising the entropy of θ_0 + Σ_t Γ_t τ_t's predictions (task t's "
                "head) on unlabelled data of each task; sequence classifiers; run by pymerge.adamerging(base, "
                "models, data, ...), on the command line by `pymerge adamerging --help`",
    run="pymerge.adamerging",
    params=(
        lp.GRANULARITY,
        lp.TASK_SPECIFIC_KEYS,
        lp.LAYER_GROUPS,
        replace(lp.INIT, default=0.3, optional=True, help="initial Γ: a number, [T] or [G, T] values; None = 1/T "
                "(unless init is given: Γ starts at 0 with init_from, at CART's λ with start='cart')"),
        replace(lp.LR, default=1e-3),
        lp.LR_SCHEDULE,
        replace(lp.BATCH_SIZE, help=lp.BATCH_SIZE.help.replace("4 * T", f"{BATCH_PER_TASK} * T")),
        replace(lp.EPOCHS, default=1),
        replace(lp.STEPS, default=500, optional=True, help="optimisation steps; None = epochs passes over the data"),
        replace(lp.EXAMPLES_PER_TASK, help=lp.EXAMPLES_PER_TASK.help + " (cycled)"),
        replace(lp.CLAMP, default=(0.0, 1.0), help=lp.CLAMP.help + " (the default with start='cart', whose Γ "
                "starts at CART's λ = 2)"),
        lp.TEMPERATURE,
        *lp.START_PARAMS,
        lp.SEED,
        lp.PROGRESS,
        lp.LOG_EVERY,
        lp.BACKEND,
        lp.GATHER_EMBEDDINGS,
        lp.BATCH_TASKS,
        lp.TASK_NAMES,
        lp.MODEL_FACTORY,
        lp.TOKENIZER,
        lp.TEXT_MAX_LENGTH,
        lp.PAD_VALUE,
    ),
)


class EntropyObjective(Objective):
    """Mean Shannon entropy of softmax(logits / temperature) over the rows of the merged model's logits."""
    needs_teacher = False

    def __init__(self, temperature=1.0, backend="auto"):
        SPEC.check_values(dict(temperature=temperature, backend=backend))
        self.temperature, self.backend = float(temperature), backend

    def loss(self, t, logits, targets):
        return entropy(logits, temperature=self.temperature, backend=self.backend)


def adamerging(base, models, data, *, task_specific_keys=None, granularity="layer", **opts):
    """Learn merge coefficients with AdaMerging; returns a pymerge.learn.LearnedMerge.

    Arguments as pymerge.divmerge's classification kind (base, models, data as unlabelled batches,
    task_specific_keys, granularity "layer" | "task"). No teacher: nothing is generated or cached.
    opts: the options below (SPEC, printed by pymerge.methods.get("adamerging").describe(); the official
    code's defaults, docs/METHODS.md §AdaMerging); steps=None runs `epochs` passes instead of 500 steps.
    """
    o = SPEC.resolve_params(dict(opts, task_specific_keys=task_specific_keys, granularity=granularity))
    objective = EntropyObjective(o.pop("temperature"), o["backend"])
    if o["batch_size"] is None:
        o["batch_size"] = BATCH_PER_TASK * len(models)
    init = o.pop("init")
    if "init" not in opts and (o["init_from"] is not None or o["start"] == "cart"):
        init = None  # start exactly at the static merge (init_from: Gamma = 0; start='cart': CART's lam)
    if "clamp" not in opts and o["start"] == "cart":
        o["clamp"] = None  # CART's lam (2.0) lies outside [0, 1]: unconstrained, as FusionBench's AdaMerging
    start = pop_learned_start(o, "adamerging")
    result = learn(base, models, data, objective, method="adamerging", init=init, start=start, **o)
    result.config.update(temperature=objective.temperature, clamp=str(o["clamp"]))
    return result


if adamerging.__doc__:  # None under python -OO
    adamerging.__doc__ += "\n    " + "\n    ".join(SPEC.describe().splitlines()[1:]) + "\n"
