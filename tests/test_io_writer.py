"""pymerge.io output: shard planning (sizes, mergekit's names), tensors written in place in any order and read
back by the safetensors package, the non-weight files copied, and the atomic output directory (no debris on
failure or signal, no output inside an input)."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pymerge.io import (AtomicDirectory, Interrupted, ModelFileError, ShardWriter, copy_model_files, parse_size,
                        plan_shards, refuse_overlap)


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10 ** 9), ("2GiB", 2 * 2 ** 30), ("1.5MB", 1_500_000),
                                        ("100", 100), (4096, 4096), ("10kb", 10_000), ("3 MiB", 3 * 2 ** 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5XB", "-1", "0", "GB", True])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(10, 10, generator=g), "b": torch.randn(30, generator=g).bfloat16(),
            "c": torch.arange(7), "d": torch.tensor([True, False, True]), "e": torch.randn(50, 4, generator=g),
            "f": torch.empty(0), "g": torch.randn(3, generator=g).double()}


def write(tmp_path, sd, limit, order=None):
    plan = plan_shards([(k, v.shape, v.dtype) for k, v in sd.items()], limit)
    w = ShardWriter(tmp_path, plan).open()
    for k in order or sd:
        w.write(k, sd[k])
    w.finish()
    return plan, w


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    sd = tensors()
    plan, w = write(tmp_path, sd, "5GB", order=list(sd)[::-1])
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert w.bytes_written == os.path.getsize(tmp_path / "model.safetensors")


def test_shards_follow_the_limit_and_mergekits_names(tmp_path):
    sd = tensors()
    limit = 500                                      # a (400 B), e (800 B: larger than the limit, alone), ...
    plan, _ = write(tmp_path, sd, limit, order=["e", "g", "a", "d", "c", "b", "f"])
    names = plan.file_names
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert index["weight_map"] == {k: names[plan.key_shard[k]] for k in sorted(sd)}
    for name in names:
        part = load_file(tmp_path / name)
        size = sum(v.numel() * v.element_size() for v in part.values())
        assert size <= limit or len(part) == 1, name
        for k, v in part.items():
            assert torch.equal(v, sd[k]) and index["weight_map"][k] == name
    # greedy in the given order: a shard is closed only when the next tensor does not fit
    shard_of = [plan.key_shard[k] for k in sd]
    assert shard_of == sorted(shard_of)
    for i in range(len(names) - 1):
        first_next = next(k for k in sd if plan.key_shard[k] == i + 1)
        used = sum(sd[k].numel() * sd[k].element_size() for k in sd if plan.key_shard[k] == i)
        assert used + sd[first_next].numel() * sd[first_next].element_size() > limit


def test_tensors_are_aligned_in_the_shard(tmp_path):
    sd = {"u": torch.arange(3, dtype=torch.uint8), "w": torch.randn(5), "d": torch.randn(3).double()}
    plan, _ = write(tmp_path, sd, "1GB")
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    for k, v in sd.items():
        assert header[k]["data_offsets"][0] % v.element_size() == 0, k


def test_writer_refuses_a_missing_or_wrong_tensor(tmp_path):
    sd = tensors()
    plan = plan_shards([(k, v.shape, v.dtype) for k, v in sd.items()], "1GB")
    w = ShardWriter(tmp_path, plan).open()
    with pytest.raises(ValueError, match="key 'a' holds 4 bytes"):
        w.write("a", torch.zeros(1))
    with pytest.raises(KeyError):
        w.write("zz", torch.zeros(1))
    w.write("a", sd["a"])
    with pytest.raises(KeyError, match="written twice"):
        w.write("a", sd["a"])
    with pytest.raises(RuntimeError, match="never written"):
        w.finish()
    w.close()


def test_copy_model_files_sets_the_dtype_and_keeps_links_inside(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "config.json").write_text(json.dumps({"torch_dtype": "float32", "hidden_size": 4}))
    (src / "tokenizer.json").write_text("{}")
    (src / "vocab.txt").write_text("a\nb\n")
    copied, written = copy_model_files([(src, ("config.json", "generation_config.json")),
                                        (src, ("tokenizer.json", "vocab.txt"))], dst, dtype=torch.bfloat16)
    assert copied == ["config.json", "tokenizer.json", "vocab.txt"]
    assert json.loads((dst / "config.json").read_text()) == {"torch_dtype": "bfloat16", "hidden_size": 4}
    assert (dst / "vocab.txt").read_text() == "a\nb\n" and written > 0
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", src / "merges.txt")
    with pytest.raises(ModelFileError, match="outside the model directory"):
        copy_model_files([(src, ("merges.txt",))], tmp_path / "dst2")


# ------------------------------------------------------------------------------------------ atomic output
def debris(parent):
    return [p for p in os.listdir(parent) if "pymerge-" in p]


def test_atomic_directory_publishes_or_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with AtomicDirectory(out) as tmp:
        (tmp / "x").write_text("1")
        assert not out.exists()
    assert (out / "x").read_text() == "1" and debris(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask     # not mkdtemp's 0700
    with pytest.raises(ModelFileError, match="already exists"):
        with AtomicDirectory(out):
            pass
    with pytest.raises(ZeroDivisionError):
        with AtomicDirectory(out, overwrite=True) as tmp:
            (tmp / "y").write_text("2")
            1 / 0
    assert os.listdir(out) == ["x"] and debris(tmp_path) == []
    with AtomicDirectory(out, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert os.listdir(out) == ["y"] and debris(tmp_path) == []


def test_a_signal_inside_the_block_cleans_up(tmp_path):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        with AtomicDirectory(out) as tmp:
            (tmp / "x").write_text("1")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10 ** 6):   # the handler runs between bytecodes
                pass
    assert e.value.signum == signal.SIGTERM
    assert not out.exists() and debris(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_refuse_overlap(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "model.safetensors").write_text("")
    inputs = [("base", tmp_path / "in")]
    for out in (tmp_path / "in", tmp_path / "in" / "out", tmp_path):
        with pytest.raises(ModelFileError, match="input"):
            refuse_overlap(out, inputs)
    weights = [("file", tmp_path / "in" / "model.safetensors")]
    refuse_overlap(tmp_path / "in" / "x", weights)                # beside an input file is fine
    for out in (tmp_path / "in" / "model.safetensors", tmp_path / "in", tmp_path):
        with pytest.raises(ModelFileError, match="contains the input"):
            refuse_overlap(out, weights)
    refuse_overlap(tmp_path / "elsewhere", inputs)
    os.symlink(tmp_path / "in", tmp_path / "alias")
    with pytest.raises(ModelFileError, match="inside the input directory"):
        refuse_overlap(Path(tmp_path / "alias" / "out"), inputs)


def test_two_writers_fill_one_set_of_shards(tmp_path):
    """What separate processes do (torchrun): one creates the files, each writes its own keys, one indexes."""
    sd = tensors()
    plan = plan_shards([(k, v.shape, v.dtype) for k, v in sd.items()], 500)
    keys = list(sd)
    first = ShardWriter(tmp_path, plan, keys=keys[::2]).open()
    second = ShardWriter(tmp_path, plan, keys=keys[1::2]).open(create=False)
    for k in reversed(keys):
        (first if k in keys[::2] else second).write(k, sd[k])
    second.finish(write_index=False)
    first.finish()
    back = {}
    for name in plan.file_names:
        back.update(load_file(tmp_path / name))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    (tmp_path / "single").mkdir()
    write(tmp_path / "single", sd, 500)                       # one writer: the same bytes
    for name in plan.file_names:
        assert (tmp_path / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
