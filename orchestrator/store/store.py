"""The durable state store: the truth about every claimed file and chunk.

One SQLite database (`data_dir/state.db`) in WAL mode with `synchronous=FULL`
and foreign keys on. This module holds the `Store` as one piece: how it opens
(refusing a database it cannot use, then migrating it) and the parts it is made
of, one method per state transition:

- `connection.Runner`: the connection, its one worker thread and `close`;
- `reads.Reads`: the queries;
- `transitions.FileTransitions`: a file's way from its claim to its result;
- `packs.PackTransitions`: small files sharing a chunk (open, join, seal);
- `submissions.ChunkTransitions`: a chunk's way through Marketo, and recovery;
- `refusals.RefusalRecords`: what Marketo refuses the daemon (credentials, 603).
- `keyorder.KeyOrder`: the key rule's order of chunks, their conflicts and holds.

All SQLite work runs in the one worker thread owned by the `Store`, so the event
loop never waits on the disk. Each public method is one short transaction,
committed before it returns: the caller may rely on it before taking the
external step it enables (a rename, a submit). A call whose task is cancelled
may still commit.

Errors:
- `StoreError(path, problem)`: the database cannot be opened (corrupt, too new,
  unwritable) or a write failed at run time (disk full, read-only); the message
  names the path, the operation and how to recover.
- `ValueError`: an illegal transition (mark_submitted on a complete chunk, say).
  These are bugs of the caller, never a state of the world.
- `LookupError`: no file or chunk with that id.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from orchestrator.models import Hold
from orchestrator.store.conflicts import Keyed, KeyOrder
from orchestrator.store.connection import close_if_connected, connect, corrupt, open_error, use_wal
from orchestrator.store.packs import PackTransitions
from orchestrator.store.reads import Reads
from orchestrator.store.refusals import RefusalRecords
from orchestrator.store.schema import LATEST_VERSION, check_version, migrate, read_version
from orchestrator.store.submissions import ChunkTransitions, Recovery
from orchestrator.store.transitions import Claim, FileTransitions

__all__ = ["LATEST_VERSION", "Claim", "Hold", "Keyed", "Recovery", "Store"]


class Store(Reads, FileTransitions, PackTransitions, ChunkTransitions, RefusalRecords, KeyOrder):
    """The state store; open with `await Store.open(path)`, close with `await close()`."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Store {str(self.path)!r} {state}>"

    @classmethod
    async def open(cls, path: Path, *, check: bool = True) -> Store:
        """Open (creating or migrating) the database at `path`; StoreError if it cannot be used.

        `check` runs SQLite's quick_check first (it reads the whole file): the daemon's
        start does; `status`, which only reads beside a running daemon, does not."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        future = executor.submit(functools.partial(_open_database, path, check=check))
        try:
            conn = await asyncio.wrap_future(future)
        except BaseException:
            # Cancelled while the thread still connects: close what it makes.
            future.add_done_callback(close_if_connected)
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _open_database(path: Path, *, check: bool) -> sqlite3.Connection:
    """In the store's thread: connect, refuse a corrupt or too new database, set the
    pragmas and migrate; StoreError on failure."""
    conn = connect(path)
    try:
        try:
            # quick_check reads every page: the daemon's start pays it, a reader need not.
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check")] if check else ["ok"]
            if problems != ["ok"]:
                raise corrupt(path, "; ".join(problems[:3]).replace("\n", " "))
            # Before WAL: a database from a newer release is refused untouched.
            check_version(path, read_version(conn))
            use_wal(conn, path)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, path)
        except sqlite3.Error as exc:
            raise open_error(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn
