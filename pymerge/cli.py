"""`pymerge ...` command line: a thin layer over the Python API (pymerge.divmerge, pymerge.adamerging,
pymerge.methods).

    pymerge methods
    pymerge divmerge --base DIR --model NAME=DIR [--model ...] --data NAME=FILE.jsonl [--data ...] --out DIR
                     [--kind auto|classification|causal-lm] [--granularity layer|task] [--divergence js|kl]
                     [--task-specific-keys REGEX] [--steps N | --epochs N] [--lr ...] [--no-cache] ...
    pymerge adamerging --base DIR --model NAME=DIR [...] --data NAME=FILE.jsonl [...] --out DIR
                     [--granularity layer|task] [--steps N] [--lr ...] [--no-clamp] ...   (classification)

The method options' flags are generated from the methods' declarations (the Params of
pymerge.methods.get("divmerge") / get("adamerging"), what `pymerge methods` prints): --NAME VALUE, --no-NAME
for a switch that defaults on (--quiet and --no-cache are the older spellings of --no-progress and
--no-teacher-cache), --no-NAME for None where None means something (--no-clamp); their values are checked
by the same Params as the Python call's.

Models are Hugging Face directories, read locally only (HF_HUB_OFFLINE=1, local_files_only): the base with
the fine-tuned models' class (AutoModelForSequenceClassification or AutoModelForCausalLM) and the tokenizer
of the base (else of the first model). Data: UTF-8 JSONL (a leading byte order mark is allowed), one
{"text": ...} object per line (other fields such as "label" are ignored: both methods use unlabelled inputs).
Every input (paths, --out and --cache-dir writability, --device, the models' kind, the data) is checked before
a model is loaded; a bad one exits with status 2 and one `pymerge <command>: error: ...` line, an internal
error with status 1 and a traceback. The output directory appears complete or not at all: everything is
written into a temporary sibling directory that is then renamed. It holds the merged model (save_pretrained +
tokenizer) and <method>.json (the learned Γ per task and group, the loss curve, the options); for
classification with task-specific heads, one complete model per task in OUT/<NAME>/.
DivMerge's teacher outputs are cached on disk (--cache-dir, default $PYMERGE_CACHE or ~/.cache/pymerge).

One file of ~580 lines on purpose: it is one flow read top to bottom (inputs checked, models loaded, the
method run, the output published, then the commands and the parser that chain them), none of it is imported
by the rest of pymerge, and its sections share the CLIError convention.
"""
import argparse
import codecs
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CLIError(Exception):
    """A problem with the command line or its inputs: reported as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ inputs
def parse_pairs(values, flag):
    """['NAME=PATH', ...] -> {NAME: Path}, in order; names unique and usable as directory names."""
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"{flag} {v!r}: expected NAME=PATH")
        if not _NAME.match(name):
            raise CLIError(f"{flag} {v!r}: NAME may hold letters, digits, '_', '.', '-' (it names an output "
                           f"directory) and must start with a letter or digit")
        if name in out:
            raise CLIError(f"{flag}: task {name!r} given twice")
        out[name] = Path(path)
    return out


def read_jsonl_texts(path, limit=None):
    """The "text" field of every non-blank line of a UTF-8 JSONL file (the first `limit` ones when given); a
    UTF-8 byte order mark may start the file. Errors name the file and the 1-based line number."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"data file {path} does not exist")
    if not path.is_file():
        raise CLIError(f"data file {path} is not a file")
    texts = []
    try:
        f = open(path, "rb")  # bytes: a decoding error can then name its line
    except OSError as e:
        raise CLIError(f"data file {path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CLIError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                               f"of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise CLIError(f"{path}:{lineno}: expected an object with a \"text\" field")
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise CLIError(f"{path}:{lineno}: \"text\" must be a non-empty string")
            texts.append(obj["text"])
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise CLIError(f"data file {path} is empty (no JSON lines)")
    return texts


def _check_model_dir(path, flag):
    if not path.is_dir():
        raise CLIError(f"{flag} {path}: not a directory")
    if not (path / "config.json").is_file():
        raise CLIError(f"{flag} {path}: no config.json (expected a Hugging Face model directory, "
                       f"as written by save_pretrained)")


def _config(path):
    """The config.json of a model directory, as a dict."""
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{path / 'config.json'}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise CLIError(f"{path / 'config.json'}: expected a JSON object, got a {type(config).__name__}")
    return config


def _architectures(config):
    """config.json's "architectures": the class names save_pretrained wrote, e.g. ["BertForSequenceClassification"]."""
    archs = config.get("architectures") or []
    return [str(a) for a in archs] if isinstance(archs, list) else [str(archs)]


def kind_from_configs(base, models):
    """(kind, flag of the directory that told it): classification or causal-lm, from the config.json
    architectures of the fine-tuned models (then the base), as pymerge.methods.divmerge.infer_kind reads them
    from modules."""
    from .methods.divmerge import kind_of_architectures
    for flag, path in [*((f"--model {n}={p}", p) for n, p in models.items()), (f"--base {base}", base)]:
        kind = kind_of_architectures(_architectures(_config(path)))
        if kind is not None:
            return kind, flag
    raise CLIError("cannot tell the model kind from config.json 'architectures'; pass --kind classification "
                   "or --kind causal-lm")


def _head_class(kind, model_type):
    """The class name AutoModelForSequenceClassification / AutoModelForCausalLM loads for `model_type`, or None."""
    _transformers()
    from transformers.models.auto import modeling_auto
    names = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if kind == "causal-lm"
             else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    return names.get(model_type)


def check_kind(kind, base, models, source):
    """Raise CLIError unless every fine-tuned model directory holds a `kind` model (its head is the task's
    teacher; loading another class would drop it and initialise the kind's head at random), and, for
    causal-lm, the base too (the LM head is merged). A classification base may be anything: its head is not
    merged. `source` says where `kind` came from, for the message. Reads config.json only."""
    from .methods.divmerge import kind_of_architecture
    dirs = [(f"--model {n}={p}", p) for n, p in models.items()]
    if kind == "causal-lm":
        dirs.append((f"--base {base}", base))
    for flag, path in dirs:
        config = _config(path)
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


# ----------------------------------------------------------------------------------------------- loading
def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers
    except ImportError:
        raise CLIError("pymerge divmerge needs the transformers package (pip install transformers)") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _dtype(name):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]


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


