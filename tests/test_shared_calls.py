"""Several daemons' Marketo clients keep one call budget and one daily quota through a real
PostgreSQL (the private test server) against the bundled simulator over loopback.

Each "daemon" here is a `MarketoClient` with its own `PostgresCoordinator` (another
instance name, one database): what the simulator counts is what Marketo would count for
the subscription. Windows are scaled down through the settings and the simulator's
`rate_window`; bounds on time are lower bounds (a slow machine only makes calls later).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import (
    BackoffSettings,
    LimitSettings,
    MarketoSettings,
    Route,
    Secret,
    Settings,
)
from orchestrator.coordination import Limits
from orchestrator.coordination.postgres import PostgresCoordinator
from orchestrator.errors import CoordinationUnavailable, TransientError
from orchestrator.marketo import MarketoClient
from orchestrator.marketo.sharing import CallWait, SharedCalls, SharedUsage
from orchestrator.marketo.wire import DAILY_USAGE, DESCRIBE_LEADS
from orchestrator.models import ObjectType, QuotaState
from orchestrator.simulator import Simulator
from tests.support.postgres import PostgresDatabase, PostgresServer
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

SUB = "123-abc-456.mktorest.com"
CLIENT_ID = "shared-calls-client"
SECRET = "shared-calls-secret-7d2e"
FAST = {"job_overhead": 0.05, "rows_per_second": 100_000.0}
BACKOFF = BackoffSettings(initial=0.05, max=0.2)
LEASE = 600.0  # no renewal runs here: the lease outlasts every test
LEADS = Route(dir="leads", object=ObjectType.LEADS)


def settings_for(sim: Simulator, **limits: Any) -> Settings:
    return Settings(
        marketo=MarketoSettings(
            base_url=sim.base_url,
            client_id=CLIENT_ID,
            client_secret=Secret(SECRET),
            request_timeout=10.0,
        ),
        limits=LimitSettings(**limits),
        backoff=BACKOFF,
    )


class Recording:
    """The real coordinator as `SharedCalls` (mypy checks that it is one), noting what
    its budget answered."""

    def __init__(self, inner: SharedCalls) -> None:
        self.inner = inner
        self.waits: list[CallWait] = []
        self.unavailable = 0  # asks that met the database away

    async def acquire_call(self, operation: str, *, counted: bool) -> int | CallWait:
        try:
            answer = await self.inner.acquire_call(operation, counted=counted)
        except CoordinationUnavailable:
            self.unavailable += 1
            raise
        if not isinstance(answer, int):
            self.waits.append(answer)
        return answer

    async def release_call(self, call: int, *, counted: bool) -> None:
        await self.inner.release_call(call, counted=counted)

    async def hold(self, seconds: float) -> None:
        await self.inner.hold(seconds)

    async def pause(self, until: dt.datetime) -> None:
        await self.inner.pause(until)

    async def record_usage(self, total: int) -> None:
        await self.inner.record_usage(total)

    async def usage_read_at(self) -> dt.datetime | None:
        return await self.inner.usage_read_at()

    async def usage(self, since: dt.datetime) -> SharedUsage:
        return await self.inner.usage(since)


@dataclass
class Observer:
    """What a client reports (ClientObserver), with hooks."""

    errors: list[str] = field(default_factory=list)
    backoffs: list[tuple[str, float]] = field(default_factory=list)
    on_error: Callable[[str], None] | None = None
    on_backoff: Callable[[str, float], None] | None = None

    def api_call(self, operation: str) -> None:
        pass

    def marketo_error(self, code: str) -> None:
        self.errors.append(code)
        if self.on_error is not None:
            self.on_error(code)

    def backoff(self, reason: str, seconds: float) -> None:
        self.backoffs.append((reason, seconds))
        if self.on_backoff is not None:
            self.on_backoff(reason, seconds)


@dataclass
class Daemon:
    coordinator: PostgresCoordinator
    shared: Recording
    client: MarketoClient
    observer: Observer


MakeDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def make_daemon(postgres_database: PostgresDatabase) -> AsyncIterator[MakeDaemon]:
    """Factory: `await make_daemon(instance, settings, **client_kw)`: a registered
    coordinator and a client that shares its budget through it."""
    made: list[Daemon] = []

    async def make(instance: str, settings: Settings, **client_kw: Any) -> Daemon:
        lim = settings.limits
        limits = Limits(
            lim.queued_jobs,
            lim.api_calls_per_window,
            lim.api_window_seconds,
            lim.concurrent_api_calls,
            lim.daily_quota,
            lim.daily_reserve,
        )
        coordinator = PostgresCoordinator(
            postgres_database.url,
            subscription=SUB,
            instance=instance,
            limits=limits,
            lease_seconds=LEASE,
        )
        await coordinator.start()
        assert coordinator.problem is None
        shared = Recording(coordinator)
        typed: SharedCalls = shared  # the coordinator's calls are what the client needs
        observer = Observer()
        client = MarketoClient(settings, shared=typed, observer=observer, **client_kw)
        made.append(Daemon(coordinator, shared, client, observer))
        return made[-1]

    yield make
    for daemon in made:
        await daemon.client.close()
        await daemon.coordinator.close()


def write_leads(tmp_path: Path) -> Path:
    path = tmp_path / "leads.csv"
    path.write_text("email,firstName\na@example.com,Ada\n", encoding="utf-8")
    return path


def counted(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in calls if c["counted"]]


async def test_two_daemons_keep_one_call_window_together(
    make_simulator: MakeSimulator, make_daemon: MakeDaemon
) -> None:
    """Each daemon alone may send 4 calls per window; together they send 4, not 8, in
    any window the simulator counts (it never refuses here: its own limit is 100)."""
    window, per_window = 3.0, 4
    sim = await make_simulator(**FAST, rate_window=window)
    settings = settings_for(sim, api_calls_per_window=per_window, api_window_seconds=window)
    a = await make_daemon("daemon-a", settings)
    b = await make_daemon("daemon-b", settings)
    for daemon in (a, b):
        await daemon.client.ensure_token()  # identity calls are in no window
    first = len(sim.calls())

    await asyncio.gather(*(d.client.describe_leads() for d in (a, b) for _ in range(6)))

    calls = counted(sim.calls()[first:])
    assert len(calls) == 12
    assert not [c for c in calls if c["code"]]
    assert sim.stats()["max_calls_in_window"] == per_window
    assert a.client.calls_by_operation[DESCRIBE_LEADS] == 6
    assert b.client.calls_by_operation[DESCRIBE_LEADS] == 6
    # Both waited for the shared window at some point, not only the one that filled it.
    assert any(w.reason == "call window full" for w in a.shared.waits + b.shared.waits)


async def test_two_daemons_keep_one_limit_of_calls_in_flight(
    make_simulator: MakeSimulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """Each daemon alone may have 3 calls in flight; slow answers keep 12 calls of two
    daemons waiting on one another, and the simulator never sees more than 3 at once."""
    sim = await make_simulator(**FAST)
    settings = settings_for(sim, concurrent_api_calls=3)
    a = await make_daemon("daemon-a", settings)
    b = await make_daemon("daemon-b", settings)
    batch = await a.client.submit(LEADS, write_leads(tmp_path), "csv")
    await b.client.ensure_token()
    sim.set_knobs(slow_fraction=1.0, slow_seconds=0.3)

    await asyncio.gather(
        *(d.client.status(LEADS, batch.batch_id) for d in (a, b) for _ in range(6))
    )

    assert sim.stats()["max_in_flight"] == 3
    assert any(w.reason == "calls in flight at the limit" for w in a.shared.waits + b.shared.waits)


async def test_a_606_one_daemon_meets_holds_the_other(
    make_simulator: MakeSimulator, make_daemon: MakeDaemon
) -> None:
    """Another integration fills the window; daemon A meets 606 and holds for a window.
    Daemon B, which Marketo never refused, sends nothing until that hold has passed."""
    window = 2.0
    sim = await make_simulator(**FAST, rate_window=window)
    settings = settings_for(sim, api_window_seconds=window)
    a = await make_daemon("daemon-a", settings)
    b = await make_daemon("daemon-b", settings)
    for daemon in (a, b):
        await daemon.client.ensure_token()
    held = asyncio.Event()
    a.observer.on_error = lambda _code: sim.set_knobs(foreign_calls_per_window=0)
    a.observer.on_backoff = lambda reason, _s: held.set() if reason == "606" else None
    sim.set_knobs(foreign_calls_per_window=sim.config.rate_limit)  # someone else's calls

    first = asyncio.create_task(a.client.describe_leads())
    await wait_until(held.is_set, "daemon A to meet 606 and hold")
    await b.client.describe_leads()
    await first

    calls = sim.calls()
    refused = [i for i, c in enumerate(calls) if c["code"] == "606"]
    assert len(refused) == 1
    after = calls[refused[0] + 1 :]
    assert len(counted(after)) == 2  # A's retry and B's call
    assert all(c["t"] >= calls[refused[0]]["t"] + window for c in after)
    assert b.observer.errors == []  # B learnt it from the database, not from Marketo
    assert any(w.reason == "606 hold" for w in b.shared.waits)


async def test_calls_marketo_does_not_count_give_their_place_back(
    make_simulator: MakeSimulator, make_daemon: MakeDaemon
) -> None:
    """Four attempts of A answered 608 (Marketo does not count them) leave the shared
    window of 3 empty: B's three calls go at once, and only then is the window full."""
    window, per_window = 60.0, 3
    sim = await make_simulator(**FAST, rate_window=window)
    settings = settings_for(sim, api_calls_per_window=per_window, api_window_seconds=window)
    a = await make_daemon("daemon-a", settings, max_attempts=4)
    b = await make_daemon("daemon-b", settings)
    for daemon in (a, b):
        await daemon.client.ensure_token()
    first = len(sim.calls())

    sim.set_knobs(fault_608=1.0)
    with pytest.raises(TransientError):
        await a.client.status(LEADS, 1)
    sim.set_knobs(fault_608=0.0)
    answered = sim.calls()[first:]
    assert [c["code"] for c in answered] == ["608"] * 4
    assert counted(answered) == []

    async with asyncio.timeout(30):  # a window that held the 608s would take 60 s
        for _ in range(per_window):
            await b.client.describe_leads()
    assert len(counted(sim.calls()[first:])) == per_window
    answer = await a.coordinator.acquire_call("probe", counted=True)
    assert not isinstance(answer, int)
    assert answer.reason == "call window full"


