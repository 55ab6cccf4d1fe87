"""A learned merge's step costs what its tokens cost: each task's examples are padded to that task's own
longest example, never to another task's; tasks of equal length still share one forward (MergedModel.forward_tasks),
and the loss and its gradient are those of one forward per task."""
import pytest
import torch

from pymerge import learn, teachers
from pymerge.methods.divmerge import DivergenceObjective

from test_divmerge import TokenNet, finetunes, one_thread  # noqa: F401 (one_thread: autouse)


def ragged_data(lengths, n=8, vocab=23, seed=1):
    """Per task n examples as batches of 4; task t's examples are lengths[t] tokens long, or, for a pair
    (short, long), half of them short: a task's batch is padded to its own longest example."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for L in lengths:
        Ls = L if isinstance(L, tuple) else (L, L)
        batches = []
        for i in range(n // 4):
            ids = torch.randint(1, vocab, (4, max(Ls)), generator=g)
            mask = torch.ones(4, max(Ls), dtype=torch.long)
            mask[: 2, Ls[0]:] = 0
            ids[mask == 0] = 0
            # one example per list entry, each cut to its own length (ragged inputs, as a tokenizer gives)
            for b in range(4):
                keep = int(mask[b].sum())
                batches.append({"input_ids": ids[b:b + 1, :keep], "attention_mask": mask[b:b + 1, :keep]})
        data.append(batches)
    return data


def build(lengths, batch_tasks=True):
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, len(lengths))
    examples = [learn.collect_examples(d, f"t{t}") for t, d in enumerate(ragged_data(lengths))]
    objective = DivergenceObjective("js", backend="reference")
    targets = [None] * len(lengths)

    def on_model(t, module):
        targets[t] = teachers.teacher_targets(module, examples[t], objective, t)
    merged = learn.MergedModel.build(base, models, task_specific_keys=r"^head\.", batch_tasks=batch_tasks,
                                     on_model=on_model)
    assert merged.verify([ex[:2] for ex in examples])["batched"] == batch_tasks
    tasks = [learn.TaskExamples(f"t{t}", examples[t], targets[t]) for t in range(len(lengths))]
    return merged, learn.CoefficientOptimizer(merged, tasks, objective, lr=1e-2, batch_size=4 * len(lengths))


def test_each_task_is_padded_to_its_own_longest_example():
    lengths = [3, 9, 3, (2, 6)]
    merged, opt = build(lengths)
    shapes = []
    merged.batched.register_forward_pre_hook(lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    for _ in range(4):
        shapes.clear()
        indices = [opt._next_indices(t) for t in range(len(lengths))]
        opt.loss(indices=indices)
        want = 0
        for t, idx in enumerate(indices):           # per task: its examples times its own longest example
            want += len(idx) * max(int(opt.tasks[t].inputs[i]["input_ids"].shape[-1]) for i in idx)
        assert sum(b * L for b, L in shapes) == want
        assert sum(b for b, _ in shapes) == 16 and len(shapes) <= len(lengths)
    # equal lengths share one forward: tasks 0 and 2 (3 tokens) ran together
    shapes.clear()
    opt.loss(indices=[[0, 1, 2, 3], [0], [4, 5], [0]])
    assert (6, 3) in shapes and len(shapes) == 3


@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 9, (2, 6)]], ids=["equal", "ragged"])
def test_loss_and_gradient_are_those_of_one_forward_per_task(lengths):
    got = []
    for batch_tasks in (True, False):
        merged, opt = build(lengths, batch_tasks)
        g = torch.Generator().manual_seed(3)
        gamma = (0.2 + 0.6 * torch.rand(merged.gamma.shape, generator=g, dtype=torch.float64)).requires_grad_()
        loss = opt.loss(gamma=gamma, indices=[[0, 3, 5], [1, 2], [7, 6, 0]])
        (grad,) = torch.autograd.grad(loss, gamma)
        got.append((loss.detach(), grad))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[0][1], got[1][1], rtol=1e-10, atol=1e-13)
