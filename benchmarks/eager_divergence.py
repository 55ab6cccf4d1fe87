"""The torch eager composites the divergence benchmarks measure pymerge against (log_softmax of both sides + the
formula, fp32 compute, autograd backward; reduction "mean"). JS follows Liger-Kernel's TorchJSD composite:
m = lerp(q, p, beta), kl_div terms. Shared by ops_divergence.py and test_bench_divergence.py."""
import torch
import torch.nn.functional as F


def eager_js(z, t, beta=0.5):
    logq = torch.log_softmax(z.float(), dim=-1)
    logp = torch.log_softmax(t.float(), dim=-1)
    logm = torch.lerp(logq.exp(), logp.exp(), beta).log()
    rows = beta * F.kl_div(logm, logp, reduction="none", log_target=True).sum(-1) \
        + (1 - beta) * F.kl_div(logm, logq, reduction="none", log_target=True).sum(-1)
    return rows.mean()


def eager_kl(z, t):
    logq = torch.log_softmax(z.float(), dim=-1)
    logp = torch.log_softmax(t.float(), dim=-1)
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1).mean()


def eager_entropy(z, _t):
    logq = torch.log_softmax(z.float(), dim=-1)
    return -(logq.exp() * logq).sum(-1).mean()
