"""One owner per data directory: an exclusive OS lock on `data_dir/daemon.lock`.

A command that runs a daemon (`run`, `submit --once`) takes the lock
(`cli.run.lock_data_dir`, the one place) before anything touches data_dir
(the store, recovery, the inbox, `run --simulate`'s simulator state), hands
it to the daemon and keeps it for the daemon's whole life. It is a `flock(2)`
lock on an open file: the kernel releases it when the process ends in any way,
kill -9 included, so there is never a stale lock to clean up. The file itself
stays; it holds the pid of the last owner, which a refused second daemon names
in its error.

Only a daemon's command takes it. `status` (and any other command that only
reads the store or drops files into the inbox) works beside a running daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from orchestrator.errors import DataDirInUse, OrchestratorError
from orchestrator.layout import Layout


class DataDirLock:
    """The held lock of one data directory; `release` (or process exit) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def __repr__(self) -> str:
        return f"<DataDirLock {str(self.path)!r} {'held' if self._fd is not None else 'released'}>"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go (closing the file does). Idempotent. The file is left in place:
        removing it would let a second daemon lock a new file while a third holds the old."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def acquire(layout: Layout) -> DataDirLock:
    """Take data_dir's lock without waiting; DataDirInUse naming the holder's pid if taken.

    On a data_dir that has turned read-only the existing lock file is opened for
    reading (flock works on it all the same), so the daemon goes on to the store,
    which says clearly what is wrong; the pid is then not written."""
    path = layout.lock
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            writable = False
        except OSError:
            raise OrchestratorError(
                f"{path}: cannot create the data directory's lock ({exc.strerror}): "
                "make data_dir writable for this user"
            ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_pid(fd)
        os.close(fd)
        raise DataDirInUse(layout.root.absolute(), holder) from None
    except OSError as exc:
        os.close(fd)
        raise OrchestratorError(f"{path}: cannot lock it ({exc.strerror})") from None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)


@contextlib.contextmanager
def held(layout: Layout) -> Iterator[DataDirLock]:
    """`acquire` for a with-block; released when it ends."""
    lock = acquire(layout)
    try:
        yield lock
    finally:
        lock.release()


def read_pid(fd: int) -> int | None:
    """The pid the holder wrote, or None (it has not written it yet, or the file is odd)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