async def test_calls_wait_while_the_database_is_away_and_go_when_it_returns(
    make_simulator: MakeSimulator,
    make_daemon: MakeDaemon,
    postgres_server: PostgresServer,
    postgres_database: PostgresDatabase,
) -> None:
    """The coordination database stops: a counted call is not sent (the daemon cannot
    know the shared window), asks again and again, and goes once the database is back.
    An identity request, which Marketo counts against no limit, goes meanwhile."""
    sim = await make_simulator(**FAST)
    settings = settings_for(sim)
    a = await make_daemon("daemon-a", settings)
    fresh = await make_daemon("daemon-b", settings)  # no token yet
    await a.client.describe_leads()

    await asyncio.to_thread(postgres_server.stop)
    before = len(sim.calls())
    waiting = asyncio.create_task(a.client.describe_leads())
    await wait_until(lambda: a.shared.unavailable >= 3, "the call to ask again, database away")
    assert not waiting.done()
    assert len(sim.calls()) == before
    await fresh.client.ensure_token()
    assert [c["operation"] for c in sim.calls()[before:]] == ["identity"]

    await asyncio.to_thread(postgres_server.start)
    async with asyncio.timeout(60):
        await waiting
    assert [c["operation"] for c in counted(sim.calls()[before:])] == [DESCRIBE_LEADS]
    assert a.coordinator.problem is None
    with postgres_database.connect() as conn:
        open_calls = conn.execute(
            "SELECT count(*) FROM marketo_orchestrator.calls WHERE done_at IS NULL"
        ).fetchone()
    assert open_calls == (0,)


