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
from typing import Mapping

CSV_FILE, MARKDOWN_FILE, ANP_PLOT, PER_TASK_PLOT = "results.csv", "results.md", "anp_vs_tasks.png", "per_task.png"
RPS_PLOT, PER_DOMAIN_PLOT = "rps_vs_domains.png", "per_domain.png"


def atomic_write(path: Path, data: bytes):
    """Write data to a temporary sibling and rename it into place: a reader sees the old file or the new one."""
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


def _variant_means(result, size, per_name, fields):
    """{variant: ({name: mean of row.<per_name>[name] over the subsets of `size` holding it}, then the mean of
    each row.<field> in `fields`)}: the per-task (per-domain) table of either suite."""
    out = {}
    for v in result.variants():
        rows = [r for r in result.rows if r.variant == v and r.size == size]
        if not rows:
            continue
        means = {}
        for t in task_names(result):
            values = [getattr(r, per_name)[t] for r in rows if t in getattr(r, per_name)]
            if values:
                means[t] = sum(values) / len(values)
        out[v] = (means, *(sum(getattr(r, f) for r in rows) / len(rows) for f in fields))
    return out


def _covered(result, means):
    """The tasks (domains) that some row of `means` measured, in the result's order."""
    return [t for t in task_names(result) if any(t in m[0] for m in means.values())]


def per_task_means(result, size):
    """{variant: ({task: mean accuracy over the subsets of `size` holding it}, mean ANP, mean merge seconds)}."""
    return _variant_means(result, size, "accuracy", ("anp", "merge_seconds"))


def console_table(result, size=None) -> str:
    """Plain-text table: per-task test accuracy (%) at `size` tasks (default the largest), ANP, merge time."""
    size = size or max(result.sizes())
    means = per_task_means(result, size)
    tasks = _covered(result, means)
    return _console(means, tasks, f"{'ANP %':>9}", lambda x: f"{100 * x:>15.1f}",
                    lambda anp: f"{100 * anp:>9.1f}", ("expert", "pretrained"))


def _console(means, names, tail_head, cell, tail, unmerged):
    """The console table of either suite: a row per variant of `means` (per-name values, the summary values,
    merge seconds last), one column per name (cell(value), blank where not measured), tail(*summaries) after
    them, then the merge time (blank for the unmerged reference rows)."""
    width = max(len(v) for v in means) + 2
    head = f"{'method':<{width}}" + "".join(f"{n[:14]:>15}" for n in names) + tail_head + f"{'merge s':>9}"
    lines = [head, "-" * len(head)]
    for v, (values, *summaries, seconds) in means.items():
        cells = "".join(cell(values[n]) if n in values else f"{'':>15}" for n in names)
        time_cell = f"{seconds:>9.2f}" if v not in unmerged else f"{'':>9}"
        lines.append(f"{v:<{width}}{cells}{tail(*summaries)}{time_cell}")
    return "\n".join(lines)


