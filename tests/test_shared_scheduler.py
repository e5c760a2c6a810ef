"""The scheduler with a shared queue: each daemon a real store, a fake submitter and a
real `PostgresCoordinator` on the private PostgreSQL server, all of one subscription.

As in tests/test_scheduler.py each test calls `submit_ready` itself (never the run
loop), and a deferral is crossed by moving the daemon's fake clock, not by waiting.
Leases are the database's clock: the one test that needs a lease to run out waits
for that on a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.config import BackoffSettings, Route, Settings
from orchestrator.coordination.postgres import PostgresCoordinator
from orchestrator.errors import (
    CoordinationUnavailable,
    CredentialsError,
    QueueFullError,
    TransientError,
)
from orchestrator.filecache import FileCache
from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path
from orchestrator.membership import limits_of, watch_others
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord
from orchestrator.orphans import OrphanPoller
from orchestrator.scheduler import Scheduler
from orchestrator.simulator import Simulator
from orchestrator.status import DaemonSlots
from orchestrator.store import Store
from tests.support.http import http_get
from tests.support.postgres import PostgresDatabase, PostgresServer
from tests.support.processes import MakeRunner
from tests.support.settings import LEADS, fast_settings, free_port, with_sections
from tests.support.stages import FakeClock, claimed_file
from tests.support.waiting import wait_until

SUBSCRIPTION = "123-abc-456.mktorest.com"
BACKOFF = BackoffSettings(initial=10.0, max=80.0)
LATER = 100.0  # seconds on a daemon's fake clock: past any deferral or backoff here


class FakeSubmitter:
    """Marketo's create call: a fresh batch id per chunk (named by its path's stem),
    unless told to answer 1016 next."""

    def __init__(self, first_batch: int) -> None:
        self.calls: list[str] = []
        self.queue_full = 0  # the next this many creates are answered 1016
        self.refused = 0  # the next this many creates meet refused credentials
        self.transient = 0  # after the next create, this many meet a 5xx
        self._next = first_batch

    async def submit(self, route: Route, path: Path, fmt: str) -> BatchStatus:
        self.calls.append(path.stem)
        if self.queue_full:
            self.queue_full -= 1
            raise QueueFullError("1016", "Too many imports", operation="import")
        if self.refused:
            self.refused -= 1
            raise CredentialsError("http-401", "client id or secret refused")
        if self.transient and len(self.calls) > 1:
            self.transient -= 1
            raise TransientError("http-503", "Service Unavailable", operation="import")
        self._next += 1
        return BatchStatus(self._next, "Queued")


@dataclass
class Member:
    """One daemon of the subscription, as far as its scheduler goes."""

    name: str
    scheduler: Scheduler
    store: Store
    client: FakeSubmitter
    clock: FakeClock
    coordinator: PostgresCoordinator
    submitted: list[str] = field(default_factory=list)
    claims: int = 0

    async def add_file(self, name: str, chunks: int, keys: list[str] | None = None) -> FileRecord:
        """A claimed, split file of `chunks` chunks ("a.csv": chunks "a1", "a2", ...);
        with `keys`, each chunk's emails (split by spaces) in its key file."""
        self.claims += 1
        began = await claimed_file(self.store, LEADS.dir, name, number=self.claims)
        for index in range(1, chunks + 1):
            path = self.scheduler.settings.layout.chunk_dir(began.id) / f"{name[:-4]}{index}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            if keys is not None:
                hashes = [key_hash(LEAD_NAMESPACE, [e]) for e in keys[index - 1].split()]
                KeySet.of(h for h in hashes if h is not None).save(keys_path(path), fsync=False)
            await self.store.add_chunk(
                began.id, index=index, path=str(path), rows=10, bytes=900, first_line=2
            )
        return await self.store.finish_split(began.id, rows=10 * chunks, chunks_total=chunks)

    async def round(self) -> list[str]:
        """One scheduling pass (conflicts found first, as the run loop's check does)."""
        before = len(self.submitted)
        await self.scheduler.keys.check.run()
        await self.scheduler.submit_ready(asyncio.Event())
        return self.submitted[before:]

    async def chunk(self, label: str) -> ChunkRecord:
        (found,) = [c for c in await self.store.chunks() if Path(c.path).stem == label]
        return found

    async def job_done(self, label: str) -> None:
        """Marketo finished one of our jobs: the poller's store call, then its hand-off."""
        chunk = await self.chunk(label)
        await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.COMPLETE, message="", finished_at="2026-12-06T01:00:00Z"
        )
        self.scheduler.job_finished(chunk.id)

    async def statuses(self) -> dict[str, ChunkStatus]:
        return {Path(c.path).stem: c.status for c in await self.store.chunks()}


