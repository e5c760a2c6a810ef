"""The status server, metrics and the status table, against a real store and real sockets."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import HttpSettings
from orchestrator.errors import StoreError
from orchestrator.metrics import Metrics, error_code_label, reason_label
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord, FileStatus
from orchestrator.status import (
    TABLE_WIDTH,
    Query,
    RateMeter,
    StatusServer,
    file_line,
    format_status_table,
    jobs_snapshot,
    load_snapshot,
    read_snapshot,
    run_line,
)
from orchestrator.store import Store
from tests.support.http import metric_samples
from tests.support.stages import FakeClock

NOW = "2026-11-23T14:03:11Z"
LATER = "2026-11-23T14:09:40Z"
PATHS = ("/healthz", "/readyz", "/metrics", "/jobs")


@dataclass
class Populated:
    """Ids of what `populate` put in the store."""

    big: FileRecord
    cars: FileRecord
    chunks: list[ChunkRecord]


async def populate(store: Store, tmp_path: Path) -> Populated:
    """leads/big.csv split in 3 chunks (1 complete, 1 submitted, 1 pending); cars/cars.tsv claimed."""
    work = tmp_path / "work"
    big = await store.begin_claim(
        route="leads",
        name="big.csv",
        source_path=str(tmp_path / "inbox" / "leads" / "big.csv"),
        work_path=str(work / "1-big.csv"),
        max_chunk_bytes=1000,
        claimed_at=NOW,
        ticket="big-1",
    )
    await store.finish_claim(big.id)
    await store.start_split(big.id)
    chunks = [
        await store.add_chunk(
            big.id,
            index=i,
            path=str(work / f"1-big.csv.{i}"),
            rows=10,
            bytes=900 + i,
            first_line=2 + 10 * (i - 1),
        )
        for i in (1, 2, 3)
    ]
    big = await store.finish_split(big.id, rows=30, chunks_total=3)
    for chunk, batch_id in ((chunks[0], 101), (chunks[1], 102)):
        await store.mark_submitting(chunk.id)
        await store.mark_submitted(
            chunk.id, batch_id=batch_id, marketo_status="Queued", submitted_at=NOW
        )
    await store.finish_chunk(
        chunks[0].id,
        status=ChunkStatus.COMPLETE,
        message="Import completed with errors, 9 records imported (9 members), 1 failed records",
        finished_at=LATER,
        batch=BatchStatus(101, "Complete", 9, 1, 0, "Import completed with errors"),
    )
    cars = await store.begin_claim(
        route="cars",
        name="cars.tsv",
        source_path=str(tmp_path / "inbox" / "cars" / "cars.tsv"),
        work_path=str(work / "2-cars.tsv"),
        max_chunk_bytes=1000,
        claimed_at=LATER,
        ticket="cars-1",
    )
    cars = await store.finish_claim(cars.id)
    return Populated(big=big, cars=cars, chunks=chunks)


class Readiness:
    """The daemon's readiness callable, steerable by the test."""

    def __init__(self) -> None:
        self.reason: str | None = "watcher not running"

    def __call__(self) -> str | None:
        return self.reason


@pytest.fixture
async def populated(store: Store, tmp_path: Path) -> Populated:
    return await populate(store, tmp_path)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def server(
    store: Store, metrics: Metrics, readiness: Readiness
) -> AsyncIterator[StatusServer]:
    srv = StatusServer("127.0.0.1", 0, store=store, metrics=metrics, readiness=readiness)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


Get = Callable[[str], Awaitable[tuple[int, str, str]]]


@pytest.fixture
def get(server: StatusServer, http: aiohttp.ClientSession) -> Get:
    async def fetch(path: str) -> tuple[int, str, str]:
        async with http.get(f"http://127.0.0.1:{server.port}{path}") as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()

    return fetch


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


async def test_healthz_says_ok(get: Get) -> None:
    status, _, body = await get("/healthz")
    assert (status, body) == (200, "ok")


