"""The split stage: claimed files cut into chunks, one at a time, in claim order.

A claimed file joins the claim queue; `run` takes them in order and splits each
with the splitter (in a worker thread), recording every chunk and every record
set aside in the store as it comes, so the scheduler may send a file's first
chunks before its split ends (`on_chunk`).

- Small files: on a route that packs, a file's first chunk is held until a
  second one is cut. A file whose split ends with that one chunk is small: it
  goes to the packer (`on_small`), which records it; its chunk is never recorded
  as a chunk of its own. A split again after a stop keeps the chunks it recorded
  before (they may be sent already), so it never packs.
- Durability: a file smaller than a chunk's limit is split without fsync, since
  it packs (the packer fsyncs the chunk file that becomes a pack, and a joiner's
  records are fsynced in the pack, its own chunk file removed); one whose repeated
  keys gave it a tail chunk is not packed, and its chunks are fsynced then. Every
  other chunk file (its key set and line files too) is fsynced before the store
  says it exists.
- Bad files: an unreadable file (the splitter raises `InputError`) or a file of
  a route no longer configured gets its error, and its split is ended early with
  the chunks it already has; the file fails once they are final. A file the
  splitter refused is then told (`on_error`): its chunks not yet sent are not sent.
- The queue: `drained` queues a marker after everything `run --once` claimed;
  taking it, the stage says so (`on_drained`). Whenever the queue empties after
  a file, `on_caught_up`. `backlog` tells whether claimed files wait.
- The header (`check_header`, one step before the cut): a file's header is checked
  against the route's object as Marketo describes it (`catalogue`) before its first
  chunk is recorded, so before any job, small files too (before they join a pack). A missing key column, or with `unknown_columns = "fail"` a column that
  matches no field, fails the file with no chunk; other unknown columns are warned of
  in the log and kept in the store for result.json. While Marketo cannot describe
  the object (unreachable, limits, refused credentials or access) the file waits
  with backoff, and so do the files claimed after it; the log says why. A split
  again that recorded chunks before is not checked again.
- Keys: a route's key columns come from `key_columns` (`ConfiguredKeys`: the
  route's `key_columns`, else the object's own, custom objects' dedupe fields as the
  catalogue describes them). With them, the splitter saves each chunk's key set
  beside it and moves a row whose key was seen nearby to a tail chunk at the end of
  the file (`splitter.repeats`). Before a chunk is recorded, `on_keys` is told where
  its keys are (the packer seals an open pack they meet, so chunks are recorded in
  the order their rows were claimed).

Each file's split ends with `on_split`: it may be finished now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from orchestrator import splitter
from orchestrator.backoff import Backoff
from orchestrator.catalogue import HeaderCheck, object_label
from orchestrator.clock import wait_for_any
from orchestrator.config import Route, Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.errors import (
    CredentialsError,
    InputError,
    MarketoError,
    QuotaExhaustedError,
    RetryableError,
)
from orchestrator.keys import keys_path
from orchestrator.models import FileRecord, FileStatus, ObjectType
from orchestrator.store import Store

log = structlog.get_logger(__name__)


class Cutter(Protocol):
    """How a file is cut (orchestrator.splitter.split_file_async)."""

    def __call__(
        self,
        source: Path,
        out_dir: Path,
        *,
        max_bytes: int,
        fmt: str,
        fsync: bool,
        keys: splitter.KeyRule | None,
    ) -> AsyncGenerator[splitter.SplitEvent, None]: ...


KeyColumns = Callable[[Route], Awaitable[tuple[str, ...]]]


class ConfiguredKeys:
    """A route's key columns: its `key_columns`, else for leads the lookup field (email
    unless set) and for program members email; a custom object's are its dedupe fields
    as Marketo describes them (`catalogue`).

    The header check asks the catalogue first, so its answer is at hand when a file is
    cut. Should Marketo fail to describe the object here (a file split again after a
    restart, a pack recovered, while Marketo is unreachable), a custom-object route
    without `key_columns` has no key rule for that file: its rows are not checked for
    repeated keys, and the stage says so once per route."""

    def __init__(self, catalogue: FieldCatalogue | None = None) -> None:
        self._catalogue = catalogue
        self._told: set[str] = set()

    async def __call__(self, route: Route) -> tuple[str, ...]:
        if route.key_columns:
            return route.key_columns
        if route.object is ObjectType.LEADS:
            return (route.lookup_field or "email",)
        if route.object is ObjectType.PROGRAM_MEMBERS:
            return ("email",)
        note = "set key_columns for this route: its rows are not kept in key order"
        if self._catalogue is not None:
            try:
                return await self._catalogue.key_columns(route)
            except MarketoError as exc:
                note = f"Marketo could not describe {object_label(route)} ({exc}): {note}"
        if route.dir not in self._told:
            self._told.add(route.dir)
            log.warning("key_columns_unknown", route=route.dir, note=note)
        return ()


class Observer(Protocol):
    """What the split stage reports (orchestrator.metrics.Metrics)."""

    def rows(self, outcome: str, n: int) -> None: ...


class FieldCatalogue(Protocol):
    """The routes' objects as Marketo describes them (orchestrator.catalogue.Catalogue)."""

    async def check_file(self, route: Route, path: Path, fmt: str) -> HeaderCheck | None: ...
    async def key_columns(self, route: Route) -> tuple[str, ...]: ...


