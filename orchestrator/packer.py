"""Packing: small files of one route, format and header share a chunk, one Marketo job.

Every Marketo job costs a place in the subscription's import queue, a fixed time at
Marketo and at least three API calls; a pipeline dropping thousands of files of a
few KB would otherwise make thousands of jobs. A file is small when its split cut
exactly one chunk; it is split (so validated) first, so a bad file never reaches a
pack. Small files are packed in the order they were split (claim order):

- Per key (route, format, header column names as Marketo reads them: BOM removed,
  padding trimmed) at most one pack is open. The first small file opens it: its own
  chunk file becomes the pack (no copy) and the file owns the chunk (it is the
  oldest, so the scheduler sends the pack in its place in the FIFO).
- A later small file joins while the pack plus its records (plus a line ending when
  the pack does not end with one) stays strictly under max_chunk_bytes: its records,
  without its header, are appended and fsynced, and only then is the join committed.
  A kill between the two leaves bytes past the pack's recorded size; the next start
  cuts them off and seals the pack, and the file, not recorded as split, is split
  and packed again. A file that does not fit seals the pack and opens the next.
- An open pack is sealed (and only a sealed pack is ever sent) when it is full, when
  `limits.pack_wait_seconds` pass without a file joining it, when `run --once` has
  split everything it claimed (told `drained`), or, with pack_wait_seconds = 0, as
  soon as no claimed file waits to be split (told `caught_up`). The packer is told
  these facts and decides itself; every sealing rule is here. A stop leaves a pack
  open; the next start seals it as it is (`recover`).
- However often small files trickle in, a pack is sealed at the latest
  MAX_AGE_FACTOR x pack_wait_seconds after it opened (a minute at the default 5 s):
  its first file does not wait hours for the pack to fill. Not while claimed files
  wait to be split (`backlog`, the split stage's): then the pack fills as fast as
  files are split, and sealing it early would only make more jobs.
- Keys (a route with key columns: the splitter saved each small file's key set beside
  its chunk). A pack never holds two rows of one key: a file whose keys meet its
  pack's is not joined, the pack is sealed and the file opens the next. And chunks are
  recorded in the order their rows were claimed: before rows whose keys meet an open
  pack's are recorded anywhere else (a chunk of a big file, `meet`, or another pack
  taking a small file), that pack is sealed. A pack's key set is saved beside it
  (fsynced) before the seal is committed; a pack left open by a kill gets its key set
  from its own records when recovery seals it.

Cost per small file: one append of its records, one fsync, one transaction; the pack
is never read back (but after a kill, for its keys). A pack's keys are kept as an
array while it is open (8 bytes a key); a file's keys are compared with each open
pack's in C (`splitter.meets`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from orchestrator import splitter
from orchestrator.clock import wait_for_any
from orchestrator.config import Route, Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.durable import fsync_dir
from orchestrator.keys import KeySet, keys_path
from orchestrator.models import ChunkRecord, FileRecord
from orchestrator.store import Store

log = structlog.get_logger(__name__)

LF = b"\n"
COPY_BUFFER = 1 << 20
MAX_AGE_FACTOR = 12  # an open pack goes at the latest this many pack_wait_seconds after it opened


@dataclass(frozen=True, slots=True)
class PackKey:
    """What files must share to share a chunk."""

    route: str
    fmt: str
    header: tuple[str, ...]  # column names as Marketo matches them (trimmed)


@dataclass(slots=True)
class OpenPack:
    """An unsealed pack as the packer tracks it (the store holds the truth)."""

    chunk_id: int
    path: Path
    bytes: int  # the pack file's recorded size: where the next records go
    limit: int  # every chunk stays strictly under this (its files' max_chunk_bytes)
    ends_with_lf: bool  # else a joiner's records start with a line ending of their own
    files: int
    opened: float  # monotonic time its first file opened it
    last_join: float  # monotonic time the last file joined (or opened it)
    keys: array[int] | None = None  # its files' key hashes; None: a route without keys

    def due(self, wait: float, *, backlog: bool) -> float:
        """When it is sealed unless a file joins (monotonic)."""
        idle = self.last_join + wait
        return idle if backlog else min(idle, self.opened + wait * MAX_AGE_FACTOR)


def pack_key(route: str, fmt: str, header: tuple[str, ...]) -> PackKey:
    return PackKey(route, fmt, tuple(name.strip() for name in header))


async def no_keys(route: Route) -> tuple[str, ...]:
    return ()


@dataclass
class Packer:
    settings: Settings
    store: Store
    on_sealed: Callable[[ChunkRecord], None]  # a pack may be sent now
    backlog: Callable[[], bool] = lambda: False  # claimed files wait to be split (split stage)
    # A route's key columns (the split stage's), for a pack recovery seals.
    key_columns: Callable[[Route], Awaitable[tuple[str, ...]]] = no_keys
    clock: Callable[[], float] = time.monotonic
    packs: dict[PackKey, OpenPack] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def wait(self) -> float:
        return self.settings.limits.pack_wait_seconds

    async def add(
        self, file: FileRecord, chunk: splitter.Chunk, done: splitter.SplitDone, fmt: str
    ) -> ChunkRecord:
        """A SPLITTING file whose split cut one chunk (`chunk`): into the open pack of its
        key, or a new pack of its own. The file is SPLIT once this returns; the chunk
        returned is the pack, as a job."""
        key = pack_key(file.route, fmt, done.header)
        keys = None
        if chunk.keys is not None:
            keys = (await asyncio.to_thread(KeySet.load, keys_path(chunk.path))).hashes
        async with self._lock:
            if keys:  # rows claimed earlier, in another open pack, are recorded first
                await self._seal_meeting(keys, but=key)
            pack = self.packs.get(key)
            if pack is not None:
                size = chunk.bytes - chunk.header_bytes + (0 if pack.ends_with_lf else len(LF))
                if pack.bytes + size >= min(pack.limit, file.max_chunk_bytes):
                    await self._seal(key, "full")
                elif keys and pack.keys and splitter.meets(keys, pack.keys):
                    await self._seal(key, "keys")  # a job never holds two rows of one key
                else:
                    return await self._join(pack, file, chunk, done, keys)
            return await self._open(key, file, chunk, done, keys)

    async def meet(self, keys_file: Path) -> None:
        """A chunk whose key set is at `keys_file` is about to be recorded: seal each open
        pack whose keys it meets first (its rows were claimed before), so that the order
        chunks are recorded in stays the order their rows were claimed."""
        if not any(pack.keys for pack in self.packs.values()):
            return
        keys = (await asyncio.to_thread(KeySet.load, keys_file)).hashes
        async with self._lock:
            await self._seal_meeting(keys)

    async def _seal_meeting(self, keys: Sequence[int], but: PackKey | None = None) -> None:
        for key, pack in list(self.packs.items()):
            if key != but and pack.keys and splitter.meets(keys, pack.keys):
                await self._seal(key, "keys")

    async def _open(
        self,
        key: PackKey,
        file: FileRecord,
        chunk: splitter.Chunk,
        done: splitter.SplitDone,
        keys: array[int] | None,
    ) -> ChunkRecord:
        # A small file is split without fsync (most join a pack and their chunk goes):
        # the one that becomes a pack is made durable before the store says it is one.
        ends_with_lf = await asyncio.to_thread(make_durable, chunk.path)
        record = await self.store.open_pack(
            file.id,
            path=str(chunk.path),
            rows=chunk.rows,
            bytes=chunk.bytes,
            first_line=chunk.first_line,
            file_rows=done.rows,
        )
        crashpoint("pack_opened")
        self.packs[key] = OpenPack(
            chunk_id=record.id,
            path=chunk.path,
            bytes=record.bytes,
            limit=file.max_chunk_bytes,
            ends_with_lf=ends_with_lf,
            files=record.files,
            opened=self.clock(),
            last_join=self.clock(),
            keys=None if keys is None else array("Q", keys),
        )
        self._changed.set()
        log.info("pack_opened", chunk_id=record.id, bytes=record.bytes)
        return record

    async def _join(
        self,
        pack: OpenPack,
        file: FileRecord,
        chunk: splitter.Chunk,
        done: splitter.SplitDone,
        keys: array[int] | None,
    ) -> ChunkRecord:
        separator = b"" if pack.ends_with_lf else LF
        ends_with_lf = await asyncio.to_thread(
            append_records, pack.path, pack.bytes, separator, chunk.path, chunk.header_bytes
        )
        crashpoint("pack_appended")
        record = await self.store.join_pack(
            pack.chunk_id,
            file.id,
            rows=chunk.rows,
            bytes=chunk.bytes - chunk.header_bytes + len(separator),
            first_line=chunk.first_line,
            file_rows=done.rows,
        )
        crashpoint("pack_joined")
        pack.bytes, pack.files, pack.ends_with_lf = record.bytes, record.files, ends_with_lf
        pack.limit = min(pack.limit, file.max_chunk_bytes)
        pack.last_join = self.clock()
        if keys is not None:
            pack.keys = array("Q") if pack.keys is None else pack.keys
            pack.keys.extend(keys)
        self._changed.set()
        # Its records live in the pack now; the chunk directory goes when the file finishes.
        await asyncio.to_thread(chunk.path.unlink, True)
        await asyncio.to_thread(keys_path(chunk.path).unlink, True)  # the pack's hold them
        log.info("pack_joined", chunk_id=record.id, files=record.files, bytes=record.bytes)
        return record

    async def _seal(self, key: PackKey, reason: str) -> None:
        pack = self.packs.pop(key)
        if pack.keys is not None:  # the submission rule reads them once the pack is sealed
            await asyncio.to_thread(save_keys, pack.path, pack.keys)
        record = await self.store.seal_pack(pack.chunk_id)
        log.info(
            "pack_sealed",
            chunk_id=record.id,
            files=record.files,
            rows=record.rows,
            bytes=record.bytes,
            reason=reason,
        )
        self.on_sealed(record)

    async def _seal_all(self, reason: str) -> None:
        async with self._lock:
            for key in list(self.packs):
                await self._seal(key, reason)

    async def drained(self) -> None:
        """run --once split everything it claimed: nothing more can join, so every open
        pack is sealed now (nothing waits pack_wait_seconds)."""
        await self._seal_all("drained")

    async def caught_up(self) -> None:
        """No claimed file waits to be split: with pack_wait_seconds = 0, seal them all;
        else the timer looks again (a backlog may have held a pack past its age)."""
        if self.wait == 0 and self.packs:
            await self._seal_all("caught-up")
        self._changed.set()

    async def recover(self, packs: list[ChunkRecord]) -> None:
        """Packs a stop or a kill left open go out as they are: bytes a kill left past a
        pack's recorded size (an append whose join was never committed) are cut off
        first; that file was not recorded as split, so it is split and packed again.
        Its key set is read from its records (what is in memory was lost)."""
        for pack in packs:
            path = Path(pack.path)
            size = (await asyncio.to_thread(path.stat)).st_size
            if size > pack.job_bytes:
                log.warning("pack_truncated", chunk=pack.id, bytes=size, kept=pack.job_bytes)
                await asyncio.to_thread(os.truncate, path, pack.job_bytes)
            owner = await self.store.get_file(pack.file_id)
            route = self.settings.route(owner.route)
            rule = None
            if route is not None:
                columns = await self.key_columns(route)
                rule = splitter.rule_for(route.object, route.api_name, columns)
            if rule is None or route is None:
                await asyncio.to_thread(keys_path(path).unlink, True)  # no keys: no waiting
            else:
                fmt = route.format_for(owner.name)
                found = await asyncio.to_thread(splitter.file_keys, path, fmt, rule)
                await asyncio.to_thread(save_keys, path, found.hashes)
            await self.store.seal_pack(pack.id)

    async def seal_idle(self) -> None:
        """Seal the packs no file joined for pack_wait_seconds, and those open for
        MAX_AGE_FACTOR times that."""
        if self.wait == 0:
            return
        async with self._lock:
            now, backlog = self.clock(), self.backlog()
            for key, pack in list(self.packs.items()):
                if now >= pack.due(self.wait, backlog=backlog):
                    idle = now - pack.last_join >= self.wait
                    await self._seal(key, "idle" if idle else "age")

    def next_deadline(self) -> float | None:
        """Seconds until the next pack is due (`seal_idle`), or None (no timer runs)."""
        if self.wait == 0 or not self.packs:
            return None
        backlog = self.backlog()
        due = min(pack.due(self.wait, backlog=backlog) for pack in self.packs.values())
        return max(0.0, due - self.clock())

    async def run(self, stop: asyncio.Event) -> None:
        """Seal idle packs, until `stop` is set (which leaves open packs open)."""
        while not stop.is_set():
            self._changed.clear()
            await self.seal_idle()
            await wait_for_any(self._changed, stop, within=self.next_deadline())


# -- blocking file work (in a worker thread) --------------------------------------------


def save_keys(pack: Path, keys: Sequence[int]) -> None:
    """A pack's key set, sorted and distinct, beside it, fsynced."""
    collector = splitter.KeyCollector()
    collector.extend(keys)
    collector.take().save(keys_path(pack))


def make_durable(path: Path) -> bool:
    """fsync a chunk file and its directory; whether it ends with LF."""
    with path.open("rb") as fh:
        os.fsync(fh.fileno())
        fh.seek(-1, os.SEEK_END)
        ends_with_lf = fh.read(1) == LF
    fsync_dir(path.parent)
    return ends_with_lf


def append_records(pack: Path, at: int, separator: bytes, source: Path, skip: int) -> bool:
    """Write `separator` and `source` from byte `skip` on into `pack` at its recorded size
    `at` (over anything an earlier, unrecorded append left there), fsynced; whether the
    pack now ends with LF. An OSError names the pack."""
    try:
        with source.open("rb") as src, pack.open("r+b") as out:
            out.seek(at)
            out.write(separator)
            src.seek(skip)
            shutil.copyfileobj(src, out, COPY_BUFFER)
            out.truncate()
            out.flush()
            os.fsync(out.fileno())
            src.seek(-1, os.SEEK_END)
            return src.read(1) == LF
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(pack)) from exc
