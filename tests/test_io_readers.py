"""pymerge.io readers on files written here: safetensors (against the safetensors package's own writer and
reader), torch checkpoints (weights_only, tied tensors, code-executing pickles), Hugging Face directories
(index json containment) and the all-mismatches check. Every corrupt file is a ModelFileError naming it."""
import json
import os
import struct
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from pymerge.io import ModelFileError, check_against_base, open_model
from pymerge.io.checkpoint import TorchCheckpoint
from pymerge.io.safetensors_file import SafetensorsFile


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([
        ("w", torch.randn(5, 7, generator=g)),
        ("h", torch.randn(3, generator=g).half()),
        ("b", torch.randn(2, 3, generator=g).bfloat16()),
        ("d", torch.randn(4, generator=g).double()),
        ("ids", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        ("mask", torch.tensor([True, False, True])),
        ("u8", torch.arange(5, dtype=torch.uint8)),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.empty(0, 4)),
    ])


def raw_file(path, header, data=b"", header_bytes=None):
    """A safetensors file from a header dict (or raw header bytes) and data bytes, unchecked."""
    text = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


# ---------------------------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_against_the_safetensors_package(tmp_path):
    sd = state()
    save_file(dict(sd), tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert set(f.keys()) == set(sd)
    for k, v in sd.items():
        info = f.key_info(k)
        assert (info.shape, info.dtype, info.nbytes) == (v.shape, v.dtype, v.numel() * v.element_size())
    assert f.bytes_read == 0                      # key_info reads no data
    for k, v in sd.items():
        got = f[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    assert f.bytes_read == sum(v.numel() * v.element_size() for v in sd.values())


def test_tensors_are_private_views_and_released_pages_read_back(tmp_path):
    sd = state()
    path = tmp_path / "m.safetensors"
    save_file(dict(sd), path)
    before = path.read_bytes()
    f = SafetensorsFile(path)
    t = f["w"]
    t.add_(1.0)                                   # copy-on-write: the file never changes
    assert path.read_bytes() == before
    f.release(["w", "d"])
    assert torch.equal(f["w"], sd["w"]) and torch.equal(f["d"], sd["d"])
    del t
    f.close()


def test_misaligned_tensor_is_read_correctly(tmp_path):
    x = torch.randn(3, 2)
    data = b"\0" + x.numpy().tobytes()
    header = {"x": {"dtype": "F32", "shape": [3, 2], "data_offsets": [1, 25]}, "pad": {
        "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    f = SafetensorsFile(raw_file(tmp_path / "m.safetensors", header, data))
    assert torch.equal(f["x"], x)


@pytest.mark.parametrize("case,expected", [
    ("short", "truncated"),
    ("header_past_end", "truncated safetensors file"),
    ("huge_header", "limit"),
    ("not_json", "not valid JSON"),
    ("not_utf8", "not valid JSON"),
    ("json_list", "expected an object"),
    ("duplicate_key", "appears twice"),
    ("unknown_dtype", "dtype 'F9'"),
    ("negative_shape", "shape"),
    ("bad_offsets", "data_offsets"),
    ("reversed_offsets", "begin <= end"),
    ("past_end", "past the end of the data"),
    ("size_mismatch", "needs 24"),
    ("overlap", "overlap"),
    ("bad_metadata", "__metadata__"),
])
def test_corrupt_safetensors_is_a_clear_error_naming_the_file(tmp_path, case, expected):
    path = tmp_path / "bad.safetensors"
    ok = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    data = bytes(24)
    if case == "short":
        path.write_bytes(b"\x01\x02\x03")
    elif case == "header_past_end":
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif case == "huge_header":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "not_json":
        raw_file(path, None, data, header_bytes=b"{not json")
    elif case == "not_utf8":
        raw_file(path, None, data, header_bytes=b"\xff\xfe{}")
    elif case == "json_list":
        raw_file(path, [1, 2], data)
    elif case == "duplicate_key":
        raw_file(path, None, data + data, header_bytes=(
            b'{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},'
            b' "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 48]}}'))
    elif case == "unknown_dtype":
        raw_file(path, {"a": {**ok, "dtype": "F9"}}, data)
    elif case == "negative_shape":
        raw_file(path, {"a": {**ok, "shape": [-2, 3]}}, data)
    elif case == "bad_offsets":
        raw_file(path, {"a": {**ok, "data_offsets": [0]}}, data)
    elif case == "reversed_offsets":
        raw_file(path, {"a": {**ok, "data_offsets": [24, 0]}}, data)
    elif case == "past_end":
        raw_file(path, {"a": {**ok, "data_offsets": [8, 32]}}, data)
    elif case == "size_mismatch":
        raw_file(path, {"a": {**ok, "data_offsets": [0, 20]}}, data)
    elif case == "overlap":
        raw_file(path, {"a": ok, "b": {**ok, "data_offsets": [12, 36]}}, data + bytes(12))
    elif case == "bad_metadata":
        raw_file(path, {"__metadata__": {"format": 1}, "a": ok}, data)
    with pytest.raises(ModelFileError) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_truncated_copy_of_a_real_file_is_refused(tmp_path):
    save_file(dict(state()), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(ModelFileError, match="truncated safetensors file"):
        SafetensorsFile(tmp_path / "cut.safetensors")


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_reads_a_state_dict_and_finds_tied_tensors(tmp_path):
    sd = state()
    sd["tied"] = sd["w"]                                  # one tensor under two names
    sd["view"] = sd["w"][1:]                              # a view is not a tie
    torch.save(sd, tmp_path / "m.bin")
    c = TorchCheckpoint(tmp_path / "m.bin")
    assert list(c.keys()) == list(sd)
    for k, v in sd.items():
        assert torch.equal(c[k], v) and c.key_info(k)[:2] == (v.shape, v.dtype), k
    assert c.aliases() == {"tied": "w"}
    torch.save({"state_dict": dict(state())}, tmp_path / "wrapped.pt")
    assert set(TorchCheckpoint(tmp_path / "wrapped.pt").keys()) == set(state())


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_in_its_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, tmp_path / "evil.bin")
    with pytest.raises(ModelFileError, match="refused") as e:
        TorchCheckpoint(tmp_path / "evil.bin")
    assert str(tmp_path / "evil.bin") in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("case,expected", [
    ("legacy", "not a torch.save zip"),
    ("not_dict", "expected a state dict"),
    ("non_tensor", "entry 'n' is a int"),
    ("garbage", "not a torch.save zip"),
])
def test_bad_checkpoints(tmp_path, case, expected):
    path = tmp_path / "m.pt"
    if case == "legacy":
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    elif case == "not_dict":
        torch.save([torch.zeros(2)], path)
    elif case == "non_tensor":
        torch.save({"w": torch.zeros(2), "n": 3}, path)
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFileError) as e:
        TorchCheckpoint(path)
    assert str(path) in str(e.value) and expected in str(e.value)


# ---------------------------------------------------------------------------------------- model directories
def sharded_dir(root, sd, shards=2):
    root.mkdir()
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, root / name)
        weight_map.update({k: name for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    return root


def test_sharded_directory_reads_every_key(tmp_path):
    sd = state()
    m = open_model(sharded_dir(tmp_path / "m", sd, shards=3))
    assert set(m.keys()) == set(sd) and len(m.files) == 3
    for k, v in sd.items():
        assert torch.equal(m[k], v)
    assert m.file_of("w").endswith("model-00001-of-00003.safetensors")


def test_directory_layouts_and_single_files(tmp_path):
    sd = state()
    (tmp_path / "st").mkdir()
    save_file(dict(sd), tmp_path / "st" / "model.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(dict(sd), tmp_path / "bin" / "pytorch_model.bin")
    for path in (tmp_path / "st", tmp_path / "bin", tmp_path / "st" / "model.safetensors",
                 tmp_path / "bin" / "pytorch_model.bin"):
        m = open_model(path)
        assert all(torch.equal(m[k], v) for k, v in sd.items()), path
    (tmp_path / "none").mkdir()
    with pytest.raises(ModelFileError, match="no model weights found"):
        open_model(tmp_path / "none")
    with pytest.raises(ModelFileError, match="does not exist"):
        open_model(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelFileError, match="unknown weights file type"):
        open_model(tmp_path / "x.txt")


@pytest.mark.parametrize("name,expected", [
    ("../outside.safetensors", "points outside"),
    ("/etc/passwd", "points outside"),
    ("sub/../../outside.safetensors", "points outside"),
    ("link.safetensors", "outside the model directory"),
    ("missing.safetensors", "does not exist"),
])
def test_index_shard_names_stay_inside_the_directory(tmp_path, name, expected):
    save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")
    root = tmp_path / "m"
    root.mkdir()
    os.symlink(tmp_path / "outside.safetensors", root / "link.safetensors")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(ModelFileError) as e:
        open_model(root)
    assert expected in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_index_errors(tmp_path):
    root = sharded_dir(tmp_path / "m", state())
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"nope": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelFileError, match="key 'nope' is mapped to"):
        open_model(root)
    index.write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="weight_map"):
        open_model(root)
    index.write_text("{")
    with pytest.raises(ModelFileError, match="cannot read the index"):
        open_model(root)


def test_hub_cache_snapshot_links_into_its_blobs_are_allowed(tmp_path):
    blobs = tmp_path / "models--x" / "blobs"
    snap = tmp_path / "models--x" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, blobs / "0123")
    os.symlink("../../blobs/0123", snap / "model.safetensors")
    assert torch.equal(open_model(snap)["w"], torch.ones(3))


# ------------------------------------------------------------------------------------------------ validation
def test_every_mismatch_is_reported_at_once(tmp_path):
    base = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4), c=torch.zeros(1), head=torch.zeros(2))
    m1 = OrderedDict(a=torch.zeros(3, 2), b=torch.zeros(4).half(), head=torch.zeros(5))      # shape, dtype, missing c
    m2 = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4), c=torch.zeros(1), x=torch.zeros(1), head=torch.zeros(7))
    paths = []
    for name, sd in (("base", base), ("m1", m1), ("m2", m2)):
        save_file(dict(sd), tmp_path / f"{name}.safetensors")
        paths.append(tmp_path / f"{name}.safetensors")
    b, *ms = [open_model(p) for p in paths]
    with pytest.raises(ModelFileError) as e:
        check_against_base(b, ms, ["m1", "m2"], "base")
    msg = str(e.value)
    for part in ("m1: key 'a' has shape (3, 2), the base's is (2, 3)", "m1: key 'b' has dtype float16",
                 "m1: missing 1 key(s) of the base: ['c']", "m2: 1 key(s) the base lacks: ['x']",
                 "m1: key 'head' has shape (5,)", "m2: key 'head' has shape (7,)", "6 mismatch(es)"):
        assert part in msg, part
    with pytest.raises(ModelFileError) as e:               # the heads exempted: the others remain
        check_against_base(b, ms, ["m1", "m2"], "base", exempt=r"^head$")
    assert "head" not in str(e.value) and "4 mismatch(es)" in str(e.value)
    check_against_base(b, [b], ["same"], "base")


def test_tied_keys_match_whatever_the_format(tmp_path):
    """A .bin base stores the tied copy, a safetensors model omits it: they match; an untied model does not."""
    sd = OrderedDict(emb=torch.randn(4, 3), other=torch.randn(2))
    tied = OrderedDict(sd, head=sd["emb"])
    torch.save(tied, tmp_path / "base.bin")
    save_file(dict(sd), tmp_path / "m.safetensors")
    save_file({**sd, "head": sd["emb"].clone()}, tmp_path / "untied.safetensors")
    base = open_model(tmp_path / "base.bin")
    assert base.aliases() == {"head": "emb"}
    check_against_base(base, [open_model(tmp_path / "m.safetensors")], ["m"])
    with pytest.raises(ModelFileError, match=r"1 key\(s\) the base lacks: \['head'\] \(tied in the base\)"):
        check_against_base(base, [open_model(tmp_path / "untied.safetensors")], ["untied"])
    assert torch.equal(load_file(tmp_path / "m.safetensors")["emb"], base["emb"])
