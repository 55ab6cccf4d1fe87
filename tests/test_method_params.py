"""One parameter declaration (Param) for every method: the learned methods' specs (registry, describe(),
defaults, validation by the Python API), the command line's flags generated from them (no flag without a
Param, no Param a flag could give without its flag), and the shared checks of pymerge.methods.params, which
no method borrows from a sibling method."""
import argparse
import ast
import collections
import inspect
import math
import os

import pytest
import torch

import pymerge
from pymerge import cli, methods
from pymerge.methods import LearnedMethodSpec, MethodSpec, params
from pymerge.methods.divmerge import DEFAULT_LR, DEFAULT_LR_SCHEDULE

from test_divmerge import TokenNet, finetunes, one_thread, token_data  # noqa: F401 (one_thread: autouse)

LEARNED = ("divmerge", "adamerging")
FUNCTIONS = {"divmerge": pymerge.divmerge, "adamerging": pymerge.adamerging}
COMMANDS = {"divmerge": cli.cmd_divmerge, "adamerging": cli.cmd_adamerging}
METHODS_DIR = os.path.dirname(methods.__file__)


# ------------------------------------------------------------------------------------------------- registry
def test_registry_tells_static_from_learned():
    assert methods.available() == methods.available("static")
    assert methods.available("learned") == list(LEARNED)
    assert methods.available("all") == methods.available("static") + list(LEARNED)
    for name in methods.available("static"):
        assert methods.get(name).kind == "static" and isinstance(methods.get(name), MethodSpec)
    for name in LEARNED:
        spec = methods.get(name)
        assert spec.kind == "learned" and isinstance(spec, LearnedMethodSpec) and spec.name == name
        assert spec.run == f"pymerge.{name}" and FUNCTIONS[name] is getattr(pymerge, name)
    with pytest.raises(ValueError, match="kind = 'bogus'"):
        methods.available("bogus")
    with pytest.raises(ValueError, match=r"unknown merging method 'nope'; available: \[.*'divmerge', 'adamerging'\]"):
        methods.get("nope")


@pytest.mark.parametrize("name", LEARNED)
def test_merge_refuses_a_learned_method_pointing_to_its_function(name):
    base = {"w": torch.zeros(2, 2)}
    models = [{"w": torch.ones(2, 2)}, {"w": -torch.ones(2, 2)}]
    message = rf"merge: {name} is a learned method: .* call pymerge\.{name}\(base, models, data, \.\.\.\)"
    with pytest.raises(ValueError, match=message):
        pymerge.merge(name, base, models)
    with pytest.raises(ValueError, match=message):
        pymerge.merge(methods.get(name), base, models)


# ------------------------------------------------------------------------------------------ describe / defaults
@pytest.mark.parametrize("name", LEARNED)
def test_learned_describe_lists_every_param_with_its_default(name):
    """describe(): one line per Param, in order, with its default (a literal equal to it), the model kinds it
    is limited to, and its help; every default has the declared type and passes its own checks, and
    resolve_params({}) fills exactly the defaults of the options of each model kind."""
    spec = methods.get(name)
    lines = spec.describe().splitlines()
    assert lines[0] == f"{name}: {spec.description}" and f"pymerge {name} --help" in lines[0]
    assert len(lines) == 1 + len(spec.params) and len({p.name for p in spec.params}) == len(spec.params)
    for line, p in zip(lines[1:], spec.params):
        only = f" ({' / '.join(p.model_kinds)} only)" if p.model_kinds else ""
        head, tail = f"  {p.name} = ", f"{only}: {p.help}"
        assert line.startswith(head) and line.endswith(tail), (line, p)
        assert ast.literal_eval(line[len(head):len(line) - len(tail)]) == p.default
        assert p.default is None or isinstance(p.default, p.type), (name, p.name)
        assert params.problem(p, p.default) is None, (name, p.name)
        assert p.check is not None or p.choices is not None, f"{name}: {p.name} is not validated"
        assert p.model_kinds is None or set(p.model_kinds) <= set(spec.model_kinds)
    for kind in spec.model_kinds:
        assert spec.resolve_params({}, kind) == {p.name: p.default for p in spec.params if p.applies_to(kind)}