SmallFile = Callable[[FileRecord, splitter.Chunk, splitter.SplitDone, str], Awaitable[object]]


async def _nothing() -> None:
    return None


async def _ignore_keys(path: Path) -> None:
    return None


@dataclass
class SplitStage:
    settings: Settings
    store: Store
    on_chunk: Callable[[], None]  # a chunk is recorded: it may be sent
    on_small: SmallFile  # (file, its one chunk, the split's end, format): pack it
    on_split: Callable[[int], Awaitable[None]]  # a file's split ended: it may be finished
    on_error: Callable[[int], None] = lambda _: None  # the splitter refused a file
    on_drained: Callable[[], Awaitable[None]] = _nothing  # run --once: all claimed is split
    on_caught_up: Callable[[], Awaitable[None]] = _nothing  # no claimed file waits now
    observer: Observer | None = None
    cut: Cutter = splitter.split_file_async
    catalogue: FieldCatalogue | None = None  # None: headers are not checked
    key_columns: KeyColumns = field(default_factory=lambda: ConfiguredKeys())
    # A chunk of a file's own is about to be recorded; its key set is at this path.
    on_keys: Callable[[Path], Awaitable[None]] = _ignore_keys
    # File ids to split in claim order; None: run --once claimed everything.
    _queue: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)  # run's: ends a header wait

    # -- the claim queue ---------------------------------------------------------

    def claimed(self, file_id: int) -> None:
        """A file was claimed: it is split after every file claimed before it."""
        self._queue.put_nowait(file_id)

    def recover(self, files: list[FileRecord]) -> None:
        """Files a stop or a crash left CLAIMED or SPLITTING: split (again) first."""
        for file in files:
            self._queue.put_nowait(file.id)

    def drained(self) -> None:
        """run --once claimed all it will: say so once the files before are split."""
        self._queue.put_nowait(None)

    def backlog(self) -> bool:
        """Whether claimed files wait to be split."""
        return not self._queue.empty()

    async def run(self, stop: asyncio.Event) -> None:
        """Split claimed files one at a time, in claim order, until `stop` is set."""
        self._stop = stop
        while not stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopper}, return_when="FIRST_COMPLETED")
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            file_id = getter.result()
            if file_id is None:
                await self.on_drained()
                continue
            file = await self.store.get_file(file_id)
            with structlog.contextvars.bound_contextvars(route=file.route, file=file.name):
                await self.split(file)
            await self.on_split(file.id)
            if self._queue.empty():
                await self.on_caught_up()

    # -- one file ----------------------------------------------------------------

    async def split(self, file: FileRecord) -> None:
        """Split one claimed file: chunks and set-aside records into the store as they come."""
        route = self.settings.route(file.route)
        again = file.status is FileStatus.SPLITTING  # after a crash or a stop
        if file.status is FileStatus.CLAIMED:
            file = await self.store.start_split(file.id)
        if file.status is not FileStatus.SPLITTING:
            return
        if file.error or route is None:
            if route is None:
                await self.store.set_file_error(file.id, f"route {file.route!r} is not configured")
            await self.end_early(file.id)
            return
        out = self.settings.layout.chunk_dir(file.id)
        out.mkdir(parents=True, exist_ok=True)
        fmt = route.format_for(file.name)
        # A split again whose chunks were recorded before keeps them (they may be sent).
        recorded = again and bool(await self.store.chunks(file_id=file.id))
        if not recorded and not await self.check_header(file, route, fmt):
            return
        pack = route.pack and not recorded
        small = pack and await asyncio.to_thread(smaller_than, file.work_path, file.max_chunk_bytes)
        events = self.cut(
            Path(file.work_path),
            out,
            max_bytes=file.max_chunk_bytes,
            fmt=fmt,
            fsync=not small,
            keys=splitter.rule_for(route.object, route.api_name, await self.key_columns(route)),
        )
        held: splitter.Chunk | None = None  # a first chunk, until it is known not the only one
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if pack and isinstance(event, splitter.Chunk):
                        if held is None and event.index == 1:
                            held = event
                            continue
                        if small:  # cut without fsync, yet not packed: a tail chunk came
                            await asyncio.to_thread(splitter.make_durable, event)
                        if held is not None:
                            if small:
                                await asyncio.to_thread(splitter.make_durable, held)
                            await self.record(file.id, held)
                            held = None
                    elif held is not None and isinstance(event, splitter.SplitDone):
                        await self.on_small(file, held, event, fmt)
                        log.info("file_split", rows=event.rows, chunks=1, packed=True)
                        return
                    await self.record(file.id, event)
        except InputError as exc:
            message = describe(exc, file.name)
            log.error("file_refused", error=message)
            await self.store.set_file_error(file.id, message)
            await self.end_early(file.id)
            self.on_error(file.id)

    async def check_header(self, file: FileRecord, route: Route, fmt: str) -> bool:
        """Whether the file may be cut, its header checked (see the module's docstring).
        False: it failed (its split ended), or the stage stopped while it waited."""
        if self.catalogue is None:
            return True
        backoff, attempt = Backoff(self.settings.backoff.initial, self.settings.backoff.max), 0
        while True:
            try:
                verdict = await self.catalogue.check_file(route, Path(file.work_path), fmt)
                break
            except MarketoError as exc:
                if not describe_may_wait(exc):
                    reason = f"Marketo could not describe {object_label(route)}: {exc}"
                    await self.fail_before_cut(file.id, reason)
                    return False
                attempt += 1
                delay = backoff.delay(attempt)
                log.warning("header_check_waits", error=str(exc), retry_in=round(delay, 2))
                await wait_for_any(self._stop, within=delay)
                if self._stop.is_set():
                    return False
        if verdict is None:  # the header cannot be read: the splitter says why
            return True
        if verdict.error is not None:
            await self.fail_before_cut(file.id, verdict.error)
            return False
        if verdict.warnings:
            log.warning("header_columns_unknown", warnings=list(verdict.warnings))
            await self.store.set_file_warnings(file.id, verdict.warnings)
        return True

    async def fail_before_cut(self, file_id: int, error: str) -> None:
        """A file refused before any chunk of it was recorded, so before any job."""
        log.error("file_refused", error=error)
        await self.store.set_file_error(file_id, error)
        await self.end_early(file_id)
        self.on_error(file_id)

    async def record(self, file_id: int, event: splitter.SplitEvent) -> None:
        """One chunk cut, record set aside, or the end of a split: into the store."""
        if isinstance(event, splitter.Chunk):
            if event.keys:
                await self.on_keys(keys_path(event.path))
            await self.store.add_chunk(
                file_id,
                index=event.index,
                path=str(event.path),
                rows=event.rows,
                bytes=event.bytes,
                first_line=event.first_line,
            )
            crashpoint("chunk_added")
            self.on_chunk()
        elif isinstance(event, splitter.Rejected):
            await self.store.add_reject(
                file_id,
                line=event.line,
                offset=event.offset,
                size=event.size,
                reason=event.reason,
            )
            if self.observer:
                self.observer.rows("rejected", 1)
            log.warning("record_rejected", line=event.line, reason=event.reason)
        else:
            await self.store.finish_split(file_id, rows=event.rows, chunks_total=event.chunks)
            log.info("file_split", rows=event.rows, chunks=event.chunks, moved=event.moved)

    async def end_early(self, file_id: int) -> None:
        """A file that will fail: close its split with the chunks it already has."""
        known = await self.store.chunks(file_id=file_id)
        await self.store.finish_split(
            file_id, rows=sum(c.rows for c in known), chunks_total=len(known)
        )


def describe_may_wait(exc: MarketoError) -> bool:
    """Whether a describe call's error is Marketo's state rather than the object's: worth
    waiting out (unreachable, limits, quota, refused credentials, 603 access denied)."""
    waits = (RetryableError, QuotaExhaustedError, CredentialsError)
    return isinstance(exc, waits) or exc.code == "603"


def smaller_than(path: str, limit: int) -> bool:
    """Whether the file at `path` is under `limit` bytes (False if it cannot be read: the
    splitter says why)."""
    try:
        return os.stat(path).st_size < limit
    except OSError:
        return False


def describe(exc: InputError, name: str) -> str:
    """The splitter's error, naming the file as the user dropped it (not our work path)."""
    return str(exc).replace(exc.file, name, 1)
