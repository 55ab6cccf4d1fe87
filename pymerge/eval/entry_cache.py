"""The on-disk cache entries both evaluation suites build their experts into (experts.py: text classifiers,
lm_experts.py: causal LMs and the dequantized GGUF base): where an entry lives, how it is written, and the
checks of its manifest that do not depend on what the entry holds.

An entry is a directory root/<kind>/<stem>-<key> (the key: 16 hex digits of the sha256 of the request it
answers) holding the weights and manifest.json. publish() writes it in a temporary sibling directory and
renames it into place, so a reader sees none or all of it; read_manifest() gives the manifest of an entry
that answers a request. Each suite checks its own weights (files, keys, shapes) after that. It is a module of
its own so that the generative suite does not reach into the text suite's experts module for it.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MANIFEST_FILE = "manifest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def entry_dir(root: Path, kind: str, stem: str, request: dict) -> Path:
    """root/kind/<stem>-<16 hex digits of the request's sha256> (both suites' caches)."""
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return root / kind / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}-{key}"


def read_manifest(path: Path, request: dict) -> tuple:
    """(manifest, None) when the entry at `path` has a readable manifest that answers `request`, else (None,
    the reason: "absent", an unreadable manifest, a manifest for another request)."""
    if not path.is_dir():
        return None, "absent"
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({e})"
    if not isinstance(manifest, dict) or manifest.get("request") != request:
        return None, "manifest for another request"
    return manifest, None


def publish(path: Path, fill, manifest: dict, weights_sha256) -> dict:
    """Fill a temporary sibling of `path` (fill(tmp_dir) -> None or more manifest fields), add manifest.json
    (with weights_sha256(tmp_dir)) and rename it into place; an entry already there is moved aside first and
    removed after (both suites' caches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        extra = fill(tmp) or {}
        manifest = {**manifest, **extra, "weights_sha256": weights_sha256(tmp)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "entry")
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
