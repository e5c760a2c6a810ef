"""The hand-offs between the stages: what happens after each step, in one place.

    spool ──claimed──▶ split worker ──chunk──▶ scheduler ──submitted──▶ poller
                           │ small      ▲ sealed  │ refused                │ final
                           ▼            │         ▼                        ▼
                         packer ────────┘      results ◀────────── every chunk final

- claimed: the spool recorded a claim; the file joins the split queue, split
  one at a time in claim order.
- chunk: the split worker recorded a chunk (or a set-aside record) in the
  store; the scheduler wakes and may submit it before the split ends. On a
  route that packs, a file's first chunk is held until a second one is cut:
  a file whose split ends with one chunk is small.
- small: the packer puts the file's records into the open pack of its route,
  format and header (or opens one); a sealed pack wakes the scheduler. After
  `run --once` claimed everything, the worker seals every pack once the files
  before it are split; with pack_wait_seconds = 0, whenever nothing waits.
- submitted: the scheduler recorded a batch id; the poller starts tracking it.
- final: a chunk reached Complete or Failed (poller), or was refused before it
  went (scheduler): results attribute it and finish each of its files that is
  split with every chunk final.
  A job that left Marketo's queue frees a slot in the scheduler's model.
- finished: the file's result is written and counted; the file cache (one, shared
  by the scheduler and the poller) drops it, and run --once looks again.

The stages never import each other; they meet here and in the store. Recovery
after a crash feeds the same hand-offs: files to split again, files to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import structlog

from orchestrator import splitter
from orchestrator.clock import wait_for_any
from orchestrator.config import Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.errors import InputError
from orchestrator.filecache import FileCache
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.models import (
    UNFINISHED_FILE_STATUSES,
    ChunkRecord,
    FileRecord,
    FileStatus,
)
from orchestrator.packer import Packer
from orchestrator.poller import Poller
from orchestrator.results import Results
from orchestrator.scheduler import Scheduler
from orchestrator.spool import Spool
from orchestrator.store import Recovery, Store

log = structlog.get_logger(__name__)


class Pipeline:
    """The stages of one daemon, wired together; the daemon runs their loops."""

    def __init__(
        self, settings: Settings, store: Store, client: MarketoClient, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.files = FileCache(store)
        self.spool = Spool(settings, store, self.file_claimed)
        self.scheduler = Scheduler(
            settings,
            store,
            client,
            on_submitted=self.submitted,
            on_chunk_final=self.chunk_refused,
            files=self.files,
            observer=metrics,
        )
        self.poller = Poller(
            settings,
            store,
            client,
            on_chunk_final=self.chunk_done,
            files=self.files,
            on_started=self.scheduler.foreign_job_left,
        )
        self.packer = Packer(
            settings,
            store,
            on_sealed=lambda _: self.scheduler.wake(),
            backlog=lambda: not self._split_queue.empty(),
        )
        self.results = Results(settings, store, observer=metrics, on_finished=self.finished)
        # File ids to split in claim order; None: run --once claimed everything.
        self._split_queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._file_finished = asyncio.Event()

    # -- startup -------------------------------------------------------------

    async def recover(self, recovery: Recovery) -> None:
        """Feed what a crash left half done back into the hand-offs."""
        self.spool.prepare()
        await self.spool.recover_claims()
        for pack in recovery.open_packs:
            await self.seal_recovered_pack(pack)
        self.scheduler.recovered(recovery.resubmit)
        for file in recovery.resplit:
            self._split_queue.put_nowait(file.id)
        await self.results.recover(recovery.finishing)

    async def seal_recovered_pack(self, pack: ChunkRecord) -> None:
        """A pack left open by a stop or a kill goes out as it is: bytes a kill left past
        its recorded size (an append whose piece was never committed) are cut off first;
        that file was not recorded as split, so it is split and packed again."""
        path = Path(pack.path)
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        if size > pack.job_bytes:
            log.warning("pack_truncated", chunk=pack.id, bytes=size, kept=pack.job_bytes)
            await asyncio.to_thread(os.truncate, path, pack.job_bytes)
        await self.store.seal_pack(pack.id)

    # -- claimed → split ------------------------------------------------------

    async def file_claimed(self, file: FileRecord) -> None:
        self._split_queue.put_nowait(file.id)

    def inbox_drained(self) -> None:
        """run --once claimed all it will: once the files before this are split, every
        open pack is sealed (nothing more can join, so nothing waits pack_wait_seconds)."""
        self._split_queue.put_nowait(None)

    async def split_worker(self, stop: asyncio.Event) -> None:
        """Split claimed files one at a time, in claim order; chunks go out as they appear."""
        while not stop.is_set():
            getter = asyncio.ensure_future(self._split_queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopper}, return_when="FIRST_COMPLETED")
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            file_id = getter.result()
            if file_id is None:
                await self.packer.seal_all("drained")
                self._file_finished.set()  # wait_idle looks again: the queue may be empty now
                continue
            file = await self.store.get_file(file_id)
            with structlog.contextvars.bound_contextvars(route=file.route, file=file.name):
                await self.split(file)
            await self.results.maybe_finish(file.id)
            if self._split_queue.empty():
                await self.packer.caught_up()

    async def split(self, file: FileRecord) -> None:
        route = self.settings.route(file.route)
        again = file.status is FileStatus.SPLITTING  # after a crash or a stop
        if file.status is FileStatus.CLAIMED:
            file = await self.store.start_split(file.id)
        if file.status is not FileStatus.SPLITTING:
            return
        if file.error or route is None:
            if route is None:
                await self.store.set_file_error(file.id, f"route {file.route!r} is not configured")
            await self.end_split_early(file.id)
            return
        out = self.settings.layout.chunk_dir(file.id)
        out.mkdir(parents=True, exist_ok=True)
        fmt = route.format_for(file.name)
        # A split again whose chunks were recorded before keeps them (they may be sent).
        pack = route.pack and not (again and await self.store.chunks(file_id=file.id))
        # A file smaller than a chunk's limit makes one chunk at most, and packs: its chunk
        # file is written without fsync, which the packer does when it opens a pack with it
        # (a joiner's records are fsynced in the pack, and its own chunk file goes).
        small = pack and await asyncio.to_thread(smaller_than, file.work_path, file.max_chunk_bytes)
        events = splitter.split_file_async(
            Path(file.work_path), out, max_bytes=file.max_chunk_bytes, fmt=fmt, fsync=not small
        )
        held: splitter.Chunk | None = None  # a first chunk, until it is known not the only one
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if pack and isinstance(event, splitter.Chunk):
                        if held is None and event.index == 1:
                            held = event
                            continue
                        if held is not None:
                            await self.record_split_event(file.id, held)
                            held = None
                    elif held is not None and isinstance(event, splitter.SplitDone):
                        await self.packer.add(file, held, event, fmt)
                        log.info("file_split", rows=event.rows, chunks=1, packed=True)
                        return
                    await self.record_split_event(file.id, event)
        except InputError as exc:
            message = describe(exc, file.name)
            log.error("file_refused", error=message)
            await self.store.set_file_error(file.id, message)
            await self.end_split_early(file.id)
            self.scheduler.wake()

    # -- split → scheduler ------------------------------------------------------

    async def record_split_event(self, file_id: int, event: splitter.SplitEvent) -> None:
        """One chunk cut, record set aside, or the end of a split: into the store."""
        if isinstance(event, splitter.Chunk):
            await self.store.add_chunk(
                file_id,
                index=event.index,
                path=str(event.path),
                rows=event.rows,
                bytes=event.bytes,
                first_line=event.first_line,
            )
            crashpoint("chunk_added")
            self.scheduler.wake()
        elif isinstance(event, splitter.Rejected):
            await self.store.add_reject(
                file_id,
                line=event.line,
                offset=event.offset,
                size=event.size,
                reason=event.reason,
            )
            self.metrics.rows("rejected", 1)
            log.warning("record_rejected", line=event.line, reason=event.reason)
        else:
            await self.store.finish_split(file_id, rows=event.rows, chunks_total=event.chunks)
            log.info("file_split", rows=event.rows, chunks=event.chunks)

    async def end_split_early(self, file_id: int) -> None:
        """A file that will fail: close its split with the chunks it already has."""
        known = await self.store.chunks(file_id=file_id)
        await self.store.finish_split(
            file_id, rows=sum(c.rows for c in known), chunks_total=len(known)
        )

    # -- scheduler → poller → results ---------------------------------------------

    def submitted(self, chunk: ChunkRecord) -> None:
        self.poller.submitted(chunk)

    async def chunk_done(self, chunk: ChunkRecord) -> None:
        """A batch reached Complete or Failed at Marketo: a queue slot is free."""
        self.scheduler.job_finished(chunk.id)
        await self.results.chunk_final(chunk)

    async def chunk_refused(self, chunk: ChunkRecord) -> None:
        """A chunk failed before it went to Marketo: no slot was taken."""
        await self.results.chunk_final(chunk)

    def finished(self, file: FileRecord) -> None:
        self.files.forget(file.id)
        self._file_finished.set()

    @property
    def finished_total(self) -> int:
        return self.results.finished_total

    @property
    def finished_failed(self) -> int:
        return self.results.finished_failed

    # -- run --once ----------------------------------------------------------------

    async def is_idle(self) -> bool:
        """Every claimed file has its result and nothing waits to be split.

        Asked after every finished file, so it reads the store's tallies (a few rows)
        rather than the unfinished files: with thousands of small files claimed at once,
        listing them each time kept the store's one thread busy for most of a run."""
        if not self._split_queue.empty():
            return False
        tallies = await self.store.tallies()
        return not any(tallies.get(f"files:{s}", 0) for s in UNFINISHED_FILE_STATUSES)

    async def wait_idle(self, stop: asyncio.Event) -> None:
        """Return once idle (checked after every finished file), or when `stop` is set."""
        while not stop.is_set():
            self._file_finished.clear()
            if await self.is_idle():
                return
            await wait_for_any(self._file_finished, stop, within=None)


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