def markdown(result, command: str | None = None) -> str:
    sizes = result.sizes()
    summary = result.summary()
    cfg = result.config
    parts = _title(["# Merged-model accuracy", ""], command)
    parts += [f"Seed {cfg['seed']}; up to {cfg['subsets_per_size']} task subsets per size; test examples per task: "
              f"{cfg['test_limit'] or 'all'}; validation examples per task (tuning): "
              f"{cfg['validation_limit'] or 'all'}; unlabelled train texts per task (learned methods): "
              f"{cfg['unlabelled_per_task']}.",
              _grids_sentence(cfg["grids"]),
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
    tasks = _covered(result, means)
    parts += [f"## Per task at {sizes[-1]} tasks (test accuracy %)", "",
              _table(["row", *tasks, "ANP %", "merge s"],
                     [[v, *(_pct(acc.get(t)) for t in tasks), _pct(anp),
                       _num(sec, 2) if v not in ("expert", "pretrained") else ""]
                      for v, (acc, anp, sec) in means.items()]), ""]
    parts += _parameters(result, sizes[-1], "tasks", "validation ANP %", lambda r: _pct(r.validation_anp))
    parts += ["## Experts", "", _table(["task", "test acc %", "validation acc %", "pretrained body + head %",
                                        "test examples", "model"],
                                       [[t, _pct(e["test"]), _pct(e["validation"]), _pct(e["pretrained_test"]),
                                         e.get("test_examples", ""), f"`{e['source']}`"]
                                        for t, e in result.experts.items()]), ""]
    return "\n".join(parts)


def _title(parts, command):
    """The page's title lines, then the command that produced it (a shell block) when given."""
    return parts + (["```", f"$ {command}", "```", ""] if command else [])


def _grids_sentence(grids):
    """"Validation grids: method: p ∈ {values}, ...; ..." over the methods with a non-empty grid."""
    return "Validation grids: " + "; ".join(f"{m}: " + ", ".join(f"{p} ∈ {{{', '.join(map(str, vs))}}}"
                                                               for p, vs in g.items())
                                         for m, g in grids.items() if g) + "."


def _parameters(result, size, what, score_head, score):
    """The "Parameters used" section: each row at `size` tasks (domains) with parameters, and score(row)."""
    chosen = [r for r in result.rows if r.size == size and r.params]
    if not chosen:
        return []
    return [f"## Parameters used at {size} {what}", "",
            _table(["subset", "row", "params", score_head],
                   [["+".join(r.subset), r.variant, "`" + json.dumps(r.params, sort_keys=True, default=str) + "`",
                     score(r)] for r in chosen]), ""]


def _pct(x):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _colors(plt, n):
    """n distinct colours (the default cycle has 10: an 11th row would repeat the first row's colour)."""
    palette = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
    return [palette[i % len(palette)] for i in range(n)]


def _outside_legend(ax):
    """The legend right of the axes, where it hides no line or bar (savefig's tight box keeps it)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def _size_plot(result, value, unmerged, one, xlabel, ylabel, title) -> bytes:
    """A line per row but the experts: value(summary entry) against the number of tasks (domains) merged,
    dashed for the `unmerged` reference row; a black line at `one` (the experts' level) when given."""
    plt = _pyplot()
    summary = result.summary()
    sizes = result.sizes()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [v for v in result.variants() if v != "expert"]
    for v, color in zip(rows, _colors(plt, len(rows))):
        xs = [s for s in sizes if (v, s) in summary]
        ax.plot(xs, [value(summary[v, s]) for s in xs], marker="o", label=v, color=color,
                linestyle="--" if v == unmerged else "-")
    if one is not None:
        ax.axhline(one, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    ax.set_title(title)
    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def _per_name_plot(means, names, ratio, one, ylabel, title) -> bytes:
    """Grouped bars: ratio(row's per-name means, name) per task (domain), one bar per row of `means`; a black
    line at `one` (the experts' level)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(names)), 4.5))
    width = 0.8 / max(1, len(means))
    for i, ((v, m), color) in enumerate(zip(means.items(), _colors(plt, len(means)))):
        ax.bar([j + i * width for j in range(len(names))], [ratio(m[0], n) for n in names], width, label=v,
               color=color)
    ax.axhline(one, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _outside_legend(ax)
    data = _figure_bytes(fig)
    plt.close(fig)
    return data


def anp_plot(result) -> bytes:
    return _size_plot(result, lambda e: 100 * e["anp"], "pretrained", None, "number of tasks merged",
                      "ANP % (accuracy / expert accuracy)", "Merged model vs experts")


def per_task_plot(result) -> bytes:
    size = result.sizes()[-1]
    means = {v: m for v, m in per_task_means(result, size).items() if v != "expert"}
    return _per_name_plot(means, _covered(result, means),
                          lambda acc, t: 100 * acc.get(t, float("nan")) / result.experts[t]["test"], 100,
                          "accuracy / expert accuracy %", f"Per task, {size} tasks merged")


def is_generative(result) -> bool:
    """Whether `result` is the generative suite's (lm_harness.LMEvalResult)."""
    return result.config.get("suite") == "generative"


def write_reports(result, out_dir, command: str | None = None, plots: bool = True) -> dict:
    """Write results.csv, results.md and (plots) the two PNGs into out_dir; {kind: path}. Either suite's
    result (harness.EvalResult or lm_harness.LMEvalResult)."""
    if is_generative(result):
        return write_lm_reports(result, out_dir, command, plots)
    return _write_files(Path(out_dir), csv_text(result), markdown(result, command),
                        {"anp_plot": (ANP_PLOT, anp_plot), "per_task_plot": (PER_TASK_PLOT, per_task_plot)}
                        if plots else {}, result)


def _write_files(out: Path, csv_body: str, markdown_body: str, plots: Mapping, result) -> dict:
    """results.csv, results.md, then each {kind: (file name, plot(result) -> PNG bytes)}; {kind: path}."""
    paths = {"csv": out / CSV_FILE, "markdown": out / MARKDOWN_FILE}
    atomic_write(paths["csv"], csv_body.encode("utf-8"))
    atomic_write(paths["markdown"], markdown_body.encode("utf-8"))
    for kind, (name, plot) in plots.items():
        paths[kind] = out / name
        atomic_write(paths[kind], plot(result))
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
    return _variant_means(result, size, "perplexity", ("rps", "gain_kept", "merge_seconds"))


def lm_console_table(result, size=None) -> str:
    """Plain-text table: per-domain test perplexity at `size` domains (default the largest), RPS, gain kept,
    merge time."""
    size = size or max(result.sizes())
    means = lm_per_domain_means(result, size)
    domains = _covered(result, means)
    return _console(means, domains, f"{'RPS':>8}{'gain':>8}", lambda x: f"{x:>15.3f}",
                    lambda rps, gain: f"{rps:>8.4f}{_num(gain, 3):>8}", ("expert", "base"))


def lm_markdown(result, command: str | None = None) -> str:
    sizes = result.sizes()
    summary = result.summary()
    cfg = result.config
    parts = _title(["# Merged causal LMs: held-out perplexity per domain", ""], command)
    parts += [f"Base `{cfg['base']}`. Seed {cfg['seed']}; up to {cfg['subsets_per_size']} domain subsets per "
              f"size; test texts per domain: {cfg['test_limit'] or 'all'}; validation texts per domain (tuning): "
              f"{cfg['validation_limit'] or 'all'}; DivMerge prompts: the start of {cfg['unlabelled_per_domain']} "
              f"train texts per domain (at most {cfg['prompt_tokens']} tokens, at most half of each text).",
              _grids_sentence(cfg["grids"]),
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
    domains = _covered(result, means)
    parts += [f"## Per domain at {sizes[-1]} domains (test perplexity)", "",
              _table(["row", *domains, "RPS", "gain kept", "merge s"],
                     [[v, *(_num(ppl.get(d), 3) for d in domains), _num(rps), _num(gain, 3),
                       _num(sec, 2) if v not in ("expert", "base") else ""]
                      for v, (ppl, rps, gain, sec) in means.items()]), ""]
    parts += _parameters(result, sizes[-1], "domains", "validation RPS", lambda r: _num(r.validation_rps))
    parts += ["## Experts", "", _table(["domain", "test ppl", "validation ppl", "base test ppl",
                                        "base validation ppl", "test texts", "test tokens", "model"],
                                       [[d, _num(e["test_ppl"], 3), _num(e["validation_ppl"], 3),
                                         _num(e["base_test_ppl"], 3), _num(e["base_validation_ppl"], 3),
                                         e["test_texts"], e["test_tokens"], f"`{e['source']}`"]
                                        for d, e in result.experts.items()]), ""]
    return "\n".join(parts)


def lm_rps_plot(result) -> bytes:
    return _size_plot(result, lambda e: e["rps"], "base", 1, "number of domains merged",
                      "RPS (expert perplexity / merged perplexity)", "Merged causal LM vs experts")


def lm_per_domain_plot(result) -> bytes:
    size = result.sizes()[-1]
    means = {v: m for v, m in lm_per_domain_means(result, size).items() if v != "expert"}
    return _per_name_plot(means, _covered(result, means),
                          lambda ppl, d: result.experts[d]["test_ppl"] / ppl[d] if d in ppl else float("nan"), 1,
                          "expert perplexity / merged perplexity", f"Per domain, {size} domains merged")


def write_lm_reports(result, out_dir, command: str | None = None, plots: bool = True) -> dict:
    """The generative suite's results.csv, results.md and (plots) rps_vs_domains.png, per_domain.png."""
    return _write_files(Path(out_dir), lm_csv_text(result), lm_markdown(result, command),
                        {"rps_plot": (RPS_PLOT, lm_rps_plot), "per_domain_plot": (PER_DOMAIN_PLOT, lm_per_domain_plot)}
                        if plots else {}, result)
