"""The job of `pymerge merge`: what to merge and how, from a mergekit-style YAML file or from the flags.

The YAML: merge_method, base_model, models: [{model: PATH, parameters: {...}}], parameters: {...}, dtype
(or out_dtype: the output's; the math is fp32), tokenizer_source (base or a model path), and pymerge's
task_specific_keys; relative paths are relative to the working directory, as in mergekit. Method names
are pymerge's (`pymerge methods`), plus mergekit's `linear` (= weight_average). For mergekit's methods
(linear, task_arithmetic, ties, dare_linear, dare_ties) the parameters mean what they mean in mergekit 0.1.5,
mergekit's defaults included, so its configs run unchanged: weight -> weights, lambda -> lam (default 1.0),
density (default 1.0; DARE: p = 1 - density), normalize and rescale where pymerge computes the same thing,
int8_mask ignored (it saves memory only); pymerge's own names are accepted too. What pymerge does not compute
(slices, gradients, filters, tokenizer union, normalize / rescale settings it has no counterpart for) is an
error saying so. A base listed among the models is not a fine-tuned model (mergekit drops it too), except
for linear / weight_average, which average every listed model.

The flags form: --method NAME (pymerge's names), --base, --model (repeat), --param NAME=VALUE (repeat; the
value as the method's Param types it; per-model ones a,b,c or [a, b, c]), all checked by the method's Params.
"""
import difflib
from pathlib import Path

from .common import CLIError

MERGEKIT_ALIASES = {"linear": "weight_average"}
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
MERGEKIT_ONLY = ("slerp", "nuslerp", "multislerp", "model_stock", "della", "della_linear", "breadcrumbs",
                 "breadcrumbs_ties", "sce", "karcher", "passthrough", "arcee_fusion", "nearswap", "ram",
                 "ramplus_tl")
# normalize: what pymerge computes for each mergekit method (True / False), or "weights" where normalize: true
# is pymerge's method with the weights divided by their sum.
NORMALIZE = {"linear": {True: None}, "ties": {True: None}, "dare_ties": {True: None},
             "task_arithmetic": {False: None, True: "weights"}, "dare_linear": {False: None, True: "weights"}}
MERGEKIT_NORMALIZE_DEFAULT = {"linear": True, "ties": True, "dare_ties": False, "task_arithmetic": False,
                              "dare_linear": False}
YAML_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "task_specific_keys")
YAML_UNSUPPORTED = ("slices", "tokenizer", "chat_template", "modules", "tokenizer_config")
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16", "float64": "float64", "fp64": "float64"}


# ------------------------------------------------------------------------------------------ the job
class Job:
    """What to merge, resolved from the YAML or the flags: method (a pymerge name), base and model paths,
    params (pymerge's names; per-model ones as lists), dtype name or None, tokenizer source, exempt regex."""

    def __init__(self, method, base, models, params, dtype=None, tokenizer_source=None, task_specific_keys=None):
        self.method, self.base, self.models, self.params = method, base, models, params
        self.dtype, self.tokenizer_source, self.task_specific_keys = dtype, tokenizer_source, task_specific_keys


