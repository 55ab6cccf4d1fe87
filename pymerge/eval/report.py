"""Reports of an evaluation (pymerge.eval.harness.EvalResult): a CSV of every row, a markdown page (the
command that produced it above its tables), PNG plots (matplotlib, Agg backend), a console table.

    write_reports(result, "results/", command="pymerge eval ...")  ->  {"csv": path, "markdown": path, ...}

Files (each written to a temporary name and renamed, so none is ever half-written):
  results.csv       one line per (subset, row): size, subset, variant, method, params (JSON), ANP, gap closed,
                    merge / tuning seconds, validation ANP, then acc:<task> per task (empty where the task is
                    not in the subset)
  results.md        the command, the settings, the summary (mean ANP per row and number of tasks, gap closed,
                    merge time), the per-task table at the largest number of tasks, the experts
  anp_vs_tasks.png  mean ANP against the number of tasks, one line per row
  per_task.png      accuracy / expert accuracy per task at the largest number of tasks, one bar per row

The generative suite (pymerge.eval.lm_harness.LMEvalResult, config["suite"] == "generative") writes the same
kinds of files: results.csv (RPS, gain kept, gap closed, seconds, then ppl:<domain>), results.md (the command,
the definitions, the summary, per-domain perplexity at the largest number of domains, the experts and the
base), rps_vs_domains.png and per_domain.png (expert perplexity / merged perplexity per domain).
"""
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

CSV_FILE, MARKDOWN_FILE, ANP_PLOT, PER_TASK_PLOT = "results.csv", "results.md", "anp_vs_tasks.png", "per_task.png"
RPS_PLOT, PER_DOMAIN_PLOT = "rps_vs_domains.png", "per_domain.png"


def _atomic_write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _num(x, digits=4):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def task_names(result):
    return list(result.experts)


def csv_text(result) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    tasks = task_names(result)
    w.writerow(["size", "subset", "variant", "method", "params", "anp", "gap_closed", "merge_seconds",
                "tune_seconds", "validation_anp", *(f"acc:{t}" for t in tasks)])
    for r in result.rows:
        w.writerow([r.size, "+".join(r.subset), r.variant, r.method, json.dumps(r.params, sort_keys=True, default=str),
                    _num(r.anp, 6), _num(r.gap_closed, 6), _num(r.merge_seconds, 3), _num(r.tune_seconds, 3),
                    _num(r.validation_anp, 6), *(_num(r.accuracy.get(t), 6) for t in tasks)])
    return out.getvalue()


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def per_task_means(result, size):
    """{variant: ({task: mean accuracy over the subsets of `size` holding it}, mean ANP, mean merge seconds)}."""
    out = {}
    for v in result.variants():
        rows = [r for r in result.rows if r.variant == v and r.size == size]
        if not rows:
            continue
        acc = {}
        for t in task_names(result):
            values = [r.accuracy[t] for r in rows if t in r.accuracy]
            if values:
                acc[t] = sum(values) / len(values)
        out[v] = (acc, sum(r.anp for r in rows) / len(rows), sum(r.merge_seconds for r in rows) / len(rows))
    return out


def console_table(result, size=None) -> str:
    """Plain-text table: per-task test accuracy (%) at `size` tasks (default the largest), ANP, merge time."""
    size = size or max(result.sizes())
    means = per_task_means(result, size)
    tasks = [t for t in task_names(result) if any(t in acc for acc, _, _ in means.values())]
    width = max(len(v) for v in means) + 2
    cols = [t[:14] for t in tasks]
    head = f"{'method':<{width}}" + "".join(f"{c:>15}" for c in cols) + f"{'ANP %':>9}{'merge s':>9}"
    lines = [head, "-" * len(head)]
    for v, (acc, anp, seconds) in means.items():
        cells = "".join(f"{100 * acc[t]:>15.1f}" if t in acc else f"{'':>15}" for t in tasks)
        time_cell = f"{seconds:>9.2f}" if v not in ("expert", "pretrained") else f"{'':>9}"
        lines.append(f"{v:<{width}}{cells}{100 * anp:>9.1f}{time_cell}")
    return "\n".join(lines)


