"""One SQLite connection and the thread it lives in: how it is opened, how work runs on it.

`connect` makes the connection (busy timeout, rows by name), `use_wal` puts the
database in WAL mode, `transaction` is the one BEGIN / COMMIT / ROLLBACK wrapper
(the `Store`'s methods and the migrations both run in it), and `Runner` owns the
connection and its one worker thread, so the event loop never waits on the disk.
SQLite's errors become `StoreError`s here, each naming the path and how to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from orchestrator.errors import StoreError

T = TypeVar("T")
Body = Callable[[sqlite3.Connection], T]

# Seconds a transaction waits for another process's lock (`status` reading while the daemon runs).
BUSY_TIMEOUT = 10.0
# Seconds between two tries to switch a database to WAL (see `use_wal`).
_WAL_RETRY = 0.01

RECOVER_HINT = (
    "stop the daemon, move it aside (with its -wal and -shm files) and restart; "
    "files in work/ will be re-imported (Bulk Import is insert-or-update)"
)

# -- opening (run in the store's thread) -------------------------------------------------------


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the database at `path` (created if missing); StoreError on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the directory {str(path.parent)!r} ({exc.strerror})"
        raise StoreError(path, f"{problem}: check data_dir and its permissions") from exc
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise open_error(path, exc) from exc
    conn.row_factory = sqlite3.Row
    return conn


def use_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Journal in WAL mode: switch the database to it unless it is there already."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        # Ask first: only a database not in WAL yet needs the switch, which takes a lock.
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() == "wal":
            return
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            # Switching turns a read lock into the write lock, which SQLite never waits for
            # (two connections doing so would wait on each other forever). A new database
            # opened twice at once (the daemon starting, a reader beside it) refuses one of
            # them: try again, as long as SQLite would wait for any other lock.
            if _primary_code(exc) != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(_WAL_RETRY)
            continue
        if str(mode).lower() != "wal":
            raise StoreError(
                path, f"cannot use WAL journaling here (got {mode!r}): use a local disk"
            )
        return


def close_if_connected(future: Future[sqlite3.Connection]) -> None:
    """After a cancelled open: close the connection the thread made anyway."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


# -- the one transaction wrapper ---------------------------------------------------------------


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[None]:
    """BEGIN, the body of the `with`, COMMIT; ROLLBACK on any exception, which goes on."""
    # IMMEDIATE takes the write lock up front, so a writer never fails half way on BUSY.
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


class Runner:
    """The connection and the one thread all its SQLite work runs in; closed once."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self.path = path
        self._executor = executor
        self._conn = conn
        self._closed = False

    async def close(self) -> None:
        """Close the connection once every queued transaction has run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        except sqlite3.Error as exc:
            raise runtime_error(self.path, "close", exc) from exc
        finally:
            self._executor.shutdown(wait=False)

    async def _run(self, operation: str, body: Body[T], *, write: bool = True) -> T:
        """Run `body` as one transaction in the store's thread."""
        if self._closed:
            raise StoreError(self.path, f"{operation}: the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transact, operation, body, write)

    def _transact(self, operation: str, body: Body[T], write: bool) -> T:
        """In the store's thread: `body` in a transaction, SQLite's errors as StoreError."""
        try:
            with transaction(self._conn, write=write):
                return body(self._conn)
        except sqlite3.Error as exc:
            raise runtime_error(self.path, operation, exc) from exc


# -- errors ------------------------------------------------------------------------------------


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def corrupt(path: Path, detail: str) -> StoreError:
    return StoreError(path, f"{path.name} is corrupt ({detail}): {RECOVER_HINT}")


def open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    code = _primary_code(exc)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return corrupt(path, str(exc))
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            path, f"cannot open: the database stays locked by another process ({exc})"
        )
    return StoreError(
        path,
        f"cannot open the state store ({exc}): check that {str(path.parent)!r} is a writable "
        "directory and the path is not taken by something that is not a SQLite file",
    )


_RUNTIME_HINTS = {
    sqlite3.SQLITE_FULL: "the disk is full: free space, then restart the daemon",
    sqlite3.SQLITE_READONLY: "the database is read-only: make data_dir writable and restart",
    sqlite3.SQLITE_IOERR: "a disk I/O error: check the volume (full, read-only, or gone)",
    sqlite3.SQLITE_BUSY: "another process held the lock too long: is a second daemon running?",
    sqlite3.SQLITE_CORRUPT: f"the database is corrupt: {RECOVER_HINT}",
    sqlite3.SQLITE_NOTADB: f"the database is corrupt: {RECOVER_HINT}",
}


def runtime_error(path: Path, operation: str, exc: sqlite3.Error) -> StoreError:
    code = _primary_code(exc)
    hint = _RUNTIME_HINTS.get(code, "") if code is not None else ""
    return StoreError(path, f"{operation} failed ({exc})" + (f": {hint}" if hint else ""))
