"""The key rule as the scheduler applies it: conflicts found once, and who waits for whom.

SPEC section 5: two of our jobs whose record keys meet never import at once, and
files go in claim order, so for one key the last row wins. The split stage saves
each chunk's keys beside it (`orchestrator.keys`) before the store records the chunk;
then:

- `ConflictCheck` takes the chunks recorded whole (a pack once sealed) in the order
  they were recorded, intersects each one's keys with those of every earlier chunk
  that still holds its keys, and records a conflict (earlier -> later) for each that
  meets it, the chunk then checked (`Store.record_conflicts`). It runs in a worker
  thread, beside the scheduler's submits: an unchecked chunk is simply not sent yet,
  and a kill before its check only means the check runs again.
- `KeyRule` tells the scheduler which pending chunks wait (`Store.holds`): unchecked,
  or an earlier chunk that meets them is not done. A chunk is done once final, and,
  if a create of it had an unknown outcome, once one more of our jobs finished after
  it (a copy of it may still import until then; the store keeps that count). When
  nothing of ours is at Marketo no job will finish to say so: after the held-back
  chunk's own last job's time at Marketo (`backoff.max` if it never had one) the rule
  takes its copies as gone (`release_idle`), rather than wait forever.

Two chunks' keys are compared straight from their key files (sorted 64-bit hashes,
`keys.KeySet.save`), `SLICE_KEYS` of each at a time (`common_keys`): the slice whose
last key is smaller is read on, and only the part of two slices where their ranges
overlap is compared (bisect, then a set of at most `SLICE_KEYS`). Nothing is cached,
so memory stays at two slices (32 KiB) and one such set (about 150 KB) however many
chunks are in flight; a set per chunk and a cache of 8 of them had grown the daemon
by 73 MB on a 1 GB file (bench/finish.py, docs/benchmarks.md).
A chunk whose key file is missing has no keys (a route without key columns), unless
it is final: then its file finished and took the key file along, and the chunk is
taken to meet every later one until it is done. A key file that cannot be read is
taken to meet everything, with a warning.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import structlog

from orchestrator.config import Settings
from orchestrator.keys import keys_path
from orchestrator.store import Hold, Keyed, Store

log = structlog.get_logger(__name__)

SLICE_KEYS: Final = 2048  # keys read from a key file at a time (16 KiB)
_KEY_BYTES: Final = 8


class KeyFile:
    """A chunk's key file, open, read `SLICE_KEYS` hashes at a time; no file: no keys."""

    __slots__ = ("_fd", "keys", "path")

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd
        self.keys = 0 if fd is None else os.fstat(fd).st_size // _KEY_BYTES

    @classmethod
    def open(cls, chunk: Keyed) -> KeyFile | None:
        """The chunk's keys; None when they cannot be known (see the module's docstring)."""
        path = keys_path(Path(chunk.path))
        try:
            return cls(path, os.open(path, os.O_RDONLY))
        except FileNotFoundError:
            return None if chunk.final else cls(path, None)
        except OSError as exc:
            log.warning("keys_unreadable", path=str(path), error=str(exc))
            return None

    def slices(self, size: int = SLICE_KEYS) -> Iterator[array[int]]:
        """The hashes in order, `size` at a time."""
        if self._fd is None:
            return
        offset, step = 0, size * _KEY_BYTES
        while data := os.pread(self._fd, step, offset):
            offset += len(data)
            hashes = array("Q")
            hashes.frombytes(data[: len(data) - len(data) % _KEY_BYTES])
            if sys.byteorder != "little":
                hashes.byteswap()
            yield hashes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> KeyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def common_keys(a: KeyFile, b: KeyFile, size: int = SLICE_KEYS) -> Iterator[int]:
    """The keys both files hold, ascending, comparing one slice of each at a time: the
    part of the two slices where their ranges overlap (found by bisect), the smaller part
    made a set and probed by the other; then the slice with the smaller last key is
    replaced by the next of its file (both when their last keys are equal)."""
    xs_left, ys_left = a.slices(size), b.slices(size)
    xs, ys = next(xs_left, None), next(ys_left, None)
    while xs and ys:
        low, high = max(xs[0], ys[0]), min(xs[-1], ys[-1])
        if low <= high:
            x = xs[bisect.bisect_left(xs, low) : bisect.bisect_right(xs, high)]
            y = ys[bisect.bisect_left(ys, low) : bisect.bisect_right(ys, high)]
            small, large = (x, y) if len(x) <= len(y) else (y, x)
            yield from sorted(set(small).intersection(large))
        x_last, y_last = xs[-1], ys[-1]
        if x_last <= y_last:
            xs = next(xs_left, None)
        if y_last <= x_last:
            ys = next(ys_left, None)


