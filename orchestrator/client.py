"""Hand a file to the orchestrator from Python and wait for its answer.

    from orchestrator.client import submit

    handle = submit("/exports/leads-2026-11-23.csv", "leads", data_dir="/data")
    result = handle.wait(timeout=3600)          # or: await handle.result(timeout=3600)
    result.raise_for_status(max_failed_rows=100)

`submit` needs only the data directory a daemon watches (the daemon may run in
another container sharing the volume, or start later). It hard-links the file
into `inbox/<route>/` (copying when a link is impossible, e.g. across
filesystems) under a hidden `.part` name, writes the ticket that carries its
id (`orchestrator.tickets`), then renames it to `<id>-<name>`: the daemon
never sees half a file, and two hand-overs of one name never meet. The result
keeps the name the caller gave.

`Handle.result()` follows the file through the state store (read-only; it
never creates one) and returns the `Result` once its result.json exists. A
`TimedOut` error means no answer yet, not a lost file: the file waits in the
inbox or in work/ and the daemon finishes it whenever it runs. `Refused` means
the daemon recorded in the state store that Marketo refused it, since the file
was handed over, for a reason of configuration (the credentials, or the API
role's permissions: 603): nothing moves until that is fixed, and the file is not
lost either. A refusal older than the hand-over does not count: the daemon may
not have tried since the configuration was fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from orchestrator import tickets
from orchestrator.clock import stamp
from orchestrator.durable import fsync_dir, write_atomic
from orchestrator.errors import OrchestratorError, UsageError
from orchestrator.layout import Layout
from orchestrator.models import ExitCode, FileStatus, Refusal
from orchestrator.spool.fs import is_ignored
from orchestrator.status import file_entry
from orchestrator.store import Store

__all__ = ["FileFailed", "Handle", "Refused", "Result", "TimedOut", "submit"]

T = TypeVar("T")
POLL_SECONDS = 1.0  # how often a waiting handle reads the state store

Progress = Callable[[dict[str, Any] | None], None]


class TimedOut(OrchestratorError):
    """No result within the timeout; the file is not lost (the message says where it waits)."""


class Refused(OrchestratorError):
    """Marketo refuses the daemon (credentials, or the API role: 603), as the daemon last
    learnt it; the file waits, not lost, until the configuration is fixed."""

    def __init__(self, refusal: Refusal, where: str) -> None:
        self.refusal = refusal
        super().__init__(
            f"Marketo refuses the daemon since {refusal.since}: {refusal.message}; {where}"
        )


class FileFailed(OrchestratorError):
    """`Result.raise_for_status`: the file failed, or had more failed rows than allowed."""

    def __init__(self, result: Result, reason: str) -> None:
        self.result = result
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Result:
    """A finished file: its result.json as `document`, and where that file is."""

    document: dict[str, Any]
    path: Path

    @property
    def id(self) -> str:
        return str(self.document.get("id", ""))

    @property
    def status(self) -> str:
        return str(self.document["status"])

    @property
    def rows_failed(self) -> int:
        return int(self.document.get("rows_failed", 0))

    def exit_code(self, max_failed_rows: int | None = None) -> ExitCode:
        """0 complete; 1 failed, or complete with more than `max_failed_rows` failed rows."""
        return ExitCode.COMPLETE if self.problem(max_failed_rows) is None else ExitCode.FAILED

    def problem(self, max_failed_rows: int | None = None) -> str | None:
        """Why this result is not a success, or None."""
        if self.status != FileStatus.COMPLETE:
            return f"{self.document.get('file')} failed: {self.document.get('error')}"
        if max_failed_rows is not None and self.rows_failed > max_failed_rows:
            return (
                f"{self.document.get('file')}: {self.rows_failed} rows failed "
                f"(more than {max_failed_rows}); see {self.document.get('failures_file')}"
            )
        return None

    def raise_for_status(self, max_failed_rows: int | None = None) -> Result:
        """Raise `FileFailed` unless the file is complete (within `max_failed_rows`)."""
        problem = self.problem(max_failed_rows)
        if problem is not None:
            raise FileFailed(self, problem)
        return self

    def summary(self) -> str:
        """One line: status, name, id, rows, and the result's place."""
        d = self.document
        line = (
            f"{d['status']}  {d['file']}  id {d.get('id', '?')}  rows {d.get('rows', 0)}: "
            f"{d.get('rows_processed', 0)} processed, {d.get('rows_failed', 0)} failed, "
            f"{d.get('rows_with_warning', 0)} warned  result {self.path}"
        )
        if d.get("error"):
            line += f"  error: {d['error']}"
        return line


