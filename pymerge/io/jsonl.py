"""JSON Lines files from users (a task's texts and labels, DivMerge's unlabelled inputs): one reader, so every
command reports a bad line the same way."""
import codecs
import json
from pathlib import Path


def jsonl_objects(path):
    """Yield ("FILE:LINE", object) for every non-blank line of a UTF-8 JSONL file (a UTF-8 byte order mark may
    start it). A missing or unreadable file, a line that is not UTF-8 or not JSON: ValueError naming the file
    and the 1-based line. What the objects must hold is the caller's to check."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {path} is not a file")
    try:
        f = open(path, "rb")  # bytes: a decoding error can then name its line
    except OSError as e:
        raise ValueError(f"data file {path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                 f"the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield where, obj