async def test_readyz_gives_the_reason_until_ready(get: Get, readiness: Readiness) -> None:
    status, ctype, body = await get("/readyz")
    assert status == 503
    assert ctype.startswith("application/json")
    assert json.loads(body) == {"ready": False, "reason": "watcher not running"}

    readiness.reason = None
    status, _, body = await get("/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True})


async def test_metrics_follow_the_store_and_the_observer_calls(
    get: Get, store: Store, populated: Populated, metrics: Metrics
) -> None:
    metrics.api_call("importLeadUsingPOST")
    metrics.api_call("importLeadUsingPOST")
    metrics.api_call("identity")
    metrics.marketo_error("1016")
    metrics.marketo_error("http-503")
    metrics.marketo_error("http-502")
    metrics.marketo_error("totally-unknown")
    metrics.backoff("1016", 2.5)
    metrics.backoff("1016", 1.5)
    metrics.rows("processed", 9)
    metrics.rows("failed", 1)
    metrics.set_api_calls_today(42)
    metrics.set_backoff_current(3.0)

    status, ctype, body = await get("/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "version=" in ctype
    parsed = metric_samples(body)
    files, chunks = "marketo_orchestrator_files", "marketo_orchestrator_chunks"
    assert value(parsed, files, status="split") == 1
    assert value(parsed, files, status="claimed") == 1
    assert value(parsed, files, status="complete") == 0
    assert value(parsed, chunks, status="complete") == 1
    assert value(parsed, chunks, status="submitted") == 1
    assert value(parsed, chunks, status="pending") == 1
    assert value(parsed, "marketo_orchestrator_jobs_outstanding") == 1
    calls = "marketo_orchestrator_api_calls_total"
    assert value(parsed, calls, operation="importLeadUsingPOST") == 2
    assert value(parsed, calls, operation="identity") == 1
    errors = "marketo_orchestrator_marketo_errors_total"
    assert value(parsed, errors, code="1016") == 1
    assert value(parsed, errors, code="http-5xx") == 2
    assert value(parsed, errors, code="other") == 1
    assert value(parsed, "marketo_orchestrator_backoff_seconds_total", reason="1016") == 4.0
    assert value(parsed, "marketo_orchestrator_backoff_waits_total", reason="1016") == 2
    assert value(parsed, "marketo_orchestrator_backoff_current_seconds") == 3.0
    assert value(parsed, "marketo_orchestrator_rows_total", outcome="processed") == 9
    assert value(parsed, "marketo_orchestrator_rows_total", outcome="failed") == 1
    assert value(parsed, "marketo_orchestrator_rows_total", outcome="rejected") == 0
    assert value(parsed, "marketo_orchestrator_api_calls_today") == 42
    assert value(parsed, "marketo_orchestrator_build_info", version="0.1.0") == 1

    # The gauges are read from the store at scrape time.
    await store.finish_chunk(
        populated.chunks[1].id,
        status=ChunkStatus.FAILED,
        message="Failed",
        finished_at=LATER,
        batch=BatchStatus(102, "Failed", 0, 0, 0, "Failed"),
    )
    parsed = metric_samples((await get("/metrics"))[2])
    assert value(parsed, "marketo_orchestrator_jobs_outstanding") == 0
    assert value(parsed, chunks, status="failed") == 1
    assert value(parsed, chunks, status="submitted") == 0


async def test_no_label_value_is_a_file_name(
    get: Get, populated: Populated, metrics: Metrics
) -> None:
    # Even a careless caller passing a file name cannot make it a label value.
    metrics.api_call("big.csv")
    metrics.backoff("cars.tsv", 1.0)
    metrics.marketo_error("big.csv")
    _, _, body = await get("/metrics")
    label_values = {
        v
        for family in text_string_to_metric_families(body)
        for s in family.samples
        for v in s.labels.values()
    }
    assert label_values, "expected labelled samples"
    for name in ("big.csv", "cars.tsv"):
        assert not any(name in v for v in label_values)
    assert "other" in label_values


async def test_jobs_is_the_snapshot_of_the_store(
    get: Get, store: Store, populated: Populated, tmp_path: Path
) -> None:
    status, ctype, body = await get("/jobs")
    assert status == 200
    assert ctype.startswith("application/json")
    data = json.loads(body)
    assert data == jobs_snapshot(await store.files(), await store.chunks())

    big, cars = data["files"]
    assert (big["route"], big["file"], big["status"]) == ("leads", "big.csv", "split")
    assert (big["chunks_done"], big["chunks_total"], big["batch_ids"]) == (1, 3, [101, 102])
    assert (big["rows"], big["rows_processed"], big["rows_failed"]) == (30, 9, 1)
    assert [c["status"] for c in big["chunks"]] == ["complete", "submitted", "pending"]
    assert big["chunks"][0]["marketo_status"] == "Complete"
    assert big["chunks"][1]["batch_id"] == 102
    assert big["claimed_at"] == NOW
    assert (cars["file"], cars["status"], cars["chunks_total"]) == ("cars.tsv", "claimed", None)
    assert data["totals"]["files"]["split"] == 1
    assert data["totals"]["chunks"]["pending"] == 1
    assert data["totals"]["jobs_outstanding"] == 1
    # Work and inbox paths are internal.
    assert str(tmp_path) not in body


async def test_only_get_and_head_exist_and_nothing_changes(
    server: StatusServer,
    http: aiohttp.ClientSession,
    get: Get,
    store: Store,
    populated: Populated,
) -> None:
    before = jobs_snapshot(await store.files(), await store.chunks())
    base = f"http://127.0.0.1:{server.port}"
    for path in PATHS:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            async with http.request(method, base + path, data=b'{"status": "failed"}') as resp:
                assert resp.status == 405, (method, path)
                assert "GET" in resp.headers.get("Allow", "")
        async with http.head(base + path) as resp:
            assert resp.status in (200, 503), path
    assert jobs_snapshot(await store.files(), await store.chunks()) == before
    assert (await get("/nowhere"))[0] == 404


async def test_store_trouble_is_a_503_not_a_crash(
    metrics: Metrics, readiness: Readiness, http: aiohttp.ClientSession
) -> None:
    class BrokenStore:
        async def tallies(self) -> dict[str, int]:
            raise StoreError("state.db", "database is locked")

        async def listing(
            self,
            *,
            limit: int | None,
            statuses: Iterable[FileStatus] | None = None,
            ticket: str | None = None,
            name_glob: str | None = None,
        ) -> list[FileRecord]:
            raise StoreError("state.db", "database is locked")

        async def chunks_of(self, file_ids: Iterable[int]) -> list[ChunkRecord]:
            raise StoreError("state.db", "database is locked")

    srv = StatusServer("127.0.0.1", 0, store=BrokenStore(), metrics=metrics, readiness=readiness)
    await srv.start()
    try:
        for path in ("/metrics", "/jobs"):
            async with http.get(f"http://127.0.0.1:{srv.port}{path}") as resp:
                assert resp.status == 503, path
        async with http.get(f"http://127.0.0.1:{srv.port}/healthz") as resp:
            assert resp.status == 200
    finally:
        await srv.stop()
    with pytest.raises(RuntimeError):
        _ = srv.port


async def test_status_table_shows_routes_files_and_counts(
    store: Store, populated: Populated
) -> None:
    now = datetime(2026, 11, 23, 14, 6, 16, tzinfo=UTC)  # 3m05s after big.csv was claimed
    table = format_status_table(jobs_snapshot(await store.files(), await store.chunks()), now=now)
    lines = table.splitlines()
    assert lines[0].split() == [
        "ROUTE",
        "FILE",
        "STATE",
        "CHUNKS",
        "ROWS",
        "FAILED",
        "WARNED",
        "ELAPSED",
    ]
    at = next(i for i, line in enumerate(lines) if "big.csv" in line)
    # One chunk done, one Queued at Marketo: the live state is "queued", not "split".
    assert lines[at].split() == ["leads", "big.csv", "queued", "1/3", "9/30", "1", "0", "3m05s"]
    assert lines[at + 1].split() == ["id", "big-1", "batches", "101,102"]
    cars = next(line for line in lines if "cars.tsv" in line)
    assert cars.split()[:5] == ["cars", "cars.tsv", "claimed", "0/?", "0/?"]
    assert "jobs at Marketo: 1" in lines[-1]
    assert all(len(line) <= 100 for line in lines)


def long_file() -> tuple[FileRecord, list[ChunkRecord]]:
    chunks = [
        ChunkRecord(
            id=i,
            file_id=1,
            index=i,
            path=f"/w/{i}",
            rows=1,
            bytes=1,
            first_line=i + 1,
            status=ChunkStatus.SUBMITTED,
            batch_id=100_000 + i,
            marketo_status="Importing" if i == 1 else "Queued",
        )
        for i in range(1, 30)
    ]
    file = FileRecord(
        id=1,
        route="a-very-long-route-name",
        name="an-extremely-long-file-name-that-goes-on-and-on-2026-11-23.csv",
        source_path="/in/x",
        work_path="/w/x",
        status=FileStatus.SPLIT,
        max_chunk_bytes=1000,
        claimed_at=NOW,
        ticket="20261123T140311Z-8f3a",
        chunks_total=29,
        error="Marketo said Failed for chunk 3:\nthe file\tcould not be parsed " + "x" * 200,
    )
    return file, chunks


def test_status_table_wraps_long_names_whole_and_stays_narrow() -> None:
    file, chunks = long_file()
    lines = format_status_table(jobs_snapshot([file], chunks)).splitlines()
    assert all(len(line) <= TABLE_WIDTH <= 100 for line in lines)
    row = lines[1]
    assert row.split()[2:4] == ["importing", "0/29"]
    # The name wraps in its column: the pieces put together are the whole name.
    start = row.index("an-extremely")
    pieces = [line[start : start + 20].strip() for line in lines[1:5]]
    assert "".join(pieces) == file.name
    detail = next(line for line in lines if line.lstrip().startswith("id "))
    assert "20261123T140311Z-8f3a" in detail
    assert "+" in detail.split()[-1]  # batch ids that do not fit are counted, not cut mid-number
    assert "100001" in detail
    error_line = next(line for line in lines if "error:" in line)
    assert error_line.lstrip().startswith("error: Marketo said Failed")
    assert "\t" not in error_line


def test_wide_status_table_keeps_every_value_on_one_line() -> None:
    file, chunks = long_file()
    lines = format_status_table(jobs_snapshot([file], chunks), wide=True).splitlines()
    assert lines[0].split()[:3] == ["ID", "ROUTE", "FILE"]
    row = lines[1].split()
    assert row[:4] == ["20261123T140311Z-8f3a", "a-very-long-route-name", file.name, "importing"]
    assert row[-1] == ",".join(str(100_000 + i) for i in range(1, 30))


async def test_snapshot_queries_by_id_name_activity_status_and_limit(
    store: Store, populated: Populated
) -> None:
    files, chunks = await store.files(), await store.chunks()

    def shown(**query: Any) -> list[str]:
        return [f["id"] for f in jobs_snapshot(files, chunks, Query(**query))["files"]]

    assert shown() == ["big-1", "cars-1"]
    assert shown(ticket="cars-1") == ["cars-1"]
    assert shown(ticket="nope") == []
    assert shown(name="*.tsv") == ["cars-1"]
    assert shown(name="big.csv") == ["big-1"]
    assert shown(statuses=frozenset({"queued"})) == ["big-1"]  # a live state
    assert shown(statuses=frozenset({"claimed"})) == ["cars-1"]
    assert shown(limit=1) == ["big-1"]
    assert shown(active=True) == ["big-1", "cars-1"]
    totals = jobs_snapshot(files, chunks, Query(ticket="nope"))["totals"]
    assert totals["files"]["split"] == 1  # totals count every file


async def test_the_store_answers_every_query_as_the_snapshot_does(
    store: Store, populated: Populated
) -> None:
    """One query path: the store's bounded listing (statuses, id and name in SQL; live
    states checked on the active files) gives what filtering everything would."""
    files, chunks = await store.files(), await store.chunks()
    queries: list[dict[str, Any]] = [
        {},
        {"ticket": "cars-1"},
        {"ticket": "nope"},
        {"name": "*.tsv"},
        {"name": "b[!x]g.csv"},
        {"statuses": frozenset({"queued"})},
        {"statuses": frozenset({"importing"})},
        {"statuses": frozenset({"claimed", "complete"})},
        {"limit": 1},
        {"active": True, "limit": 1},
    ]
    for query in queries:
        read = await load_snapshot(store, Query(**query))
        expected = jobs_snapshot(files, chunks, Query(**query))
        assert read["files"] == expected["files"], query
        assert read["totals"] == expected["totals"], query  # the tallies count it all
    assert (await load_snapshot(store, Query(limit=1)))["truncated"] is True
    assert (await load_snapshot(store))["truncated"] is False


async def test_jobs_takes_status_and_limit_and_one_job_by_id(
    get: Get, populated: Populated
) -> None:
    status, _, body = await get("/jobs?status=claimed")
    assert status == 200
    assert [f["id"] for f in json.loads(body)["files"]] == ["cars-1"]
    status, _, body = await get("/jobs?status=split,claimed&limit=1")
    assert [f["id"] for f in json.loads(body)["files"]] == ["big-1"]
    for bad in ("/jobs?status=done", "/jobs?limit=0", "/jobs?limit=x", "/jobs?limit=1001"):
        status, _, body = await get(bad)
        assert status == 400, bad
        assert json.loads(body)["error"]
    status, _, body = await get("/jobs/big-1")
    assert status == 200
    one = json.loads(body)
    assert (one["id"], one["file"], one["state"], one["result"]) == (
        "big-1",
        "big.csv",
        "queued",
        None,
    )
    status, _, body = await get("/jobs/nope")
    assert status == 404
    assert "nope" in json.loads(body)["error"]


async def test_read_snapshot_for_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = await Store.open(db)
    try:
        await populate(store, tmp_path)
        expected = jobs_snapshot(await store.files(), await store.chunks())
    finally:
        await store.close()
    assert await read_snapshot(db) == expected

    missing = tmp_path / "never-ran" / "state.db"
    with pytest.raises(StoreError, match="no state store here"):
        await read_snapshot(missing)
    assert not missing.parent.exists()


def test_label_values_are_bounded() -> None:
    assert error_code_label("1016") == "1016"
    assert error_code_label("606") == "606"
    assert error_code_label("http-413") == "http-413"
    assert error_code_label("http-404") == "http-4xx"
    assert error_code_label("http-599") == "http-5xx"
    assert error_code_label("network") == "network"
    assert error_code_label("timeout") == "timeout"
    assert {error_code_label(c) for c in ("42", "99999", "http-9999", "boom", "")} == {"other"}
    assert reason_label("http-503") == "http-5xx"
    assert reason_label("queue-full") == "queue-full"
    assert reason_label("../etc/passwd") == "other"


def test_rows_rejects_an_unknown_outcome() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="unknown row outcome"):
        metrics.rows("skipped", 1)


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.api_call("identity")
    assert b'operation="identity"' in first.render()
    assert b'operation="identity"' not in second.render()


def test_default_listen_address_is_loopback() -> None:
    settings = HttpSettings()
    assert settings.listen == "127.0.0.1:9400"
    host_port = settings.host_port
    assert host_port is not None
    host, port = host_port
    assert ipaddress.ip_address(host).is_loopback
    assert port == 9400


async def test_files_sharing_a_pack_show_packing_then_their_share(store: Store) -> None:
    files = []
    for name in ("a.csv", "b.csv"):
        claimed = await store.begin_claim(
            route="leads",
            name=name,
            source_path=f"/in/{name}",
            work_path=f"/work/{name}",
            max_chunk_bytes=1000,
            claimed_at=NOW,
            ticket=f"id-{name}",
        )
        await store.finish_claim(claimed.id)
        files.append(await store.start_split(claimed.id))
    a, b = files
    pack = await store.open_pack(a.id, path="/p", rows=3, bytes=40, first_line=2, file_rows=3)
    await store.join_pack(pack.id, b.id, rows=2, bytes=20, first_line=2, file_rows=2)
    snapshot = await load_snapshot(store)
    assert [(f["file"], f["state"]) for f in snapshot["files"]] == [
        ("a.csv", "packing"),
        ("b.csv", "packing"),
    ]
    assert await load_snapshot(store, Query(statuses=frozenset({"packing"}))) == snapshot
    await store.seal_pack(pack.id)
    snapshot = await load_snapshot(store)
    assert [f["state"] for f in snapshot["files"]] == ["waiting", "waiting"]
    chunks = [f["chunks"] for f in snapshot["files"]]
    assert [[(c["index"], c["rows"], c["bytes"]) for c in cs] for cs in chunks] == [
        [(1, 3, 40)],
        [(1, 2, 20)],
    ]
    whole = {"files": 2, "rows": 5, "bytes": 60}
    assert [cs[0]["shared"] for cs in chunks] == [whole, whole]


# -- the progress line ---------------------------------------------------------------------


async def test_run_and_file_progress_lines_are_one_renderer(
    store: Store, populated: Populated
) -> None:
    """`run --once` (every file) and `submit --wait` (one file) say the same things in
    the same words: counts, chunks, rows, the rate since the line first showed, and what
    the work waits for (the state nearest to Marketo, or a backoff)."""
    clock = FakeClock()
    run_meter, file_meter = RateMeter(clock), RateMeter(clock)
    big = Query(ticket="big-1")
    entry = (await load_snapshot(store, big))["files"][0]
    waiting = "waiting for: Marketo's queue"
    # big.csv has a chunk queued at Marketo, cars.tsv waits for the splitter.
    assert await run_line(store, 0.0, run_meter) == f"files 0/2  chunks 1/3  rows 9  {waiting}"
    assert file_line(entry, file_meter) == f"queued  chunks 1/3  rows 9/30  {waiting}"

    clock.advance(2.0)
    await store.finish_chunk(
        populated.chunks[1].id,
        status=ChunkStatus.COMPLETE,
        message="Import succeeded, 10 records imported (10 members)",
        finished_at=LATER,
        batch=BatchStatus(102, "Complete", 10, 0, 0, "Import succeeded"),
    )
    entry = (await load_snapshot(store, big))["files"][0]
    assert await run_line(store, 12.4, run_meter) == (
        "files 0/2  chunks 2/3  rows 19  5 rows/s  waiting for: a backoff (12s)"
    )
    line = file_line(entry, file_meter)
    assert line == "waiting  chunks 2/3  rows 19/30  5 rows/s  waiting for: a queue slot"

    cars = (await load_snapshot(store, Query(ticket="cars-1")))["files"][0]
    line = file_line(cars, RateMeter(clock))
    assert line == "claimed  chunks 0/?  rows 0/?  waiting for: the splitter"
    assert file_line(None, RateMeter(clock)) == "unclaimed  waiting for: a daemon to claim it"


async def test_a_held_chunk_shows_as_held_and_what_it_waits_for(
    get: Get, store: Store, populated: Populated
) -> None:
    """The key rule (issue 20): cars.tsv's only chunk shares record keys with big.csv's
    pending chunk 3, so it is held: the file's state, its chunk's `held_by`, the table's
    line below it, `?status=held` and the metrics' gauge say so."""
    cars = populated.cars
    await store.start_split(cars.id)
    waiting = await store.add_chunk(
        cars.id, index=1, path="/w/2-cars.tsv.1", rows=5, bytes=200, first_line=2
    )
    await store.finish_split(cars.id, rows=5, chunks_total=1)
    for chunk in populated.chunks:
        await store.record_conflicts(chunk.id, [])
    await store.record_conflicts(waiting.id, [populated.chunks[2].id])

    data = json.loads((await get("/jobs"))[2])
    big, held = data["files"]
    assert big["state"] == "queued"
    assert (big["held"], big["chunks"][2]["held_by"]) == (None, None)
    assert held["state"] == "held"
    waits_for = [{"id": "big-1", "file": "big.csv", "chunk": 3}]
    assert held["held"] == {"chunk": 1, "waits_for": waits_for}
    assert held["chunks"][0]["held_by"] == waits_for
    only = json.loads((await get("/jobs?status=held"))[2])
    assert [f["file"] for f in only["files"]] == ["cars.tsv"]

    table = format_status_table(data)
    assert "held: chunk 1 waits for big.csv chunk 3 (id big-1): they share record keys" in table
    assert all(len(line) <= TABLE_WIDTH for line in table.splitlines())
    assert "cars-1: held: chunk 1 waits for big.csv chunk 3" in format_status_table(data, wide=True)
    entry = (await load_snapshot(store, Query(ticket="cars-1")))["files"][0]
    assert file_line(entry, RateMeter()).endswith(
        "waiting for: an earlier job sharing record keys with it"
    )
    parsed = metric_samples((await get("/metrics"))[2])
    assert value(parsed, "marketo_orchestrator_chunks_held") == 1

    await store.mark_submitting(populated.chunks[2].id)
    await store.finish_chunk(
        populated.chunks[2].id, status=ChunkStatus.FAILED, message="x", finished_at=LATER
    )
    data = json.loads((await get("/jobs"))[2])
    assert [(f["state"], f["held"]) for f in data["files"]] == [("queued", None), ("waiting", None)]
    parsed = metric_samples((await get("/metrics"))[2])
    assert value(parsed, "marketo_orchestrator_chunks_held") == 0