MakeMember = Callable[..., Awaitable[Member]]


@pytest.fixture
async def member(tmp_path: Path, postgres_database: PostgresDatabase) -> AsyncIterator[MakeMember]:
    """Factory: `await member("a")` joins daemon "a" to the subscription."""
    made: list[Member] = []

    async def make(name: str, *, lease_seconds: float = 30.0, **limits: int) -> Member:
        settings: Settings = replace(
            fast_settings("http://marketo.invalid", tmp_path / name, (LEADS,), **limits),
            backoff=BACKOFF,
        )
        store = await Store.open(settings.layout.state_db)
        coordinator = PostgresCoordinator(
            postgres_database.url,
            subscription=SUBSCRIPTION,
            instance=name,
            limits=limits_of(settings),
            lease_seconds=lease_seconds,
        )
        await coordinator.start()
        assert coordinator.problem is None
        client, clock = FakeSubmitter(first_batch=1000 * (len(made) + 1)), FakeClock()
        submitted: list[str] = []

        async def on_final(chunk: ChunkRecord) -> None:
            pass

        scheduler = Scheduler(
            settings,
            store,
            client,
            on_submitted=lambda chunk: submitted.append(Path(chunk.path).stem),
            on_chunk_final=on_final,
            files=FileCache(store),
            shared=coordinator,
            clock=clock,
        )
        made.append(Member(name, scheduler, store, client, clock, coordinator, submitted))
        return made[-1]

    yield make
    for one in made:
        await one.coordinator.close()
        await one.store.close()


def shared_states(database: PostgresDatabase) -> dict[str, int]:
    with database.connect() as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM marketo_orchestrator.chunks GROUP BY state"
        ).fetchall()
    return {str(state): int(n) for state, n in rows}


async def test_two_daemons_share_ten_slots_and_a_deferral_ends_the_round(
    member: MakeMember, postgres_database: PostgresDatabase
) -> None:
    a, b = await member("a"), await member("b")
    await a.add_file("a.csv", 8)
    await b.add_file("b.csv", 5)
    assert len(await a.round()) == 8
    # Alone, b would send all five (its own model has room for ten): the queue holds
    # two more, then the database defers it and the round ends.
    assert await b.round() == ["b1", "b2"]
    assert b.client.calls == ["b1", "b2"]
    assert shared_states(postgres_database) == {"submitted": 10, "pending": 3}
    admission = b.scheduler.admission
    assert admission is not None
    assert "queue is full" in admission.why
    deadline = b.scheduler.next_deadline()
    assert deadline is not None
    assert deadline <= b.scheduler.settings.polling.interval
    assert await b.round() == []  # still deferred: the database is not even asked
    # One of a's jobs ends: a reports it at its next round, then b's next look admits one.
    await a.job_done("a1")
    assert await a.round() == []
    b.clock.advance(LATER)
    assert await b.round() == ["b3"]
    assert shared_states(postgres_database) == {"submitted": 10, "pending": 2, "done": 1}


async def test_fifo_holds_across_daemons(member: MakeMember) -> None:
    a, b = await member("a", queued_jobs=2), await member("b")
    await a.add_file("a.csv", 3)
    assert await a.round() == ["a1", "a2"]  # a3 registered, claimed before b's file
    await b.add_file("b.csv", 1)
    await a.job_done("a1")
    admission = a.scheduler.admission
    assert admission is not None
    assert await admission.flush()
    assert await b.round() == []  # a3 was claimed earlier and can go: b waits
    assert b.scheduler.admission is not None
    assert "FIFO" in b.scheduler.admission.why
    a.clock.advance(LATER)
    assert await a.round() == ["a3"]


async def test_the_key_rule_holds_across_daemons(member: MakeMember) -> None:
    a, b = await member("a"), await member("b")
    await a.add_file("a.csv", 1, keys=["ada@example.com bob@example.com"])
    assert await a.round() == ["a1"]
    await b.add_file("b.csv", 2, keys=["bob@example.com", "cy@example.com"])
    assert await b.round() == []  # b1 shares bob with a's job at Marketo; b2 follows b1
    assert b.scheduler.admission is not None
    assert "shares keys" in b.scheduler.admission.why
    await a.job_done("a1")
    assert await a.round() == []
    b.clock.advance(LATER)
    assert await b.round() == ["b1", "b2"]


async def test_1016_backs_off_every_daemon(member: MakeMember) -> None:
    a, b = await member("a"), await member("b")
    await a.add_file("a.csv", 2)
    await b.add_file("b.csv", 1)
    a.client.queue_full = 1  # another integration holds the rest of the queue
    assert await a.round() == []
    assert await b.round() == []  # the shared backoff: b does not even try
    assert b.client.calls == []
    assert b.scheduler.admission is not None
    assert "backoff after 1016" in b.scheduler.admission.why


