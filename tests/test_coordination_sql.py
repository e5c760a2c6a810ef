"""The coordination database's statements against a real PostgreSQL: admission that
cannot overshoot, FIFO and the key rule across daemons, leases, the shared call window."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from orchestrator.coordination import admission, budget, leases, outcomes, registering
from orchestrator.coordination.database import migrate, redact
from orchestrator.coordination.shapes import Deferral, Grant, Limits
from orchestrator.errors import LeaseLost
from tests.support.postgres import PostgresDatabase

SUB = "123-abc-456.mktorest.com"
LIMITS = Limits(10, 50, 20.0, 5, 50_000, 5_000)
EPOCH0 = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

Conn = psycopg.Connection[Any]


@pytest.fixture
def connect(postgres_database: PostgresDatabase) -> Iterator[Callable[[], Conn]]:
    made: list[Conn] = []

    def make() -> Conn:
        conn = postgres_database.connect(autocommit=True)
        made.append(conn)
        return conn

    migrate(make())
    yield make
    for conn in made:
        conn.close()


def tx(conn: Conn, body: Callable[[Conn], Any]) -> Any:
    with conn.transaction():
        return body(conn)


def lease_runs_out(conn: Conn, instance: str, within: float = 10.0) -> None:
    """Wait, by the database's clock (the one leases are timed by), until `instance`'s
    lease has run out; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not conn.execute(
        """SELECT lease_until < clock_timestamp() FROM marketo_orchestrator.daemons
           WHERE subscription = %s AND instance = %s""",
        (SUB, instance),
    ).fetchone()[0]:
        assert time.monotonic() < deadline, f"{instance}'s lease still held after {within} s"
        time.sleep(0.02)


def join(conn: Conn, instance: str, lease: float = 30.0, limits: Limits = LIMITS) -> int:
    return int(tx(conn, lambda c: leases.register(c, SUB, instance, limits, lease)))


def chunk(
    conn: Conn,
    instance: str,
    ref: int,
    *,
    file: int | None = None,
    keys: tuple[int, ...] = (),
    list_id: int = 0,
) -> int:
    return int(
        tx(
            conn,
            lambda c: registering.register_chunk(
                c,
                SUB,
                instance,
                file_ref=ref if file is None else file,
                chunk_ref=ref,
                index=1,
                list_id=list_id,
                object="leads",
                api_name="",
                keys=keys,
            ),
        )
    )


def admit(conn: Conn, instance: str, epoch: int, cid: int) -> Grant | Deferral:
    result: Grant | Deferral = tx(
        conn,
        lambda c: admission.admit(
            c, SUB, instance, epoch, cid, quota_since=EPOCH0, quota_resets_in=3600.0
        ),
    )
    return result


