"""Issue 21: several daemons on one Marketo subscription, sharing it through a real
PostgreSQL database (SPEC section 5, "Several daemons").

Every daemon is a real `marketo-orchestrator run` process with a data directory of its
own and a client id of its own (so the simulator's log says whose each call was); all
of them talk to one simulator over loopback and name one fresh database of the private
server (tests/support/shared.py). What is asserted is counted at the simulator, where
Marketo's limits are kept for the whole subscription: jobs outstanding, 1016 answers,
calls per window, the day's count, which row of which job a record got last. Time is
Marketo's scaled down through the config (tests/support/settings.py); waits are on
conditions with deadlines.

Without PostgreSQL's server programs these tests are skipped, saying how to get them;
under ORCHESTRATOR_REQUIRE_POSTGRES=1 they fail instead (tests/support/postgres.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator import constants
from orchestrator.config import Route
from orchestrator.models import ChunkStatus, ObjectType
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.postgres import PostgresDatabase, PostgresServer
from tests.support.processes import MakeRunner
from tests.support.settings import LEADS, SIM_KNOBS
from tests.support.shared import (
    FOREIGN,
    SCHEMA,
    Fleet,
    Member,
    claim_order,
    creates,
    most_at_once,
    ours,
    outstanding_peak,
    refusals,
    start_fleet,
)
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

ONE_JOB = Route(dir="leads", object=ObjectType.LEADS, pack=False)  # every file its own job
HEADER = ("email", "firstName")
ROWS = 20  # rows per file: one chunk of fast_settings' 2,000 bytes
LEASE = 2.0  # seconds; renewed five times per lease (coordination/postgres.py)
# Polls spaced so that creates, not polls, spend most of the shared call budget.
SLOW_POLLS = {"polling": {"interval": 0.2, "max_interval": 0.4}}
# Creates in flight at once, summed over the daemons (the shared in-flight budget).
IN_FLIGHT = constants.DEFAULT_CONCURRENT_API_CALLS

MakeFleet = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def fleet(
    make_postgres_database: Callable[[], PostgresDatabase],
    make_simulator: MakeSimulator,
    daemons: MakeRunner,
    tmp_path: Path,
) -> MakeFleet:
    """Factory: `await fleet(count, knobs=..., **options)` starts `count` daemons on a new
    simulator (SIM_KNOBS changed by `knobs`) and a fresh database, ready; `options` go to
    start_fleet (routes, lease_seconds, sections, start, and [limits] keys).

    Teardown: the daemons are killed first, then the simulators stop, then the
    database is dropped (the fixtures this one needs were made in that order)."""

    async def make(
        count: int,
        *,
        knobs: dict[str, Any] | None = None,
        routes: tuple[Route, ...] = (ONE_JOB,),
        **options: Any,
    ) -> Fleet:
        database = make_postgres_database()
        sim = await make_simulator(**{**SIM_KNOBS, **(knobs or {})})
        return await start_fleet(daemons, sim, database, tmp_path, count, routes, **options)

    return make


def leads(prefix: str, count: int, value: str = "F") -> list[tuple[str, str]]:
    return [(f"{prefix}{i}@example.com", value) for i in range(count)]


def drop_files(member: Member, count: int, *, first: int = 0) -> list[str]:
    """`count` files of ROWS new leads each in the member's inbox; their names."""
    names = []
    for number in range(first, first + count):
        name = f"{member.instance}{number:02d}.csv"
        member.drop(name, HEADER, leads(f"{member.instance}{number}-", ROWS))
        names.append(name)
    return names


def expected_emails(names: dict[Member, list[str]]) -> set[str]:
    """The leads of every file drop_files wrote (`a07.csv`: a7-0@example.com, ...)."""
    return {
        email
        for files in names.values()
        for name in files
        for email, _ in leads(f"{name[0]}{int(name[1:3])}-", ROWS)
    }


def emails(sim: Simulator) -> set[str]:
    return {str(r["email"]) for r in sim.records("leads")}


def assert_complete(names: dict[Member, list[str]], rows: int = ROWS) -> None:
    """Every file has exactly its result, complete with every row processed."""
    for member, files in names.items():
        for name in files:
            doc = member.result(name)
            assert doc is not None, f"{member.instance}: {name} has no result"
            got = {k: doc.get(k) for k in ("status", "rows", "rows_processed")}
            assert got == {"status": "complete", "rows": rows, "rows_processed": rows}, name


