"""ShardWriter's write-behind (pymerge/io/write_behind.py): the same files as writing in the caller's thread, a
bounded queue, the thread's errors raised in the caller, and abort() dropping what was not written."""
import os
import threading

import pytest
import torch

from pymerge.io import ShardWriter, plan_shards
from pymerge.io.write_behind import WriteBehind


def tensors(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return {f"k{i}": torch.randn(64 + 17 * i, 33, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(n)}


@pytest.mark.parametrize("limit", ["5GB", 20_000])
def test_write_behind_gives_the_same_files(tmp_path, limit):
    sd = tensors()
    plan = plan_shards([(k, v.shape, v.dtype) for k, v in sd.items()], limit)
    out = {}
    for behind in (False, True):
        d = tmp_path / str(behind)
        d.mkdir()
        w = ShardWriter(d, plan, write_behind=behind).open()
        for k in list(sd)[::-1]:
            w.write(k, sd[k])
        w.finish()
        out[behind] = {name: (d / name).read_bytes() for name in sorted(os.listdir(d))}
    assert len(out[True]) == (1 if limit == "5GB" else len(plan.shards) + 1)
    assert out[True] == out[False]


def test_queue_is_bounded_and_writes_everything(tmp_path, monkeypatch):
    import pymerge.io.write_behind as wb_module
    release = threading.Event()
    real = wb_module.pwrite_all

    def slow_pwrite(fd, view, offset):
        release.wait(timeout=30)
        real(fd, view, offset)
    monkeypatch.setattr(wb_module, "pwrite_all", slow_pwrite)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    wb = WriteBehind(max_bytes=100, sync_every=50)
    wb.submit(fd, bytes([1]) * 60, 0)
    second = threading.Thread(target=lambda: (wb.submit(fd, bytes([2]) * 60, 60),
                                              wb.submit(fd, bytes([3]) * 200, 120)))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()                    # 60 + 60 > 100 bytes would wait: submit blocks
    release.set()
    second.join(timeout=30)
    assert not second.is_alive()
    wb.drain()
    wb.abort()
    os.close(fd)
    assert path.read_bytes() == bytes([1]) * 60 + bytes([2]) * 60 + bytes([3]) * 200


def test_errors_of_the_thread_reach_the_caller(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)             # pwrite fails with EBADF in the thread
    wb = WriteBehind()
    wb.submit(fd, b"abc", 0)
    with pytest.raises(OSError):
        wb.drain()
    with pytest.raises(OSError):                # raised again: the caller cannot go on as if it were written
        wb.submit(fd, b"abc", 0)
    wb.abort()
    with pytest.raises(OSError):
        wb.drain()
    os.close(fd)
    assert path.read_bytes() == b"x"


def test_shard_writer_close_drops_unwritten_and_stops_the_thread(tmp_path):
    sd = tensors(n=4)
    plan = plan_shards([(k, v.shape, v.dtype) for k, v in sd.items()], "5GB")
    w = ShardWriter(tmp_path, plan, write_behind=True).open()
    before = {t.name for t in threading.enumerate()}
    assert "pymerge-write-behind" in before
    w.write("k0", sd["k0"])
    w.close()                                   # as on an error or a signal: no finish()
    assert "pymerge-write-behind" not in {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="never written"):
        w.finish()