def check_device(name):
    """The torch.device of --device NAME (cpu, cuda, cuda:N, or auto: cuda when available), or CLIError."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CLIError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {name}: there are {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return device


def check_options(spec, opts, max_length):
    """The method options given (checked by their Params) and --max-length, before anything is read."""
    from .methods.params import int_at_least, problem
    for name, value in opts.items():
        msg = problem(spec.param(name), value)
        if msg:
            raise CLIError(f"{option_flag(name)} {value!r}: {msg}")
    msg = int_at_least(1)(max_length)
    if msg:
        raise CLIError(f"--max-length {max_length!r}: {msg}")


# ------------------------------------------------------------------------------------------------ output
def _check_writable(directory, flag, given):
    """Raise CLIError unless this process can create directories in `directory` (created later when missing):
    its nearest existing ancestor is a directory where a probe directory can be made (and is removed at once;
    a probe, not permission bits, so that it also holds for root and for file systems such as /proc)."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{flag} {given}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pymerge-probe-", dir=existing))
    except OSError as e:
        raise CLIError(f"{flag} {given}: cannot create a directory in {existing} ({e.strerror or e})") from None


def _prepare_out(out, overwrite):
    """Check --out: absent (or a directory and --overwrite), and its parent writable. Creates nothing."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CLIError(f"--out {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    _check_writable(out.parent, "--out", out)
    return out


def _publish(tmp, out):
    """Move the finished temporary directory to `out`; an existing `out` is swapped away first, so `out`
    never holds a partial result."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


# -------------------------------------------------------------------------------------------- commands
def cmd_methods(args):
    from . import methods
    for name in methods.available("all"):
        print(methods.get(name).describe())
        print()
    return 0


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
    _check_model_dir(base, "--base")
    for name, path in models.items():
        _check_model_dir(path, f"--model {name}=")
    check_options(spec, opts, args.max_length)
    out = _prepare_out(args.out, args.overwrite)
    if teacher_cache:
        from .teachers.cache import cache_dir
        where = cache_dir(opts.get("cache_dir"))
        _check_writable(where, "--cache-dir", where)
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
    tf = _transformers()
    tok, tok_dir = _tokenizer(tf, base, models)
    return tf, _dtype(args.dtype), tok, tok_dir


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
        _publish(tmp, out)
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
    from .methods.divmerge import EXAMPLES_PER_TASK, SPEC, divmerge
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
    from .methods.adamerging import SPEC, adamerging
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