@dataclass(frozen=True, slots=True)
class Handle:
    """A file handed over: its id, route and inbox name, and the data directory."""

    id: str
    route: str
    name: str  # the caller's name, as result.json will show it
    inbox_name: str  # its unique name in inbox/<route>/ until the daemon claims it
    data_dir: Path
    handed_over: str = ""  # ISO 8601 UTC; a refusal Marketo last made before it is stale

    @property
    def layout(self) -> Layout:
        return Layout(self.data_dir)

    async def entry(self) -> dict[str, Any] | None:
        """The file as `status --json` shows it (live state, chunks, rows), or None while
        it is still in the inbox (or no daemon has created the state store yet)."""
        db = self.layout.state_db
        if not await asyncio.to_thread(db.is_file):
            return None
        store = await Store.open(db, check=False)  # a reader: the daemon checks at its start
        try:
            return await self._entry(store)
        finally:
            await store.close()

    async def _entry(self, store: Store) -> dict[str, Any] | None:
        file = await store.find_file(self.id)
        if file is None:
            return None
        return file_entry(file, await store.chunks(file_id=file.id))

    async def result(
        self,
        # A parameter, not asyncio.timeout: on timeout, TimedOut says where the file waits.
        timeout: float | None = None,  # noqa: ASYNC109
        *,
        poll: float = POLL_SECONDS,
        on_progress: Progress | None = None,
    ) -> Result:
        """Wait for the file's result; `TimedOut` after `timeout` seconds (None: no limit),
        `Refused` as soon as the daemon records that Marketo refused it after the
        hand-over (credentials, 603).

        `on_progress` is called after every look with the file's entry (None while
        it is unclaimed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        store: Store | None = None
        try:
            while True:
                if store is None and await asyncio.to_thread(self.layout.state_db.is_file):
                    store = await Store.open(self.layout.state_db, check=False)
                entry = await self._entry(store) if store is not None else None
                if on_progress is not None:
                    on_progress(entry)
                found = await self._finished(entry)
                if found is not None:
                    return found
                refusals = await store.refusals() if store is not None else []
                fresh = [r for r in refusals if r.last >= self.handed_over]
                if fresh:
                    raise Refused(fresh[0], self.where(entry, None))
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimedOut(self.where(entry, timeout))
                wait = poll if deadline is None else min(poll, deadline - time.monotonic())
                await asyncio.sleep(max(0.0, wait))
        finally:
            if store is not None:
                await store.close()

    def wait(self, timeout: float | None = None, *, poll: float = POLL_SECONDS) -> Result:
        """`result()` for code without an event loop (an Airflow or Dagster task)."""
        return run_sync(lambda: self.result(timeout, poll=poll))

    async def _finished(self, entry: dict[str, Any] | None) -> Result | None:
        if entry is None or entry["result"] is None:
            return None
        path = self.data_dir / entry["result"]
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return None  # finished in the store a moment before the rename: look again
        return Result(document=json.loads(text), path=path)

    def where(self, entry: dict[str, Any] | None, timeout: float | None) -> str:
        """No result yet: what the file is doing and where it waits (nothing is lost)."""
        waited = f"no result within {timeout:g} s" if timeout is not None else "no result yet"
        if entry is None:
            place = self.layout.inbox_route(self.route) / self.inbox_name
            return f"{self.name} (id {self.id}): {waited}; it waits unclaimed at {place}"
        return (
            f"{self.name} (id {self.id}): {waited}; it is {entry['state']} "
            f"({entry['chunks_done']}/{entry['chunks_total'] or '?'} chunks) in "
            f"{self.layout.work}; the daemon finishes it whenever it runs"
        )


def submit(
    path: str | os.PathLike[str],
    route: str,
    *,
    data_dir: str | os.PathLike[str],
    id: str | None = None,
) -> Handle:
    """Hand `path` to the daemon watching `data_dir` for `route`; the `Handle` to wait on.

    Raises UsageError for a mistake of the caller (no such file, a directory, no
    such route directory, an id in use), naming what is wrong."""
    handed_over = stamp()  # before the file is in the inbox: the daemon may try it at once
    source = Path(path)
    layout = Layout(Path(data_dir))
    check_source(source)
    file_id = tickets.check_id(id) if id is not None else tickets.new_id()
    inbox = layout.inbox_route(route)
    if not inbox.is_dir():
        raise UsageError(
            "--route",
            f"{inbox} is not a directory: is route {route!r} configured, and has the daemon "
            "run with this data_dir?",
        )
    refuse_used_id(layout, route, file_id)
    inbox_name = f"{file_id}-{source.name}"
    target = inbox / inbox_name
    part = inbox / f".{inbox_name}.part"
    ticket = tickets.ticket_path(target)
    write_atomic(ticket, tickets.ticket_text(file_id, source.name).encode())
    try:
        place(source, part)
        os.rename(part, target)
    except OSError as exc:
        ticket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            part.unlink()
        raise UsageError(str(source), f"cannot hand it over: {exc.strerror or exc}") from None
    fsync_dir(inbox)
    return Handle(file_id, route, source.name, inbox_name, Path(data_dir), handed_over)


def check_source(source: Path) -> None:
    if not source.exists():
        raise UsageError(str(source), "no such file")
    if not source.is_file():
        raise UsageError(str(source), "is not a regular file")
    if not os.access(source, os.R_OK):
        raise UsageError(str(source), "is not readable")
    if is_ignored(source.name) or "\n" in source.name:
        raise UsageError(
            str(source),
            "the daemon ignores names starting with '.' or ending in .part or .tmp: rename it",
        )


def refuse_used_id(layout: Layout, route: str, file_id: str) -> None:
    """An id names one file: refuse one the store or a waiting ticket already holds."""
    waiting = [t.name for t in layout.inbox.glob(f"*/.{file_id}-*{tickets.TICKET_SUFFIX}")]
    if waiting:
        raise UsageError("--id", f"{file_id!r} is already used by a file waiting in the inbox")
    db = layout.state_db
    if not db.is_file():
        return

    async def known() -> bool:
        store = await Store.open(db, check=False)  # a reader: the daemon checks at its start
        try:
            return await store.find_file(file_id) is not None
        finally:
            await store.close()

    if run_sync(known):
        raise UsageError("--id", f"{file_id!r} is already used by a claimed file")


def place(source: Path, part: Path) -> None:
    """Hard-link `source` at `part`, or copy it there (fsynced) when a link is impossible."""
    try:
        os.link(source, part)
        return
    except OSError:
        pass  # another filesystem, or links not allowed: copy
    with open(source, "rb") as src, open(part, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end from sync code, also when the caller's thread has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
