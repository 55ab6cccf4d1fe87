"""open_model(path): a model on disk as one lazy mapping key -> tensor, whatever its layout.

Accepted:
  - a Hugging Face model directory (as save_pretrained writes it): model.safetensors.index.json + shards,
    model.safetensors, pytorch_model.bin.index.json + shards, or pytorch_model.bin (looked for in that order);
  - a single .safetensors file, or a .bin / .pt / .pth checkpoint (torch.save zip format).
The files are untrusted: safetensors headers are validated (safetensors_file.py), checkpoints loaded with
weights_only=True only (checkpoint.py), and every shard an index json names must resolve inside the model
directory: a plain relative name without '..', not absolute, and not a symbolic link leading out of the
directory. (One exception keeps Hugging Face's hub cache usable: a snapshot directory
.../snapshots/<revision>/ whose files link into the same cache's .../blobs/.)
"""
import json
from collections import OrderedDict
from pathlib import Path

from .checkpoint import TorchCheckpoint
from .errors import ModelFileError
from .safetensors_file import SafetensorsFile

# Looked for in a model directory, in this order: (index json or None, single file).
LAYOUTS = (("model.safetensors.index.json", None), (None, "model.safetensors"),
           ("pytorch_model.bin.index.json", None), (None, "pytorch_model.bin"))
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(root, name, what):
    """root/name as a real path, refused unless `name` is a relative name without '..' whose real path (all
    links followed) lies inside root (or in root's hub-cache blobs, see the module doc)."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelFileError(f"{what}: invalid file name {name!r}")
    parts = Path(name).parts
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
        raise ModelFileError(f"{what}: file name {name!r} points outside the model directory {root} "
                             f"(absolute paths and '..' are refused)")
    real_root = root.resolve()
    real = (root / name).resolve()
    allowed = [real_root]
    if real_root.parent.name == "snapshots":
        allowed.append(real_root.parent.parent / "blobs")
    if not any(_inside(real, a) for a in allowed):
        raise ModelFileError(f"{what}: {name!r} is a link to {real}, outside the model directory {root}")
    return real


def _read_index(path):
    def unique(pairs):
        out = OrderedDict()
        for k, v in pairs:
            if k in out:
                raise ValueError(f"key {k!r} appears twice")
            out[k] = v
        return out
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f, object_pairs_hook=unique)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot read the index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(f"{path}: expected a JSON object with a \"weight_map\" {{key: shard file name}}")
    return weight_map


class Model:
    """A lazy read-only mapping key -> tensor over the files of one model (see the module doc).

    key_info(key) reads no data; self[key] maps the key's bytes; release(keys) drops their pages; aliases()
    maps each tied key (stored once under several names) to its first name; file_of(key) names its file."""

    def __init__(self, path, files, key_file, directory=None):
        self.path = Path(path)
        self.directory = directory  # the Hugging Face directory (config, tokenizer) or None for a single file
        self.files = files          # [SafetensorsFile | TorchCheckpoint]
        self._key_file = key_file   # OrderedDict key -> index into files

    def keys(self):
        return self._key_file.keys()

    def __iter__(self):
        return iter(self._key_file)

    def __len__(self):
        return len(self._key_file)

    def __contains__(self, key):
        return key in self._key_file

    def file_of(self, key):
        return self.files[self._key_file[key]].path

    def key_info(self, key):
        return self.files[self._key_file[key]].key_info(key)

    def __getitem__(self, key):
        return self.files[self._key_file[key]][key]

    @property
    def bytes_read(self):
        return sum(f.bytes_read for f in self.files)

    def aliases(self):
        out = {}
        for f in self.files:
            out.update((k, v) for k, v in f.aliases().items() if k in self._key_file)
        return out

    def release(self, keys):
        by_file = {}
        for key in keys:
            if key in self._key_file:
                by_file.setdefault(self._key_file[key], []).append(key)
        for i, ks in by_file.items():
            self.files[i].release(ks)

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Model({str(self.path)!r}, {len(self.files)} file(s), {len(self)} tensors)"


def open_file(path, shown=None):
    """One weights file: SafetensorsFile for .safetensors, TorchCheckpoint for .bin / .pt / .pth. `shown`: the
    name the model directory gives it (a link's name; what errors name and what tells the type)."""
    path, shown = Path(path), Path(shown or path)
    if shown.suffix == ".safetensors":
        f = SafetensorsFile(path)
    elif shown.suffix in CHECKPOINT_SUFFIXES:
        f = TorchCheckpoint(path)
    else:
        raise ModelFileError(f"{shown}: unknown weights file type (expected .safetensors, or a torch checkpoint "
                         f"{' / '.join(CHECKPOINT_SUFFIXES)})")
    f.path = str(shown)
    return f


def open_model(path) -> Model:
    """The model at `path` (a directory or one file; see the module doc), validated, nothing but headers read."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: does not exist")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _open_index(path.parent, path)
        f = open_file(path)
        return Model(path, [f], OrderedDict((k, 0) for k in f.keys()))
    if not path.is_dir():
        raise ModelFileError(f"{path}: neither a file nor a directory")
    for index_name, single in LAYOUTS:
        candidate = path / (index_name or single)
        if candidate.exists() or candidate.is_symlink():
            if index_name is not None:
                return _open_index(path, candidate)
            real = resolve_inside(path, single, str(path))
            if not real.is_file():
                raise ModelFileError(f"{candidate}: not a regular file")
            f = open_file(real, candidate)
            return Model(path, [f], OrderedDict((k, 0) for k in f.keys()), directory=path)
    looked = ", ".join(i or s for i, s in LAYOUTS)
    raise ModelFileError(f"{path}: no model weights found (looked for {looked})")


def _open_index(directory, index_path):
    weight_map = _read_index(index_path)
    if not weight_map:
        raise ModelFileError(f"{index_path}: the weight_map is empty")
    names = list(OrderedDict.fromkeys(weight_map.values()))
    files, file_no = [], {}
    try:
        for name in names:
            real = resolve_inside(directory, name, str(index_path))
            if not real.is_file():
                raise ModelFileError(f"{index_path}: shard {name!r} does not exist in {directory}")
            f = open_file(real, Path(directory) / name)
            file_no[name] = len(files)
            files.append(f)
        key_file = OrderedDict()
        for key, name in weight_map.items():
            f = files[file_no[name]]
            if key not in f:
                raise ModelFileError(f"{index_path}: key {key!r} is mapped to {name} but that file does not hold it")
            key_file[key] = file_no[name]
    except BaseException:
        for f in files:
            f.close()
        raise
    return Model(directory, files, key_file, directory=Path(directory))