def outstanding(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(*) FROM marketo_orchestrator.chunks WHERE state IN ('creating', 'submitted')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_schema_is_made_once_by_daemons_starting_together(
    postgres_database: PostgresDatabase,
) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with postgres_database.connect(autocommit=True) as conn:
                migrate(conn)
        except BaseException as exc:  # any failure of a starter fails the test
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with postgres_database.connect() as conn:
        assert conn.execute("SELECT version FROM marketo_orchestrator.meta").fetchall() == [(1,)]


def test_admission_cannot_overshoot_the_cap_with_many_daemons_racing(
    connect: Callable[[], Conn],
) -> None:
    """Six daemons, four submitters each, 120 chunks, a cap of 10: never more than 10
    outstanding (sampled by a watcher), and every chunk admitted once."""
    setup = connect()
    instances = [f"d{n}" for n in range(6)]
    epochs = {i: join(setup, i) for i in instances}
    ids = {i: [chunk(setup, i, n) for n in range(20)] for i in instances}
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        conn = connect()
        while not done.is_set():
            peak[0] = max(peak[0], outstanding(conn))

    failures: list[BaseException] = []

    def submitter(instance: str, mine: list[int]) -> None:
        try:
            submit(instance, mine)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    def submit(instance: str, mine: list[int]) -> None:
        conn = connect()
        while mine:
            cid = mine.pop(0)
            answer = admit(conn, instance, epochs[instance], cid)
            if isinstance(answer, Deferral):
                mine.append(cid)
                continue
            tx(conn, lambda c, g=answer: outcomes.created(c, SUB, g, 1000 + g.chunk))
            # The job ends a little later, as Marketo finishes it.
            tx(conn, lambda c, g=answer: outcomes.finished(c, SUB, g.chunk))

    queues = [(i, ids[i][q::4]) for i in instances for q in range(4)]
    threads = [threading.Thread(target=watch)] + [
        threading.Thread(target=submitter, args=queue) for queue in queues
    ]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(timeout=120)
    done.set()
    threads[0].join()
    states = setup.execute(
        "SELECT state, count(*) FROM marketo_orchestrator.chunks GROUP BY state"
    ).fetchall()
    assert states == [("done", 120)]
    assert 1 <= peak[0] <= 10


def test_fifo_across_daemons_and_a_dead_daemons_chunks_are_passed(
    connect: Callable[[], Conn],
) -> None:
    conn = connect()
    a, b = join(conn, "a", lease=0.5), join(conn, "b")
    first = chunk(conn, "a", 1)
    second = chunk(conn, "b", 1)
    answer = admit(conn, "b", b, second)
    assert isinstance(answer, Deferral)
    assert "FIFO" in answer.reason
    assert isinstance(admit(conn, "a", a, first), Grant)
    # a dies with its next chunk pending: b's chunk is no longer behind it.
    later = chunk(conn, "a", 2)
    lease_runs_out(conn, "a")
    assert tx(conn, lambda c: leases.reap(c, SUB)) == ["a"]
    assert isinstance(admit(conn, "b", b, second), Grant)
    with pytest.raises(LeaseLost):
        admit(conn, "a", a, later)
    with pytest.raises(LeaseLost):  # nor any call to Marketo, until it registers again
        tx(conn, lambda c: budget.acquire(c, SUB, "a", a, "status", counted=False))


def test_the_key_rule_holds_across_daemons(connect: Callable[[], Conn]) -> None:
    conn = connect()
    a, b = join(conn, "a"), join(conn, "b")
    first = chunk(conn, "a", 1, keys=(1, 2, 2**64 - 1))
    other = chunk(conn, "b", 1, keys=(7,))
    shares = chunk(conn, "b", 2, file=2, keys=(2**64 - 1,))
    granted = admit(conn, "a", a, first)
    assert isinstance(granted, Grant)
    assert isinstance(admit(conn, "b", b, other), Grant)  # unrelated: goes
    held = admit(conn, "b", b, shares)
    assert isinstance(held, Deferral)
    assert "shares keys" in held.reason
    assert tx(conn, lambda c: outcomes.created(c, SUB, granted, 501))
    assert isinstance(admit(conn, "b", b, shares), Deferral)  # importing: still held
    assert tx(conn, lambda c: outcomes.finished(c, SUB, first))
    assert isinstance(admit(conn, "b", b, shares), Grant)


def test_each_orphan_is_one_live_daemons_to_poll(connect: Callable[[], Conn]) -> None:
    conn = connect()
    a = join(conn, "a", lease=0.5)
    join(conn, "b")
    join(conn, "c")
    for ref in range(1, 6):
        grant = admit(conn, "a", a, chunk(conn, "a", ref))
        assert isinstance(grant, Grant)
        assert tx(conn, lambda c, g=grant, r=ref: outcomes.created(c, SUB, g, 700 + r))
    lease_runs_out(conn, "a")
    tx(conn, lambda c: leases.reap(c, SUB))
    every = {o.batch_id for o in tx(conn, lambda c: leases.orphans(c, SUB))}
    b = {o.batch_id for o in tx(conn, lambda c: leases.orphans(c, SUB, "b"))}
    c = {o.batch_id for o in tx(conn, lambda c: leases.orphans(c, SUB, "c"))}
    assert every == {701, 702, 703, 704, 705}
    assert b | c == every  # every orphan is polled ...
    assert not b & c  # ... by one daemon
    assert b
    assert c
    assert tx(conn, lambda c: leases.orphans(c, SUB, "a")) == []  # the dead poll nothing


def test_a_dead_daemons_creates_are_unknown_and_its_batches_are_orphans(
    connect: Callable[[], Conn],
) -> None:
    conn = connect()
    a = join(conn, "a", lease=0.5)
    join(conn, "b")
    sent, sending = chunk(conn, "a", 1), chunk(conn, "a", 2)
    g1 = admit(conn, "a", a, sent)
    assert isinstance(g1, Grant)
    assert tx(conn, lambda c: outcomes.created(c, SUB, g1, 777))
    g2 = admit(conn, "a", a, sending)
    assert isinstance(g2, Grant)
    lease_runs_out(conn, "a")
    tx(conn, lambda c: leases.reap(c, SUB))
    # A late answer of the dead daemon is refused: it cannot write under its old epoch.
    assert not tx(conn, lambda c: outcomes.created(c, SUB, g2, 778))
    orphans = tx(conn, lambda c: leases.orphans(c, SUB))
    assert [(o.batch_id, o.instance) for o in orphans] == [(777, "a")]
    row = conn.execute(
        "SELECT state, unknown_outcomes FROM marketo_orchestrator.chunks WHERE id = %s",
        (sending,),
    ).fetchone()
    assert row == ("pending", 1)
    # Coming back, a registers again with a new epoch and sends it again.
    again = join(conn, "a")
    assert again > a
    assert isinstance(admit(conn, "a", again, sending), Grant)


def test_a_job_whose_create_report_a_kill_lost_still_finishes_its_chunk(
    connect: Callable[[], Conn],
) -> None:
    """a is killed after Marketo made the job and a recorded its batch id locally, but
    before it told the database (`created`): the others settle the chunk as an unknown
    outcome (pending). Back again, a polls that job to its end; the chunk is done then,
    or it would stay pending, ahead of every later chunk in the shared FIFO, forever."""
    conn = connect()
    a = join(conn, "a", lease=0.5)
    b = join(conn, "b")
    made, later = chunk(conn, "a", 1), chunk(conn, "a", 2)
    theirs = chunk(conn, "b", 1)
    assert isinstance(admit(conn, "a", a, made), Grant)  # its create goes; a is killed
    lease_runs_out(conn, "a")
    assert tx(conn, lambda c: leases.reap(c, SUB)) == ["a"]
    again = join(conn, "a")
    assert tx(conn, lambda c: outcomes.finished(c, SUB, made))  # a's poller: job ended
    row = conn.execute(
        "SELECT state, unknown_outcomes FROM marketo_orchestrator.chunks WHERE id = %s",
        (made,),
    ).fetchone()
    assert row == ("done", 0)
    assert isinstance(admit(conn, "a", again, later), Grant)
    assert isinstance(admit(conn, "b", b, theirs), Grant)


def test_one_1016_backs_every_daemon_off_and_teaches_the_shared_model(
    connect: Callable[[], Conn],
) -> None:
    conn = connect()
    a, b = join(conn, "a"), join(conn, "b")
    one, two = chunk(conn, "a", 1), chunk(conn, "b", 1)
    g = admit(conn, "a", a, one)
    assert isinstance(g, Grant)
    tx(
        conn,
        lambda c: outcomes.not_created(
            c, SUB, g, reason="1016", delay=lambda n: 30.0, queue_full=True
        ),
    )
    answer = admit(conn, "b", b, two)
    assert isinstance(answer, Deferral)
    assert "1016" in answer.reason
    assert answer.seconds is not None
    assert 25 < answer.seconds <= 30
    row = conn.execute("SELECT foreign_slots FROM marketo_orchestrator.subscriptions").fetchone()
    assert row == (10,)  # nothing of ours was outstanding: all ten are others'


def test_the_daily_quota_less_the_reserve_stops_admission(connect: Callable[[], Conn]) -> None:
    conn = connect()
    limits = Limits(10, 50, 20.0, 5, 100, 10)
    a = join(conn, "a", limits=limits)
    cid = chunk(conn, "a", 1)
    tx(conn, lambda c: budget.record_usage(c, SUB, 85))
    for _ in range(5):
        call = tx(conn, lambda c: budget.acquire(c, SUB, "a", a, "status", counted=True))
        assert isinstance(call, int)
        tx(conn, lambda c, n=call: budget.release(c, n, counted=True))
    answer = admit(conn, "a", a, cid)
    assert isinstance(answer, Deferral)
    assert "90 of its 100" in answer.reason


def test_the_shared_window_holds_over_daemons_and_uncounted_calls_leave_it(
    connect: Callable[[], Conn],
) -> None:
    conn = connect()
    limits = Limits(10, 5, 3600.0, 10, 50_000, 0)
    epochs = {"a": join(conn, "a", limits=limits), "b": join(conn, "b", limits=limits)}
    got = [
        tx(conn, lambda c, d="ab"[i % 2]: budget.acquire(c, SUB, d, epochs[d], "x", counted=True))
        for i in range(6)
    ]
    assert all(isinstance(g, int) for g in got[:5])
    assert isinstance(got[5], budget.Wait)
    assert got[5].reason == "call window full"
    tx(conn, lambda c: budget.release(c, got[0], counted=False))  # a 601: not counted
    again = tx(conn, lambda c: budget.acquire(c, SUB, "b", epochs["b"], "x", counted=True))
    assert isinstance(again, int)


def test_a_password_never_shows() -> None:
    url = "postgresql://orch:s3cr3t@db.example:5432/coord?sslmode=require"
    assert "s3cr3t" not in redact(url)
    assert redact(url) == "postgresql://orch:***@db.example:5432/coord?sslmode=require"
