"""The engine end to end in-process: store → splitter → scheduler → client → poller → results,
against the bundled simulator over loopback, driven through the daemon's --once mode."""

from __future__ import annotations

import asyncio
import csv
import itertools
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchestrator.config import Route, Settings
from orchestrator.filecache import FileCache
from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path
from orchestrator.marketo import MarketoClient
from orchestrator.models import ChunkRecord, ObjectType
from orchestrator.poller import Poller
from orchestrator.scheduler import Scheduler
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.daemons import LockedDaemon
from tests.support.data import all_results, drop_leads, drop_workload, result, write_csv
from tests.support.settings import CARS, CLIENT_ID, LEADS, MEMBERS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator, imports
from tests.support.stages import claimed_file
from tests.support.waiting import wait_until

RESULT_KEYS = {
    "id", "file", "route", "object", "status", "error", "warnings", "rows", "rows_processed",
    "rows_failed", "rows_with_warning", "chunks", "failures_file", "warnings_file",
    "claimed_at", "finished_at",
}  # fmt: skip


async def run_once(settings: Settings) -> int:
    async with asyncio.timeout(60):
        return await LockedDaemon(settings, once=True).run()


@pytest.fixture
async def sim(make_simulator: MakeSimulator) -> Simulator:
    return await make_simulator(**SIM_KNOBS)


async def test_fifo_across_files_and_routes(sim: Simulator, tmp_path: Path) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS, MEMBERS), max_chunk_bytes=700)
    t0 = time.time() - 100
    drop_workload(
        tmp_path,
        leads=60,
        cars=80,
        members=50,
        names=("a.csv", "b.csv", "c.csv"),
        prefix="a",
        car_note="x" * 30,
        mtime=t0,
    )
    drop_leads(tmp_path, "d.csv", 30, prefix="d", mtime=t0 + 3)

    assert await run_once(settings) == 0

    order = []
    for route, name in (
        ("leads", "a.csv"),
        ("cars", "b.csv"),
        ("members", "c.csv"),
        ("leads", "d.csv"),
    ):
        doc = result(tmp_path, "done", route, name)
        assert set(doc) == RESULT_KEYS
        assert doc["status"] == "complete"
        assert doc["error"] is None
        assert len(doc["chunks"]) >= 2, "small max_chunk_bytes must split every file"
        assert [c["index"] for c in doc["chunks"]] == list(range(1, len(doc["chunks"]) + 1))
        order.extend(c["batch_id"] for c in doc["chunks"])
        assert doc["rows"] == doc["rows_processed"] == sum(c["rows"] for c in doc["chunks"])
        assert (tmp_path / "done" / route / name).is_file()
    assert order == sorted(order), "batches are created in claim order, chunk order kept"
    ops = [c["operation"] for c in imports(sim)]
    assert ops[0] == "importLeadUsingPOST"
    assert "importCustomObjectUsingPOST" in ops
    assert "importProgramMemberUsingPOST" in ops
    assert len(sim.records("leads")) == 90
    assert len(sim.records("customobject", api_name="car_c")) == 80
    assert len(sim.records("programmembers", program_id=1001)) == 50


async def test_queue_kept_full_but_never_over_the_limit(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    # Marketo starts nothing until the queue is full, so how fast this machine submits
    # does not matter: the daemon must stop at 10 by itself, then imports resume.
    sim = await make_simulator(**{**SIM_KNOBS, "max_importing": 0})
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), max_chunk_bytes=700)
    drop_leads(tmp_path, "big.csv", 800)
    daemon = asyncio.ensure_future(run_once(settings))

    def ours_outstanding() -> int:
        return int(sim.stats()["max_outstanding"].get(CLIENT_ID, 0))

    await wait_until(lambda: ours_outstanding() >= 10 or daemon.done(), "10 jobs of ours queued")
    sim.set_knobs(max_importing=2)
    assert await daemon == 0
    doc = result(tmp_path, "done", "leads", "big.csv")
    assert len(doc["chunks"]) >= 20
    stats = sim.stats()
    assert stats["max_outstanding"][CLIENT_ID] == 10, "the queue is filled up to Marketo's 10"
    assert stats["max_importing"][CLIENT_ID] == 2
    assert stats["errors"].get("1016", 0) == 0, "no 1016 is caused by us alone"
    assert len(imports(sim)) == len(doc["chunks"]), "each chunk submitted exactly once"