def meets(a: KeyFile | None, b: KeyFile | None) -> bool:
    """Whether two chunks share a key (None: keys unknown, taken to meet everything)."""
    if a is None or b is None:
        return True
    try:
        return next(common_keys(a, b), None) is not None
    except OSError as exc:
        log.warning("keys_unreadable", path=f"{a.path} or {b.path}", error=str(exc))
        return True


def meeting(chunk: Keyed, earlier: list[Keyed]) -> list[int]:
    """The ids of the `earlier` chunks whose keys meet `chunk`'s (blocking: a thread)."""
    own = KeyFile.open(chunk)
    if own is not None and not own.keys:
        own.close()
        return []  # no keys: it meets nothing
    met = []
    try:
        for other in earlier:
            theirs = KeyFile.open(other)
            try:
                if meets(own, theirs):
                    met.append(other.chunk_id)
            finally:
                if theirs is not None:
                    theirs.close()
    finally:
        if own is not None:
            own.close()
    return met


@dataclass
class ConflictCheck:
    """Finds each recorded chunk's conflicts once, in the order chunks were recorded."""

    store: Store

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Check every chunk not checked yet (those recorded meanwhile too), or until
        `stop` is set; how many were checked."""
        checked = 0
        while todo := await self.store.unchecked():
            for chunk in todo:
                if stop is not None and stop.is_set():
                    return checked
                await self.check(chunk)
                checked += 1
        return checked

    async def check(self, chunk: Keyed) -> None:
        earlier = await self.store.holding_before(chunk.seq)
        started = time.perf_counter()
        met = await asyncio.to_thread(meeting, chunk, earlier)
        await self.store.record_conflicts(chunk.chunk_id, met)
        emit = log.info if met else log.debug
        emit(
            "keys_checked",
            chunk_id=chunk.chunk_id,
            against=len(earlier),
            conflicts=len(met),
            seconds=round(time.perf_counter() - started, 3),
        )


Holds = dict[int, tuple[Hold, ...]]


@dataclass
class KeyRule:
    """Which pending chunks the key rule holds back, for the scheduler."""

    settings: Settings
    store: Store
    clock: Callable[[], float] = time.monotonic
    check: ConflictCheck = field(init=False)
    release_at: float | None = None  # when copies that may be at Marketo are taken as gone
    _told: set[int] = field(default_factory=set)  # held chunks logged as such

    def __post_init__(self) -> None:
        self.check = ConflictCheck(self.store)

    @property
    def on(self) -> bool:
        return self.settings.limits.key_order

    async def holds(self, outstanding: int) -> Holds:
        """The pending chunks that may not go now, each with what it waits for. With
        nothing of ours at Marketo, chunks done but for copies that may still be there
        are taken as done once `release_at` passed."""
        if not self.on:
            return {}
        holds = await self.store.holds()
        if await self.release_idle(holds, outstanding):
            holds = await self.store.holds()
        self.tell(holds)
        return holds

    async def release_idle(self, holds: Holds, outstanding: int) -> bool:
        stale = {h.chunk_id: h for waits in holds.values() for h in waits if h.final}
        if outstanding or not stale:
            self.release_at = None
            return False
        now = self.clock()
        if self.release_at is None:
            self.release_at = now + max(self.copy_time(h) for h in stale.values())
            return False
        if now < self.release_at:
            return False
        self.release_at = None
        await self.store.release_keys(stale)
        log.warning("keys_released_idle", chunks=sorted(stale))
        return True

    def copy_time(self, hold: Hold) -> float:
        """How long a copy of a held-back chunk may still import: its own last job's time
        at Marketo (a copy queued ahead of that job carries the same rows); backoff.max if
        it never had a job."""
        seconds = job_seconds(hold.submitted_at, hold.finished_at)
        floor = self.settings.polling.max_interval
        return self.settings.backoff.max if seconds is None else max(seconds, floor)

    def next_deadline(self) -> float | None:
        """Seconds until held copies are taken as gone, or None."""
        return None if self.release_at is None else max(0.0, self.release_at - self.clock())

    def tell(self, holds: Holds) -> None:
        """Log each chunk once when it is first held back by another."""
        for chunk_id, waits in holds.items():
            if waits and chunk_id not in self._told:
                first = waits[0]
                log.info(
                    "chunk_held",
                    chunk_id=chunk_id,
                    waits_for_file=first.file,
                    waits_for_chunk=first.index,
                    waits_for=len(waits),
                )
        self._told = {c for c, waits in holds.items() if waits}


def job_seconds(submitted_at: str | None, finished_at: str | None) -> float | None:
    """Seconds between two stamps, or None when either is missing or unreadable."""
    if not submitted_at or not finished_at:
        return None
    try:
        delta = datetime.fromisoformat(finished_at) - datetime.fromisoformat(submitted_at)
    except ValueError:
        return None
    return max(0.0, delta.total_seconds())
