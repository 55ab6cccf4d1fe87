"""check_against_base: every model's keys, shapes and dtypes against the base's, from the headers alone
(key_info), before any tensor is read; all the mismatches in one error."""
import re

from .errors import ModelFileError

# Mismatches listed in the error (the count says how many there are in all).
SHOWN = 40


def _info(model, key):
    info = model.key_info(key)
    return tuple(info[0]), info[1]


def mismatches(base, models, names, exempt=None):
    """["<name>: <what differs>", ...] for every model against the base: missing and extra keys, shapes and
    dtypes. Keys matching the regex `exempt` (re.search) are not compared (per-task heads). A tied key (stored
    once under several names, reader.aliases()) counts under its first name only, so a model tied like the base
    matches whatever else the files spell (a Hugging Face safetensors file omits the tied copy, a .bin keeps
    it); a key tied in one and stored on its own in the other is a missing or an extra key. `names` labels
    the models in the messages (e.g. their paths)."""
    pattern = re.compile(exempt) if isinstance(exempt, str) else exempt

    def compared(model):
        aliases = _aliases(model)
        return [k for k in model.keys() if k not in aliases and (pattern is None or not pattern.search(k))]

    base_aliases = _aliases(base)
    base_keys = compared(base)
    base_set = set(base_keys)
    out = []
    for name, model in zip(names, models):
        keys = compared(model)
        key_set = set(keys)
        missing = [k for k in base_keys if k not in key_set]
        extra = [k for k in keys if k not in base_set]
        if missing:
            out.append(f"{name}: missing {len(missing)} key(s) of the base: {_list(missing)}"
                       + (" (tied there)" if any(k in model for k in missing) else ""))
        if extra:
            out.append(f"{name}: {len(extra)} key(s) the base lacks: {_list(extra)}"
                       + (" (tied in the base)" if any(k in base_aliases for k in extra) else ""))
        for key in base_keys:
            if key not in key_set:
                continue
            (bs, bd), (ms, md) = _info(base, key), _info(model, key)
            if bs != ms:
                out.append(f"{name}: key {key!r} has shape {ms}, the base's is {bs}")
            elif bd != md:
                out.append(f"{name}: key {key!r} has dtype {str(md).replace('torch.', '')}, the base's is "
                           f"{str(bd).replace('torch.', '')}")
    return out


def _aliases(model):
    get = getattr(model, "aliases", None)
    return get() if callable(get) else {}


def _list(keys, limit=5):
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def check_against_base(base, models, names, base_name="base", exempt=None):
    """Raise ModelFileError listing every mismatch (see mismatches) of the models against the base."""
    found = mismatches(base, models, names, exempt)
    if found:
        more = f"; ... and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        hint = "" if exempt is not None else " (keys that differ on purpose, such as per-task heads, can be " \
                                             "exempted with a regex: --task-specific-keys)"
        raise ModelFileError(f"the models do not match the base {base_name}: {len(found)} mismatch(es): "
                             + "; ".join(found[:SHOWN]) + more + hint)