async def test_queued_jobs_setting_caps_outstanding(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "max_importing": 0})
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), queued_jobs=3, max_chunk_bytes=700)
    drop_leads(tmp_path, "big.csv", 300)
    daemon = asyncio.ensure_future(run_once(settings))
    await wait_until(lambda: len(imports(sim)) >= 3 or daemon.done(), "3 jobs of ours queued")
    sim.set_knobs(max_importing=2)
    assert await daemon == 0
    assert sim.stats()["max_outstanding"][CLIENT_ID] == 3


async def test_foreign_jobs_cause_1016_nothing_dropped_order_kept(
    sim: Simulator, tmp_path: Path
) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    drop_leads(tmp_path, "a.csv", 200, prefix="a")
    drop_leads(tmp_path, "b.csv", 100, prefix="b")
    sim.add_foreign_jobs(8, 1.0)
    assert await run_once(settings) == 0
    batches = []
    for name in ("a.csv", "b.csv"):
        doc = result(tmp_path, "done", "leads", name)
        assert doc["status"] == "complete"
        batches.extend(c["batch_id"] for c in doc["chunks"])
    assert batches == sorted(batches)
    assert sim.stats()["errors"].get("1016", 0) >= 1, "the foreign jobs filled the queue"
    assert len(sim.records("leads")) == 300


async def test_one_outstanding_job_per_list(sim: Simulator, tmp_path: Path) -> None:
    listed = Route(dir="leads", object=ObjectType.LEADS, list_id=77)
    settings = fast_settings(sim.base_url, tmp_path, (listed, CARS))
    drop_leads(tmp_path, "a.csv", 150)
    write_csv(tmp_path / "inbox" / "cars" / "b.csv", ["vin"], [[f"V{i}"] for i in range(300)])
    assert await run_once(settings) == 0
    assert sim.stats()["errors"].get("1019", 0) == 0
    jobs = sorted(
        (j for j in sim.jobs() if j.get("list_id") == 77), key=lambda j: float(j["queued_at"])
    )
    assert len(jobs) >= 3
    for before, after in itertools.pairwise(jobs):
        assert float(after["queued_at"]) >= float(before["finished_at"])
    assert len(sim.records("lists", list_id=77)) == 150


async def test_failures_and_warnings_merged_with_source_lines(
    sim: Simulator, tmp_path: Path
) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    bad, warn = {3, 40, 41, 95}, {10, 77}
    source = drop_leads(tmp_path, "mixed.csv", 120, bad=bad, warn=warn)
    lines = physical_lines(source)
    assert await run_once(settings) == 0  # row failures are reported, not fatal

    doc = result(tmp_path, "done", "leads", "mixed.csv")
    assert doc["status"] == "complete"
    assert doc["rows_failed"] == len(bad)
    assert doc["rows_with_warning"] == len(warn)
    assert doc["rows_processed"] == 120 - len(bad)
    assert doc["failures_file"] == "mixed.csv.failures.csv"
    assert doc["warnings_file"] == "mixed.csv.warnings.csv"
    failures = read_rows(tmp_path / "done" / "leads" / doc["failures_file"])
    assert failures[0] == ["email", "firstName", "note", "Import Failure Reason", "Source Line"]
    assert len(failures) == 1 + len(bad)
    assert {row[0] for row in failures[1:]} == {f"p{i}.example.com" for i in bad}
    for row in failures[1:]:
        assert row[3], "Marketo's reason is kept"
        assert int(row[4]) == lines[int(row[0].split(".")[0][1:])]
    warnings = read_rows(tmp_path / "done" / "leads" / doc["warnings_file"])
    assert warnings[0][-2:] == ["Import Warning Reason", "Source Line"]
    assert sorted(int(r[-1]) for r in warnings[1:]) == sorted(lines[i] for i in warn)


