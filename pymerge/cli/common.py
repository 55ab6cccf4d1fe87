"""What every `pymerge` command shares: the CLIError convention (one line, exit status 2), NAME=PATH pairs,
JSONL texts, Hugging Face model directories read offline, --device, output directories checked before work
and published atomically, and the flags generated from a method's Params."""
import argparse
import json
import os
import re
import shutil
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
    from ..io.jsonl import jsonl_objects
    path = Path(path)
    texts = []
    try:
        for where, obj in jsonl_objects(path):
            if not isinstance(obj, dict) or "text" not in obj:
                raise CLIError(f"{where}: expected an object with a \"text\" field")
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise CLIError(f"{where}: \"text\" must be a non-empty string")
            texts.append(obj["text"])
            if limit is not None and len(texts) >= limit:
                break
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not texts:
        raise CLIError(f"data file {path} is empty (no JSON lines)")
    return texts



def check_model_dir(path, flag):
    if not path.is_dir():
        raise CLIError(f"{flag} {path}: not a directory")
    if not (path / "config.json").is_file():
        raise CLIError(f"{flag} {path}: no config.json (expected a Hugging Face model directory, "
                       f"as written by save_pretrained)")


def read_config(path):
    """The config.json of a model directory, as a dict."""
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{path / 'config.json'}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise CLIError(f"{path / 'config.json'}: expected a JSON object, got a {type(config).__name__}")
    return config



# ----------------------------------------------------------------------------------------------- loading
def load_transformers():
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


def torch_dtype(name):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]



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
    from ..methods.params import int_at_least, problem
    for name, value in opts.items():
        msg = problem(spec.param(name), value)
        if msg:
            raise CLIError(f"{option_flag(name)} {value!r}: {msg}")
    msg = int_at_least(1)(max_length)
    if msg:
        raise CLIError(f"--max-length {max_length!r}: {msg}")



# ------------------------------------------------------------------------------------------------ output
def check_writable(directory, flag, given):
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


def prepare_out(out, overwrite):
    """Check --out: absent (or a directory and --overwrite), and its parent writable. Creates nothing."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CLIError(f"--out {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    check_writable(out.parent, "--out", out)
    return out


def publish(tmp, out):
    """Move the finished temporary directory to `out`; an existing `out` is swapped away first, so `out`
    never holds a partial result."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



FLAG_ALIASES = {"progress": ("--quiet",), "teacher_cache": ("--no-cache",)}
# What the command does itself where an option is not given.
CLI_NOTES = {"task_specific_keys": "here, for classification: the head, i.e. the keys the base checkpoint lacks"}


def option_flag(name):
    return "--" + name.replace("_", "-")


def _metavar(p):
    """REGEX / DIR for the options their check reads so, else argparse's own (the option's name)."""
    from ..methods.params import path_like, regex
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

