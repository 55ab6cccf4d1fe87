"""`pymerge divmerge` and `pymerge adamerging`: the learned methods over Hugging Face model directories and
JSONL data. Every input is checked before a model is loaded; the output appears complete or not at all."""
import json
import re
import shutil
import tempfile
from pathlib import Path

from .common import (CLIError, add_option_flags, check_device, check_model_dir, check_options, check_writable,
                     load_transformers, parse_pairs, prepare_out, publish, read_config, read_jsonl_texts,
                     torch_dtype)

def _architectures(config):
    """config.json's "architectures": the class names save_pretrained wrote, e.g. ["BertForSequenceClassification"]."""
    archs = config.get("architectures") or []
    return [str(a) for a in archs] if isinstance(archs, list) else [str(archs)]


def kind_from_configs(base, models):
    """(kind, flag of the directory that told it): classification or causal-lm, from the config.json
    architectures of the fine-tuned models (then the base), as pymerge.methods.divmerge.infer_kind reads them
    from modules."""
    from ..methods.divmerge import kind_of_architectures
    for flag, path in [*((f"--model {n}={p}", p) for n, p in models.items()), (f"--base {base}", base)]:
        kind = kind_of_architectures(_architectures(read_config(path)))
        if kind is not None:
            return kind, flag
    raise CLIError("cannot tell the model kind from config.json 'architectures'; pass --kind classification "
                   "or --kind causal-lm")


def _head_class(kind, model_type):
    """The class name AutoModelForSequenceClassification / AutoModelForCausalLM loads for `model_type`, or None."""
    load_transformers()
    from transformers.models.auto import modeling_auto
    names = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if kind == "causal-lm"
             else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    return names.get(model_type)


def check_kind(kind, base, models, source):
    """Raise CLIError unless every fine-tuned model directory holds a `kind` model (its head is the task's
    teacher; loading another class would drop it and initialise the kind's head at random), and, for
    causal-lm, the base too (the LM head is merged). A classification base may be anything: its head is not
    merged. `source` says where `kind` came from, for the message. Reads config.json only."""
    from ..methods.divmerge import kind_of_architecture
    dirs = [(f"--model {n}={p}", p) for n, p in models.items()]
    if kind == "causal-lm":
        dirs.append((f"--base {base}", base))
    for flag, path in dirs:
        config = read_config(path)
        archs = _architectures(config)
        if not archs:
            continue  # nothing to compare: loading tells
        kinds = {kind_of_architecture(a) for a in archs} - {None}
        if kinds and kind not in kinds:
            raise CLIError(f"{flag}: config.json architectures {archs} make it a {kinds.pop()} model, not {kind} "
                           f"({source})")
        if not kinds:
            # an architecture the name does not classify: it must be the class the kind's Auto class loads
            model_type = config.get("model_type")
            expected = _head_class(kind, model_type)
            if expected not in archs:
                have = f"{expected} for model_type {model_type!r}" if expected else \
                    f"model_type {model_type!r} has none in transformers"
                raise CLIError(f"{flag}: config.json architectures {archs} hold no {kind} head ({have}; {source})")



def _load(auto_cls, path, dtype, device, **kw):
    try:
        out = auto_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the message says what is wrong
        raise CLIError(f"cannot load a model from {path}: {type(e).__name__}: {e}") from None
    model, info = out if isinstance(out, tuple) else (out, None)
    return model.to(device).eval(), info


def _tokenizer(tf, base, models):
    errors = []
    for path in [base, *models.values()]:
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{path}: {type(e).__name__}")
            continue
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # padding is masked; any id will do
        return tok, path
    raise CLIError("no tokenizer found in the base or model directories (" + "; ".join(errors) + ")")