@pytest.mark.parametrize("name", LEARNED)
def test_function_keywords_are_the_declared_defaults(name):
    """The options the function names in its signature (task_specific_keys, granularity, ...) are Params with
    the same defaults, so its documented defaults and its declaration cannot part."""
    spec = methods.get(name)
    keywords = {k: v.default for k, v in inspect.signature(FUNCTIONS[name]).parameters.items()
                if v.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords and all(spec.param(k).default == default for k, default in keywords.items())


def test_defaults_are_the_papers_and_official_codes():
    """docs/METHODS.md §DivMerge (paper Table 9, but for the learning rate chosen on validation in
    docs/RESULTS.md: per model kind, None = DEFAULT_LR with DEFAULT_LR_SCHEDULE) and §AdaMerging (official
    code, constant lr)."""
    dm, ada = methods.get("divmerge"), methods.get("adamerging")
    d = {p.name: p.default for p in dm.params}
    assert (d["lr"], d["lr_schedule"], d["epochs"], d["steps"], d["batch_size"], d["init"], d["temperature"], d["beta"],
            d["divergence"], d["granularity"], d["max_new_tokens"], d["top_k"], d["clamp"]) == \
        (None, None, 4, None, None, None, 1.0, 0.5, "js", "layer", 32, 64, None)   # the paper's Γ: unconstrained
    assert (DEFAULT_LR, DEFAULT_LR_SCHEDULE) == ({"classification": 0.5, "causal-lm": 0.2},
                                                {"classification": "cosine", "causal-lm": "constant"})
    a = {p.name: p.default for p in ada.params}
    assert (a["lr"], a["lr_schedule"], a["steps"], a["init"], a["clamp"], a["batch_size"], a["granularity"]) == \
        (1e-3, "constant", 500, 0.3, (0.0, 1.0), None, "layer")
    assert dm.param("teacher_batch_size").model_kinds == ("classification",)
    assert "beta" not in a and "teacher_cache" not in a


# ------------------------------------------------------------------------------------------ validation (Python)
def _never_loaded():
    raise AssertionError("a model was read before the options were checked")


def _call(name, **options):
    """The method on loaders that fail if called: an option error must come first."""
    base = TokenNet().double()
    return FUNCTIONS[name](base, [_never_loaded, _never_loaded], token_data(2), **{"progress": False, **options})


def _options(name, kind):
    return [p for p in methods.get(name).params_for(kind) if p.name != "kind" or kind is None]


@pytest.mark.parametrize("name,kind", [("divmerge", "classification"), ("divmerge", "causal-lm"),
                                       ("adamerging", None)])
def test_every_option_of_the_wrong_type_is_refused_by_name(name, kind):
    """Each declared option given an object of no accepted type: ValueError naming it, before any model is read."""
    kw = {"kind": kind} if name == "divmerge" else {}
    for p in _options(name, kind):
        owner = f"{name} \\({kind}\\)" if name == "divmerge" and p.name != "kind" else name
        with pytest.raises(ValueError, match=rf"^{owner}: {p.name} = <object object"):
            _call(name, **{**kw, p.name: object()})


BAD_VALUES = [
    # (method, option, value, message after "<method>[ (kind)]: ")
    ("divmerge", "lr", 0.0, "lr = 0.0: must be a positive finite number"),
    ("divmerge", "lr", float("inf"), "lr = inf: must be a positive finite number"),
    ("divmerge", "lr", "0.1", "lr = '0.1': must be a positive finite number"),
    ("divmerge", "batch_size", 0, "batch_size = 0: must be an int >= 1"),
    ("divmerge", "batch_size", 4.0, "batch_size = 4.0: must be an int >= 1"),
    ("divmerge", "epochs", True, "epochs = True: must be an int >= 1"),
    ("divmerge", "steps", -1, "steps = -1: must be an int >= 0"),
    ("divmerge", "examples_per_task", 0, "examples_per_task = 0: must be an int >= 1"),
    ("divmerge", "temperature", float("nan"), "temperature = nan: must be a positive finite number"),
    ("divmerge", "beta", 1.0, r"beta = 1.0: must be in \(0, 1\)"),
    ("divmerge", "beta", 0, r"beta = 0: must be in \(0, 1\)"),
    ("divmerge", "cart_rank_ratio", 1.5, r"cart_rank_ratio = 1.5: must be in \(0, 1\]"),
    ("divmerge", "cart_svd", "full", r"cart_svd = 'full'; expected one of \['exact', 'randomized'\]"),
    ("divmerge", "init_from", "divmerge", "init_from = 'divmerge': unknown static method"),
    ("divmerge", "init", float("nan"), "init = nan: must be a finite number"),
    ("divmerge", "seed", 1.5, "seed = 1.5: must be an int"),
    ("divmerge", "progress", "yes", "progress = 'yes': must be True or False"),
    ("divmerge", "granularity", "block", r"granularity = 'block'; expected one of \['task', 'layer'\]"),
    ("divmerge", "layer_groups", "[a", "layer_groups = '\\[a': not a valid regular expression"),
    ("divmerge", "lr", 0, "lr = 0: must be a positive finite number"),
    ("divmerge", "lr_schedule", "linear", r"lr_schedule = 'linear'; expected one of \['constant', 'cosine'\]"),
    ("divmerge", "teacher_batch_size", 0, "teacher_batch_size = 0: must be an int >= 1"),
    ("divmerge", "pad_value", {"input_ids": "x"}, "pad_value = .*: must be a number or a dict"),
    ("adamerging", "clamp", (1.0, 0.0), r"clamp = \(1.0, 0.0\): must be a \(low, high\) pair"),
    ("adamerging", "clamp", (0.0,), r"clamp = \(0.0,\): must be a \(low, high\) pair"),
    ("adamerging", "steps", 2.5, "steps = 2.5: must be an int >= 0"),
    ("adamerging", "lr", -1e-3, "lr = -0.001: must be a positive finite number"),
    ("adamerging", "backend", "gpu", "backend = 'gpu'; expected one of"),
]


@pytest.mark.parametrize("name,option,value,message", BAD_VALUES)
def test_bad_option_values_are_refused_naming_the_option(name, option, value, message):
    owner = "divmerge \\(classification\\)" if name == "divmerge" else name
    with pytest.raises(ValueError, match=rf"^{owner}: {message}"):
        _call(name, **{option: value})


def test_causal_lm_options_and_kind():
    with pytest.raises(ValueError, match=r"^divmerge \(causal-lm\): top_k = -1: must be an int >= 0"):
        _call("divmerge", kind="causal-lm", top_k=-1)
    with pytest.raises(ValueError, match=r"^divmerge \(causal-lm\): eos_token_id = 'eos': must be 'auto', None"):
        _call("divmerge", kind="causal-lm", eos_token_id="eos")
    with pytest.raises(ValueError, match=r"^divmerge \(classification\): unknown option\(s\) \['top_k'\]"):
        _call("divmerge", top_k=8)
    with pytest.raises(ValueError, match=r"^divmerge: kind = 'seq2seq'; expected one of"):
        _call("divmerge", kind="seq2seq")


def test_none_where_declared_valid_and_top_k_zero_is_dense():
    """adamerging's clamp=None, steps=None and init=None are declared optional (unconstrained, epochs, 1/T);
    divmerge's top_k=0 means the dense teacher, as None does."""
    torch.manual_seed(0)
    base = TokenNet().double()
    models = finetunes(base, 2)
    kw = dict(task_specific_keys=r"^head\.", granularity="task", progress=False, backend="reference")
    start = pymerge.adamerging(base, models, token_data(2), init=None, steps=0, **kw)
    assert torch.equal(start.coefficients, torch.full((2,), 0.5, dtype=start.coefficients.dtype))   # 1/T
    r = pymerge.adamerging(base, models, token_data(2), clamp=None, steps=None, epochs=2, **kw)
    assert r.config["clamp"] == "None" and len(r.losses) == 2      # 12 examples, 16 per task per step: 1 per epoch
    from pymerge.methods.divmerge import GenerativeObjective
    assert GenerativeObjective(top_k=0).generation["top_k"] is None
    assert GenerativeObjective(top_k=8).generation["top_k"] == 8


# ------------------------------------------------------------------------------------------ command line
def _subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", LEARNED)
def test_every_flag_is_a_param_and_every_text_param_a_flag(name):
    """The flags of `pymerge <name>`: the command's own IO arguments, else a Param of the method's SPEC (dest =
    its name, its type and choices, no default of its own); and every Param that text can give has its flag."""
    spec, command = methods.get(name), _subcommands()[name]
    assert not set(cli.IO_ARGUMENTS) & {p.name for p in spec.params}
    flagged = collections.defaultdict(list)
    for action in command._actions:
        if action.dest in ("help", *cli.IO_ARGUMENTS):
            continue
        p = spec.param(action.dest)          # KeyError: a flag without a Param
        flagged[p.name].append(action)
        assert action.default is argparse.SUPPRESS, action.option_strings
        if action.nargs is None:            # --NAME VALUE
            assert action.option_strings[0] == cli.option_flag(p.name) and action.type is p.type
            assert list(action.choices or ()) == list(p.choices or ())
        else:                               # a switch: --no-NAME (off, or None), --NAME (on)
            assert action.option_strings[0] in (f"--no-{p.name.replace('_', '-')}", cli.option_flag(p.name))
            assert action.const in (None, not p.default) and (action.const is not None or p.optional)
    for p in spec.params:
        if p.type in (int, float, str, bool):
            assert p.name in flagged, f"{name}: Param {p.name} has no flag"
        if p.optional and p.default is not None:
            assert any(a.option_strings[0].startswith("--no-") for a in flagged[p.name]), p.name


def test_flags_parse_to_the_python_options():
    """Flags, old spellings included, give what the Python call takes; options not given are absent (the
    method's defaults hold)."""
    parser = cli.build_parser()
    args = parser.parse_args(["divmerge", "--base", "b", "--out", "o", "--lr", "0.5", "--quiet", "--no-cache",
                              "--top-k", "0", "--cart-rank-ratio", "0.2", "--kind", "causal-lm", "--epochs", "2"])
    spec = methods.get("divmerge")
    assert cli.given_options(args, spec) == dict(lr=0.5, progress=False, teacher_cache=False, top_k=0,
                                                 cart_rank_ratio=0.2, kind="causal-lm", epochs=2, steps=None)
    assert cli.given_options(args, spec, "classification") == dict(lr=0.5, progress=False, teacher_cache=False,
                                                                   cart_rank_ratio=0.2, kind="causal-lm", epochs=2,
                                                                   steps=None)
    args = parser.parse_args(["adamerging", "--base", "b", "--out", "o", "--no-clamp", "--no-progress",
                              "--steps", "3", "--init", "0.5", "--no-batch-tasks"])
    assert cli.given_options(args, methods.get("adamerging")) == dict(clamp=None, progress=False, steps=3, init=0.5,
                                                                      batch_tasks=False)
    assert cli.given_options(parser.parse_args(["adamerging", "--base", "b", "--out", "o"]),
                             methods.get("adamerging")) == {}


@pytest.mark.parametrize("name,option,value,message", [b for b in BAD_VALUES if b[2] is not None])
def test_cli_refuses_the_same_values_with_the_same_words(name, option, value, message):
    """cli.check_options (run before any file is read): "--flag VALUE: <the Python API's words>", exit 2."""
    spec = methods.get(name)
    body = message.partition(": ")[2] if ": " in message else message.partition("; ")[2]
    with pytest.raises(cli.CLIError, match=rf"^{cli.option_flag(option)} .*[:;] ?{body}") as e:
        cli.check_options(spec, {option: value}, max_length=8)
    assert ("\n" not in str(e.value))


def test_cli_bad_value_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    """Through main(): a bad option value is a usage error (exit 2, one line), found before the inputs are read."""
    monkeypatch.setattr(cli.learned, "read_jsonl_texts", lambda *a, **k: pytest.fail("data read before options checked"))
    for d in ("base", "a"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    argv = ["--base", str(tmp_path / "base"), "--model", f"a={tmp_path / 'a'}", "--data", f"a={tmp_path / 'a.jsonl'}",
            "--out", str(tmp_path / "out")]
    for command, extra, line in (("divmerge", ["--beta", "1.5"], "--beta 1.5: must be in (0, 1)"),
                                 ("divmerge", ["--init-from", "bogus"], "--init-from 'bogus': unknown static method"),
                                 ("adamerging", ["--cart-rank-ratio", "0"], "--cart-rank-ratio 0.0: must be in (0, 1]"),
                                 ("adamerging", ["--steps", "-2"], "--steps -2: must be an int >= 0")):
        code = cli.main([command, *argv, *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"pymerge {command}: error: {line}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:   # a value that is no int at all: argparse's own usage error
        cli.main(["divmerge", *argv, "--steps", "two"])
    assert e.value.code == 2 and "--steps: invalid int value: 'two'" in capsys.readouterr().err


def test_methods_command_lists_every_method_with_its_params(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in methods.available("all"):
        assert methods.get(name).describe() in out
    assert "  max_new_tokens = 32 (causal-lm only): " in out and "  clamp = (0.0, 1.0): " in out


# ------------------------------------------------------------------------------------------ shared checks
def test_no_method_imports_a_private_name_from_a_sibling():
    """Shared checks live in pymerge/methods/params.py with public names; a method file never reaches into
    another method's private helpers (`from .weight_average import _finite`)."""
    borrowed = []
    for f in sorted(os.listdir(METHODS_DIR)):
        if not f.endswith(".py"):
            continue
        with open(os.path.join(METHODS_DIR, f), encoding="utf-8") as src:
            tree = ast.parse(src.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                borrowed += [f"{f}: from .{node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert borrowed == []


def test_shared_checks():
    assert params.finite_number(1) is None and params.finite_number(-2.5) is None
    for bad in (float("nan"), float("inf"), True, "1", None):
        assert params.finite_number(bad) == "must be a finite number"
    unit_open = params.number_in(0, 1, low_open=True, high_open=True)
    closed = params.number_in(0, 1)
    assert [unit_open(v) is None for v in (0, 1e-9, 0.5, 1 - 1e-9, 1)] == [False, True, True, True, False]
    assert [closed(v) is None for v in (-1e-9, 0, 1, 1 + 1e-9, float("nan"), True)] == \
        [False, True, True, False, False, False]
    assert params.number_in(0, 1, high_open=True)(1.0) == "must be in [0, 1)"
    assert params.int_at_least(1)(1) is None and params.int_at_least(1)(0) == "must be an int >= 1"
    assert params.int_at_least(0)(False) and params.int_at_least(0)(2.0)
    assert params.positive_number(1e-300) is None and params.positive_number(0) and params.positive_number(math.inf)
    assert params.regex(r"^a\.") is None and params.regex("(").startswith("not a valid regular expression")
    assert params.regex(3).startswith("must be a regular expression")
    assert params.integer(-5) is None and params.integer(True) and params.boolean(1)
    p = params.Param("x", 1.0, "h", check=params.finite_number)
    assert params.problem(p, None) == "pass a value (default 1.0)"
    assert params.problem(params.Param("s", 0, "h", type=int, check=params.integer, optional=True), None) is None
    with pytest.raises(ValueError, match=r"^m: x = nan: must be a finite number$"):
        params.check_value("m", p, float("nan"))