async def test_a_daemon_that_cannot_send_is_passed_by_the_shared_fifo(member: MakeMember) -> None:
    a, b = await member("a"), await member("b")
    await a.add_file("a.csv", 1)
    a.client.refused = 1  # a's credentials are refused: a waits, fails nothing
    assert await a.round() == []
    await b.add_file("b.csv", 1)
    assert await b.round() == ["b1"]  # claimed after a1, but a cannot send
    a.clock.advance(LATER)
    assert await a.round() == ["a1"]  # fixed: a sends again, and says so
    admission = a.scheduler.admission
    assert admission is not None
    assert admission.paused == ""


async def test_a_daemon_backing_off_after_a_5xx_is_passed_by_the_shared_fifo(
    member: MakeMember,
) -> None:
    a, b = await member("a"), await member("b")
    await a.add_file("a.csv", 2)
    a.client.transient = 1  # a1 goes, then a2 meets a 503: a backs off on its own
    assert await a.round() == ["a1"]
    await b.add_file("b.csv", 1)
    assert await b.round() == ["b1"]  # claimed after a2, but a cannot send now
    a.clock.advance(LATER)
    assert await a.round() == ["a2"]
    admission = a.scheduler.admission
    assert admission is not None
    assert admission.paused == ""  # its create went through: it heads the FIFO again


async def test_a_daemon_back_from_a_kill_tells_the_database_what_ended_meanwhile(
    member: MakeMember, postgres_database: PostgresDatabase
) -> None:
    """A kill between a chunk's end in the daemon's store and its report to the database
    (`finished`, `dropped`) would leave the chunk unfinished there for good: holding a
    queue slot, or the head of the shared FIFO. Back again, the daemon says so first."""
    a = await member("a")
    await a.add_file("a.csv", 1)
    assert await a.round() == ["a1"]
    await a.add_file("c.csv", 1)
    waiting = await a.chunk("c1")
    assert await a.scheduler.register([waiting])
    # a1's job ends and c1 is refused in a's store; a is killed before it tells anyone.
    for label, status in (("a1", ChunkStatus.COMPLETE), ("c1", ChunkStatus.FAILED)):
        await a.store.finish_chunk(
            (await a.chunk(label)).id, status=status, message="", finished_at="2026-12-06T01:00:00Z"
        )
    assert shared_states(postgres_database) == {"submitted": 1, "pending": 1}
    again = await member("a")  # the same data directory, a new process
    await again.add_file("d.csv", 1)
    assert await again.round() == ["d1"]
    assert shared_states(postgres_database) == {"done": 1, "dropped": 1, "submitted": 1}


async def test_without_the_database_nothing_is_sent_and_nothing_fails(
    member: MakeMember, postgres_server: PostgresServer, postgres_database: PostgresDatabase
) -> None:
    a = await member("a", queued_jobs=1)
    await a.add_file("a.csv", 3)
    assert await a.round() == ["a1"]
    await a.job_done("a1")
    postgres_server.stop("fast")
    a.clock.advance(LATER)
    assert await a.round() == []
    assert a.client.calls == ["a1"]
    assert a.coordinator.problem is not None
    assert "unreachable" in a.coordinator.problem
    assert postgres_database.url not in a.coordinator.problem
    statuses = await a.statuses()
    assert statuses == {
        "a1": ChunkStatus.COMPLETE,
        "a2": ChunkStatus.PENDING,
        "a3": ChunkStatus.PENDING,
    }
    assert [f.error for f in await a.store.files()] == [None]
    admission = a.scheduler.admission
    assert admission is not None
    assert admission.reports
    postgres_server.start()
    a.clock.advance(LATER)
    assert await a.round() == ["a2"]
    assert a.coordinator.problem is None
    assert not admission.reports
    assert shared_states(postgres_database) == {"done": 1, "submitted": 1, "pending": 1}


class FakeStatus:
    """Marketo's status call: each batch's status as the test sets it."""

    def __init__(self) -> None:
        self.statuses: dict[int, str] = {}

    async def status(self, route: Route, batch_id: int) -> BatchStatus:
        return BatchStatus(batch_id, self.statuses.get(batch_id, "Queued"))