def markdown(result, command: str | None = None) -> str:
    sizes = result.sizes()
    summary = result.summary()
    cfg = result.config
    parts = ["# Merged-model accuracy", ""]
    if command:
        parts += ["```", f"$ {command}", "```", ""]
    parts += [f"Seed {cfg['seed']}; up to {cfg['subsets_per_size']} task subsets per size; test examples per task: "
              f"{cfg['test_limit'] or 'all'}; validation examples per task (tuning): "
              f"{cfg['validation_limit'] or 'all'}; unlabelled train texts per task (learned methods): "
              f"{cfg['unlabelled_per_task']}.",
              "Validation grids: " + "; ".join(f"{m}: " + ", ".join(f"{p} ∈ {{{', '.join(map(str, vs))}}}"
                                                                     for p, vs in g.items())
                                               for m, g in cfg["grids"].items() if g) + ".",
              "ANP = mean over tasks of accuracy(merged) / accuracy(expert); gap closed = (ANP − ANP_TA) / "
              "(1 − ANP_TA), TA = task arithmetic at its tuned λ. Heads are never merged.", ""]
    header = ["row", *(f"ANP % ({s} tasks)" for s in sizes), f"gap closed % ({sizes[-1]})",
              f"merge s ({sizes[-1]})", "note"]
    notes = {r.variant: r.note for r in result.rows}
    rows = []
    for v in result.variants():
        last = summary.get((v, sizes[-1]), {})
        rows.append([v, *(_pct(summary.get((v, s), {}).get("anp")) for s in sizes),
                     _pct(last.get("gap_closed")) if v != "expert" else "",
                     _num(last.get("merge_seconds"), 2) if v not in ("expert", "pretrained") else "",
                     notes.get(v, "")])
    parts += ["## Summary (means over subsets)", "", _table(header, rows), ""]
    means = per_task_means(result, sizes[-1])
    tasks = [t for t in task_names(result) if any(t in acc for acc, _, _ in means.values())]
    parts += [f"## Per task at {sizes[-1]} tasks (test accuracy %)", "",
              _table(["row", *tasks, "ANP %", "merge s"],
                     [[v, *(_pct(acc.get(t)) for t in tasks), _pct(anp),
                       _num(sec, 2) if v not in ("expert", "pretrained") else ""]
                      for v, (acc, anp, sec) in means.items()]), ""]
    chosen = [r for r in result.rows if r.size == sizes[-1] and r.params]
    if chosen:
        parts += [f"## Parameters used at {sizes[-1]} tasks", "",
                  _table(["subset", "row", "params", "validation ANP %"],
                         [["+".join(r.subset), r.variant, "`" + json.dumps(r.params, sort_keys=True, default=str)
                           + "`", _pct(r.validation_anp)] for r in chosen]), ""]
    parts += ["## Experts", "", _table(["task", "test acc %", "validation acc %", "pretrained body + head %",
                                        "test examples", "model"],
                                       [[t, _pct(e["test"]), _pct(e["validation"]), _pct(e["pretrained_test"]),
                                         e.get("test_examples", ""), f"`{e['source']}`"]
                                        for t, e in result.experts.items()]), ""]
    return "\n".join(parts)


def _pct(x):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def anp_plot(result) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    summary = result.summary()
    sizes = result.sizes()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in result.variants():
        if v == "expert":
            continue
        xs = [s for s in sizes if (v, s) in summary]
        ax.plot(xs, [100 * summary[v, s]["anp"] for s in xs], marker="o", label=v,
                linestyle="--" if v == "pretrained" else "-")
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("ANP % (accuracy / expert accuracy)")
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Merged model vs experts")
    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def per_task_plot(result) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    size = result.sizes()[-1]
    means = {v: m for v, m in per_task_means(result, size).items() if v != "expert"}
    tasks = [t for t in task_names(result) if any(t in acc for acc, _, _ in means.values())]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(tasks)), 4.5))
    width = 0.8 / max(1, len(means))
    for i, (v, (acc, _, _)) in enumerate(means.items()):
        ax.bar([j + i * width for j in range(len(tasks))],
               [100 * acc.get(t, float("nan")) / result.experts[t]["test"] for t in tasks], width, label=v)
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20)
    ax.set_ylabel("accuracy / expert accuracy %")
    ax.set_title(f"Per task, {size} tasks merged")
    ax.legend(fontsize=7, ncol=2)
    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def is_generative(result) -> bool:
    """Whether `result` is the generative suite's (lm_harness.LMEvalResult)."""
    return result.config.get("suite") == "generative"