# ------------------------------------------------------------------------------------------------- main
# The command's own arguments (inputs, output, model loading): every other flag of `pymerge divmerge` /
# `pymerge adamerging` is generated from a Param of the method's SPEC (add_option_flags).
IO_ARGUMENTS = ("base", "model", "data", "out", "overwrite", "max_length", "device", "dtype")
# Earlier spellings of generated flags, kept working.
FLAG_ALIASES = {"progress": ("--quiet",), "teacher_cache": ("--no-cache",)}
# What the command does itself where an option is not given.
CLI_NOTES = {"task_specific_keys": "here, for classification: the head, i.e. the keys the base checkpoint lacks"}


def option_flag(name):
    return "--" + name.replace("_", "-")


def _metavar(p):
    """REGEX / DIR for the options their check reads so, else argparse's own (the option's name)."""
    from .methods.params import path_like, regex
    return {regex: "REGEX", path_like: "DIR"}.get(p.check)


def add_option_flags(parser, spec):
    """One flag per Param of `spec` that text can give: --NAME VALUE for type int, float or str (with its
    choices), --no-NAME for a bool defaulting to True (--NAME for one defaulting to False), and --no-NAME for
    None where an optional Param's default is not None (AdaMerging's --no-clamp). Each flag's dest is the
    Param's name and its default argparse.SUPPRESS: the namespace holds the options given, and the method's
    defaults apply to the others (given_options)."""
    group = parser.add_argument_group(f"{spec.name} options (pymerge.methods.get({spec.name!r}).describe())")
    for p in spec.params:
        words = p.help + (f" (default {p.default!r})" if p.default is not None else "")
        if p.model_kinds is not None:
            words = f"{' / '.join(p.model_kinds)} only: {words}"
        if p.name in CLI_NOTES:
            words += f"; {CLI_NOTES[p.name]}"
        words = words.replace("%", "%%")  # argparse formats help with %
        aliases = FLAG_ALIASES.get(p.name, ())
        if p.type is bool:
            negated = p.default is True
            flag = f"--no-{option_flag(p.name)[2:]}" if negated else option_flag(p.name)
            group.add_argument(flag, *aliases, dest=p.name, action="store_false" if negated else "store_true",
                               default=argparse.SUPPRESS, help=f"{'off' if negated else 'on'}: {p.help}")
            continue
        if p.type in (int, float, str):
            group.add_argument(option_flag(p.name), *aliases, dest=p.name, type=p.type, choices=p.choices,
                               metavar=_metavar(p), default=argparse.SUPPRESS, help=words)
        if p.optional and p.default is not None:
            none_help = p.help.rpartition("None = ")[2] if "None = " in p.help else "None"
            group.add_argument(f"--no-{option_flag(p.name)[2:]}", dest=p.name, action="store_const", const=None,
                               default=argparse.SUPPRESS, help=f"{p.name} = None: {none_help}".replace("%", "%%"))


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


def build_parser():
    from .methods import adamerging as ada, divmerge as dm
    p = argparse.ArgumentParser(prog="pymerge", description="Fast model merging: CART, DivMerge and relatives.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list the registered merging methods and their parameters")
    m.set_defaults(func=cmd_methods)
    for spec, func, short in ((dm.SPEC, cmd_divmerge, "learn merge coefficients with DivMerge on unlabelled task "
                               "data"),
                              (ada.SPEC, cmd_adamerging, "learn merge coefficients with AdaMerging (entropy "
                               "minimisation)")):
        command = sub.add_parser(spec.name, help=short, description=spec.description)
        _add_io_arguments(command)
        add_option_flags(command, spec)
        command.set_defaults(func=func)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        message = " ".join(str(e).split("\n"))  # one line, also for wrapped multi-line library messages
        print(f"pymerge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