def _classification_batches(tok, texts, max_length, batch_size=32):
    return [dict(tok(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def _prompts(tok, texts, max_length):
    return [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]



def _load_merged(module, state_dict, what):
    """module.load_state_dict(state_dict) where state_dict may omit tied aliases (merged once)."""
    import torch
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state_dict]
    present = {own[k].data_ptr() for k in own if k in state_dict and isinstance(own[k], torch.Tensor)}
    untied = [k for k in missing if own[k].data_ptr() not in present]
    if untied:
        raise CLIError(f"{what}: the merge lacks key(s) {untied[:5]} of the model")
    with torch.no_grad():
        result = module.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise CLIError(f"{what}: the merge has key(s) {result.unexpected_keys[:5]} the model lacks")
    return module



def _task_inputs(args, spec, opts, limit, kind, source, teacher_cache):
    """(base, models, data, texts, out, kind, device): the checked command line (the method options `opts`
    by `spec`'s Params), the data files read (first `limit` lines each; None: all), the output directory
    checked, the teacher cache directory checked when `teacher_cache`, the kind ("auto" resolved; `source`
    words where a given one comes from) checked against the models' config.json, the device checked.
    Nothing is loaded yet."""
    models = parse_pairs(args.model, "--model")
    data = parse_pairs(args.data, "--data")
    if not models:
        raise CLIError("give at least one fine-tuned model: --model NAME=DIR")
    no_data = [n for n in models if n not in data]
    if no_data:
        raise CLIError(f"task(s) {no_data} have --model but no --data NAME=FILE.jsonl")
    no_model = [n for n in data if n not in models]
    if no_model:
        raise CLIError(f"task(s) {no_model} have --data but no --model NAME=DIR")
    base = Path(args.base)
    check_model_dir(base, "--base")
    for name, path in models.items():
        check_model_dir(path, f"--model {name}=")
    check_options(spec, opts, args.max_length)
    out = prepare_out(args.out, args.overwrite)
    if teacher_cache:
        from ..teachers.cache import cache_dir
        where = cache_dir(opts.get("cache_dir"))
        check_writable(where, "--cache-dir", where)
    device = check_device(args.device)
    if kind == "auto":
        kind, flag = kind_from_configs(base, models)
        source = f"--kind auto: {kind} from {flag}"
    check_kind(kind, base, models, source)
    texts = {name: read_jsonl_texts(path, limit) for name, path in data.items()}
    return base, models, data, texts, out, kind, device


def given_options(args, spec, kind=None):
    """{name: value} of `spec`'s options given on the command line (the method's defaults hold for the
    others), those of another model kind than `kind` left out; --epochs without --steps counts, also for a
    method whose default is a number of steps."""
    opts = {p.name: getattr(args, p.name) for p in spec.params_for(kind) if hasattr(args, p.name)}
    if "epochs" in opts and "steps" not in opts:
        opts["steps"] = None
    return opts


def _runtime(args, base, models):
    """(transformers, dtype, tokenizer, tokenizer dir)."""
    tf = load_transformers()
    tok, tok_dir = _tokenizer(tf, base, models)
    return tf, torch_dtype(args.dtype), tok, tok_dir


def _loaders(auto, models, dtype, device):
    """{name: zero-argument loader}: the methods read one fine-tuned model at a time."""
    return {n: (lambda p=p: _load(auto, p, dtype, device)[0]) for n, p in models.items()}


def _classification_setup(tf, args, task_specific, base, models, texts, tok, dtype, device):
    """(base model, loaders, batches per task, task-specific keys, pad value) for sequence classifiers;
    task_specific None: the head."""
    auto = tf.AutoModelForSequenceClassification
    num_labels = tf.AutoConfig.from_pretrained(str(next(iter(models.values()))), local_files_only=True).num_labels
    base_model, info = _load(auto, base, dtype, device, num_labels=num_labels, ignore_mismatched_sizes=True,
                             output_loading_info=True)
    if task_specific is None:
        # The head: what the base checkpoint lacks (or holds in another size) for a classifier.
        head = sorted(set(info.get("missing_keys", ())) | {m[0] for m in info.get("mismatched_keys", ())})
        if head:
            task_specific = "^(?:" + "|".join(re.escape(k) for k in head) + ")$"
    batches = {n: _classification_batches(tok, texts[n], args.max_length) for n in models}
    return base_model, _loaders(auto, models, dtype, device), batches, task_specific, \
        {"input_ids": tok.pad_token_id or 0}


def _learn(method, *a, **kw):
    try:
        return method(*a, **kw)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _write_result(result, loaders, tok, out, config):
    """OUT/ (one merged model) or OUT/<task>/ (one per task when heads are task-specific), and
    OUT/<method>.json; written into a temporary sibling directory, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if any(result.heads[n] for n in result.tasks):
            for n in result.tasks:
                module = _load_merged(loaders[n](), result.task_state_dicts[n], f"task {n}")
                module.save_pretrained(str(tmp / n))
                tok.save_pretrained(str(tmp / n))
                del module
        else:
            module = _load_merged(loaders[result.tasks[0]](), result.state_dict, "merged model")
            module.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            del module
        summary = result.to_json()
        summary["config"].update(config)
        with open(tmp / f"{result.method}.json", "w") as f:
            json.dump(summary, f, indent=1)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(result, kind, base, models, data, tok, tok_dir, task_specific, loaders, out):
    _write_result(result, loaders, tok, out, dict(
        kind=kind, base=str(base), models={n: str(p) for n, p in models.items()},
        data={n: str(p) for n, p in data.items()}, tokenizer=str(tok_dir), task_specific_keys=task_specific))
    last = f"{result.losses[-1]:.4g}" if result.losses else "n/a (0 steps)"
    print(f"pymerge {result.method}: {kind}, {len(result.tasks)} tasks, {result.granularity} level, "
          f"{len(result.losses)} steps, final loss {last} -> {out}")
    return 0


def cmd_divmerge(args):
    from ..methods.divmerge import EXAMPLES_PER_TASK, SPEC, divmerge
    opts = given_options(args, SPEC)
    granularity = opts.get("granularity", SPEC.param("granularity").default)
    limit = opts["examples_per_task"] if "examples_per_task" in opts else EXAMPLES_PER_TASK[granularity]
    given_kind = opts.get("kind", SPEC.param("kind").default)
    base, models, data, texts, out, kind, device = _task_inputs(
        args, SPEC, opts, limit, given_kind, f"--kind {given_kind}", opts.get("teacher_cache", True))
    opts = given_options(args, SPEC, kind)  # the other kind's options (given to a kind="auto" run) do not apply
    opts["kind"] = kind
    tf, dtype, tok, tok_dir = _runtime(args, base, models)
    task_specific = opts.pop("task_specific_keys", None)
    if kind == "causal-lm":
        auto = tf.AutoModelForCausalLM
        base_model, _ = _load(auto, base, dtype, device)
        loaders = _loaders(auto, models, dtype, device)
        inputs = {n: _prompts(tok, texts[n], args.max_length) for n in models}
    else:
        base_model, loaders, inputs, task_specific, opts["pad_value"] = _classification_setup(
            tf, args, task_specific, base, models, texts, tok, dtype, device)
    result = _learn(divmerge, base_model, loaders, inputs, task_specific_keys=task_specific, **opts)
    del base_model
    return _finish(result, kind, base, models, data, tok, tok_dir, task_specific, loaders, out)


def cmd_adamerging(args):
    from ..methods.adamerging import SPEC, adamerging
    opts = given_options(args, SPEC)
    base, models, data, texts, out, _, device = _task_inputs(
        args, SPEC, opts, opts.get("examples_per_task"), "classification", "adamerging merges sequence "
        "classifiers, its entropy is over each task head's class predictions; for causal LMs use `pymerge divmerge`",
        teacher_cache=False)
    tf, dtype, tok, tok_dir = _runtime(args, base, models)
    base_model, loaders, batches, task_specific, opts["pad_value"] = _classification_setup(
        tf, args, opts.pop("task_specific_keys", None), base, models, texts, tok, dtype, device)
    result = _learn(adamerging, base_model, loaders, batches, task_specific_keys=task_specific, **opts)
    del base_model
    return _finish(result, "classification", base, models, data, tok, tok_dir, task_specific, loaders, out)



# The command's own arguments (inputs, output, model loading): every other flag of `pymerge divmerge` /
# `pymerge adamerging` is generated from a Param of the method's SPEC (add_option_flags).
IO_ARGUMENTS = ("base", "model", "data", "out", "overwrite", "max_length", "device", "dtype")


def _add_io_arguments(p):
    """The arguments of IO_ARGUMENTS, which divmerge and adamerging share."""
    p.add_argument("--base", required=True, metavar="DIR", help="pretrained base model directory (θ_0)")
    p.add_argument("--model", action="append", metavar="NAME=DIR", help="a fine-tuned model (repeat per task)")
    p.add_argument("--data", action="append", metavar="NAME=FILE", help='JSONL of {"text": ...} for task NAME')
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs/prompts to this many tokens")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")



def add_parsers(sub):
    """The divmerge and adamerging subcommands, their option flags generated from the methods' SPECs."""
    from ..methods import adamerging as ada, divmerge as dm
    for spec, func, short in ((dm.SPEC, cmd_divmerge, "learn merge coefficients with DivMerge on unlabelled task "
                               "data"),
                              (ada.SPEC, cmd_adamerging, "learn merge coefficients with AdaMerging (entropy "
                               "minimisation)")):
        command = sub.add_parser(spec.name, help=short, description=spec.description)
        _add_io_arguments(command)
        add_option_flags(command, spec)
        command.set_defaults(func=func)
