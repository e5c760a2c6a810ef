"""The watched inbox: real directories in tmp_path, a real Store on a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from orchestrator.config import Route, Settings, WatchSettings
from orchestrator.errors import ConfigError
from orchestrator.models import FileRecord, FileStatus, ObjectType
from orchestrator.spool import Spool, fs
from orchestrator.spool import claims as claims_module
from orchestrator.spool.claims import CLAIM_BATCH
from orchestrator.store import Store
from tests.support.waiting import wait_until

DEADLINE = 10.0  # seconds any awaited condition may take before the test fails
ROUTES = (
    Route("leads", ObjectType.LEADS),
    Route("cars", ObjectType.CUSTOM_OBJECT, api_name="car_c"),
)


def make_settings(data_dir: Path, *, settle: float = 0.0, force_polling: bool = False) -> Settings:
    watch = WatchSettings(settle_seconds=settle, force_polling=force_polling)
    return Settings(data_dir=data_dir, watch=watch, routes=ROUTES)


class Claims:
    """Collects on_claimed calls; tests wait on it with a deadline."""

    def __init__(self) -> None:
        self.records: list[FileRecord] = []
        self.sizes: dict[int, int] = {}  # file id -> size of the work path when claimed
        self._changed = asyncio.Condition()

    async def __call__(self, record: FileRecord) -> None:
        if record.error is None:
            self.sizes[record.id] = size_of(record.work_path)
        async with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    async def wait_for(self, count: int, within: float = DEADLINE) -> list[FileRecord]:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.records) >= count)
        return self.records


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def incoming(data_dir: Path) -> Path:
    """Where claimed entries land (absolute, as the spool records it)."""
    return data_dir.absolute() / "work" / "incoming"


SpoolFactory = Callable[..., tuple[Spool, Claims]]


@pytest.fixture
def make_spool(data_dir: Path, store: Store) -> SpoolFactory:
    """Spool with its Claims collector; the tree is prepared."""

    def make(
        *,
        settle: float = 0.0,
        force_polling: bool = False,
        on_store: Store | None = None,
        **kw: Any,
    ) -> tuple[Spool, Claims]:
        claims = Claims()
        settings = make_settings(data_dir, settle=settle, force_polling=force_polling)
        spool = Spool(settings, on_store or store, claims, **kw)
        spool.prepare()
        return spool, claims

    return make


@contextlib.asynccontextmanager
async def running(spool: Spool) -> AsyncIterator[asyncio.Task[None]]:
    """spool.run() in a task, ready when the watcher runs; stopped (and checked) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(spool.run(stop))
    try:
        # `running` is a readiness flag with no event to await: polled, with a deadline.
        await wait_until(
            lambda: spool.running or task.done(), "the watcher", within=DEADLINE, poll=0.01
        )
        assert spool.running, task
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await task
    assert not spool.running


def drop(directory: Path, name: str, data: bytes) -> Path:
    """Write elsewhere, rename in: the way writers are told to deliver."""
    staging = directory / f".{name}.part"
    staging.write_bytes(data)
    return staging.rename(directory / name)


def inbox(data_dir: Path, route: str = "leads") -> Path:
    return data_dir / "inbox" / route


def size_of(path: str | Path) -> int:
    return os.path.getsize(path)


def on_disk(path: str | Path) -> tuple[str, object]:
    """What is at `path`, never following a symlink nor opening a FIFO."""
    if os.path.islink(path):
        return ("symlink", os.readlink(path))
    if not os.path.lexists(path):
        return ("missing", None)
    if Path(path).is_fifo():
        return ("fifo", None)
    if Path(path).is_dir():
        return ("dir", sorted(p.name for p in Path(path).iterdir()))
    return ("file", Path(path).read_bytes())


MISSING = ("missing", None)


# -- layout -----------------------------------------------------------------------------------


def test_prepare_creates_the_tree(data_dir: Path, store: Store) -> None:
    spool = Spool(make_settings(data_dir), store, Claims())
    spool.prepare()
    spool.prepare()  # again on an existing tree is fine
    for route in ("leads", "cars"):
        for top in ("inbox", "done", "failed"):
            assert (data_dir / top / route).is_dir(), (top, route)
    assert (data_dir / "work" / "incoming").is_dir()
    assert not spool.running
    assert spool.pending() == 0