def write_reports(result, out_dir, command: str | None = None, plots: bool = True) -> dict:
    """Write results.csv, results.md and (plots) the two PNGs into out_dir; {kind: path}. Either suite's
    result (harness.EvalResult or lm_harness.LMEvalResult)."""
    if is_generative(result):
        return write_lm_reports(result, out_dir, command, plots)
    out = Path(out_dir)
    paths = {"csv": out / CSV_FILE, "markdown": out / MARKDOWN_FILE}
    _atomic_write(paths["csv"], csv_text(result).encode("utf-8"))
    _atomic_write(paths["markdown"], markdown(result, command).encode("utf-8"))
    if plots:
        paths["anp_plot"], paths["per_task_plot"] = out / ANP_PLOT, out / PER_TASK_PLOT
        _atomic_write(paths["anp_plot"], anp_plot(result))
        _atomic_write(paths["per_task_plot"], per_task_plot(result))
    return paths


# --------------------------------------------------------------------------- generative suite (lm_harness)
def lm_csv_text(result) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    domains = task_names(result)
    w.writerow(["size", "subset", "variant", "method", "params", "rps", "gain_kept", "gap_closed", "merge_seconds",
                "tune_seconds", "validation_rps", *(f"ppl:{d}" for d in domains)])
    for r in result.rows:
        w.writerow([r.size, "+".join(r.subset), r.variant, r.method,
                    json.dumps(r.params, sort_keys=True, default=str), _num(r.rps, 6), _num(r.gain_kept, 6),
                    _num(r.gap_closed, 6), _num(r.merge_seconds, 3), _num(r.tune_seconds, 3),
                    _num(r.validation_rps, 6),
                    *(_num(r.perplexity.get(d), 6) for d in domains)])
    return out.getvalue()


def lm_per_domain_means(result, size):
    """{variant: ({domain: mean perplexity over the subsets of `size` holding it}, mean RPS, mean gain kept,
    mean merge seconds)}."""
    out = {}
    for v in result.variants():
        rows = [r for r in result.rows if r.variant == v and r.size == size]
        if not rows:
            continue
        ppl = {}
        for d in task_names(result):
            values = [r.perplexity[d] for r in rows if d in r.perplexity]
            if values:
                ppl[d] = sum(values) / len(values)
        out[v] = (ppl, sum(r.rps for r in rows) / len(rows), sum(r.gain_kept for r in rows) / len(rows),
                  sum(r.merge_seconds for r in rows) / len(rows))
    return out


def lm_console_table(result, size=None) -> str:
    """Plain-text table: per-domain test perplexity at `size` domains (default the largest), RPS, gain kept,
    merge time."""
    size = size or max(result.sizes())
    means = lm_per_domain_means(result, size)
    domains = [d for d in task_names(result) if any(d in m[0] for m in means.values())]
    width = max(len(v) for v in means) + 2
    head = (f"{'method':<{width}}" + "".join(f"{d[:14]:>15}" for d in domains)
            + f"{'RPS':>8}{'gain':>8}{'merge s':>9}")
    lines = [head, "-" * len(head)]
    for v, (ppl, rps, gain, seconds) in means.items():
        cells = "".join(f"{ppl[d]:>15.3f}" if d in ppl else f"{'':>15}" for d in domains)
        time_cell = f"{seconds:>9.2f}" if v not in ("expert", "base") else f"{'':>9}"
        lines.append(f"{v:<{width}}{cells}{rps:>8.4f}{_num(gain, 3):>8}{time_cell}")
    return "\n".join(lines)