async def test_a_release_the_database_missed_is_written_when_it_returns(
    make_simulator: MakeSimulator,
    make_daemon: MakeDaemon,
    postgres_server: PostgresServer,
    postgres_database: PostgresDatabase,
) -> None:
    """A call that ends while the database is away would count as in flight for good:
    its release is kept, and written (uncounted, as it ended) once the database answers."""
    sim = await make_simulator(**FAST)
    a = await make_daemon("daemon-a", settings_for(sim))
    call = await a.coordinator.acquire_call(DESCRIBE_LEADS, counted=True)
    assert isinstance(call, int)

    await asyncio.to_thread(postgres_server.stop)
    await a.coordinator.release_call(call, counted=False)  # does not raise
    await asyncio.to_thread(postgres_server.start)
    await a.coordinator.renew()

    with postgres_database.connect() as conn:
        row = conn.execute(
            "SELECT done_at IS NOT NULL, counted FROM marketo_orchestrator.calls WHERE id = %s",
            (call,),
        ).fetchone()
    assert row == (True, False)


async def test_one_daily_quota_read_once_and_paused_for_every_daemon(
    make_simulator: MakeSimulator, make_daemon: MakeDaemon
) -> None:
    """A reads Marketo's usage and makes two calls; B's view of the day is the same
    figure, Marketo's own count, without reading it again. A meets 607: B's quota shuts
    its creates, and C, which never asked Marketo, sends nothing either."""
    sim = await make_simulator(**FAST)
    settings = settings_for(sim)
    a = await make_daemon("daemon-a", settings)
    b = await make_daemon("daemon-b", settings)
    c = await make_daemon("daemon-c", settings)
    for daemon in (a, b, c):
        await daemon.client.ensure_token()

    read = await a.client.refresh_usage()
    assert read.marketo_count is not None
    await a.client.describe_leads()
    await a.client.describe_leads()
    state = await b.client.refresh_usage()
    assert [x["operation"] for x in sim.calls()].count(DAILY_USAGE) == 1
    assert state.marketo_count == read.marketo_count
    assert state.ours_since == 2
    assert state.used == len(counted(sim.calls()))  # what Marketo counted, all of it
    assert b.client.calls_today == 0

    sim.set_knobs(daily_quota=len(counted(sim.calls())))  # spent
    tasks = [asyncio.create_task(a.client.describe_leads())]
    try:
        await wait_until(lambda: a.client.quota.paused_until, "A to pause after 607")
        paused_until = a.client.quota.paused_until

        async def paused() -> QuotaState | None:  # A tells the database right after
            state = await b.client.refresh_usage()
            return state if state.paused_until else None

        state = await wait_until(paused, "B to see the pause")
        assert state.paused_until == paused_until
        assert state.creates_paused
        before = len(sim.calls())
        tasks.append(asyncio.create_task(c.client.describe_leads()))
        await wait_until(lambda: c.client.quota.paused_until, "C to learn the pause")
        assert c.client.quota.paused_until == paused_until
        assert len(sim.calls()) == before
        assert [w.paused_until for w in c.shared.waits] == [paused_until]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [x["code"] for x in sim.calls()].count("607") == 1
