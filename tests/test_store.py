"""The state store: transitions, persistence, recovery, migrations and failures, on real SQLite."""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import StoreError
from orchestrator.models import (
    BatchStatus,
    ChunkStatus,
    FileRecord,
    FileStatus,
    QuotaState,
    Refusal,
    RejectRecord,
)
from orchestrator.store import LATEST_VERSION, Claim, Recovery, Store
from orchestrator.store.schema import _MIGRATIONS
from tests.support.waiting import wait_until

T0 = "2026-11-23T14:00:00Z"
T1 = "2026-11-23T14:00:01Z"
T2 = "2026-11-23T14:00:02Z"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "state.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db_path)
    yield opened
    await opened.close()


async def reopen(store: Store) -> Store:
    await store.close()
    return await Store.open(store.path)


async def claim(store: Store, name: str = "big.csv", claimed_at: str = T0) -> FileRecord:
    record = await store.begin_claim(
        route="leads",
        name=name,
        source_path=f"/data/inbox/leads/{name}",
        work_path=f"/data/work/{name}",
        max_chunk_bytes=1000,
        claimed_at=claimed_at,
    )
    return await store.finish_claim(record.id)


async def split(store: Store, file: FileRecord, chunks: int) -> FileRecord:
    await store.start_split(file.id)
    for index in range(1, chunks + 1):
        await add(store, file.id, index)
    return await store.finish_split(file.id, rows=10 * chunks, chunks_total=chunks)


