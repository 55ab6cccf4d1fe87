"""An output directory that appears complete or not at all, and the checks on where it may go.

    with AtomicDirectory(out, overwrite=False) as tmp:
        ... write every file into tmp (fsynced) ...
    # here `out` holds exactly what was written; on an exception or SIGINT / SIGTERM neither `out` (unless
    # it existed before) nor any temporary directory is left

Everything is written into a temporary sibling directory (same file system, so the final rename is atomic);
on success the directory is fsynced, renamed to `out` (an existing `out`, allowed by overwrite, is first moved
aside and removed after the rename) and its parent fsynced. While the block runs, SIGINT and SIGTERM raise
Interrupted (a BaseException, so no `except Exception` swallows it) and the temporary directory is removed;
the signals are blocked during the final renames. The previous handlers are restored on exit.
"""
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import ModelFileError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while an AtomicDirectory was being written."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_overlap(out, inputs):
    """ModelFileError when the output directory `out` is or lies inside an input directory, is an input file,
    or contains an input (writing or replacing it would touch the input). inputs: [(label, path)]."""
    real_out = Path(os.path.abspath(out)).resolve()
    for label, path in inputs:
        real = Path(os.path.abspath(path)).resolve()
        if real.is_dir() and (real_out == real or real in real_out.parents):
            raise ModelFileError(f"output {out} is inside the input directory {path} ({label}); write it elsewhere")
        if real_out == real or real_out in real.parents:
            raise ModelFileError(f"output {out} contains the input {path} ({label}); write it elsewhere")


class AtomicDirectory:
    """See the module doc."""

    def __init__(self, out, overwrite=False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.tmp = None
        self._old_handlers = {}

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise ModelFileError(f"output {self.out} already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise ModelFileError(f"output {self.out} exists and is not a directory")
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old_handlers[s] = signal.signal(s, _raise_interrupted)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.pymerge-tmp-", dir=self.out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 is for the temporary name, not the output
        except OSError as e:
            self._restore()
            raise ModelFileError(f"output {self.out}: cannot create a directory in {self.out.parent} "
                                 f"({e.strerror or e})") from None
        except BaseException:
            self._restore()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._publish()
        finally:
            # A second SIGINT / SIGTERM (torchrun stops every rank when one fails) must not cut the clean-up
            # short: the signals wait until the temporary directory is gone and the old handlers are back.
            blocked = hasattr(signal, "pthread_sigmask")
            if blocked:
                previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                if self.tmp is not None and self.tmp.exists():
                    shutil.rmtree(self.tmp, ignore_errors=True)
                self._restore()
            finally:
                if blocked:
                    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return False

    def _publish(self):
        _fsync_dir(self.tmp)
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            old = None
            if self.out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.pymerge-old-", dir=self.out.parent))
                os.replace(self.out, old / "previous")
            os.replace(self.tmp, self.out)
            _fsync_dir(self.out.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _restore(self):
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}
