"""Write-behind for ShardWriter: one thread that puts merged tensors into their shard files (pwrite) and starts
their write-back to the device (fdatasync once enough bytes are waiting), while the caller merges the next
group. A merge from a warm page cache is bound by memory bandwidth, so the copy into the page cache and the wait
for the device are worth hiding behind the arithmetic (benchmarks/large_merge.py measures it).

Bounded: at most `max_bytes` of submitted tensors wait at a time (a larger tensor waits alone), so write-behind
adds at most that much to the merge's memory. An error of the thread (a full disk, say) is raised by every later
submit() and drain(). abort() drops whatever has not been written yet and joins the thread: callers abort
before anything a queued tensor points into is closed, and before a temporary output is removed.
"""
import os
import threading
from collections import deque

DEFAULT_MAX_BYTES = 256 * 2 ** 20
SYNC_EVERY = 64 * 2 ** 20           # start the device write-back after this many new bytes of one file


def pwrite_all(fd, view, offset):
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class WriteBehind:
    def __init__(self, max_bytes=DEFAULT_MAX_BYTES, sync_every=SYNC_EVERY):
        self.max_bytes, self.sync_every = max_bytes, sync_every
        self._items = deque()
        self._waiting = 0                   # bytes submitted and not yet written
        self._unsynced = {}                 # fd -> bytes written since its last fdatasync
        self._error = None
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="pymerge-write-behind", daemon=True)
        self._thread.start()

    def submit(self, fd, data, offset):
        """Queue `data` (an object exporting a contiguous byte buffer, kept alive until written) for
        pwrite(fd, data, offset). Blocks while more than max_bytes wait."""
        n = memoryview(data).nbytes
        with self._cv:
            while self._waiting and self._waiting + n > self.max_bytes and self._error is None:
                self._cv.wait()
            self._raise()
            if self._stop:
                raise RuntimeError("WriteBehind: submit after abort")
            self._items.append((fd, data, offset, n))
            self._waiting += n
            self._cv.notify_all()

    def drain(self):
        """Wait until everything submitted is written; raise the thread's error if it had one."""
        with self._cv:
            while self._waiting and self._error is None:
                self._cv.wait()
            self._raise()

    def abort(self):
        """Drop what is still queued, let a pwrite in progress end, and stop the thread."""
        with self._cv:
            self._stop = True
            self._items.clear()
            self._waiting = 0
            self._cv.notify_all()
        self._thread.join()

    def _raise(self):
        if self._error is not None:     # every later submit() / drain() raises it again: nothing is half-done
            raise self._error

    def _run(self):
        while True:
            with self._cv:
                while not self._items and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                fd, data, offset, n = self._items[0]
            try:
                pwrite_all(fd, memoryview(data).cast("B"), offset)
                self._unsynced[fd] = self._unsynced.get(fd, 0) + n
                if self._unsynced[fd] >= self.sync_every:
                    os.fdatasync(fd)
                    self._unsynced[fd] = 0
            except BaseException as e:     # noqa: B902 (handed to the caller's thread)
                with self._cv:
                    self._error = e
                    self._items.clear()
                    self._waiting = 0
                    self._cv.notify_all()
                return
            with self._cv:
                if self._items:             # abort() may have cleared the queue meanwhile
                    self._items.popleft()
                    self._waiting -= n
                self._cv.notify_all()
