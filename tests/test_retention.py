"""Months of history: the store's tallies, the bounded listing, and retention.

Against a real store: the tallies (kept by triggers) always equal a count over the
rows, also for a database migrated with history in it; /jobs and status list active
work first and at most `limit` files; finished files past `retention.keep_days`
leave the store in small transactions, with their chunks and set-aside records,
while their result files stay; the clock is moved by hand. One test runs the real
daemon with retention scaled down to seconds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from orchestrator.clock import stamp
from orchestrator.config import RetentionSettings, Settings
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.models import BatchStatus, ChunkStatus, FileRecord, FileStatus
from orchestrator.simulator import Simulator
from orchestrator.status import Query, StatusServer, format_status_table, load_snapshot
from orchestrator.store import Store
from orchestrator.store.schema import _MIGRATIONS, LATEST_VERSION
from orchestrator.upkeep import Upkeep
from tests.support.data import drop_leads, result_path
from tests.support.http import http_get, metric_samples
from tests.support.processes import MakeRunner
from tests.support.settings import LEADS, SIM_KNOBS, fast_settings, with_sections
from tests.support.simulators import MakeSimulator

DAY0 = datetime(2026, 1, 1, tzinfo=UTC)


async def finished_file(
    store: Store, number: int, *, at: datetime, chunks: int = 2, failed: bool = False
) -> FileRecord:
    """A file claimed, split, imported by Marketo and finished at `at`."""
    began = await store.begin_claim(
        route="leads",
        name=f"f{number}.csv",
        source_path=f"/data/inbox/leads/f{number}.csv",
        work_path=f"/data/work/incoming/{number}-f{number}.csv",
        max_chunk_bytes=2000,
        claimed_at=stamp(at - timedelta(minutes=5)),
    )
    await store.finish_claim(began.id)
    await store.start_split(began.id)
    for index in range(1, chunks + 1):
        chunk = await store.add_chunk(
            began.id, index=index, path=f"/c/{number}.{index}", rows=10, bytes=100, first_line=2
        )
        await store.mark_submitting(chunk.id)
        await store.mark_submitted(
            chunk.id, batch_id=number * 100 + index, marketo_status="Queued", submitted_at=T(at)
        )
        await store.finish_chunk(
            chunk.id,
            status=ChunkStatus.COMPLETE,
            message="",
            finished_at=T(at),
            batch=BatchStatus(number * 100 + index, "Complete", 10, 0, 0, ""),
        )
    await store.add_reject(began.id, line=99, offset=0, size=1, reason="too large")
    await store.finish_split(began.id, rows=10 * chunks, chunks_total=chunks)
    await store.reserve_result(began.id, result_path=f"/data/done/leads/f{number}.csv.result.json")
    return await store.finish_file(
        began.id,
        status=FileStatus.FAILED if failed else FileStatus.COMPLETE,
        error="chunk 1 failed" if failed else None,
        finished_at=T(at),
    )


def T(moment: datetime) -> str:
    return stamp(moment)


async def active_file(store: Store, number: int, *, at: datetime) -> FileRecord:
    began = await store.begin_claim(
        route="leads",
        name=f"a{number}.csv",
        source_path=f"/data/inbox/leads/a{number}.csv",
        work_path=f"/data/work/incoming/{number}-a{number}.csv",
        max_chunk_bytes=2000,
        claimed_at=T(at),
    )
    return await store.finish_claim(began.id)


def counted(db: Path) -> Counter[str]:
    """What the tallies must say, counted over the rows."""
    conn = sqlite3.connect(db)
    try:
        found: Counter[str] = Counter()
        for status, n in conn.execute("SELECT status, count(*) FROM files GROUP BY status"):
            found[f"files:{status}"] = n
        for status, n in conn.execute("SELECT status, count(*) FROM chunks GROUP BY status"):
            found[f"chunks:{status}"] = n
        (rows,) = conn.execute("SELECT coalesce(sum(rows_processed), 0) FROM chunks").fetchone()
        found["rows:processed"] = rows
        return found
    finally:
        conn.close()


async def tallies_of(store: Store) -> Counter[str]:
    return Counter({k: v for k, v in (await store.tallies()).items() if v})


# -- tallies --------------------------------------------------------------------------------


async def test_tallies_follow_every_transition_and_deletion(store: Store) -> None:
    assert await tallies_of(store) == Counter()
    old = await finished_file(store, 1, at=DAY0)
    await finished_file(store, 2, at=DAY0, failed=True)
    claiming = await store.begin_claim(
        route="leads",
        name="x.csv",
        source_path="/x",
        work_path="/w/x",
        max_chunk_bytes=2000,
        claimed_at=T(DAY0),
    )
    await active_file(store, 3, at=DAY0)
    assert await tallies_of(store) == counted(store.path)
    assert (await store.tallies())["files:claiming"] == 1
    assert (await store.tallies())["rows:processed"] == 40
    await store.drop_claim(claiming.id)
    await store.prune_finished(before=T(DAY0 + timedelta(seconds=1)), limit=1)
    assert await tallies_of(store) == counted(store.path)
    tallies = await store.tallies()
    assert tallies["files:claiming"] == 0
    assert tallies["files:complete"] + tallies["files:failed"] == 1
    with pytest.raises(LookupError):
        await store.get_file(old.id)


async def test_a_v1_database_with_history_is_migrated_with_its_counts(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    async with await Store.open(db) as store:
        await finished_file(store, 1, at=DAY0)
        await active_file(store, 2, at=DAY0)
    # Take the database back to v1 as an older release left it: no hand-over ids (v2),
    # no tallies, triggers or finished_at index (v3), no count of unknown outcomes (v4)...
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE tallies")
    conn.execute("DROP INDEX files_by_finished")
    conn.execute("DROP INDEX files_by_ticket")
    conn.execute("ALTER TABLE files DROP COLUMN ticket")
    conn.execute("ALTER TABLE chunks DROP COLUMN unknown_outcomes")
    # ...and no pieces, packs or shares (v5), no kept daily quota (v7).
    conn.execute("DROP TABLE pieces")
    for column in ("files", "sealed", "attributed"):
        conn.execute(f"ALTER TABLE chunks DROP COLUMN {column}")
    conn.execute("ALTER TABLE chunks DROP COLUMN unmatched_rows")  # v7
    conn.execute("DROP TABLE refusals")  # (v9; v8's 'unknown' chunk status stays allowed)
    conn.execute("DROP TABLE quota")
    conn.execute("ALTER TABLE files DROP COLUMN warnings")  # nor header warnings (v11)
    # No key order or conflicts either (v12).
    conn.execute("DROP TABLE conflicts")
    conn.execute("DROP TABLE key_order")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    assert len(_MIGRATIONS) >= 4
    async with await Store.open(db) as store:
        assert await tallies_of(store) == counted(db)
        assert (await store.tallies())["files:complete"] == 1
        assert (await store.tallies())["files:claimed"] == 1
        assert all(f.ticket for f in await store.files())  # v2 gave them ids
        chunks = await store.chunks_of([f.id for f in await store.files()])
        assert chunks
        assert all(c.unknown_outcomes == 0 for c in chunks)  # v4
        assert all(c.files == 1 and c.sealed and c.job_rows == c.rows for c in chunks)  # v5
        assert all(c.unmatched_rows == 0 for c in chunks)  # v7
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    finally:
        conn.close()


# -- the bounded listing ----------------------------------------------------------------------


async def test_listing_is_active_work_first_then_the_latest_finished(store: Store) -> None:
    for n in range(1, 13):
        await finished_file(store, n, at=DAY0 + timedelta(hours=n), chunks=1)
    active = [
        await active_file(store, 100 + n, at=DAY0 + timedelta(days=2, hours=n)) for n in (1, 2)
    ]
    listed = await store.listing(limit=5)
    assert [f.id for f in listed[:2]] == [f.id for f in active]
    assert [f.name for f in listed[2:]] == ["f12.csv", "f11.csv", "f10.csv"]
    only_active = await store.listing(limit=1)
    assert [f.id for f in only_active] == [active[0].id]

    snapshot = await load_snapshot(store, Query(limit=5))
    assert [e["file"] for e in snapshot["files"]] == [f.name for f in listed]
    assert snapshot["totals"]["files"]["complete"] == 12  # everything held, not just listed
    assert snapshot["truncated"] is True
    table = format_status_table(snapshot)
    assert "(showing 5 of 14 files: active first, then the latest finished)" in table


async def test_jobs_takes_limit_and_status(store: Store) -> None:
    for n in range(1, 5):
        await finished_file(store, n, at=DAY0 + timedelta(hours=n), chunks=1, failed=n == 2)
    await active_file(store, 10, at=DAY0)
    server = StatusServer("127.0.0.1", 0, store=store, metrics=Metrics(), readiness=lambda: None)
    await server.start()
    base = f"http://127.0.0.1:{server.port}/jobs"
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await http_get(http, base + "?limit=2")
            assert status == 200
            assert [e["file"] for e in json.loads(body)["files"]] == ["a10.csv", "f4.csv"]
            status, body = await http_get(http, base + "?status=failed")
            assert [e["file"] for e in json.loads(body)["files"]] == ["f2.csv"]
            status, body = await http_get(http, base + "?status=complete,claimed&limit=3")
            assert [e["file"] for e in json.loads(body)["files"]] == ["a10.csv", "f4.csv", "f3.csv"]
            for bad in ("?limit=0", "?limit=x", "?status=bogus"):
                status, body = await http_get(http, base + bad)
                assert status == 400, bad
                assert "error" in json.loads(body)
    finally:
        await server.stop()


async def test_metrics_come_from_the_tallies(store: Store) -> None:
    for n in range(1, 4):
        await finished_file(store, n, at=DAY0, chunks=2)
    await active_file(store, 9, at=DAY0)
    metrics = Metrics()
    await metrics.refresh_from_store(store)
    samples = metric_samples(metrics.render().decode())
    files = {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "marketo_orchestrator_files"
    }
    assert files["complete"] == 3
    assert files["claimed"] == 1
    chunks = {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "marketo_orchestrator_chunks"
    }
    assert chunks["complete"] == 6


# -- retention ------------------------------------------------------------------------------


class WallClock:
    """A wall clock moved by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_retention_prunes_old_finished_files_in_small_batches(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, retention=RetentionSettings(keep_days=30, interval=60.0))
    for n in range(1, 6):  # finished on days 1..5
        await finished_file(store, n, at=DAY0 + timedelta(days=n))
    active = await active_file(store, 50, at=DAY0)  # claimed long ago, still at work
    result_file = tmp_path / "done" / "leads" / "f1.csv.result.json"
    result_file.parent.mkdir(parents=True)
    result_file.write_text("{}", encoding="utf-8")

    clock = WallClock(DAY0 + timedelta(days=31, hours=12))  # day 1 is past 30 days
    client = MarketoClient(settings, observer=Metrics(), calls_today=0)
    try:
        upkeep = Upkeep(settings, store, client, Metrics(), persisted_calls=0, clock=clock)
        monkeypatch.setattr("orchestrator.upkeep.PRUNE_BATCH", 2)
        batches: list[int] = []
        real = store.prune_finished

        async def counting(*, before: str, limit: int) -> int:
            batches.append(n := await real(before=before, limit=limit))
            return n

        monkeypatch.setattr(store, "prune_finished", counting)
        assert await upkeep.prune() == 1
        names = {f.name for f in await store.files()}
        assert names == {"a50.csv", "f2.csv", "f3.csv", "f4.csv", "f5.csv"}

        clock.now = DAY0 + timedelta(days=40)  # days 2..5 are past too
        batches.clear()
        assert await upkeep.prune() == 4
        assert batches == [2, 2, 0]  # one small transaction at a time
        assert [f.id for f in await store.files()] == [active.id]
        assert await store.chunks() == []
        assert await store.rejects(active.id) == []
        assert result_file.exists()  # the user's result files stay
        assert await tallies_of(store) == counted(store.path)
        assert upkeep.pruned_total == 5
    finally:
        await client.close()


