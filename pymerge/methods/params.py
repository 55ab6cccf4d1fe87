"""A method's parameters: the Param declaration, the value checks every method shares, and the rules that
turn given values into checked ones. Static methods (pymerge.merge) and learned methods (pymerge.divmerge,
pymerge.adamerging) declare their parameters with the same Param, so describe(), validation, the command
line's flags and config files all read one declaration (pymerge/methods/spec.py holds the two spec kinds).

A check is a function value -> None (valid) or a message saying what the value must be ("must be an int >= 1");
the caller names the method and the parameter (``problem`` / ``check_value``). It sees one value (each
element of a per-model list); None never reaches it (see ``problem``).
"""
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

from ..ops.backend import BACKENDS


@dataclass(frozen=True)
class Param:
    """One method parameter.

    type: the type of a value written as text (a command-line flag, a config file): int, float, str or bool;
        object (or tuple, dict) for a parameter only Python can pass. check may accept more (e.g. init=: a
        float on the command line, also a list or a tensor from Python).
    per_model: accepts a scalar or a list of T values (one per fine-tuned model; static methods).
    optional: None is a valid value although the default is not None (e.g. a seed: fresh randomness;
        AdaMerging's clamp: unconstrained); a None default is always valid.
    model_kinds: the model kinds (a learned method's kind=) the parameter applies to; None: every kind.
    """
    name: str
    default: Any
    help: str
    type: type = float
    per_model: bool = False
    choices: Optional[Sequence[Any]] = None
    # Returns an error message for a bad value (one value; each element for per_model lists), or None.
    check: Optional[Callable[[Any], Optional[str]]] = None
    optional: bool = False
    model_kinds: Optional[Tuple[str, ...]] = None

    def applies_to(self, model_kind) -> bool:
        return self.model_kinds is None or model_kind is None or model_kind in self.model_kinds


# The op backend a method passes to pymerge.ops ("auto" = the fastest available for the tensors' device).
BACKEND_PARAM = Param("backend", "auto", "pymerge.ops backend for the heavy math", type=str, choices=BACKENDS)


# ------------------------------------------------------------------------------------------------- checks
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite_number(v):
    return None if _is_number(v) and math.isfinite(float(v)) else "must be a finite number"


def positive_number(v):
    return None if _is_number(v) and math.isfinite(float(v)) and v > 0 else "must be a positive finite number"


def number_in(low, high, *, low_open=False, high_open=False):
    """A check of a number in the interval low..high, each end closed unless *_open (NaN fails)."""
    shown = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(v):
        if _is_number(v):
            x = float(v)
            if (low < x if low_open else low <= x) and (x < high if high_open else x <= high):
                return None
        return f"must be in {shown}"
    return check


def int_at_least(minimum):
    """A check of an int (not a bool) >= minimum."""
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            return f"must be an int >= {minimum}"
        return None
    return check


def integer(v):
    return None if isinstance(v, int) and not isinstance(v, bool) else "must be an int"


def boolean(v):
    return None if isinstance(v, bool) else "must be True or False"


def regex(v):
    """A regular expression (re.search on key names): a string or a compiled pattern that compiles."""
    if not isinstance(v, (str, re.Pattern)):
        return f"must be a regular expression (a str), got a {type(v).__name__}"
    try:
        re.compile(v)
    except re.error as e:
        return f"not a valid regular expression ({e})"
    return None


def regex_list(v):
    if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        return None
    return "must be a list of regexes (re.search on the key name)"


def path_like(v):
    return None if isinstance(v, (str, os.PathLike)) else "must be a path (a str or os.PathLike)"


# --------------------------------------------------------------------------------------------- resolving
def problem(p: Param, value) -> Optional[str]:
    """What is wrong with `value` for `p` (one value, not a per-model list), or None when it is valid.

    None is valid for a parameter whose default is None or that is optional; anywhere else it would reach
    the method's arithmetic."""
    if value is None:
        return None if p.default is None or p.optional else f"pass a value (default {p.default!r})"
    if p.choices is not None and value not in p.choices:
        return f"expected one of {list(p.choices)}"
    return p.check(value) if p.check is not None else None


def check_value(owner: str, p: Param, value):
    """ValueError "{owner}: {name} = {value}: {what is wrong}" unless `value` is valid for `p`."""
    msg = problem(p, value)
    if msg is not None:
        sep = "; " if value is None or (p.choices is not None and value not in p.choices) else ": "
        raise ValueError(f"{owner}: {p.name} = {value!r}{sep}{msg}")


def reject_unknown(owner: str, given: Iterable[str], params: Sequence[Param], noun: str):
    """ValueError naming the given names no Param declares (noun: "parameter" or "option")."""
    known = {p.name for p in params}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{owner}: unknown {noun}(s) {unknown}; known: {sorted(known)}")


def describe_params(params: Sequence[Param]) -> list:
    """One line per Param: "  name = default[ (scalar or one per model)][ (<kind> only)]: help"."""
    lines = []
    for p in params:
        per = " (scalar or one per model)" if p.per_model else ""
        only = f" ({' / '.join(p.model_kinds)} only)" if p.model_kinds is not None else ""
        lines.append(f"  {p.name} = {p.default!r}{per}{only}: {p.help}")
    return lines