def test_prepare_refuses_an_inbox_on_another_filesystem(data_dir: Path, store: Store) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(data_dir.parent).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than tmp_path")
    elsewhere = shm / f"spool-test-{os.getpid()}-{time.time_ns()}"
    elsewhere.mkdir()
    try:
        (data_dir / "inbox").mkdir(parents=True)
        (data_dir / "inbox" / "cars").symlink_to(elsewhere, target_is_directory=True)
        spool = Spool(make_settings(data_dir), store, Claims())
        with pytest.raises(ConfigError, match="different filesystems") as caught:
            spool.prepare()
        assert str(data_dir / "inbox" / "cars") in str(caught.value)
        assert str(data_dir / "work" / "incoming") in str(caught.value)
    finally:
        elsewhere.rmdir()


def test_prepare_names_a_path_that_is_not_a_directory(data_dir: Path, store: Store) -> None:
    (data_dir / "inbox").mkdir(parents=True)
    (data_dir / "inbox" / "leads").write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory") as caught:
        Spool(make_settings(data_dir), store, Claims()).prepare()
    assert caught.value.key == "data_dir"
    assert str(data_dir / "inbox" / "leads") in str(caught.value)


# -- scanning ---------------------------------------------------------------------------------


async def test_files_present_at_start_are_claimed_in_mtime_order(
    make_spool: SpoolFactory, data_dir: Path, store: Store, incoming: Path
) -> None:
    spool, claims = make_spool()
    newer = drop(inbox(data_dir, "leads"), "b.csv", b"email\nb@example.com\n")
    older = drop(inbox(data_dir, "cars"), "cars.tsv", b"vin\n123\n")
    tie = drop(inbox(data_dir, "leads"), "a.csv", b"email\na@example.com\n")
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    os.utime(tie, ns=(2_000_000_000, 2_000_000_000))

    assert await spool.scan() == 3

    assert [r.name for r in claims.records] == ["cars.tsv", "a.csv", "b.csv"]
    stamps = [r.claimed_at for r in claims.records]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 3
    assert all(s.endswith("Z") and len(s) == len("2026-11-23T14:03:11.000000Z") for s in stamps)
    for record in claims.records:
        assert record.status is FileStatus.CLAIMED
        assert record.error is None
        assert on_disk(record.source_path) == MISSING
        assert on_disk(record.work_path)[0] == "file"
        work = Path(record.work_path)
        assert work.parent == incoming
        assert work.name.endswith("-" + record.name)
    assert (await store.files()) == claims.records
    assert list(inbox(data_dir, "leads").iterdir()) == []
    assert await spool.scan() == 0


async def test_many_files_are_claimed_in_batches_in_mtime_order(
    make_spool: SpoolFactory, data_dir: Path, store: Store
) -> None:
    spool, claims = make_spool()
    count = 2 * CLAIM_BATCH + 7
    for n in range(count):
        path = drop(inbox(data_dir, ("leads", "cars")[n % 2]), f"f{n:04d}.csv", b"email\n")
        os.utime(path, ns=(10**9 * (count - n), 10**9 * (count - n)))  # the last is oldest

    assert await spool.scan() == count

    names = [r.name for r in claims.records]
    assert names == [f"f{n:04d}.csv" for n in reversed(range(count))]
    stamps = [r.claimed_at for r in claims.records]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == count
    assert await store.files() == claims.records
    assert all(on_disk(r.work_path)[0] == "file" for r in claims.records)