def _static_method(name, where):
    from .. import methods
    if not isinstance(name, str) or not name:
        raise CLIError(f"{where}: expected a method name, got {name!r}")
    if name in methods.available("static"):
        return name
    if name in MERGEKIT_ALIASES:
        return MERGEKIT_ALIASES[name]
    static = methods.available("static")
    if name in methods.available("learned"):
        raise CLIError(f"{where} {name!r}: a learned method (it needs data); run `pymerge {name}`")
    if name in MERGEKIT_ONLY:
        raise CLIError(f"{where} {name!r}: mergekit's {name} is not available in pymerge; available: {static}")
    close = difflib.get_close_matches(name, static + list(MERGEKIT_ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CLIError(f"{where} {name!r}: unknown merging method{hint}; available: {static}")


def dtype_name(value, where):
    if value is None:
        return None
    name = DTYPES.get(str(value).replace("torch.", ""))
    if name is None:
        raise CLIError(f"{where} {value!r}: expected one of float32, bfloat16, float16, float64")
    return name


def _scalar(value, where):
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        raise CLIError(f"{where}: conditional values (filter:) are not supported by pymerge merge; give one value")
    if isinstance(value, list):
        raise CLIError(f"{where}: a list (mergekit's per-layer gradient) is not supported by pymerge merge; "
                       f"give one value")
    return value


def _unknown_parameter(name, known, method):
    """The words for a parameter `method` does not have, with the closest known name when there is one."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown parameter of {method}{hint}; known: {sorted(known)}"


def _translate(mk_method, name, value, where):
    """(pymerge name, value) of a mergekit parameter of mergekit method mk_method (None: not a mergekit method)."""
    if mk_method is None:
        return name, value
    if name == "weight":
        return "weights", value
    if name == "lambda":
        return "lam", value
    if name == "density" and mk_method in ("dare_linear", "dare_ties"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CLIError(f"{where} = {value!r}: must be a number in (0, 1]")
        return "p", 1.0 - float(value)
    return name, value


def job_from_yaml(path):
    """The Job of a mergekit-style YAML file (see the module doc); CLIError naming the file and the entry."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config {path}: {'does not exist' if not path.exists() else 'not a file'}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CLIError(f"config {path}: cannot read it as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise CLIError(f"config {path}: expected a YAML mapping (merge_method:, base_model:, models:, ...), got a "
                       f"{type(config).__name__}")
    for key in config:
        if key in YAML_UNSUPPORTED:
            raise CLIError(f"config {path}: mergekit's {key!r} is not supported by pymerge merge")
        if key not in YAML_KEYS:
            raise CLIError(f"config {path}: unknown entry {key!r}; known: {list(YAML_KEYS)}")
    if "merge_method" not in config:
        raise CLIError(f"config {path}: no merge_method")
    given = config["merge_method"]
    method = _static_method(given, f"config {path}: merge_method")
    mk = given if given in MERGEKIT_METHODS else None
    entries = config.get("models")
    if not isinstance(entries, list) or not entries:
        raise CLIError(f"config {path}: models must be a non-empty list of {{model: PATH, parameters: ...}}")
    base = config.get("base_model")
    if base is not None and not isinstance(base, str):
        raise CLIError(f"config {path}: base_model must be a path, got {base!r}")
    models, per_model = [], []
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise CLIError(f"config {path}: models[{i}] must be {{model: PATH, parameters: ...}}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise CLIError(f"config {path}: models[{i}] has {sorted(extra)}, not supported by pymerge merge")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise CLIError(f"config {path}: models[{i}].parameters must be a mapping")
        if base is not None and method != "weight_average" and _same_path(entry["model"], base):
            continue  # the base among the models (mergekit's habit): not a fine-tuned model
        models.append(entry["model"])
        per_model.append({k: _scalar(v, f"config {path}: models[{i}].parameters.{k}") for k, v in params.items()})
    if base is None:
        if method != "weight_average":
            raise CLIError(f"config {path}: {given} needs a base_model")
        base = models[0]
    if not models:
        raise CLIError(f"config {path}: no fine-tuned model (models lists the base only)")
    global_params = config.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise CLIError(f"config {path}: parameters must be a mapping")
    params = _combine(method, mk, {k: _scalar(v, f"config {path}: parameters.{k}") for k, v in global_params.items()},
                      per_model, f"config {path}")
    dtype = dtype_name(config.get("out_dtype", config.get("dtype")), f"config {path}: dtype")
    tok = config.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        raise CLIError(f"config {path}: tokenizer_source {tok!r}: a mapping is not supported; give base or a path")
    if tok == "union":
        raise CLIError(f"config {path}: tokenizer_source: union is not supported (pymerge never changes the "
                       f"vocabulary); give base or a model path")
    return Job(method, base, models, params, dtype, None if tok in (None, "base") else tok,
               config.get("task_specific_keys"))


def _same_path(a, b):
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _combine(method, mk, global_params, per_model, where):
    """pymerge params from global and per-model settings (mergekit names translated when mk is a mergekit
    method, mergekit's defaults applied); per-model Params become lists of T values."""
    from .. import methods
    spec = methods.get(method)
    T = len(per_model)
    known = {p.name: p for p in spec.params}
    flags = {}

    def put(target, name, value, place):
        if mk is not None and name in ("normalize", "rescale", "int8_mask"):
            flags[name] = (value, place)
            return
        new, value = _translate(mk, name, value, f"{where}: {place}{name}")
        if new not in known:
            raise CLIError(f"{where}: {place}{name}: {_unknown_parameter(new, known, method)}")
        if new in target:
            raise CLIError(f"{where}: {place}{name}: {new} given twice")
        target[new] = value

    shared = {}
    for name, value in global_params.items():
        put(shared, name, value, "parameters.")
    each = []
    for t, params in enumerate(per_model):
        mine = {}
        for name, value in params.items():
            put(mine, name, value, f"models[{t}].parameters.")
        for new in mine:
            if not known[new].per_model:
                raise CLIError(f"{where}: models[{t}].parameters: {new} is one value for all models; put it under "
                               f"the global parameters")
        each.append(mine)
    if mk is not None:
        _mergekit_defaults(mk, shared, each, flags, where)
    out = dict(shared)
    for name in {n for m in each for n in m}:
        out[name] = [m.get(name, shared.get(name, known[name].default)) for m in each]
    if flags.get("normalize", (None,))[0] is True and NORMALIZE[mk].get(True) == "weights":
        w = out.get("weights", 1.0)
        w = list(w) if isinstance(w, list) else [w] * T
        total = sum(float(x) for x in w)
        if total == 0:
            raise CLIError(f"{where}: normalize: true with weights summing to 0")
        out["weights"] = [float(x) / total for x in w]
    return out


def _mergekit_defaults(mk, shared, each, flags, where):
    """mergekit 0.1.5's defaults for what the config leaves out, and its flags checked against pymerge."""
    for name, (value, place) in flags.items():
        if place != "parameters." and name != "int8_mask":
            raise CLIError(f"{where}: {place}{name}: one value for all models; put it under the global parameters")
        if not isinstance(value, bool):
            raise CLIError(f"{where}: {place}{name} = {value!r}: must be true or false")
    normalize = flags.get("normalize", (MERGEKIT_NORMALIZE_DEFAULT[mk],))[0]
    if normalize not in NORMALIZE[mk]:
        what = {"ties": "the weighted disjoint mean of the agreeing entries",
                "dare_ties": "the weighted disjoint mean of the agreeing entries",
                "linear": "the weights divided by their sum"}[mk]
        ask = "add `normalize: true` under parameters" if normalize is False else "remove normalize"
        raise CLIError(f"{where}: {mk} with normalize: {str(normalize).lower()} is not supported (pymerge computes "
                       f"{what}, mergekit's normalize: true); {ask}")
    if "rescale" in flags:
        rescale = flags["rescale"][0]
        if mk in ("dare_linear", "dare_ties") and rescale is False:
            raise CLIError(f"{where}: {mk} with rescale: false is not supported (pymerge rescales the kept entries "
                           f"by 1 / (1 - p))")
        if mk not in ("dare_linear", "dare_ties") and rescale is True:
            raise CLIError(f"{where}: {mk} with rescale: true is not supported")
    if mk in ("task_arithmetic", "dare_linear") and "lam" not in shared:
        shared["lam"] = 1.0
    if mk == "ties" and "density" not in shared and not any("density" in m for m in each):
        shared["density"] = 1.0
    if mk in ("dare_linear", "dare_ties") and "p" not in shared and not any("p" in m for m in each):
        shared["p"] = 0.0


def _parse_value(p, text, where):
    """A --param value as the Param's type reads it; per-model Params take a list (a,b,c or [a, b, c])."""
    if p.per_model and ("," in text or text.strip().startswith("[")):
        items = text.strip().strip("[]").split(",")
        return [_parse_one(p, item.strip(), where) for item in items]
    return _parse_one(p, text, where)


def _parse_one(p, text, where):
    import yaml
    if text.lower() in ("none", "null"):
        return None
    try:
        if p.type is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("true", "1", "yes", "on")
        if p.type in (int, float, str):
            return p.type(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        kind = {bool: "true or false", int: "an int", float: "a number"}.get(p.type, "a YAML value")
        raise CLIError(f"{where}: expected {kind}, got {text!r}") from None


def job_from_flags(args):
    from .. import methods
    if not args.method:
        raise CLIError("give a CONFIG.yaml or --method NAME with --base DIR and --model DIR ...")
    method = _static_method(args.method, "--method")
    if not args.model:
        raise CLIError(f"--method {args.method}: no --model given (the fine-tuned models to merge)")
    if not args.base and method != "weight_average":
        raise CLIError(f"--method {args.method}: --base DIR is required")
    spec = methods.get(method)
    known = {p.name: p for p in spec.params}
    params = {}
    for item in args.param or []:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise CLIError(f"--param {item!r}: expected NAME=VALUE")
        if name not in known:
            raise CLIError(f"--param {item!r}: {_unknown_parameter(name, known, method)}")
        if name in params:
            raise CLIError(f"--param {name}: given twice")
        params[name] = _parse_value(known[name], text, f"--param {item}")
    return Job(method, args.base or args.model[0], list(args.model), params, dtype_name(args.dtype, "--dtype"),
               args.tokenizer_source, args.task_specific_keys)