async def test_oversized_record_set_aside_rest_lands(sim: Simulator, tmp_path: Path) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    rows = [[f"r{i}@example.com", "F", "n"] for i in range(40)]
    rows[20][2] = "y" * 5_000  # larger than max_chunk_bytes on its own
    write_csv(tmp_path / "inbox" / "leads" / "huge.csv", ["email", "firstName", "note"], rows)
    assert await run_once(settings) == 0
    doc = result(tmp_path, "done", "leads", "huge.csv")
    assert doc["rows"] == 40
    assert doc["rows_processed"] == 39
    assert doc["rows_failed"] == 1
    failures = read_rows(tmp_path / "done" / "leads" / "huge.csv.failures.csv")
    assert len(failures) == 2
    assert failures[1][0] == "r20@example.com"
    assert failures[1][-1] == "22"
    assert "too large" in failures[1][-2]
    assert len(sim.records("leads")) == 39


async def test_file_without_its_lookup_column_fails_before_a_job(
    sim: Simulator, tmp_path: Path
) -> None:
    """Issue 19 item 4: such a file once cost a job that Marketo failed whole ("field
    'email' is not a column"); its header is now checked first, and the file beside it
    goes on."""
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    write_csv(
        tmp_path / "inbox" / "leads" / "nolookup.csv", ["firstName", "lastName"], [["A", "B"]] * 5
    )
    drop_leads(tmp_path, "good.csv", 10)
    assert await run_once(settings) == 1
    doc = result(tmp_path, "failed", "leads", "nolookup.csv")
    assert doc["status"] == "failed"
    assert doc["chunks"] == []
    assert doc["error"] == "the header lacks the key column 'email' of leads"
    assert result(tmp_path, "done", "leads", "good.csv")["status"] == "complete"
    assert [job["rows"] for job in sim.jobs()] == [10], "one job: the good file's"


async def test_bad_input_fails_only_that_file(sim: Simulator, tmp_path: Path) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    (tmp_path / "inbox" / "leads").mkdir(parents=True)
    (tmp_path / "inbox" / "leads" / "empty.csv").write_bytes(b"")
    (tmp_path / "inbox" / "leads" / "latin1.csv").write_bytes(b"email\ncaf\xe9@example.com\n")
    drop_leads(tmp_path, "good.csv", 25)
    assert await run_once(settings) == 1
    empty = result(tmp_path, "failed", "leads", "empty.csv")
    assert empty["error"].startswith("empty.csv: ")
    latin = result(tmp_path, "failed", "leads", "latin1.csv")
    assert "latin1.csv" in latin["error"]
    assert "UTF-8" in latin["error"] or "utf-8" in latin["error"]
    assert "line 2" in latin["error"]
    assert (tmp_path / "failed" / "leads" / "latin1.csv").is_file()
    assert result(tmp_path, "done", "leads", "good.csv")["rows_processed"] == 25


async def test_results_never_overwritten(sim: Simulator, tmp_path: Path) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    drop_leads(tmp_path, "daily.csv", 5, prefix="x")
    assert await run_once(settings) == 0
    drop_leads(tmp_path, "daily.csv", 7, prefix="y")
    assert await run_once(settings) == 0
    first = result(tmp_path, "done", "leads", "daily.csv")
    second = result(tmp_path, "done", "leads", "daily.2.csv")
    assert (first["rows"], second["rows"]) == (5, 7)
    assert second["file"] == "daily.csv"
    assert len(all_results(tmp_path)) == 2


async def test_first_chunk_submitted_before_split_finishes(sim: Simulator, tmp_path: Path) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), max_chunk_bytes=4_000)
    drop_leads(tmp_path, "long.csv", 3_000)
    with capture_logs() as logs:
        assert await run_once(settings) == 0
    events = [e["event"] for e in logs]
    assert events.index("chunk_submitted") < events.index("file_split")


def physical_lines(path: Path) -> dict[int, int]:
    """Row number (0-based data record) to the physical line it starts on."""
    starts, line = {}, 2
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for i, _ in enumerate(reader):
            starts[i] = line
            line = reader.line_num + 1
    return starts


def read_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