def lm_markdown(result, command: str | None = None) -> str:
    sizes = result.sizes()
    summary = result.summary()
    cfg = result.config
    parts = ["# Merged causal LMs: held-out perplexity per domain", ""]
    if command:
        parts += ["```", f"$ {command}", "```", ""]
    parts += [f"Base `{cfg['base']}`. Seed {cfg['seed']}; up to {cfg['subsets_per_size']} domain subsets per "
              f"size; test texts per domain: {cfg['test_limit'] or 'all'}; validation texts per domain (tuning): "
              f"{cfg['validation_limit'] or 'all'}; DivMerge prompts: the start of {cfg['unlabelled_per_domain']} "
              f"train texts per domain (at most {cfg['prompt_tokens']} tokens, at most half of each text).",
              "Validation grids: " + "; ".join(f"{m}: " + ", ".join(f"{p} ∈ {{{', '.join(map(str, vs))}}}"
                                                                     for p, vs in g.items())
                                               for m, g in cfg["grids"].items() if g) + ".",
              "Perplexity = exp(next-token NLL per token) over a domain's test texts (each: start token, text, eos "
              "when it fits). RPS = mean over domains of ppl(expert) / ppl(merged) (1 = the experts' own "
              "perplexity); gain kept = mean over domains of (ln ppl(base) − ln ppl(merged)) / (ln ppl(base) − "
              "ln ppl(expert)); gap closed = (RPS − RPS_TA) / (1 − RPS_TA), TA = task arithmetic at its tuned "
              "λ. Every weight is merged.", ""]
    header = ["row", *(f"RPS ({s} domains)" for s in sizes), f"gain kept ({sizes[-1]})",
              f"gap closed % ({sizes[-1]})", f"merge s ({sizes[-1]})", "note"]
    notes = {r.variant: r.note for r in result.rows}
    rows = []
    for v in result.variants():
        last = summary.get((v, sizes[-1]), {})
        rows.append([v, *(_num(summary.get((v, s), {}).get("rps")) for s in sizes), _num(last.get("gain_kept"), 3),
                     _pct(last.get("gap_closed")) if v != "expert" else "",
                     _num(last.get("merge_seconds"), 2) if v not in ("expert", "base") else "", notes.get(v, "")])
    parts += ["## Summary (means over subsets)", "", _table(header, rows), ""]
    means = lm_per_domain_means(result, sizes[-1])
    domains = [d for d in task_names(result) if any(d in m[0] for m in means.values())]
    parts += [f"## Per domain at {sizes[-1]} domains (test perplexity)", "",
              _table(["row", *domains, "RPS", "gain kept", "merge s"],
                     [[v, *(_num(ppl.get(d), 3) for d in domains), _num(rps), _num(gain, 3),
                       _num(sec, 2) if v not in ("expert", "base") else ""]
                      for v, (ppl, rps, gain, sec) in means.items()]), ""]
    chosen = [r for r in result.rows if r.size == sizes[-1] and r.params]
    if chosen:
        parts += [f"## Parameters used at {sizes[-1]} domains", "",
                  _table(["subset", "row", "params", "validation RPS"],
                         [["+".join(r.subset), r.variant, "`" + json.dumps(r.params, sort_keys=True, default=str)
                           + "`", _num(r.validation_rps)] for r in chosen]), ""]
    parts += ["## Experts", "", _table(["domain", "test ppl", "validation ppl", "base test ppl",
                                        "base validation ppl", "test texts", "test tokens", "model"],
                                       [[d, _num(e["test_ppl"], 3), _num(e["validation_ppl"], 3),
                                         _num(e["base_test_ppl"], 3), _num(e["base_validation_ppl"], 3),
                                         e["test_texts"], e["test_tokens"], f"`{e['source']}`"]
                                        for d, e in result.experts.items()]), ""]
    return "\n".join(parts)


def lm_rps_plot(result) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    summary = result.summary()
    sizes = result.sizes()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in result.variants():
        if v == "expert":
            continue
        xs = [s for s in sizes if (v, s) in summary]
        ax.plot(xs, [summary[v, s]["rps"] for s in xs], marker="o", label=v,
                linestyle="--" if v == "base" else "-")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xlabel("number of domains merged")
    ax.set_ylabel("RPS (expert perplexity / merged perplexity)")
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Merged causal LM vs experts")
    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def lm_per_domain_plot(result) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    size = result.sizes()[-1]
    means = {v: m for v, m in lm_per_domain_means(result, size).items() if v != "expert"}
    domains = [d for d in task_names(result) if any(d in m[0] for m in means.values())]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(domains)), 4.5))
    width = 0.8 / max(1, len(means))
    for i, (v, (ppl, _, _, _)) in enumerate(means.items()):
        ax.bar([j + i * width for j in range(len(domains))],
               [result.experts[d]["test_ppl"] / ppl[d] if d in ppl else float("nan") for d in domains], width,
               label=v)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))])
    ax.set_xticklabels(domains, rotation=20)
    ax.set_ylabel("expert perplexity / merged perplexity")
    ax.set_title(f"Per domain, {size} domains merged")
    ax.legend(fontsize=7, ncol=2)
    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def write_lm_reports(result, out_dir, command: str | None = None, plots: bool = True) -> dict:
    """The generative suite's results.csv, results.md and (plots) rps_vs_domains.png, per_domain.png."""
    out = Path(out_dir)
    paths = {"csv": out / CSV_FILE, "markdown": out / MARKDOWN_FILE}
    _atomic_write(paths["csv"], lm_csv_text(result).encode("utf-8"))
    _atomic_write(paths["markdown"], lm_markdown(result, command).encode("utf-8"))
    if plots:
        paths["rps_plot"], paths["per_domain_plot"] = out / RPS_PLOT, out / PER_DOMAIN_PLOT
        _atomic_write(paths["rps_plot"], lm_rps_plot(result))
        _atomic_write(paths["per_domain_plot"], lm_per_domain_plot(result))
    return paths