async def test_a_crash_between_a_batch_of_intents_and_their_renames_claims_each_once(
    make_spool: SpoolFactory,
    data_dir: Path,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool, claims = make_spool()
    for n in range(5):
        drop(inbox(data_dir), f"f{n}.csv", f"email\n{n}@example.com\n".encode())

    def killed_after_two(moves: list[Any]) -> list[Any]:
        fs.move_entries(moves[:2])
        raise KeyboardInterrupt  # stands for the kill: three intents left unmoved

    monkeypatch.setattr(claims_module, "move_entries", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        await spool.scan()
    assert claims.records == []
    assert {f.status for f in await store.files()} == {FileStatus.CLAIMING}
    monkeypatch.undo()

    after, claims = make_spool()
    await after.recover_claims()
    assert await after.scan() == 0
    assert sorted(r.name for r in claims.records) == [f"f{n}.csv" for n in range(5)]
    assert [f.status for f in await store.files()] == [FileStatus.CLAIMED] * 5
    assert list(inbox(data_dir).iterdir()) == []


async def test_ignored_names_wait_until_renamed(make_spool: SpoolFactory, data_dir: Path) -> None:
    spool, claims = make_spool()
    leads = inbox(data_dir)
    for name in ("big.csv.part", "big2.csv.TMP", ".hidden.csv"):
        (leads / name).write_text("email\nx@example.com\n")

    assert await spool.scan() == 0
    assert spool.pending() == 0
    assert sorted(p.name for p in leads.iterdir()) == [
        ".hidden.csv",
        "big.csv.part",
        "big2.csv.TMP",
    ]

    (leads / "big.csv.part").rename(leads / "big.csv")
    (leads / "big2.csv.TMP").rename(leads / "big2.csv")
    (leads / ".hidden.csv").rename(leads / "hidden.csv")
    assert await spool.scan() == 3
    assert sorted(r.name for r in claims.records) == ["big.csv", "big2.csv", "hidden.csv"]


async def test_same_name_twice_gets_distinct_work_paths(
    make_spool: SpoolFactory, data_dir: Path
) -> None:
    spool, claims = make_spool()
    drop(inbox(data_dir), "daily.csv", b"email\nfirst@example.com\n")
    assert await spool.scan() == 1
    drop(inbox(data_dir), "daily.csv", b"email\nsecond@example.com\n")
    assert await spool.scan() == 1

    first, second = claims.records
    assert first.name == second.name == "daily.csv"
    assert first.work_path != second.work_path
    assert on_disk(first.work_path) == ("file", b"email\nfirst@example.com\n")
    assert on_disk(second.work_path) == ("file", b"email\nsecond@example.com\n")


async def test_long_name_keeps_its_extension_in_the_work_path(
    make_spool: SpoolFactory, data_dir: Path
) -> None:
    spool, claims = make_spool()
    name = "x" * 246 + ".csv"  # 250 bytes: no room left for the claim-time prefix
    (inbox(data_dir) / name).write_bytes(b"email\n")
    assert await spool.scan() == 1
    (record,) = claims.records
    assert record.name == name
    assert Path(record.work_path).name.endswith("xx.csv")
    assert len(Path(record.work_path).name) <= 255
    assert on_disk(record.work_path) == ("file", b"email\n")


async def test_settle_waits_until_a_file_written_in_place_stops_growing(
    make_spool: SpoolFactory, data_dir: Path
) -> None:
    spool, claims = make_spool(settle=0.3, rescan_seconds=3600)
    target = inbox(data_dir) / "slow.csv"
    finished = asyncio.Event()

    async def write_slowly() -> int:
        with target.open("ab") as fh:
            fh.write(b"email\n")
        for i in range(10):  # the workload: one row every 0.1 s for about a second
            await asyncio.sleep(0.1)
            with target.open("ab") as fh:
                fh.write(f"row{i}@example.com\n".encode())
        finished.set()
        return target.stat().st_size

    async with running(spool):
        writer = asyncio.create_task(write_slowly())
        await claims.wait_for(1)
        assert finished.is_set(), "claimed while the writer was still appending"
        final_size = await writer

    (record,) = claims.records
    assert claims.sizes[record.id] == final_size
    assert size_of(record.work_path) == final_size
    assert not target.exists()
    assert spool.pending() == 0


async def test_drain_waits_out_settle_and_growth(make_spool: SpoolFactory, data_dir: Path) -> None:
    spool, claims = make_spool(settle=0.3)
    leads = inbox(data_dir)
    drop(leads, "ready.csv", b"email\na@example.com\n")
    (leads / "later.csv.part").write_text("email\n")  # ignored: must not keep drain waiting
    growing = leads / "growing.csv"
    growing.write_bytes(b"email\n")

    async def grow() -> int:
        for i in range(5):
            await asyncio.sleep(0.1)
            with growing.open("ab") as fh:
                fh.write(f"g{i}@example.com\n".encode())
        return growing.stat().st_size

    grower = asyncio.create_task(grow())
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE):
        await spool.drain()
    assert time.monotonic() - started >= 0.3
    assert grower.done()
    final_size = grower.result()

    by_name = {r.name: r for r in claims.records}
    assert sorted(by_name) == ["growing.csv", "ready.csv"]
    assert claims.sizes[by_name["growing.csv"].id] == final_size
    assert (leads / "later.csv.part").exists()


async def test_unmovable_file_warns_once_and_stays_until_it_can_move(
    make_spool: SpoolFactory, data_dir: Path, store: Store
) -> None:
    spool, claims = make_spool()
    incoming = data_dir / "work" / "incoming"
    incoming.rmdir()
    incoming.write_text("in the way")  # the rename target's directory cannot be made
    source = drop(inbox(data_dir), "stuck.csv", b"email\n")

    with structlog.testing.capture_logs() as logs:
        assert await spool.scan() == 0
        assert await spool.scan() == 0
        await spool.drain()  # an entry that cannot move does not keep drain waiting
    failed = [e for e in logs if e["event"] == "claim_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["file"] == "stuck.csv"
    assert source.exists()
    assert await store.files() == []
    assert spool.pending() == 0

    incoming.unlink()
    assert await spool.scan() == 1
    assert claims.records[0].name == "stuck.csv"


async def test_a_name_that_is_not_utf8_is_left_alone(
    make_spool: SpoolFactory, data_dir: Path, store: Store
) -> None:
    spool, _ = make_spool()
    raw = drop(inbox(data_dir), os.fsdecode(b"bad-\xff.csv"), b"email\n")
    with structlog.testing.capture_logs() as logs:
        assert await spool.scan() == 0
    assert [e["event"] for e in logs] == ["claim_failed"]
    assert "UTF-8" in logs[0]["reason"]
    assert on_disk(raw) == ("file", b"email\n")
    assert await store.files() == []


async def test_route_directory_trouble_warns_once_and_spares_other_routes(
    make_spool: SpoolFactory, data_dir: Path
) -> None:
    spool, claims = make_spool()
    cars = inbox(data_dir, "cars")
    cars.rmdir()
    drop(inbox(data_dir, "leads"), "a.csv", b"email\n")
    with structlog.testing.capture_logs() as logs:
        assert await spool.scan() == 1
        assert await spool.scan() == 0
    assert [(e["event"], e["route"], e["problem"]) for e in logs if "problem" in e] == [
        ("route_directory_problem", "cars", "missing: recreated")
    ]
    assert on_disk(cars) == ("dir", [])

    cars.rmdir()
    cars.write_text("someone put a file here")
    drop(inbox(data_dir, "leads"), "b.csv", b"email\n")
    with structlog.testing.capture_logs() as logs:
        assert await spool.scan() == 1
        assert await spool.scan() == 0
    problems = [e for e in logs if e["event"] == "route_directory_problem"]
    assert len(problems) == 1
    assert problems[0]["problem"].startswith("cannot be listed")
    assert [r.name for r in claims.records] == ["a.csv", "b.csv"]


# -- entries that are never read ------------------------------------------------------------------


async def test_symlink_is_claimed_with_an_error_and_moved_as_a_link(
    make_spool: SpoolFactory, data_dir: Path, tmp_path: Path
) -> None:
    spool, claims = make_spool()
    secret = tmp_path / "outside.csv"
    secret.write_text("email\nnot-for-marketo@example.com\n")
    (inbox(data_dir) / "link.csv").symlink_to(secret)
    (inbox(data_dir) / "dangling.csv").symlink_to(tmp_path / "nowhere")

    with structlog.testing.capture_logs() as logs:
        assert await spool.scan() == 2

    for record in claims.records:
        assert record.status is FileStatus.CLAIMED
        assert record.error is not None
        assert record.error.startswith("symbolic link")
        assert on_disk(record.work_path)[0] == "symlink"  # the link itself moved
        assert on_disk(record.source_path) == MISSING
    link = next(r for r in claims.records if r.name == "link.csv")
    assert on_disk(link.work_path) == ("symlink", str(secret))
    assert secret.read_text() == "email\nnot-for-marketo@example.com\n"
    refused = [e for e in logs if e["event"] == "refused_entry"]
    assert len(refused) == 2
    assert all(e["log_level"] == "warning" for e in refused)


@pytest.mark.timeout(60)
async def test_fifo_is_claimed_with_an_error_without_opening_it(
    make_spool: SpoolFactory, data_dir: Path
) -> None:
    spool, claims = make_spool()
    os.mkfifo(inbox(data_dir) / "pipe.csv")
    async with asyncio.timeout(DEADLINE):  # opening a FIFO with no writer would hang here
        assert await spool.scan() == 1
    (record,) = claims.records
    assert record.error is not None
    assert record.error.startswith("named pipe (FIFO)")
    assert on_disk(record.work_path) == ("fifo", None)


async def test_directory_in_a_route_dir_is_claimed_with_an_error(
    make_spool: SpoolFactory, data_dir: Path
) -> None:
    spool, claims = make_spool()
    nested = inbox(data_dir) / "batch"
    nested.mkdir()
    (nested / "inside.csv").write_text("email\n")

    assert await spool.scan() == 1
    (record,) = claims.records
    assert record.error is not None
    assert record.error.startswith("directory")
    assert on_disk(record.work_path) == ("dir", ["inside.csv"])
    assert not nested.exists()


async def test_unrouted_entries_are_left_alone_with_one_warning(
    make_spool: SpoolFactory, data_dir: Path, store: Store
) -> None:
    spool, _ = make_spool()
    stray = data_dir / "inbox" / "contacts"
    stray.mkdir()
    (stray / "people.csv").write_text("email\n")
    loose = data_dir / "inbox" / "loose.csv"
    loose.write_text("email\n")
    (data_dir / "inbox" / ".DS_Store").write_text("")

    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert await spool.scan() == 0
    events = sorted((e["event"], e["log_level"], e["path"]) for e in logs)
    assert events == [
        ("unrouted_directory", "warning", str(stray.absolute())),
        ("unrouted_file", "warning", str(loose.absolute())),
    ]
    assert (stray / "people.csv").read_text() == "email\n"
    assert loose.exists()
    assert await store.files() == []


# -- run(): events as hints -----------------------------------------------------------------------


@pytest.mark.parametrize("force_polling", [False, True], ids=["inotify", "polling"])
async def test_run_claims_on_an_event_long_before_the_rescan(
    make_spool: SpoolFactory, data_dir: Path, force_polling: bool
) -> None:
    # settle 0.3 and one rename event: the claim must come from the scheduled settle
    # re-check, since nothing else happens before the hour-long rescan.
    spool, claims = make_spool(settle=0.3, force_polling=force_polling, rescan_seconds=3600)
    drop(inbox(data_dir, "cars"), "before.csv", b"vin\n1\n")  # found by the startup scan
    async with running(spool):
        await claims.wait_for(1)
        started = time.monotonic()
        drop(inbox(data_dir, "leads"), "after.csv", b"email\na@example.com\n")
        await claims.wait_for(2, within=60.0)
        elapsed = time.monotonic() - started
    assert [r.name for r in claims.records] == ["before.csv", "after.csv"]
    assert 0.3 <= elapsed < 60.0, "settled, then claimed long before the hour-long rescan"


# -- exactly once, across instances and crashes -------------------------------------------------


async def test_a_file_is_claimed_once_across_instances_and_restarts(
    make_spool: SpoolFactory, data_dir: Path, tmp_path: Path, store: Store
) -> None:
    first, first_claims = make_spool()
    drop(inbox(data_dir), "once.csv", b"email\n")
    assert await first.scan() == 1

    second, second_claims = make_spool()
    await second.recover_claims()
    assert await second.scan() == 0

    reopened = await Store.open(tmp_path / "state.db")
    try:
        third, third_claims = make_spool(on_store=reopened)
        await third.recover_claims()
        assert await third.scan() == 0
        assert [f.name for f in await reopened.files()] == ["once.csv"]
    finally:
        await reopened.close()
    assert len(first_claims.records) == 1
    assert second_claims.records == third_claims.records == []


@pytest.mark.parametrize("crash_point", ["before_rename", "after_rename", "source_vanished"])
async def test_recover_claims_completes_what_a_crash_left(
    make_spool: SpoolFactory, data_dir: Path, store: Store, incoming: Path, crash_point: str
) -> None:
    spool, claims = make_spool()
    source = drop(inbox(data_dir), "crash.csv", b"email\nc@example.com\n")
    work = incoming / "1700000000000000000-crash.csv"
    record = await store.begin_claim(
        route="leads",
        name="crash.csv",
        source_path=str(source),
        work_path=str(work),
        max_chunk_bytes=1000,
        claimed_at="2023-11-14T22:13:20.000000Z",
    )
    if crash_point == "after_rename":
        source.rename(work)
    elif crash_point == "source_vanished":
        source.unlink()

    await spool.recover_claims()
    assert await spool.scan() == 0  # nothing left in the inbox to claim a second time

    if crash_point == "source_vanished":
        assert claims.records == []
        assert await store.files() == []
    else:
        (done,) = claims.records
        assert done.id == record.id
        assert done.status is FileStatus.CLAIMED
        assert work.read_bytes() == b"email\nc@example.com\n"
        assert not source.exists()
        assert await store.files() == [done]


async def test_scan_finishes_a_half_done_claim_before_looking_at_the_inbox(
    make_spool: SpoolFactory, data_dir: Path, store: Store, incoming: Path
) -> None:
    spool, claims = make_spool()
    source = drop(inbox(data_dir), "half.csv", b"email\n")
    work = incoming / "1-half.csv"
    await store.begin_claim(
        route="leads",
        name="half.csv",
        source_path=str(source),
        work_path=str(work),
        max_chunk_bytes=1000,
        claimed_at="2023-11-14T22:13:20.000000Z",
    )
    await spool.scan()  # without recover_claims first: must not claim the file again
    assert [r.name for r in claims.records] == ["half.csv"]
    assert [(f.status, f.work_path) for f in await store.files()] == [
        (FileStatus.CLAIMED, str(work))
    ]
