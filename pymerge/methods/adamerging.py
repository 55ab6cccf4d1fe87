"""AdaMerging (Yang et al., ICLR 2024; docs/METHODS.md §AdaMerging): merge coefficients learned by minimising the
entropy of the merged model's predictions on unlabelled test-time batches of each task (task t's head).

    Gamma* = argmin_Gamma sum_t E_{x ~ X_t} [ H( p_{Phi_Gamma}(.|x) ) ],   Phi_Gamma = theta_0 + sum_t Gamma_t tau_t

Official defaults (EnnengYang/AdaMerging): init 0.3, Adam lr 1e-3, 500 steps, batch 16 per task, Gamma clamped
to [0, 1] after every step; task-wise and layer-wise. The baseline DivMerge compares with; the same machinery
(pymerge.learn), the entropy on the fused pymerge.ops kernel. No teacher: the fine-tuned models are only
read for their task vectors and heads.
"""
from ..learn.objective import Objective
from ..learn.pipeline import learn, method_options
from ..ops import entropy
from .learned_starts import pop_learned_start

DEFAULTS = dict(lr=1e-3, batch_size=None, steps=500, epochs=1, examples_per_task=None, init=0.3, clamp=(0.0, 1.0),
                layer_groups=None, start="pretrained", cart_rank_ratio=None, cart_keys=None, cart_svd="exact",
                init_from=None, init_from_params=None, temperature=1.0, seed=0, progress=True, backend="auto",
                pad_value=0, gather_embeddings=True, batch_tasks=True, task_names=None)
BATCH_PER_TASK = 16


class EntropyObjective(Objective):
    """Mean Shannon entropy of softmax(logits / temperature) over the rows of the merged model's logits."""
    needs_teacher = False

    def __init__(self, temperature=1.0, backend="auto"):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"adamerging: temperature = {temperature} must be a positive number")
        self.temperature, self.backend = float(temperature), backend

    def loss(self, t, logits, targets):
        return entropy(logits, temperature=self.temperature, backend=self.backend)


def adamerging(base, models, data, *, task_specific_keys=None, granularity="layer", **opts):
    """Learn merge coefficients with AdaMerging; returns a pymerge.learn.LearnedMerge.

    Arguments as pymerge.divmerge's classification kind (base, models, data as unlabelled batches,
    task_specific_keys, granularity "layer" | "task"). No teacher: nothing is generated or cached.
    opts (official defaults): init=0.3, lr=1e-3 (Adam), steps=500 (set steps=None to use epochs instead),
    batch_size=16*T (16 per task per step), clamp=(0.0, 1.0) (None: unconstrained), examples_per_task=None
    (all of each task's data, cycled), temperature=1.0, layer_groups, start, cart_*, init_from (Gamma then
    starts at 0), seed, progress, backend, pad_value, gather_embeddings, task_names as in divmerge.
    """
    o = method_options("adamerging", DEFAULTS, opts, granularity)
    objective = EntropyObjective(o.pop("temperature"), o["backend"])
    if o["batch_size"] is None:
        o["batch_size"] = BATCH_PER_TASK * len(models)
    init = o.pop("init")
    if "init" not in opts and o["init_from"] is not None:
        init = None  # start exactly at the static merge (Gamma = 0)
    start = pop_learned_start(o, "adamerging")
    result = learn(base, models, data, objective, method="adamerging", task_specific_keys=task_specific_keys,
                   granularity=granularity, init=init, start=start, **o)
    result.config.update(temperature=objective.temperature, clamp=str(o["clamp"]))
    return result
