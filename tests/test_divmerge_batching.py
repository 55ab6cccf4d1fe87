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


# ------------------------------------------------------------------------- examples handed over pre-padded
class MaskedMeanNet(TokenNet):
    """TokenNet averaging over the unmasked tokens only: its outputs do not depend on the padding."""

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        return {"logits": self.head(self.norm(self.body(h)))}


def padded_and_ragged(lengths=(3, 7, 2, 5, 4, 6, 1, 7), width=12, vocab=23, seed=4):
    """The same examples twice: as rows of one batch padded to `width` (a tokenizer's padding=True over a
    longer text that is not among them) and as batches of one, each cut to its own length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(1, vocab, (L,), generator=g)
        mask[i, :L] = 1
    padded = [{"input_ids": ids, "attention_mask": mask}]
    ragged = [{"input_ids": ids[i:i + 1, :L], "attention_mask": mask[i:i + 1, :L]} for i, L in enumerate(lengths)]
    return padded, ragged


def test_trim_padding_drops_only_the_columns_every_row_masks():
    ids = torch.arange(12).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    other = torch.ones(3, 5)          # not [B, L]: kept whole
    got = learn.batching.trim_padding({"input_ids": ids, "attention_mask": mask, "pixels": other, "n": 3})
    assert torch.equal(got["input_ids"], ids[:, :3]) and torch.equal(got["attention_mask"], mask[:, :3])
    assert got["pixels"] is other and got["n"] == 3
    for batch in ({"input_ids": ids, "attention_mask": torch.ones(3, 4, dtype=torch.long)},   # nothing to drop
                  {"input_ids": ids, "attention_mask": torch.zeros(3, 4, dtype=torch.long)},  # every row empty
                  {"input_ids": ids}, ids, (ids, mask)):                                     # no mask
        assert learn.batching.trim_padding(batch) is batch
    # the length teacher_targets sorts by: 1 + the last unmasked position
    assert [learn.batching.real_length({"attention_mask": m}) for m in mask] == [2, 1, 3]
    assert learn.batching.real_length({"attention_mask": torch.zeros(4)}) == 4
    assert learn.batching.real_length({"input_ids": ids[0]}) is None


def prepadded_problem(data):
    torch.manual_seed(0)
    base = MaskedMeanNet().double()
    models = []
    for m in finetunes(base, 2):
        net = MaskedMeanNet(m.head.out_features).double()
        net.load_state_dict(m.state_dict())
        models.append(net)
    examples = [learn.collect_examples(d, f"t{t}") for t, d in enumerate(data)]
    objective = DivergenceObjective("js", backend="reference")
    targets = [None] * 2
    shapes = []

    def on_model(t, module):
        hook = module.register_forward_pre_hook(
            lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        targets[t] = teachers.teacher_targets(module, examples[t], objective, t, batch_size=3)
        hook.remove()
    merged = learn.MergedModel.build(base, models, task_specific_keys=r"^head\.", on_model=on_model)
    merged.verify([ex[:2] for ex in examples])
    tasks = [learn.TaskExamples(f"t{t}", examples[t], targets[t]) for t in range(2)]
    return merged, learn.CoefficientOptimizer(merged, tasks, objective, lr=1e-2, batch_size=8), targets, shapes


def test_prepadded_examples_cost_and_give_what_ragged_ones_do():
    """Rows of a padded batch keep its padding; each forward (teachers and steps) drops the columns that all
    its rows mask, so it runs at its own longest real length, and the teachers, the loss and its gradient
    are those of the same examples handed over cut to their own lengths (float64)."""
    pad0, rag0 = padded_and_ragged()
    pad1, rag1 = padded_and_ragged((5, 2, 2, 8, 3, 1), width=10, seed=5)
    got = {}
    for name, data in (("padded", [pad0, pad1]), ("ragged", [rag0, rag1])):
        merged, opt, targets, shapes = prepadded_problem(data)
        # teachers: chunks of 3 examples of similar real length, each chunk as wide as its longest example
        lengths = [sorted(int(e["attention_mask"].sum()) for e in task.inputs) for task in opt.tasks]
        assert shapes == [(len(ls[i:i + 3]), ls[i:i + 3][-1]) for ls in lengths for i in range(0, len(ls), 3)]
        seen = []
        for mod in (merged.batched, *merged.skeletons):
            mod.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
        g = torch.Generator().manual_seed(3)
        gamma = (0.2 + 0.6 * torch.rand(merged.gamma.shape, generator=g, dtype=torch.float64)).requires_grad_()
        indices = [[0, 2, 6], [1, 2, 5]]
        loss = opt.loss(gamma=gamma, indices=indices)
        (grad,) = torch.autograd.grad(loss, gamma)
        want = sorted(max(int(opt.tasks[t].inputs[i]["attention_mask"].sum()) for i in idx)
                      for t, idx in enumerate(indices))
        assert sorted(seen) == want          # [3, 2]: not the batches' widths 12 and 10
        got[name] = (*(torch.cat(list(ts)) for ts in targets), loss.detach(), grad)
    for a, b in zip(got["padded"], got["ragged"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