async def add(store: Store, file_id: int, index: int, path: str = "") -> Any:
    return await store.add_chunk(
        file_id,
        index=index,
        path=path or f"/data/work/{file_id}.{index}.csv",
        rows=10,
        bytes=900,
        first_line=2 + 10 * (index - 1),
    )


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def damage_page(path: Path, page: int, page_size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > (page + 1) * page_size
    data[page * page_size : (page + 1) * page_size] = b"\x5a" * page_size
    path.write_bytes(bytes(data))


def set_user_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


def pragma(path: Path, name: str) -> Any:
    with sqlite3.connect(path) as conn:
        value = conn.execute(f"PRAGMA {name}").fetchone()[0]
    conn.close()
    return value


# -- opening, pragmas, migrations --------------------------------------------------------------


async def test_open_creates_schema_with_wal_full_sync_and_foreign_keys(store: Store) -> None:
    async def on_store_connection(name: str) -> Any:
        # Per-connection pragmas can only be seen on the store's own connection.
        return await store._run("test", lambda c: c.execute(f"PRAGMA {name}").fetchone()[0])

    assert await on_store_connection("journal_mode") == "wal"
    assert await on_store_connection("synchronous") == 2  # FULL
    assert await on_store_connection("foreign_keys") == 1
    assert pragma(store.path, "user_version") == LATEST_VERSION == 12
    assert await store.integrity_check() == "ok"


async def test_empty_v0_file_is_migrated_to_the_latest(db_path: Path) -> None:
    write_file(db_path, b"")
    async with await Store.open(db_path) as store:
        file = await claim(store)
    assert pragma(db_path, "user_version") == LATEST_VERSION
    with sqlite3.connect(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {
        "files",
        "chunks",
        "pieces",
        "rejects",
        "api_calls",
        "tallies",
        "refusals",
        "quota",
        "key_order",
        "conflicts",
    }
    async with await Store.open(db_path) as store:
        assert await store.get_file(file.id) == file


async def test_v7_chunks_may_end_unknown_once_migrated_seen_by_every_connection(
    db_path: Path,
) -> None:
    """Migrations 8 and 9 (issue 19): 'unknown' joins the chunk statuses the CHECK allows,
    tallied like the others, without rebuilding the table; a connection opened before
    the migration (a `status` reader beside the daemon) sees the new rule too."""
    async with await Store.open(db_path) as store:
        file = await split(store, await claim(store), 2)
        [first, second] = await store.chunks(file_id=file.id)
    conn = sqlite3.connect(db_path, isolation_level=None)  # back to what v7 left
    conn.execute("DROP TABLE conflicts")  # v12
    conn.execute("DROP TABLE key_order")
    conn.execute("DROP TABLE refusals")
    conn.execute("DROP TABLE quota")
    conn.execute("ALTER TABLE files DROP COLUMN warnings")
    conn.execute("DELETE FROM tallies WHERE name = 'chunks:unknown'")
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = replace(sql, ', ''unknown''', '') WHERE name = 'chunks'"
    )
    conn.execute("PRAGMA writable_schema = RESET")
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    older = sqlite3.connect(db_path, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # v7 knows no 'unknown'
        older.execute("UPDATE chunks SET status = 'unknown' WHERE id = ?", (second.id,))
    try:
        async with await Store.open(db_path) as store:
            unknown = await store.finish_chunk(
                first.id, status=ChunkStatus.UNKNOWN, message="610", finished_at=T0
            )
            assert unknown.status is ChunkStatus.UNKNOWN
            assert (await store.tallies())["chunks:unknown"] == 1
            assert await store.refusals() == []
            assert await store.integrity_check() == "ok"
        older.execute("UPDATE chunks SET status = 'unknown' WHERE id = ?", (second.id,))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            older.execute("UPDATE chunks SET status = 'lost' WHERE id = ?", (second.id,))
    finally:
        older.close()
    assert pragma(db_path, "user_version") == LATEST_VERSION


async def test_refusals_are_replaced_as_a_whole(store: Store) -> None:
    learnt = Refusal("Read-Write Lead", "603", "Access denied", T0, T0)
    await store.set_refusals([learnt, replace(learnt, what="credentials", code="http-401")])
    assert [r.what for r in await store.refusals()] == ["Read-Write Lead", "credentials"]
    await store.set_refusals([learnt])
    assert await store.refusals() == [learnt]
    await store.set_refusals([])
    assert await store.refusals() == []


async def test_v1_files_get_an_id_from_their_claim_second_when_migrated(db_path: Path) -> None:
    """Migration 2 adds the hand-over id; files claimed under v1 get one that never clashes."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN")
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for n in (1, 2):
        conn.execute(
            "INSERT INTO files (route, name, source_path, work_path, status, max_chunk_bytes,"
            " claimed_at) VALUES ('leads', ?, 's', 'w', 'complete', 1000, ?)",
            (f"f{n}.csv", "2026-11-23T14:03:11.123456Z"),
        )
    conn.execute("COMMIT")
    conn.close()
    async with await Store.open(db_path) as store:
        files = await store.files()
        assert [f.ticket for f in files] == ["20261123T140311Z-0001", "20261123T140311Z-0002"]
        assert await store.find_file("20261123T140311Z-0002") == files[1]
        fresh = await claim(store, "new.csv")
    assert pragma(db_path, "user_version") == LATEST_VERSION
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{4}", fresh.ticket)


async def test_schema_from_the_future_is_refused_untouched(db_path: Path) -> None:
    write_file(db_path, b"")
    set_user_version(db_path, 99)
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    assert info.value.path == str(db_path)
    assert str(db_path) in str(info.value)
    assert "newer" in str(info.value)
    assert pragma(db_path, "user_version") == 99
    assert pragma(db_path, "journal_mode") == "delete"


async def test_junk_file_is_refused_with_recovery_advice(db_path: Path) -> None:
    write_file(db_path, b"this is not a database\n" * 400)
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    message = str(info.value)
    assert str(db_path) in message
    assert "corrupt" in message
    assert "move it aside" in message
    assert "restart" in message


async def test_damaged_page_is_refused_by_quick_check(store: Store) -> None:
    file = await claim(store)
    await split(store, file, 300)
    await store.close()  # the last connection checkpoints the WAL into the file
    damage_page(store.path, 3)
    with pytest.raises(StoreError, match="corrupt") as info:
        await Store.open(store.path)
    assert str(store.path) in str(info.value)


async def test_path_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    write_file(tmp_path / "data", b"a file where the data directory should be")
    path = tmp_path / "data" / "state.db"
    with pytest.raises(StoreError) as info:
        await Store.open(path)
    assert info.value.path == str(path)


async def test_path_that_is_a_directory_is_refused(db_path: Path) -> None:
    # As root, chmod cannot make a directory unwritable; a directory in the way is a real failure.
    write_file(db_path / "x", b"")
    with pytest.raises(StoreError) as info:
        await Store.open(db_path)
    assert info.value.path == str(db_path)
    assert "cannot open" in str(info.value)


async def test_readers_open_beside_a_writing_daemon_without_database_is_locked(
    tmp_path: Path,
) -> None:
    """Readers (status, the hand-over client) open the store beside the daemon, from the
    first open of a new database on, and again and again while it commits in a loop.

    A new database is switched to WAL by whoever opens it first, and the switch takes a
    lock SQLite does not wait for: opened by several at once, all but one used to fail
    with "database is locked" (in about one round in ten here, so many rounds)."""
    day = "2026-11-23"

    async def daemon_opens(db: Path) -> None:
        async with await Store.open(db) as store:
            await store.add_api_calls(day, 1)

    async def reader_opens(db: Path) -> int:
        async with await Store.open(db, check=False) as store:
            return await store.api_calls(day)

    for n in range(200):
        db = tmp_path / str(n) / "state.db"
        async with asyncio.TaskGroup() as group:
            group.create_task(daemon_opens(db))
            for _ in range(2):
                group.create_task(reader_opens(db))
        assert await reader_opens(db) == 1

    commits = 0
    stop = asyncio.Event()

    async def daemon() -> None:
        nonlocal commits
        async with await Store.open(db) as store:
            while not stop.is_set():
                await store.add_api_calls(day, 1)
                commits += 1

    async def reader() -> None:
        await wait_until(lambda: commits > 0 or writing.done(), "the daemon's first commit")
        for _ in range(25):
            await reader_opens(db)

    writing = asyncio.create_task(daemon())
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(2):
                group.create_task(reader())
    finally:
        stop.set()
        await writing
    assert await reader_opens(db) == 1 + commits


async def test_a_reader_opens_while_the_daemon_is_inside_a_write_transaction(
    store: Store,
) -> None:
    """Opening an up-to-date database takes no write lock: a reader does not queue
    behind the daemon's writes (nor fail once they outlast the busy timeout)."""
    await store.add_api_calls("2026-11-23", 2)
    writer = sqlite3.connect(store.path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE api_calls SET count = 99")
        async with await Store.open(store.path, check=False) as reader:
            assert await reader.api_calls("2026-11-23") == 2  # the last commit, not 99
        writer.execute("ROLLBACK")
    finally:
        writer.close()


FILL_DISK = """
import asyncio, resource, signal, sys
from pathlib import Path
from orchestrator.errors import StoreError
from orchestrator.store import Store

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of dying

async def main():
    store = await Store.open(Path(sys.argv[1]))
    f = await store.begin_claim(route="r", name="n", source_path="s", work_path="w",
                                max_chunk_bytes=1, claimed_at="t")
    await store.start_split((await store.finish_claim(f.id)).id)
    # Root ignores file modes but not RLIMIT_FSIZE: the WAL cannot grow past what the
    # migrations left in it plus 256 KiB.
    wal = Path(sys.argv[1] + "-wal").stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal + 256 * 1024, resource.RLIM_INFINITY))
    for k in range(1, 10_000):
        try:
            await store.add_chunk(f.id, index=k, path="x" * 2000, rows=1, bytes=1, first_line=k)
        except StoreError as exc:
            print(k - 1, exc, flush=True)
            sys.exit(3)
    sys.exit(0)

asyncio.run(main())
"""


async def test_write_failure_at_run_time_names_path_and_operation(db_path: Path) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", FILL_DISK, str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    committed, message = done.stdout.split(" ", 1)
    assert message.startswith(f"{db_path}: add_chunk failed")
    async with await Store.open(db_path) as store:
        assert await store.integrity_check() == "ok"
        assert len(await store.chunks()) == int(committed) > 0


async def test_closed_store_refuses_calls_and_close_is_idempotent(store: Store) -> None:
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.files()


async def test_a_second_process_view_sees_committed_state(store: Store) -> None:
    # The `status` command opens the same file while the daemon runs.
    async with await Store.open(store.path) as reader:
        file = await claim(store)
        assert await reader.get_file(file.id) == file


# -- claiming ------------------------------------------------------------------------------------


async def test_claim_transitions_persist(store: Store) -> None:
    began = await store.begin_claim(
        route="leads",
        name="big.csv",
        source_path="/in/big.csv",
        work_path="/work/1-big.csv",
        max_chunk_bytes=9_500_000,
        claimed_at=T0,
        ticket="nightly-42",
    )
    assert began == FileRecord(
        id=began.id,
        route="leads",
        name="big.csv",
        source_path="/in/big.csv",
        work_path="/work/1-big.csv",
        status=FileStatus.CLAIMING,
        max_chunk_bytes=9_500_000,
        claimed_at=T0,
        ticket="nightly-42",
    )
    assert await store.find_file("nightly-42") == began
    assert await store.find_file("nightly-43") is None
    claimed = await store.finish_claim(began.id)
    assert claimed.status is FileStatus.CLAIMED
    assert await store.finish_claim(began.id) == claimed  # again after a crash: no-op
    store = await reopen(store)
    try:
        assert await store.get_file(began.id) == claimed
        with pytest.raises(ValueError, match="drop_claim"):
            await store.drop_claim(began.id)
    finally:
        await store.close()


async def test_claims_begin_and_finish_in_one_transaction_each(store: Store) -> None:
    claims = [
        Claim("leads", f"{n}.csv", f"/in/{n}.csv", f"/work/{n}-{n}.csv", 1000, T0, ticket=job)
        for n, job in ((1, "given-1"), (2, ""), (3, ""))
    ]
    began = await store.begin_claims(claims)
    assert [(f.name, f.status) for f in began] == [
        (f"{n}.csv", FileStatus.CLAIMING) for n in (1, 2, 3)
    ]
    assert began[0].ticket == "given-1"
    assert began[1].ticket
    assert began[1].ticket != began[2].ticket
    ids = [f.id for f in began]
    claimed = await store.finish_claims(ids[:2])
    assert claimed == [await store.get_file(i) for i in ids[:2]]
    assert all(f.status is FileStatus.CLAIMED for f in claimed)
    assert await store.finish_claims(ids[:2]) == claimed  # again after a crash: no-op
    await store.start_split(ids[0])
    with pytest.raises(ValueError, match="finish_claims"):
        await store.finish_claims([ids[2], ids[0]])  # one illegal transition: none happen
    assert (await store.get_file(ids[2])).status is FileStatus.CLAIMING
    assert await store.finish_claims([]) == []


async def test_drop_claim_forgets_the_file(store: Store) -> None:
    began = await store.begin_claim(
        route="leads",
        name="a.csv",
        source_path="s",
        work_path="w",
        max_chunk_bytes=1,
        claimed_at=T0,
    )
    await store.drop_claim(began.id)
    store = await reopen(store)
    try:
        with pytest.raises(LookupError):
            await store.get_file(began.id)
        assert await store.files() == []
    finally:
        await store.close()


async def test_refused_entry_fails_with_the_error_given_at_claim(store: Store) -> None:
    began = await store.begin_claim(
        route="leads",
        name="link.csv",
        source_path="/in/link.csv",
        work_path="/failed/leads/link.csv",
        max_chunk_bytes=1,
        claimed_at=T0,
        error="a symlink is never read",
    )
    assert began.error == "a symlink is never read"
    reserved = await store.reserve_result(
        began.id, result_path="/failed/leads/link.csv.result.json"
    )
    assert reserved.status is FileStatus.FINISHING
    done = await store.finish_file(began.id, status=FileStatus.FAILED, error=None, finished_at=T1)
    assert (done.status, done.error, done.finished_at) == (
        FileStatus.FAILED,
        "a symlink is never read",
        T1,
    )


# -- splitting -----------------------------------------------------------------------------------


async def test_split_transitions_persist_and_adds_are_idempotent(store: Store) -> None:
    file = await claim(store)
    assert (await store.start_split(file.id)).status is FileStatus.SPLITTING
    assert (await store.start_split(file.id)).status is FileStatus.SPLITTING  # resume: no-op
    first = await add(store, file.id, 1)
    assert (first.index, first.status, first.submit_attempts) == (1, ChunkStatus.PENDING, 0)
    assert await add(store, file.id, 1, path="/elsewhere") == first  # re-split: unchanged
    await add(store, file.id, 2)
    await store.add_reject(file.id, line=7, offset=1234, size=2000, reason="record too large")
    await store.add_reject(file.id, line=7, offset=1234, size=2000, reason="said again")
    await store.add_reject(file.id, line=3, offset=100, size=1500, reason="record too large")
    with pytest.raises(ValueError, match="2 chunks"):
        await store.finish_split(file.id, rows=20, chunks_total=3)
    done = await store.finish_split(file.id, rows=20, chunks_total=2)
    assert (done.status, done.rows, done.chunks_total) == (FileStatus.SPLIT, 20, 2)
    with pytest.raises(ValueError, match="add_chunk"):
        await add(store, file.id, 3)

    store = await reopen(store)
    try:
        assert await store.get_file(file.id) == done
        assert [c.index for c in await store.chunks(file_id=file.id)] == [1, 2]
        assert (await store.chunks(file_id=file.id))[0] == first
        assert await store.rejects(file.id) == [
            RejectRecord(file.id, 3, 1500, "record too large", offset=100),
            RejectRecord(file.id, 7, 2000, "record too large", offset=1234),
        ]
    finally:
        await store.close()


async def test_chunk_lifecycle_persists(store: Store) -> None:
    file = await split(store, await claim(store), 1)
    (chunk,) = await store.chunks(file_id=file.id)
    assert (await store.mark_submitting(chunk.id)).submit_attempts == 1
    back = await store.mark_pending(chunk.id)  # 1016: keep the head of the queue
    assert (back.status, back.submit_attempts) == (ChunkStatus.PENDING, 1)
    sending = await store.mark_submitting(chunk.id)
    assert (sending.status, sending.submit_attempts) == (ChunkStatus.SUBMITTING, 2)
    sent = await store.mark_submitted(
        chunk.id, batch_id=3404, marketo_status="Queued", submitted_at=T1
    )
    assert (sent.status, sent.batch_id, sent.marketo_status, sent.submitted_at) == (
        ChunkStatus.SUBMITTED,
        3404,
        "Queued",
        T1,
    )
    assert (
        await store.mark_submitted(
            chunk.id, batch_id=3404, marketo_status="Queued", submitted_at=T2
        )
        == sent
    )
    polled = await store.update_batch(
        chunk.id, BatchStatus(3404, "Importing", 5, 1, 0, "Importing")
    )
    assert (polled.marketo_status, polled.rows_processed, polled.rows_failed) == ("Importing", 5, 1)
    with_files = await store.set_chunk_files(
        chunk.id, failures_path="/w/1.failures.csv", warnings_path=None
    )
    assert with_files.failures_path == "/w/1.failures.csv"
    final = BatchStatus(3404, "Complete", 8, 2, 1, "Import completed with errors")
    done = await store.finish_chunk(
        chunk.id, status=ChunkStatus.COMPLETE, message="done", finished_at=T2, batch=final
    )
    assert (done.status, done.marketo_status, done.rows_processed, done.rows_failed) == (
        ChunkStatus.COMPLETE,
        "Complete",
        8,
        2,
    )
    assert (done.rows_with_warning, done.message, done.finished_at) == (1, "done", T2)
    assert done.failures_path == "/w/1.failures.csv"
    store = await reopen(store)
    try:
        assert await store.chunks(file_id=file.id) == [done]
    finally:
        await store.close()


async def test_illegal_chunk_transitions_are_refused(store: Store) -> None:
    file = await split(store, await claim(store), 2)
    first, second = await store.chunks(file_id=file.id)
    with pytest.raises(ValueError, match="mark_submitted"):
        await store.mark_submitted(first.id, batch_id=1, marketo_status="Queued", submitted_at=T1)
    with pytest.raises(ValueError, match="mark_pending"):
        await store.mark_pending(first.id)
    with pytest.raises(ValueError, match="update_batch"):
        await store.update_batch(first.id, BatchStatus(1, "Queued"))
    with pytest.raises(ValueError, match="not a final"):
        await store.finish_chunk(first.id, status=ChunkStatus.SUBMITTED, message="", finished_at=T1)
    with pytest.raises(LookupError):
        await store.mark_submitting(9999)
    await store.mark_submitting(first.id)
    await store.mark_submitted(first.id, batch_id=1, marketo_status="Queued", submitted_at=T1)
    with pytest.raises(ValueError, match="batch 1, not 2"):
        await store.update_batch(first.id, BatchStatus(2, "Importing"))
    await store.finish_chunk(first.id, status=ChunkStatus.FAILED, message="Failed", finished_at=T2)
    with pytest.raises(ValueError, match="mark_submitted"):
        await store.mark_submitted(first.id, batch_id=1, marketo_status="Queued", submitted_at=T1)
    with pytest.raises(ValueError, match="finish_chunk"):
        await store.finish_chunk(first.id, status=ChunkStatus.COMPLETE, message="", finished_at=T2)
    # A chunk refused before Marketo saw it fails without a batch.
    refused = await store.finish_chunk(
        second.id, status=ChunkStatus.FAILED, message="HTTP 413", finished_at=T2
    )
    assert (refused.status, refused.batch_id) == (ChunkStatus.FAILED, None)
    assert (await store.get_file(file.id)).status is FileStatus.SPLIT  # a rollback left it alone


# -- finishing files -----------------------------------------------------------------------------


async def test_finish_file_complete_needs_every_chunk_complete(store: Store) -> None:
    file = await split(store, await claim(store), 2)
    first, second = await store.chunks(file_id=file.id)
    result = "/data/done/leads/big.csv.result.json"
    for chunk in (first, second):
        await store.mark_submitting(chunk.id)
        await store.mark_submitted(
            chunk.id, batch_id=chunk.index, marketo_status="Queued", submitted_at=T1
        )
    await store.finish_chunk(first.id, status=ChunkStatus.COMPLETE, message="", finished_at=T1)
    reserved = await store.reserve_result(file.id, result_path=result)
    assert (reserved.status, reserved.result_path) == (FileStatus.FINISHING, result)
    assert await store.reserve_result(file.id, result_path=result) == reserved
    with pytest.raises(ValueError, match="reserve_result"):
        await store.reserve_result(file.id, result_path=result + ".2")
    with pytest.raises(ValueError, match="unfinished"):
        await store.finish_file(file.id, status=FileStatus.COMPLETE, error=None, finished_at=T2)
    with pytest.raises(ValueError, match="mark_submitting"):
        await store.mark_submitting(second.id)
    await store.finish_chunk(second.id, status=ChunkStatus.COMPLETE, message="", finished_at=T2)
    done = await store.finish_file(file.id, status=FileStatus.COMPLETE, error=None, finished_at=T2)
    assert (done.status, done.error, done.finished_at) == (FileStatus.COMPLETE, None, T2)
    with pytest.raises(ValueError, match="set_file_error"):
        await store.set_file_error(file.id, "too late")
    other = await claim(store, "other.csv")
    with pytest.raises(ValueError, match="taken by file"):
        await store.reserve_result(other.id, result_path=result)
    store = await reopen(store)
    try:
        assert await store.get_file(file.id) == done
        assert await store.result_path_taken(result)
        assert not await store.result_path_taken(result + ".other")
    finally:
        await store.close()


async def test_failing_file_keeps_the_error_it_was_given(store: Store) -> None:
    file = await claim(store)
    await store.start_split(file.id)
    chunk = await add(store, file.id, 1)
    noted = await store.set_file_error(file.id, "line 7: unterminated quote")
    assert (noted.status, noted.error) == (FileStatus.SPLITTING, "line 7: unterminated quote")
    await store.reserve_result(file.id, result_path="/failed/big.csv.result.json")
    with pytest.raises(ValueError, match="unfinished"):
        await store.finish_file(file.id, status=FileStatus.FAILED, error=None, finished_at=T1)
    await store.finish_chunk(
        chunk.id, status=ChunkStatus.FAILED, message="file failed", finished_at=T1
    )
    with pytest.raises(ValueError, match="cannot be complete"):
        await store.finish_file(file.id, status=FileStatus.COMPLETE, error=None, finished_at=T1)
    done = await store.finish_file(file.id, status=FileStatus.FAILED, error=None, finished_at=T1)
    assert (done.status, done.error) == (FileStatus.FAILED, "line 7: unterminated quote")


async def test_failed_file_needs_an_error(store: Store) -> None:
    file = await claim(store)
    await store.reserve_result(file.id, result_path="/failed/x.result.json")
    with pytest.raises(ValueError, match="without an error"):
        await store.finish_file(file.id, status=FileStatus.FAILED, error=None, finished_at=T1)
    with pytest.raises(ValueError, match="not a final"):
        await store.finish_file(file.id, status=FileStatus.SPLIT, error=None, finished_at=T1)


# -- recovery and queries ------------------------------------------------------------------------


async def test_recover_after_a_crash(store: Store) -> None:
    claiming = await store.begin_claim(
        route="leads",
        name="a.csv",
        source_path="s",
        work_path="w",
        max_chunk_bytes=1,
        claimed_at=T0,
    )
    claimed = await claim(store, "b.csv", T0)
    splitting = await claim(store, "c.csv", T0)
    await store.start_split(splitting.id)
    in_flight = await add(store, splitting.id, 1)
    queued = await add(store, splitting.id, 2)
    await store.mark_submitting(queued.id)
    await store.mark_submitted(queued.id, batch_id=77, marketo_status="Queued", submitted_at=T1)
    await store.mark_submitting(in_flight.id)  # the crash comes while this request is out
    finishing = await split(store, await claim(store, "d.csv", T1), 0)
    await store.reserve_result(finishing.id, result_path="/done/d.csv.result.json")
    complete = await split(store, await claim(store, "e.csv", T1), 0)
    await store.reserve_result(complete.id, result_path="/done/e.csv.result.json")
    await store.finish_file(complete.id, status=FileStatus.COMPLETE, error=None, finished_at=T2)

    store = await reopen(store)
    try:
        found = await store.recover()
        assert isinstance(found, Recovery)
        assert [(c.id, c.status, c.submit_attempts) for c in found.resubmit] == [
            (in_flight.id, ChunkStatus.PENDING, 1)
        ]
        assert [f.id for f in found.claiming] == [claiming.id]
        assert [f.id for f in found.resplit] == [claimed.id, splitting.id]
        assert [f.id for f in found.finishing] == [finishing.id]
        store = await reopen(store)
        assert (await store.recover()).resubmit == []
        after = await store.chunks(file_id=splitting.id)
        assert after[0] == found.resubmit[0]
        assert (after[1].status, after[1].batch_id) == (ChunkStatus.SUBMITTED, 77)
    finally:
        await store.close()


async def test_files_and_chunks_come_in_claim_order(store: Store) -> None:
    late = await claim(store, "late.csv", T2)
    early = await claim(store, "early.csv", T1)
    tie = await claim(store, "tie.csv", T1)  # same time: id decides
    for file in (late, early, tie):
        await store.start_split(file.id)
        for index in (2, 1):
            await add(store, file.id, index)
    assert [f.name for f in await store.files()] == ["early.csv", "tie.csv", "late.csv"]
    assert [f.name for f in await store.files([FileStatus.SPLITTING])] == [
        "early.csv",
        "tie.csv",
        "late.csv",
    ]
    assert await store.files([FileStatus.COMPLETE]) == []
    assert await store.files([]) == []
    order = [(c.file_id, c.index) for c in await store.chunks()]
    assert order == [(f.id, i) for f in (early, tie, late) for i in (1, 2)]
    first = (await store.chunks(file_id=tie.id))[0]
    sending = await store.mark_submitting(first.id)
    assert await store.chunks(statuses=[ChunkStatus.SUBMITTING]) == [sending]
    pending = await store.chunks(file_id=late.id, statuses=[ChunkStatus.PENDING])
    assert [(c.file_id, c.index) for c in pending] == [(late.id, 1), (late.id, 2)]


async def test_api_calls_add_up_per_day_and_persist(store: Store) -> None:
    await store.add_api_calls("2026-11-23", 3)
    await store.add_api_calls("2026-11-23", 4)
    await store.add_api_calls("2026-11-24", 1)
    with pytest.raises(ValueError, match="negative"):
        await store.add_api_calls("2026-11-23", -1)
    store = await reopen(store)
    try:
        assert await store.api_calls("2026-11-23") == 7
        assert await store.api_calls("2026-11-24") == 1
        assert await store.api_calls("2026-11-25") == 0
    finally:
        await store.close()


async def test_the_daily_quota_as_reckoned_is_kept_and_read_back(store: Store) -> None:
    assert await store.quota() is None
    at = datetime(2026, 11, 23, 20, 0, tzinfo=UTC)
    state = QuotaState(
        as_of=at,
        quota=50_000,
        reserve=5_000,
        resets_at=datetime(2026, 11, 24, 6, 0, tzinfo=UTC),
        marketo_count=44_990,
        read_at=at - timedelta(minutes=3),
        next_read_at=at + timedelta(minutes=7),
        ours_since=12,
        ours_today=812,
    )
    await store.save_quota(state)
    await store.save_quota(replace(state, ours_since=13, paused_until=state.resets_at))
    store = await reopen(store)
    try:
        kept = await store.quota()
    finally:
        await store.close()
    assert kept == replace(state, ours_since=13, paused_until=state.resets_at)
    assert kept is not None
    assert (kept.used, kept.limit, kept.creates_paused) == (45_003, 45_000, True)


# -- the event loop and crashes ------------------------------------------------------------------


async def test_event_loop_keeps_running_during_transactions(store: Store) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    seen = [ticks]
    for _ in range(200):
        await store.add_api_calls("2026-11-23", 1)
        seen.append(ticks)
    stop.set()
    await task
    # Blocking SQLite on the loop would leave the ticker no turn between calls.
    assert all(after > before for before, after in itertools.pairwise(seen))
    assert await store.api_calls("2026-11-23") == 200


CRASH_LOOP = """
import asyncio, sys
from pathlib import Path
from orchestrator.store import Store

async def main():
    store = await Store.open(Path(sys.argv[1]))
    n = 0
    while True:
        n += 1
        f = await store.begin_claim(route="leads", name=f"f{n}.csv", source_path="s",
                                    work_path="w", max_chunk_bytes=1, claimed_at=f"{n:08d}")
        await store.finish_claim(f.id)
        await store.start_split(f.id)
        for k in (1, 2, 3):
            c = await store.add_chunk(f.id, index=k, path="p", rows=1, bytes=1, first_line=k)
            await store.mark_submitting(c.id)
        print(f.id, flush=True)  # everything above is committed

asyncio.run(main())
"""


async def test_kill_9_mid_transactions_leaves_a_sound_database(db_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_LOOP, str(db_path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    reported: list[int] = []
    try:
        async with asyncio.timeout(60):
            while len(reported) < 20:
                line = await proc.stdout.readline()
                assert line, "the writer exited early"
                reported.append(int(line))
    finally:
        proc.kill()
        await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -9
    async with await Store.open(db_path) as store:
        assert await store.integrity_check() == "ok"
        known = {f.id for f in await store.files()}
        assert set(reported) <= known
        found = await store.recover()
        assert {c.file_id for c in found.resubmit} >= set(reported)
        assert all(c.submit_attempts == 1 for c in found.resubmit)


# -- packing: several files in one chunk ---------------------------------------------------------


async def packed(store: Store, names: list[str]) -> tuple[list[FileRecord], int]:
    """Files of 10 records each packed into one (unsealed) chunk, oldest first."""
    files = [await claim(store, name, T0) for name in names]
    for file in files:
        await store.start_split(file.id)
    owner = files[0]
    pack = await store.open_pack(
        owner.id, path="/data/work/pack.csv", rows=10, bytes=300, first_line=2, file_rows=10
    )
    for file in files[1:]:
        pack = await store.join_pack(
            pack.id, file.id, rows=10, bytes=250, first_line=2, file_rows=11
        )
    return [await store.get_file(f.id) for f in files], pack.id


async def test_a_pack_is_one_chunk_that_each_of_its_files_sees_as_its_share(store: Store) -> None:
    (a, b, c), chunk_id = await packed(store, ["a.csv", "b.csv", "c.csv"])
    assert [(f.status, f.chunks_total, f.rows) for f in (a, b, c)] == [
        (FileStatus.SPLIT, 1, 10),
        (FileStatus.SPLIT, 1, 11),
        (FileStatus.SPLIT, 1, 11),
    ]
    (job,) = await store.open_packs()
    assert (job.id, job.file_id, job.files, job.sealed) == (chunk_id, a.id, 3, False)
    assert (job.rows, job.bytes, job.job_rows, job.job_bytes) == (30, 800, 30, 800)
    views = await store.members(chunk_id)
    assert [(v.file_id, v.rows, v.bytes, v.first_row) for v in views] == [
        (a.id, 10, 300, 0),
        (b.id, 10, 250, 10),
        (c.id, 10, 250, 20),
    ]
    assert all((v.job_rows, v.job_bytes, v.files) == (30, 800, 3) for v in views)
    assert await store.chunks(file_id=b.id) == [views[1]]
    assert await store.chunks_of([c.id, a.id]) == [views[0], views[2]]
    # An open pack is no job yet: not listed, not sent.
    assert await store.chunks() == []
    with pytest.raises(ValueError, match="not yet sealed"):
        await store.mark_submitting(chunk_id)
    sealed = await store.seal_pack(chunk_id)
    assert sealed.sealed
    assert await store.open_packs() == []
    assert [c.id for c in await store.chunks(statuses=[ChunkStatus.PENDING])] == [chunk_id]
    late = await claim(store, "late.csv", T1)
    await store.start_split(late.id)
    with pytest.raises(ValueError, match="sealed"):
        await store.join_pack(chunk_id, late.id, rows=1, bytes=1, first_line=2, file_rows=1)


async def test_shares_of_a_finished_pack_are_each_files_own(store: Store) -> None:
    (a, b), chunk_id = await packed(store, ["a.csv", "b.csv"])
    await store.seal_pack(chunk_id)
    await store.mark_submitting(chunk_id)
    await store.mark_submitted(chunk_id, batch_id=5, marketo_status="Queued", submitted_at=T1)
    batch = BatchStatus(5, "Complete", rows_processed=17, rows_failed=3, rows_with_warning=1)
    with pytest.raises(ValueError, match="set_shares"):
        await store.set_shares(chunk_id, {a.id: (8, 2, 0), b.id: (9, 1, 1)})
    await store.finish_chunk(
        chunk_id, status=ChunkStatus.COMPLETE, message="", finished_at=T2, batch=batch
    )
    # Before the failures are matched back, a file's share is not known: none is claimed.
    assert [(v.rows_failed, v.attributed) for v in await store.members(chunk_id)] == [
        (0, False),
        (0, False),
    ]
    await store.set_shares(chunk_id, {a.id: (8, 2, 0), b.id: (9, 1, 1)})
    views = await store.members(chunk_id)
    assert [(v.rows_processed, v.rows_failed, v.rows_with_warning) for v in views] == [
        (8, 2, 0),
        (9, 1, 1),
    ]
    assert all(v.attributed and v.batch_id == 5 for v in views)
    (job,) = await store.chunks()
    assert (job.rows_processed, job.rows_failed, job.rows_with_warning) == (17, 3, 1)
    assert (await store.tallies())["rows:processed"] == 17  # Marketo's count, once
    for file in (a, b):
        await store.reserve_result(file.id, result_path=f"/done/{file.name}.result.json")
        await store.finish_file(file.id, status=FileStatus.COMPLETE, error=None, finished_at=T2)


async def test_a_pack_left_open_is_found_by_recovery(store: Store) -> None:
    (a, _b), chunk_id = await packed(store, ["a.csv", "b.csv"])
    joining = await claim(store, "c.csv", T1)
    await store.start_split(joining.id)  # appended, then killed before join_pack
    store = await reopen(store)
    try:
        found = await store.recover()
        assert [(p.id, p.job_bytes, p.sealed) for p in found.open_packs] == [(chunk_id, 550, False)]
        assert [f.id for f in found.resplit] == [joining.id]
        assert (await store.get_file(a.id)).status is FileStatus.SPLIT
    finally:
        await store.close()


async def test_retention_prunes_a_shared_chunk_with_all_of_its_files(store: Store) -> None:
    (a, b), chunk_id = await packed(store, ["a.csv", "b.csv"])
    await store.seal_pack(chunk_id)
    await store.mark_submitting(chunk_id)
    await store.mark_submitted(chunk_id, batch_id=5, marketo_status="Queued", submitted_at=T1)
    await store.finish_chunk(chunk_id, status=ChunkStatus.FAILED, message="x", finished_at=T1)
    await store.reserve_result(a.id, result_path="/done/a.csv.result.json")
    await store.finish_file(a.id, status=FileStatus.FAILED, error="x", finished_at=T1)
    # b still finishing: the chunk cannot go, so neither does a.
    await store.reserve_result(b.id, result_path="/done/b.csv.result.json")
    assert await store.prune_finished(before=T2, limit=10) == 0
    assert [f.id for f in await store.files()] == [a.id, b.id]
    await store.finish_file(b.id, status=FileStatus.FAILED, error="x", finished_at="2026-12-01")
    # b finished later than the cut-off, but goes with a: the chunk is theirs together.
    assert await store.prune_finished(before=T2, limit=1) == 2
    assert await store.files() == []
    assert await store.chunks() == []
    assert await store.integrity_check() == "ok"


# -- the key rule: the order chunks are recorded in, their conflicts (issue 20) -------------------


async def sent(store: Store, chunk_id: int, batch_id: int) -> None:
    await store.mark_submitting(chunk_id)
    await store.mark_submitted(
        chunk_id, batch_id=batch_id, marketo_status="Queued", submitted_at=T1
    )


async def done(store: Store, chunk_id: int) -> None:
    await store.finish_chunk(chunk_id, status=ChunkStatus.COMPLETE, message="", finished_at=T2)


async def test_chunks_take_their_place_in_the_key_order_when_recorded_whole(store: Store) -> None:
    """add_chunk places a chunk at once; a pack only when sealed (an open pack still
    takes rows). The check takes them in that order; again is a no-op."""
    (a, _), pack = await packed(store, ["a.csv", "b.csv"])
    big = await claim(store, "big.csv", T1)
    await store.start_split(big.id)
    first = await add(store, big.id, 1)
    assert [k.chunk_id for k in await store.unchecked()] == [first.id]
    await store.seal_pack(pack)
    second = await add(store, big.id, 2)
    await add(store, big.id, 1)  # a split again after a crash: the same chunk
    await store.seal_pack(pack)
    order = await store.unchecked()
    assert [k.chunk_id for k in order] == [first.id, pack, second.id]
    assert [k.seq for k in order] == sorted(k.seq for k in order)
    assert not any(k.final for k in order)
    assert await store.holds() == {first.id: (), pack: (), second.id: ()}, "unchecked: held"
    await store.record_conflicts(first.id, [])
    await store.record_conflicts(first.id, [])
    assert [k.chunk_id for k in await store.unchecked()] == [pack, second.id]
    assert [k.chunk_id for k in await store.holding_before(order[2].seq)] == [first.id, pack]
    assert a.id in {f.id for f in await store.files()}


async def test_a_conflict_holds_the_later_chunk_until_the_earlier_is_done(store: Store) -> None:
    a = await split(store, await claim(store, "a.csv", T0), 2)
    b = await split(store, await claim(store, "b.csv", T1), 1)
    a1, a2 = await store.chunks(file_id=a.id)
    (b1,) = await store.chunks(file_id=b.id)
    for chunk in (a1, a2):
        await store.record_conflicts(chunk.id, [])
    await store.record_conflicts(b1.id, [a2.id, a1.id])

    holds = await store.holds()
    assert list(holds) == [b1.id]
    assert [(h.chunk_id, h.file, h.ticket, h.index) for h in holds[b1.id]] == [
        (a1.id, "a.csv", a.ticket, 1),
        (a2.id, "a.csv", a.ticket, 2),
    ]
    assert await store.holds([a1.id, a2.id]) == {}
    assert await store.held_chunks() == 1
    await sent(store, a1.id, 11)
    await done(store, a1.id)
    store = await reopen(store)  # the rule holds after a restart
    try:
        (still,) = (await store.holds())[b1.id]
        assert (still.chunk_id, still.status, still.final) == (a2.id, ChunkStatus.PENDING, False)
        await sent(store, a2.id, 12)
        assert (await store.holds())[b1.id][0].status is ChunkStatus.SUBMITTED
        await store.finish_chunk(a2.id, status=ChunkStatus.FAILED, message="x", finished_at=T2)
        assert await store.holds() == {}
        assert await store.held_chunks() == 0
    finally:
        await store.close()


async def test_an_unknown_outcome_holds_keys_until_one_more_job_of_ours_ends(
    store: Store,
) -> None:
    """A copy of a chunk whose create had an unknown outcome may still import after the
    chunk's own resubmission finished, and one refused past max_resubmits may have
    copies at Marketo: either is done once one more of our jobs ended after it."""
    a = await split(store, await claim(store, "a.csv", T0), 2)
    b = await split(store, await claim(store, "b.csv", T1), 2)
    a1, a2 = await store.chunks(file_id=a.id)
    b1, b2 = await store.chunks(file_id=b.id)
    for chunk in (a1, a2, b1):
        await store.record_conflicts(chunk.id, [])
    await store.record_conflicts(b2.id, [a1.id, a2.id])
    await store.mark_submitting(a1.id)
    await store.mark_unknown_outcome(a1.id)
    await sent(store, a1.id, 21)  # the resubmission
    await done(store, a1.id)
    await store.mark_submitting(a2.id)
    await store.mark_unknown_outcome(a2.id)  # past the cap: refused, never sent again
    await store.finish_chunk(a2.id, status=ChunkStatus.FAILED, message="cap", finished_at=T2)
    holds = (await store.holds())[b2.id]
    assert [(h.chunk_id, h.final) for h in holds] == [(a1.id, True), (a2.id, True)]

    await sent(store, b1.id, 22)
    store = await reopen(store)
    try:
        assert len((await store.holds())[b2.id]) == 2
        await done(store, b1.id)  # one more of our jobs ended
        assert await store.holds() == {}
    finally:
        await store.close()


async def test_release_keys_takes_final_chunks_as_done_and_no_others(store: Store) -> None:
    a = await split(store, await claim(store, "a.csv", T0), 2)
    b = await split(store, await claim(store, "b.csv", T1), 1)
    a1, a2 = await store.chunks(file_id=a.id)
    (b1,) = await store.chunks(file_id=b.id)
    await store.record_conflicts(b1.id, [a1.id, a2.id])
    await store.mark_submitting(a1.id)
    await store.mark_unknown_outcome(a1.id)
    await sent(store, a1.id, 31)
    await done(store, a1.id)
    await store.release_keys([a1.id, a2.id])  # a2 is pending: not done, whatever is asked
    assert [h.chunk_id for h in (await store.holds())[b1.id]] == [a2.id]


async def test_retention_forgets_the_key_order_and_conflicts_of_what_it_prunes(
    store: Store,
) -> None:
    a = await split(store, await claim(store, "a.csv", T0), 1)
    b = await split(store, await claim(store, "b.csv", T0), 1)
    (a1,) = await store.chunks(file_id=a.id)
    (b1,) = await store.chunks(file_id=b.id)
    await store.record_conflicts(a1.id, [])
    await store.record_conflicts(b1.id, [a1.id])
    for file, chunk in ((a, a1), (b, b1)):
        await store.mark_submitting(chunk.id)
        await store.mark_unknown_outcome(chunk.id)  # both still hold their keys
        await store.finish_chunk(chunk.id, status=ChunkStatus.FAILED, message="x", finished_at=T1)
        await store.reserve_result(file.id, result_path=f"/failed/{file.name}.result.json")
        await store.finish_file(file.id, status=FileStatus.FAILED, error="x", finished_at=T1)
    assert await store.prune_finished(before=T2, limit=10) == 2

    def rows(conn: sqlite3.Connection) -> tuple[int, int]:
        (order,) = conn.execute("SELECT count(*) FROM key_order").fetchone()
        (conflicts,) = conn.execute("SELECT count(*) FROM conflicts").fetchone()
        return int(order), int(conflicts)

    assert await store._run("count", rows) == (0, 0)
    assert await store.integrity_check() == "ok"
