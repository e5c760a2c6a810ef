"""Claiming: inbox entries become files of ours, each exactly once, also across crashes.

A claim is three steps, each one safe to be interrupted:

1. intent: `Store.begin_claims` records the source path and the work path
   (status CLAIMING);
2. move: `os.rename` from the inbox into work/ (one filesystem, so atomic);
3. done: `Store.finish_claims` (status CLAIMED); the spool then hands the
   record on.

If the source vanished before the rename, the intent is dropped. A crash
between the steps leaves a CLAIMING record that `Claimer.recover` completes:
work path present -> finish; source still in the inbox -> move, then finish;
neither -> drop.

Work paths are `work/incoming/<ns>-<name>`: `<ns>` is the claim time in
nanoseconds since the epoch, strictly increasing within a process (two files of
the same name never share a work path), and the same instant as `claimed_at`.
Names too long for the filesystem lose characters from the front, so the
extension survives; the record keeps the original name.

A file handed over by `submit` has a ticket beside it (`orchestrator.tickets`):
its id and the name the caller gave are recorded at the claim, and the ticket
is deleted once the claim is done. Any other file gets a fresh id.

Which entries to claim, and when, is the spool's part (`spool.inbox`); the
claimer only claims what it is given and says how each ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from orchestrator.clock import stamp_ns
from orchestrator.config import Settings
from orchestrator.models import FileRecord, FileStatus
from orchestrator.spool.fs import (
    Entry,
    Move,
    drop_tickets,
    move_entries,
    read_tickets,
    resume_move,
    work_name,
)
from orchestrator.store import Claim, Store
from orchestrator.tickets import drop_ticket, new_id

log = structlog.get_logger(__name__)

# Entries claimed together: one transaction records their intents, one their claims.
CLAIM_BATCH = 100


@dataclass(frozen=True, slots=True)
class Taken:
    """How a batch of claims ended, entry by entry, in the batch's order."""

    claimed: list[tuple[Entry, FileRecord]]  # now CLAIMED
    gone: list[Entry]  # vanished before the move, or the name changed hands
    stuck: list[tuple[Entry, str]]  # left in place, and why; retried on later scans


class Claimer:
    """Records intents, moves entries into work/, marks them claimed; completes old claims."""

    def __init__(self, settings: Settings, store: Store, incoming: Path) -> None:
        self._store = store
        self._incoming = incoming
        self._max_chunk_bytes = settings.limits.max_chunk_bytes
        self._last_ns = 0
        self._recovered = False

    @property
    def recovered(self) -> bool:
        """False until every claim a crash left CLAIMING is done, and again after a batch
        was cut short (some of its entries may be left CLAIMING)."""
        return self._recovered

    async def recover(self, on_claimed: Callable[[FileRecord], Awaitable[None]]) -> None:
        """Complete or drop every CLAIMING claim; completed ones go to `on_claimed`."""
        for record in await self._store.files([FileStatus.CLAIMING]):
            if not await asyncio.to_thread(resume_move, record):
                await self._store.drop_claim(record.id)
                log.info("claim_dropped", route=record.route, file=record.name)
                continue
            done = await self._store.finish_claim(record.id)
            await asyncio.to_thread(drop_ticket, Path(record.source_path))
            log.info("claim_recovered", route=done.route, file=done.name, file_id=done.id)
            await on_claimed(done)
        self._recovered = True

    async def take(self, entries: list[Entry]) -> Taken:
        """Claim settled entries, in this order."""
        takeable = []
        stuck = []
        for entry in entries:
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                stuck.append((entry, "file name is not valid UTF-8; rename it"))
                continue
            takeable.append(entry)
        if not takeable:
            return Taken([], [], stuck)
        try:
            taken = await self._take(takeable)
        except BaseException:
            self._recovered = False  # some may be left CLAIMING: the next scan finishes them
            raise
        return Taken(taken.claimed, taken.gone, stuck + taken.stuck)

    async def _take(self, entries: list[Entry]) -> Taken:
        """Intents, renames, done, for a batch: one transaction records every intent
        before any rename, and one more marks the moved files CLAIMED."""
        tickets = await asyncio.to_thread(read_tickets, [e.path for e in entries])
        claims = [self._claim(entry, found) for entry, found in zip(entries, tickets, strict=True)]
        records = await self._store.begin_claims(claims)
        moves = await asyncio.to_thread(
            move_entries, [(e, Path(r.work_path)) for e, r in zip(entries, records, strict=True)]
        )
        moved: list[tuple[Entry, FileRecord]] = []
        gone: list[Entry] = []
        stuck: list[tuple[Entry, str]] = []
        for entry, record, outcome in zip(entries, records, moves, strict=True):
            if isinstance(outcome, OSError):
                await self._store.drop_claim(record.id)
                stuck.append((entry, f"cannot move it into work/: {outcome.strerror or outcome}"))
            elif outcome is not Move.MOVED:
                await self._store.drop_claim(record.id)
                log.info("claim_abandoned", route=entry.route, file=entry.name, why=outcome.value)
                gone.append(entry)
            else:
                moved.append((entry, record))
        done = await self._store.finish_claims([record.id for _, record in moved])
        with_ticket = {e.path for e, ticket in zip(entries, tickets, strict=True) if ticket}
        ticketed = [entry.path for entry, _ in moved if entry.path in with_ticket]
        if ticketed:
            await asyncio.to_thread(drop_tickets, ticketed)
        claimed = [(entry, record) for (entry, _), record in zip(moved, done, strict=True)]
        return Taken(claimed, gone, stuck)

    def _claim(self, entry: Entry, ticket: tuple[str, str] | None) -> Claim:
        """The intent for one entry: its work path, claim time, and id (the ticket's, if any)."""
        ns = self._next_ns()
        file_id, name = ticket if ticket else (new_id(), entry.name)
        return Claim(
            route=entry.route,
            name=name,
            source_path=str(entry.path),
            work_path=str(self._incoming / work_name(ns, entry.name)),
            max_chunk_bytes=self._max_chunk_bytes,
            claimed_at=stamp_ns(ns),
            ticket=file_id,
            error=entry.signature.kind.refusal,
        )

    def _next_ns(self) -> int:
        """Claim time in ns, at least a microsecond after the previous one (distinct claimed_at)."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1000)
        return self._last_ns