async def wait_a_while(seconds: float, what: str) -> None:
    """Let `seconds` pass, to see that something does NOT happen meanwhile (an
    observation window, not a synchronisation: nothing is awaited to be done)."""
    until = time.monotonic() + seconds
    await wait_until(lambda: time.monotonic() > until, what, within=seconds + 30)


async def rows_of(fleet: Fleet, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of the coordination database; none while no daemon made the schema."""
    try:
        return await fleet.query(sql, params)
    except psycopg.errors.UndefinedTable:
        return []


# -- the cap on outstanding jobs ------------------------------------------------------------


FILES = constants.MAX_QUEUED_JOBS  # per daemon: enough to fill the queue alone


@pytest.mark.parametrize("count", [2, 3])
async def test_daemons_sharing_a_cap_of_ten_never_have_more_outstanding(
    fleet: MakeFleet, count: int
) -> None:
    """Each daemon alone would fill Marketo's 10 slots; together they must share them:
    never more than 10 of their jobs outstanding, no 1016 they made themselves (no other
    integration holds a slot here), every row lands, each chunk created once. Each
    daemon has as many files as slots, so each alone would fill the queue."""
    shared = await fleet(count, knobs={"job_overhead": 0.6}, sections=SLOW_POLLS)
    names = {member: drop_files(member, FILES) for member in shared}
    await shared.wait_results(names)
    assert await shared.stop() == [0] * count
    sim = shared.sim

    assert refusals(sim, "1016") == [], "a 1016 with no other integration is self-made"
    peak = outstanding_peak(sim)
    assert peak <= constants.MAX_QUEUED_JOBS
    assert peak >= 6, f"the cap was pressed ({peak} at most outstanding)"
    assert_complete(names)
    assert emails(sim) == expected_emails(names)
    assert len(creates(sim)) == count * FILES, "one job per chunk"


# -- one 1016 backoff ------------------------------------------------------------------------


async def test_one_shared_backoff_when_other_integrations_hold_eight_slots(
    fleet: MakeFleet,
) -> None:
    """Another integration holds 8 of the 10 slots for HOLD seconds. Daemon a takes the
    other two; daemon b's files come after. One shared queue model knows the queue is
    full, so b sends nothing meanwhile; a daemon with a model of its own would learn it
    alone and probe on every backoff (here at most 0.2 s apart), a 1016 each time."""
    hold = 5.0
    shared = await fleet(
        2,
        knobs={"job_overhead": 0.1},
        sections={"backoff": {"initial": 0.05, "max": 0.2}},
    )
    sim = shared.sim
    a, b = shared
    assert len(sim.add_foreign_jobs(8, hold)) == 8
    names = {a: drop_files(a, 6)}
    await wait_until(lambda: len(a.creates(sim)) >= 2, "two jobs of a at Marketo", process=a.proc)
    names[b] = drop_files(b, 6)
    await shared.wait_results(names)
    assert await shared.stop() == [0, 0]

    freed = max(j["finished_at"] for j in sim.jobs() if j["owner"] == FOREIGN)
    spans = [(j["queued_at"], min(j["finished_at"], freed)) for j in ours(sim)]
    assert most_at_once([s for s in spans if s[0] < freed]) <= 2, "8 slots were someone else's"
    refused = refusals(sim, "1016")
    # Before the shared model learns that others hold 8 slots, the creates in flight at
    # once may meet 1016, and a few more while its count of others' slots settles; a
    # second daemon probing on its own would add about HOLD / 0.2 = 25.
    assert len(refused) <= 2 * IN_FLIGHT, [(c["t"], c["client_id"]) for c in refused]
    assert all(c["t"] < freed for c in refused), "no 1016 once the others' jobs were gone"
    assert_complete(names)
    assert emails(sim) == expected_emails(names)


# -- FIFO across daemons ----------------------------------------------------------------------


async def test_files_claimed_earlier_on_any_daemon_are_created_earlier(fleet: MakeFleet) -> None:
    """Ten files handed to two daemons in turn, one outstanding job at a time for the
    whole subscription (queued_jobs 1, so concurrent_jobs 1 too): the jobs are created
    in the order the database's clock says their files were claimed."""
    shared = await fleet(2, knobs={"job_overhead": 0.1}, queued_jobs=1, concurrent_jobs=1)
    sim = shared.sim
    names: dict[Member, list[str]] = {member: [] for member in shared}
    for number in range(10):
        member = shared[number % 2]
        names[member] += drop_files(member, 1, first=number)
        await member.proc.wait_for_event("file_claimed", count=len(names[member]))
    await shared.wait_results(names)
    assert await shared.stop() == [0, 0]

    rows = await rows_of(
        shared,
        f"SELECT batch_id, claimed_at, instance FROM {SCHEMA}.chunks WHERE batch_id IS NOT NULL",
    )
    claimed = {int(batch_id): at.timestamp() for batch_id, at, _ in rows}
    assert len(claimed) == 10, rows
    by_claim = [instance for _, _, instance in sorted(rows, key=lambda row: row[1])]
    assert by_claim != sorted(by_claim), f"the claims interleave across daemons: {by_claim}"
    made = creates(sim)
    pairs, wrong = claim_order(made, claimed)
    assert (pairs, wrong) == (45, 0), [(c["client_id"], c["batch_id"]) for c in made]
    assert outstanding_peak(sim) == 1
    assert_complete(names)


# -- a daemon that dies, a daemon that sleeps -------------------------------------------------


async def test_kill_9_with_jobs_at_marketo_the_other_daemon_polls_them(fleet: MakeFleet) -> None:
    """Daemon a holds all 10 slots when it is killed -9. Daemon b takes it as dead after
    LEASE, polls a's jobs so their slots free as Marketo finishes them, and gets its own
    files through while a is still dead. When a comes back with its data directory its
    files finish; no chunk whose batch id was recorded is created again."""
    shared = await fleet(2, knobs={"job_overhead": 0.8}, lease_seconds=LEASE)
    sim = shared.sim
    a, b = shared
    names = {a: drop_files(a, 12)}
    await wait_until(
        lambda: len(a.creates(sim)) >= constants.MAX_QUEUED_JOBS,
        "a holding all ten slots",
        process=a.proc,
    )
    a.proc.kill()
    assert await a.proc.wait() == -signal.SIGKILL
    async with await Store.open(a.data_dir / "state.db") as store:
        chunks = await store.chunks()
    recorded = {c.batch_id for c in chunks if c.batch_id is not None}
    unknown = sum(1 for c in chunks if c.status is ChunkStatus.SUBMITTING)
    outstanding = {
        int(batch_id)
        for (batch_id,) in await rows_of(
            shared,
            f"SELECT batch_id FROM {SCHEMA}.chunks"
            " WHERE instance = 'a' AND state = 'submitted' AND batch_id IS NOT NULL",
        )
    }
    assert outstanding, "the database knows a's jobs at Marketo"

    names[b] = drop_files(b, 4)
    await shared.wait_results({b: names[b]})
    assert a.proc.returncode == -signal.SIGKILL, "b's files went while a was dead"
    polled_by_b = {
        c["batch_id"]
        for c in sim.calls()
        if c["client_id"] == b.client_id and str(c["operation"]).startswith("getImport")
    }
    assert outstanding <= polled_by_b, "b polled every job a left at Marketo"
    assert any(e.get("instance") == "a" for e in b.proc.events("coordination_daemon_dead"))

    await a.start()
    await shared.wait_results(names)
    assert await shared.stop() == [0, 0]
    made = creates(sim)
    copies = Counter(c["digest"] for c in made)
    digest_of = {c["batch_id"]: c["digest"] for c in made}
    again = [b_id for b_id in recorded if copies[digest_of[b_id]] > 1]
    assert again == [], "a chunk with a batch id was created again"
    assert sum(copies.values()) - len(copies) <= unknown, "only creates in doubt went twice"
    assert refusals(sim, "1016") == []
    assert outstanding_peak(sim) <= constants.MAX_QUEUED_JOBS
    assert_complete(names)
    assert emails(sim) == expected_emails(names)


async def test_a_daemon_stopped_past_its_lease_registers_again_before_it_sends(
    fleet: MakeFleet,
) -> None:
    """SIGSTOP daemon a until b takes it as dead, hand it more files, SIGCONT: a registers
    again before it calls Marketo at all, every job it creates after it woke carries the
    new registration's epoch (a late write under the old one would be refused), nothing
    overshoots, and every file finishes."""
    shared = await fleet(2, knobs={"job_overhead": 0.3}, lease_seconds=LEASE)
    sim = shared.sim
    a, b = shared
    names = {a: drop_files(a, 4), b: drop_files(b, 2)}
    await wait_until(lambda: a.creates(sim), "a job of a at Marketo", process=a.proc)
    first = (await a.proc.wait_for_event("coordination_registered"))[0]
    a.proc.send_signal(signal.SIGSTOP)
    try:
        await wait_until(
            lambda: any(
                e.get("instance") == "a" for e in b.proc.events("coordination_daemon_dead")
            ),
            "b to take the stopped a as dead",
            process=b.proc,
        )
        names[a] += drop_files(a, 4, first=4)
        names[b] += drop_files(b, 2, first=2)
        woke, woke_at = len(sim.calls()), time.time()  # the database runs on this host
    finally:
        a.proc.send_signal(signal.SIGCONT)
    await shared.wait_results(names)
    assert await shared.stop() == [0, 0]

    registered = a.proc.events("coordination_registered")
    assert len(registered) >= 2, "a registered again after it woke"
    epoch = registered[-1]["epoch"]
    assert epoch > first["epoch"]
    epochs = dict(
        await rows_of(
            shared,
            f"SELECT batch_id, epoch FROM {SCHEMA}.chunks"
            " WHERE instance = 'a' AND batch_id IS NOT NULL",
        )
    )
    after = [
        c
        for c in sim.calls()[woke:]
        if c["client_id"] == a.client_id
        and str(c["operation"]).startswith("import")
        and c["batch_id"]
    ]
    assert after, "a created the jobs of the files it found when it woke"
    assert {epochs.get(c["batch_id"]) for c in after} == {epoch}, (epochs, after)
    # Every call takes its place in the shared budget first, stamped by the database's
    # clock: none of a's after it woke may come before its new registration.
    [(registered_at,)] = await rows_of(
        shared, f"SELECT started_at FROM {SCHEMA}.daemons WHERE instance = 'a'"
    )
    early = await rows_of(
        shared,
        f"SELECT operation, at FROM {SCHEMA}.calls"
        " WHERE instance = 'a' AND at >= to_timestamp(%s) AND at < %s ORDER BY at",
        (woke_at, registered_at),
    )
    assert early == [], f"a called Marketo after it woke, before it registered at {registered_at}"
    assert refusals(sim, "1016") == []
    assert outstanding_peak(sim) <= constants.MAX_QUEUED_JOBS
    assert max(Counter(c["digest"] for c in creates(sim)).values()) == 1
    assert_complete(names)
    assert emails(sim) == expected_emails(names)


# -- the database goes away -------------------------------------------------------------------


async def test_a_postgresql_restart_mid_run_fails_nothing(
    fleet: MakeFleet, postgres_server: PostgresServer
) -> None:
    """The server stops with jobs at Marketo: both daemons say on /readyz that the
    coordination database is away and create nothing new while it is; once it is back,
    every file finishes, no job is made twice, the cap held."""
    shared = await fleet(2, knobs={"job_overhead": 0.3}, lease_seconds=3.0)
    sim = shared.sim
    names = {member: drop_files(member, 6) for member in shared}
    await wait_until(lambda: len(creates(sim)) >= 4, "jobs at Marketo")
    await asyncio.to_thread(postgres_server.stop)
    try:

        async def not_ready(member: Member) -> tuple[int, str] | None:
            answer = await member.readyz()
            return answer if answer is not None and answer[0] == 503 else None

        down = [
            await wait_until(
                lambda m=member: not_ready(m),
                f"/readyz 503 of {member.instance}",
                process=member.proc,
            )
            for member in shared
        ]
        made = len(creates(sim))
        await wait_a_while(1.0, "a second of outage")
        assert len(creates(sim)) == made, "a job was created while the database was away"
    finally:
        await asyncio.to_thread(postgres_server.start)
    await shared.wait_results(names)
    assert await shared.stop() == [0, 0]

    for _, body in down:
        assert "coordination database" in body, body
    assert max(Counter(c["digest"] for c in creates(sim)).values()) == 1
    assert refusals(sim, "1016") == []
    assert outstanding_peak(sim) <= constants.MAX_QUEUED_JOBS
    assert_complete(names)
    assert emails(sim) == expected_emails(names)


# -- one call budget, one daily quota ---------------------------------------------------------


async def test_two_daemons_spend_one_daily_quota(fleet: MakeFleet) -> None:
    """Other integrations used all but ROOM calls of daily_quota - daily_reserve. Two
    daemons share what is left: no job is created once the subscription's count (the
    simulator's, every client's) reached the limit, give or take the calls already in
    flight when the last create was decided. Each daemon counting only its own calls
    would create jobs until about ROOM calls past it."""
    quota, reserve, room = 10_000, 1_000, 12
    limit = quota - reserve
    shared = await fleet(
        2,
        knobs={"foreign_usage_today": limit - room},
        daily_quota=quota,
        daily_reserve=reserve,
    )
    sim = shared.sim
    names = {member: drop_files(member, 8) for member in shared}

    def waiting_or_done(member: Member) -> bool:
        """Its files are done, or it said it waits for the quota."""
        done = all(member.result(name) is not None for name in names[member])
        return done or bool(member.proc.events("quota_spent"))

    await wait_until(
        lambda: all(waiting_or_done(m) for m in shared), "the quota to bind on each daemon"
    )
    await wait_until(
        lambda: all(j["finished_at"] is not None for j in ours(sim)),
        "every job at Marketo polled to its end",
    )
    assert await shared.stop() == [0, 0]

    used, made = limit - room, 0
    for call in sorted(sim.calls(), key=lambda c: float(c["t"])):
        if str(call["operation"]).startswith("import") and call["batch_id"]:
            assert used < limit + IN_FLIGHT, f"a job created with {used} of {limit} used"
            made += 1
        used += bool(call["counted"])
    assert made >= 1
    unfinished = [n for m, files in names.items() for n in files if m.result(n) is None]
    assert unfinished, "the quota bound: files wait for the next day"


async def test_the_call_window_is_held_summed_over_daemons(fleet: MakeFleet) -> None:
    """A budget of BUDGET calls per window, the window longer than the test: the two
    daemons together make at most BUDGET calls Marketo counts, and at most
    concurrent_api_calls at once. Each with a budget of its own would make twice that."""
    budget = 30
    shared = await fleet(2, api_calls_per_window=budget, api_window_seconds=600.0)
    sim = shared.sim
    for member in shared:
        drop_files(member, 10)

    def counted() -> int:
        return sum(1 for c in sim.calls() if c["counted"])

    await wait_until(lambda: counted() >= budget - 5, "the budget nearly spent")
    await wait_a_while(1.5, "the daemons to go on if they could")
    assert counted() <= budget
    assert sim.stats()["max_in_flight"] <= IN_FLIGHT
    assert refusals(sim, "606") == []
    assert await shared.stop() == [0, 0]


# -- the key rule across daemons --------------------------------------------------------------


async def test_the_key_rule_holds_across_two_daemons(fleet: MakeFleet) -> None:
    """Daemon b's file updates 50 keys of a file claimed a moment earlier on daemon a,
    whose rows for them come last. Imported at once, b's rows would land first (older
    values win) and a record added by both within the twin window is made twice. The
    rule across daemons holds b's job until a's is done: one record per key, b's value."""
    shared = await fleet(
        2,
        routes=(LEADS,),
        knobs={"job_overhead": 0.5, "rows_per_second": 200.0, "twin_window": 0.4},
        max_chunk_bytes=100_000,
    )
    sim = shared.sim
    a, b = shared
    keys = [email for email, _ in leads("k", 50)]
    a.drop("old.csv", HEADER, [*leads("filler", 150), *[(k, "old") for k in keys]])

    async def registered() -> bool:
        found = await rows_of(shared, f"SELECT count(*) FROM {SCHEMA}.chunks WHERE instance = 'a'")
        return bool(found and found[0][0])

    await wait_until(registered, "a's chunk in the coordination database", process=a.proc)
    b.drop("new.csv", HEADER, [(k, "new") for k in keys])
    await shared.wait_results({a: ["old.csv"], b: ["new.csv"]})
    assert await shared.stop() == [0, 0]

    old, new = a.result("old.csv"), b.result("new.csv")
    assert old is not None
    assert new is not None
    assert (old["status"], old["rows_processed"], old["rows_failed"]) == ("complete", 200, 0)
    assert (new["status"], new["rows_processed"], new["rows_failed"]) == ("complete", 50, 0)
    records = [r for r in sim.records("leads") if r["email"] in keys]
    assert sorted(r["email"] for r in records) == sorted(keys), "no twin records"
    assert {r["firstName"] for r in records} == {"new"}, "the later file's values win"
    for key in keys:
        assert [h["values"]["firstName"] for h in sim.history("leads", key)] == ["old", "new"]
    [job_a], [job_b] = a.creates(sim), b.creates(sim)
    jobs = {j["batch_id"]: j for j in sim.jobs()}
    assert jobs[job_b["batch_id"]]["started_at"] >= jobs[job_a["batch_id"]]["finished_at"]