async def test_polls_are_spent_only_where_a_status_can_change(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.1})
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), max_chunk_bytes=700)
    drop_leads(tmp_path, "big.csv", 600)
    assert await run_once(settings) == 0
    started = {j["batch_id"]: float(j["started_at"]) for j in sim.jobs()}
    polls = [c for c in sim.calls() if c["operation"] == "getImportLeadStatusUsingGET"]
    assert len(started) >= 20
    # Marketo imports FIFO, two at a time: a job queued behind two of ours cannot change,
    # so no poll of a job comes before it started importing.
    early = [c for c in polls if float(c["t"]) < started[c["batch_id"]]]
    assert early == []
    assert len(polls) <= 4 * len(started), "a handful of polls per job, not one per interval each"


# -- the key rule: the scheduler and the poller against the simulator (issue 20) --------------


async def test_the_key_rule_holds_a_chunk_until_the_earlier_one_sharing_a_key_is_done(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    """old.csv's last chunk ends with s@x.com = old; new.csv, claimed after it, starts
    with S@x.com = new. Marketo imports two jobs at once and applies rows as it goes:
    without the rule new.csv's job would import beside old.csv's last and its row land
    first, so the older value would win. Key files are written by hand beside the
    chunks, as the split stage leaves them; other.csv shares no key and passes."""
    sim = await make_simulator(job_overhead=0.3, rows_per_second=50.0)
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    store = await Store.open(tmp_path / "state.db")
    number = itertools.count(1)

    async def add_file(name: str, chunks: list[list[tuple[str, str]]]) -> None:
        file = await claimed_file(store, "leads", name, number=next(number))
        for index, rows in enumerate(chunks, 1):
            path = settings.layout.chunk_dir(file.id) / f"chunk-{index:05d}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{e},{v}\n" for e, v in [("email", "title"), *rows]))
            hashes = (key_hash(LEAD_NAMESPACE, [email]) for email, _ in rows)
            KeySet.of(h for h in hashes if h is not None).save(keys_path(path), fsync=False)
            await store.add_chunk(
                file.id, index=index, path=str(path), rows=len(rows), bytes=0, first_line=2
            )
        await store.finish_split(file.id, rows=sum(map(len, chunks)), chunks_total=len(chunks))

    def users(start: int, value: str) -> list[tuple[str, str]]:
        return [(f"u{n}@x.com", value) for n in range(start, start + 5)]

    await add_file(
        "old.csv", [users(0, "old"), users(5, "old"), [*users(10, "old"), ("s@x.com", "old")]]
    )
    await add_file("new.csv", [[("S@x.com", "new"), *users(20, "new")]])
    await add_file("other.csv", [users(30, "other")])

    finals: list[ChunkRecord] = []
    files = FileCache(store)
    stop = asyncio.Event()
    async with MarketoClient(settings) as client:

        async def final(chunk: ChunkRecord) -> None:
            scheduler.job_finished(chunk.id)
            finals.append(chunk)

        poller = Poller(settings, store, client, on_chunk_final=final, files=files)
        scheduler = Scheduler(
            settings,
            store,
            client,
            on_submitted=poller.submitted,
            on_chunk_final=final,
            files=files,
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(scheduler.run(stop))
            group.create_task(poller.run(stop))
            await wait_until(lambda: len(finals) == 5, "every chunk final", within=60.0)
            stop.set()
    await store.close()

    jobs = {job["batch_id"]: job for job in sim.jobs()}
    batch = {Path(c.path).parent.name + "/" + Path(c.path).stem: c.batch_id for c in finals}
    last_old, new, other = batch["1/chunk-00003"], batch["2/chunk-00001"], batch["3/chunk-00001"]
    assert jobs[new]["started_at"] >= jobs[last_old]["finished_at"]
    assert other < new, "other.csv shares no key: it passed the held chunk"
    applied = sim.history("leads", "s@x.com")
    assert [(h["batch_id"], h["values"]["title"]) for h in applied] == [
        (last_old, "old"),
        (new, "new"),
    ]
    assert [r["title"] for r in sim.records("leads") if r["email"].lower() == "s@x.com"] == ["new"]