async def test_a_dead_daemons_jobs_are_polled_by_the_living(member: MakeMember) -> None:
    a = await member("a", lease_seconds=1.0)
    b = await member("b")
    await a.add_file("a.csv", 2)
    assert await a.round() == ["a1", "a2"]
    batches = [(await a.chunk(label)).batch_id for label in ("a1", "a2")]
    # a stops renewing: once its lease ran out (the database's clock), b takes it as dead.

    async def dead() -> bool:
        await b.coordinator.renew()
        return len(await b.coordinator.orphans()) == 2

    await wait_until(dead, "b to take a as dead", within=30)
    marketo = FakeStatus()
    marketo.statuses[int(batches[0] or 0)] = "Complete"
    poller = OrphanPoller(b.coordinator, marketo, interval=0.05)
    assert await poller.poll_round() == 1
    [left] = await b.coordinator.orphans()
    assert left.batch_id == batches[1]
    assert await poller.poll_round() == 0  # still queued: nothing more


async def test_readyz_says_why_while_the_database_is_away(
    tmp_path: Path,
    daemons: MakeRunner,
    simulator: Simulator,
    postgres_server: PostgresServer,
    postgres_database: PostgresDatabase,
) -> None:
    """A real daemon with a coordination URL: ready once registered; while PostgreSQL
    is stopped /readyz is 503 and says why; ready again after. The URL's password (the
    test server trusts its socket and never asks for it) appears nowhere."""
    port = free_port()
    password = "s3cret-pw"
    url_with_password = postgres_database.url.replace("postgres@", f"postgres:{password}@", 1)
    assert password in url_with_password
    settings = with_sections(
        fast_settings(simulator.base_url, tmp_path / "data", (LEADS,)),
        http={"listen": f"127.0.0.1:{port}"},
    )  # the URL comes from the environment, as from a Kubernetes Secret
    runner = daemons(settings)
    daemon = await runner.daemon(env={"ORCHESTRATOR_COORDINATION_URL": url_with_password})
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as session:

        async def readiness() -> tuple[int, str] | None:
            try:
                return await http_get(session, url)
            except aiohttp.ClientConnectionError:
                return None  # not listening yet

        async def answers(status: int) -> tuple[int, str] | None:
            found = await readiness()
            return found if found is not None and found[0] == status else None

        await wait_until(lambda: answers(200), "/readyz 200", process=daemon)
        postgres_server.stop("fast")
        _, body = await wait_until(lambda: answers(503), "/readyz 503", process=daemon)
        assert "coordination" in body
        assert password not in body
        postgres_server.start()
        await wait_until(lambda: answers(200), "/readyz 200 again", process=daemon)
    daemon.terminate()
    assert await daemon.wait(10) == 0
    assert "coordination_registered" in daemon.stdout() + daemon.stderr()
    assert password not in daemon.stdout() + daemon.stderr()


async def test_a_finish_is_told_during_a_local_backoff(
    member: MakeMember, postgres_database: PostgresDatabase
) -> None:
    """A daemon in its own backoff still tells the others at once that a slot is free."""
    a = await member("a")
    await a.add_file("a.csv", 2)
    a.client.transient = 1  # a2's create meets a 5xx the client gave up on: a backs off
    assert await a.round() == ["a1"]
    assert a.client.calls == ["a1", "a2"]
    await a.job_done("a1")
    assert await a.round() == []  # still backing off, but a1's end is told
    assert shared_states(postgres_database) == {"done": 1, "pending": 1}


async def test_the_status_page_sees_the_other_daemons_jobs(member: MakeMember) -> None:
    a, b = await member("a"), await member("b")
    await a.add_file("a.csv", 3)
    assert len(await a.round()) == 3
    shown: list[tuple[DaemonSlots, ...]] = []
    stop = asyncio.Event()

    def show(others: tuple[DaemonSlots, ...]) -> None:
        shown.append(others)
        stop.set()  # one reading is enough

    await watch_others(b.coordinator, show, stop, every=0.05)
    assert shown == [(DaemonSlots("a", importing=0, queued=3),)]


async def test_a_daemon_stopped_inside_a_transaction_does_not_block_the_others(
    member: MakeMember,
) -> None:
    """SIGSTOP between two statements would leave a's transaction open, the
    subscription's row locked, and every other daemon waiting: the server ends such a
    session well inside a lease, and b goes on."""
    a = await member("a", lease_seconds=2.0)
    b = await member("b")
    locked, resume = threading.Event(), threading.Event()

    def stalled(conn: Any) -> None:  # a's worker thread, "stopped" with the row locked
        conn.execute(
            "SELECT 1 FROM marketo_orchestrator.subscriptions WHERE id = %s FOR UPDATE",
            (SUBSCRIPTION,),
        )
        locked.set()
        resume.wait(timeout=60)
        conn.execute("SELECT 1")

    stop = asyncio.create_task(a.coordinator._db.run("stalled", stalled))
    await wait_until(locked.is_set, "a's transaction to hold the row")
    await b.add_file("b.csv", 1)
    assert await b.round() == ["b1"]  # admitted: a's session was ended for it
    resume.set()
    with pytest.raises(CoordinationUnavailable):
        await stop