async def test_keep_days_zero_keeps_everything(store: Store, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, retention=RetentionSettings(keep_days=0))
    await finished_file(store, 1, at=DAY0)
    client = MarketoClient(settings, observer=Metrics(), calls_today=0)
    try:
        clock = WallClock(DAY0 + timedelta(days=3650))
        upkeep = Upkeep(settings, store, client, Metrics(), persisted_calls=0, clock=clock)
        await asyncio.wait_for(upkeep.retention(asyncio.Event()), timeout=30)  # returns at once
        assert len(await store.files()) == 1
    finally:
        await client.close()


async def test_the_daemon_prunes_finished_files_while_it_runs(
    tmp_path: Path, make_simulator: MakeSimulator, daemons: MakeRunner
) -> None:
    """keep_days scaled down to about a second: a finished file leaves `status`, its
    result stays in done/."""
    sim: Simulator = await make_simulator(**SIM_KNOBS)
    data_dir = tmp_path / "data"
    settings = with_sections(
        fast_settings(sim.base_url, data_dir, (LEADS,)),
        retention={"keep_days": 1.5 / 86400, "interval": 0.1},
    )
    runner = daemons(settings)
    drop_leads(data_dir, "first.csv", 30)
    daemon = await runner.daemon()
    await daemon.wait_for_event("file_finished")
    assert result_path(data_dir, "done", "leads", "first.csv").exists()

    await daemon.wait_for_event("retention_pruned")
    proc = await runner.command("status", "--json")
    assert proc.returncode == 0, proc.stderr()
    snapshot = json.loads(proc.stdout())
    assert snapshot["files"] == []
    assert snapshot["totals"]["files"]["complete"] == 0
    assert result_path(data_dir, "done", "leads", "first.csv").exists()
    daemon.terminate()
    assert await daemon.wait() == 0
