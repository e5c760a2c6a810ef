"""Packing small files into shared chunks (issue 13): which files share a chunk, what the
pack file holds, when a pack is sealed, and the daemon end to end against the simulator.

The packing rules are tested on the packer alone: small files cut by the real splitter
as the split stage cuts them (one chunk, no fsync) and handed to it, over a real store,
with a clock moved by hand and the backlog and "sealed" callbacks as plain fakes. The
end-to-end ones run the daemon in-process against the simulator on loopback.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchestrator import splitter
from orchestrator.config import Settings
from orchestrator.daemon import Daemon
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.models import ChunkRecord, ChunkStatus, FileRecord, FileStatus
from orchestrator.packer import Packer
from orchestrator.pipeline import Pipeline
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.daemons import LockedDaemon
from tests.support.data import LEAD_HEADER, drop_leads, lead_rows, result, result_docs, write_csv
from tests.support.settings import CARS, LEADS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator, imports
from tests.support.stages import FakeClock, claimed_file
from tests.support.waiting import wait_until

UNPACKED = replace(LEADS, dir="solo", pack=False)
NEVER = 3600.0  # pack_wait_seconds that no test waits out


# -- the packer alone over a real store ------------------------------------------------------


@dataclass
class Packs:
    """A packer fed by hand: claim a small file, cut it, hand it over, look at the store."""

    packer: Packer
    store: Store
    settings: Settings
    src: Path
    clock: FakeClock
    sealed: list[ChunkRecord] = field(default_factory=list)
    waiting: bool = False  # the split stage's backlog, as the packer asks for it
    claims: int = 0

    async def add(
        self, route: str, name: str, text: str | bytes, *, max_chunk_bytes: int | None = None
    ) -> FileRecord:
        """Claim `text` as `name` of `route` (after every earlier claim), cut it as the
        split stage cuts a small file, and give its one chunk to the packer."""
        self.claims += 1
        path = self.src / f"{self.claims}-{name}"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        limit = max_chunk_bytes or self.settings.limits.max_chunk_bytes
        file = await claimed_file(
            self.store, route, name, number=self.claims, work_path=str(path), max_chunk_bytes=limit
        )
        config = self.settings.route(route)
        assert config is not None
        fmt = config.format_for(name)
        out = self.settings.layout.chunk_dir(file.id)
        events = list(splitter.split_file(path, out, max_bytes=limit, fmt=fmt, fsync=False))
        (chunk,) = [e for e in events if isinstance(e, splitter.Chunk)]
        (done,) = [e for e in events if isinstance(e, splitter.SplitDone)]
        await self.packer.add(file, chunk, done, fmt)
        return await self.store.get_file(file.id)

    async def chunk_ids(self, file: FileRecord) -> list[int]:
        return [c.id for c in await self.store.chunks(file_id=file.id)]

    async def job(self, file: FileRecord) -> ChunkRecord:
        """The one chunk of a small file, as the job it is."""
        (view,) = await self.store.chunks(file_id=file.id)
        jobs = [*await self.store.open_packs(), *await self.store.chunks()]
        return next(c for c in jobs if c.id == view.id)


def make_packs(store: Store, tmp_path: Path, **limits: float) -> Packs:
    settings = fast_settings("http://marketo.invalid", tmp_path / "data", (LEADS, CARS), **limits)
    (tmp_path / "src").mkdir()
    clock = FakeClock()
    packs = Packs(
        Packer(settings, store, on_sealed=lambda _: None, clock=clock),
        store,
        settings,
        tmp_path / "src",
        clock,
    )
    packs.packer.on_sealed = packs.sealed.append
    packs.packer.backlog = lambda: packs.waiting
    return packs


@pytest.fixture
async def packs(store: Store, tmp_path: Path) -> Packs:
    return make_packs(store, tmp_path, max_chunk_bytes=600, pack_wait_seconds=NEVER)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], delimiter: str = ",") -> str:
    out = io.StringIO(newline="")
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def leads(n: int, prefix: str) -> str:
    return table(LEAD_HEADER, lead_rows(n, prefix=prefix))


async def test_small_files_share_by_route_format_and_header(packs: Packs) -> None:
    a = await packs.add("leads", "a.csv", leads(2, "a"))
    b = await packs.add("leads", "b.csv", "\ufeff" + leads(2, "b").replace("note", " note "))
    other_header = await packs.add("leads", "c.csv", table(["email", "lastName"], [["c@x", "C"]]))
    tsv = await packs.add("leads", "d.tsv", table(LEAD_HEADER, [["d@x", "D", "n"]], "\t"))
    car1 = await packs.add("cars", "e.csv", table(["vin"], [["V1"]]))
    car2 = await packs.add("cars", "f.csv", table(["vin"], [["V2"]]))
    z = await packs.add("leads", "z.csv", leads(1, "z"))

    (shared,) = set(await packs.chunk_ids(a))
    assert await packs.chunk_ids(b) == await packs.chunk_ids(z) == [shared], (
        "BOM and padded names do not keep files of one header apart"
    )
    (cars,) = set(await packs.chunk_ids(car1))
    assert await packs.chunk_ids(car2) == [cars]
    alone = [i for f in (other_header, tsv) for i in await packs.chunk_ids(f)]
    ids = [shared, cars, *alone]
    assert len(ids) == len(set(ids)) == 4, "another header, format or route: apart"
    members = await packs.store.members(shared)
    assert [m.file_id for m in members] == [a.id, b.id, z.id], "in claim order, a the owner"
    assert [m.first_row for m in members] == [0, 2, 4]
    assert all(f.status is FileStatus.SPLIT for f in (a, b, z, car1, tsv))
    assert [p.id for p in await packs.store.open_packs()] == [shared, *alone[:1], alone[1], cars]
    # Open packs are not jobs yet: nothing waits for a queue slot.
    assert await packs.store.chunks(statuses=[ChunkStatus.PENDING]) == []
    assert packs.sealed == []


async def test_drained_seals_every_pack_and_it_goes_in_its_oldest_files_place(
    packs: Packs,
) -> None:
    a = await packs.add("leads", "a.csv", leads(2, "a"))
    # A big file claimed after a.csv: its own chunk, recorded as the split stage does.
    packs.claims += 1
    big = await claimed_file(packs.store, "leads", "big.csv", number=packs.claims)
    await packs.store.add_chunk(
        big.id, index=1, path="/data/work/chunks/big-1.csv", rows=9, bytes=500, first_line=2
    )
    await packs.store.finish_split(big.id, rows=9, chunks_total=1)
    await packs.add("leads", "b.csv", leads(1, "b"))
    e = await packs.add("cars", "e.csv", table(["vin"], [["V1"]]))

    with capture_logs() as logs:
        await packs.packer.drained()

    assert [e["reason"] for e in logs if e["event"] == "pack_sealed"] == ["drained"] * 2
    assert [(c.file_id, c.files) for c in packs.sealed] == [(a.id, 2), (e.id, 1)]
    pending = await packs.store.chunks(statuses=[ChunkStatus.PENDING])
    assert [c.file_id for c in pending] == [a.id, big.id, e.id], (
        "sealed late, the pack still goes out in the place of its oldest file: before big.csv"
    )
    assert (pending[0].files, pending[0].rows) == (2, 3)
    assert await packs.store.open_packs() == []


async def test_a_pack_holds_the_header_once_then_each_files_records_byte_for_byte(
    packs: Packs,
) -> None:
    texts = [
        leads(2, "a"),
        leads(1, "b").rstrip("\n"),  # no line ending after its last record
        "email,firstName,note\r\nc@x,C,n\r\n",  # CRLF, same columns
    ]
    files = [await packs.add("leads", f"{n}.csv", t) for n, t in zip("abc", texts, strict=True)]
    job = await packs.job(files[0])
    data = read(job.path)
    body = [t.encode().split(b"\n", 1)[1] for t in texts]
    assert data == texts[0].encode() + body[1] + b"\n" + body[2], (
        "a line ending is added after a record that had none, and only then"
    )
    assert (job.bytes, job.rows, job.files) == (len(data), 4, 3)
    members = await packs.store.members(job.id)
    assert sum(m.bytes for m in members) == len(data)
    assert [m.bytes for m in members] == [len(texts[0]), len(body[1]), 1 + len(body[2])]
    assert [(m.first_row, m.first_line) for m in members] == [(0, 2), (2, 2), (3, 2)]
    assert not (packs.settings.layout.chunk_dir(files[1].id) / "chunk-00001.csv").exists()


async def test_a_full_pack_is_sealed_and_the_next_file_opens_another(packs: Packs) -> None:
    text = leads(3, "p")  # 3 records: 4 such files do not fit under 600 bytes
    size, header = len(text), len(text.split("\n", 1)[0]) + 1
    fit = 1 + (600 - 1 - size) // (size - header)  # files whose records fit in one pack
    with capture_logs() as logs:
        files = [await packs.add("leads", f"p{i}.csv", text) for i in range(fit + 2)]
    chunk_ids = [(await packs.chunk_ids(f))[0] for f in files]
    first, second = chunk_ids[0], chunk_ids[fit]
    assert chunk_ids == [first] * fit + [second] * 2
    assert [(c.id, c.files) for c in packs.sealed] == [(first, fit)]
    assert [e["reason"] for e in logs if e["event"] == "pack_sealed"] == ["full"]
    assert packs.sealed[0].bytes < 600 <= packs.sealed[0].bytes + size - header, (
        "full: the next did not fit"
    )
    assert [p.id for p in await packs.store.open_packs()] == [second]


async def test_a_smaller_max_chunk_bytes_of_a_later_file_is_kept(packs: Packs) -> None:
    a = await packs.add("leads", "a.csv", leads(2, "a"))
    b = await packs.add("leads", "b.csv", leads(2, "b"), max_chunk_bytes=150)
    assert await packs.chunk_ids(a) != await packs.chunk_ids(b), (
        "a pack stays under the max_chunk_bytes of every file in it"
    )


async def test_pack_wait_seals_a_pack_no_file_joined_for_that_long(
    store: Store, tmp_path: Path
) -> None:
    packs = make_packs(store, tmp_path, pack_wait_seconds=5.0)
    packer, clock = packs.packer, packs.clock

    a = await packs.add("leads", "a.csv", leads(1, "a"))
    assert packer.next_deadline() == 5.0
    clock.advance(4.0)
    await packs.add("leads", "b.csv", leads(1, "b"))  # joining starts the wait again
    clock.advance(4.0)
    await packer.seal_idle()
    assert packs.sealed == []
    assert packer.next_deadline() == 1.0
    clock.advance(1.0)
    with capture_logs() as logs:
        await packer.seal_idle()
    assert [(c.file_id, c.files, c.sealed) for c in packs.sealed] == [(a.id, 2, True)]
    assert [e["reason"] for e in logs if e["event"] == "pack_sealed"] == ["idle"]
    assert await store.open_packs() == []
    assert packer.next_deadline() is None


async def test_a_pack_that_files_keep_joining_goes_at_the_latest_twelve_waits_after_it_opened(
    store: Store, tmp_path: Path
) -> None:
    """A trickle (a file every 4 s, pack_wait 5 s) never lets the pack idle: it still goes
    60 s after its first file came, not when it is full hours later."""
    packs = make_packs(store, tmp_path, pack_wait_seconds=5.0)
    packer = packs.packer
    for i in range(15):  # joins at 0, 4, ... 56 s; the next at 60 s would be late
        await packs.add("leads", f"t{i}.csv", leads(1, f"t{i}"))
        await packer.seal_idle()
        packs.clock.advance(4.0)
    assert packs.sealed == []
    assert packer.next_deadline() == 0.0
    # While claimed files wait to be split the pack fills at the speed of splitting:
    # sealing it for its age would only make another job.
    packs.waiting = True
    await packer.seal_idle()
    assert packs.sealed == []
    assert packer.next_deadline() == 1.0, "only the idle rule holds meanwhile"
    packs.waiting = False
    with capture_logs() as logs:
        await packer.seal_idle()
    assert [c.files for c in packs.sealed] == [15]
    assert [e["reason"] for e in logs if e["event"] == "pack_sealed"] == ["age"]


async def test_pack_wait_zero_seals_once_no_claimed_file_waits(
    store: Store, tmp_path: Path
) -> None:
    packs = make_packs(store, tmp_path, pack_wait_seconds=0.0)
    await packs.add("leads", "a.csv", leads(1, "a"))
    await packs.add("leads", "b.csv", leads(1, "b"))
    packer = packs.packer
    assert packer.next_deadline() is None, "no timer: 0 does not mean 'seal at once'"
    await packer.seal_idle()
    assert len(await store.open_packs()) == 1
    with capture_logs() as logs:
        await packer.caught_up()
    assert await store.open_packs() == []
    assert [e["reason"] for e in logs if e["event"] == "pack_sealed"] == ["caught-up"]
    (job,) = await store.chunks()
    assert job.files == 2


async def test_caught_up_with_a_pack_wait_leaves_the_pack_to_its_timer(packs: Packs) -> None:
    await packs.add("leads", "a.csv", leads(1, "a"))
    await packs.packer.caught_up()
    assert packs.sealed == []
    assert len(await packs.store.open_packs()) == 1


async def test_recovery_cuts_off_an_unrecorded_append_and_seals_the_pack(packs: Packs) -> None:
    """A kill between a joiner's append and its join leaves bytes past the pack's recorded
    size: the next start cuts them off and sends the pack as it was recorded."""
    a = await packs.add("leads", "a.csv", leads(2, "a"))
    await packs.add("leads", "b.csv", leads(1, "b"))
    (pack,) = await packs.store.open_packs()
    recorded = read(pack.path)
    append(pack.path, b"c0@example.com,half")  # an append whose join was never committed

    restarted = Packer(packs.settings, packs.store, on_sealed=packs.sealed.append)
    with capture_logs() as logs:
        await restarted.recover(await packs.store.open_packs())

    assert read(pack.path) == recorded
    assert [e["kept"] for e in logs if e["event"] == "pack_truncated"] == [len(recorded)]
    assert await packs.store.open_packs() == []
    (job,) = await packs.store.chunks(statuses=[ChunkStatus.PENDING])
    assert (job.id, job.file_id, job.files, job.bytes) == (pack.id, a.id, 2, len(recorded))


# -- the pipeline's drained hand-off -----------------------------------------------------------


async def test_run_once_with_nothing_claimed_is_idle_once_the_drain_marker_is_handled(
    store: Store, tmp_path: Path
) -> None:
    """The marker run --once queues after its claims is not a file: once the split stage
    took it, wait_idle must see the pipeline idle without any file finishing."""
    settings = fast_settings("http://marketo.invalid", tmp_path / "data", (LEADS,))
    pipeline, stop = Pipeline(settings, store, MarketoClient(settings), Metrics()), asyncio.Event()
    pipeline.splitting.drained()
    waiting = asyncio.ensure_future(pipeline.wait_idle(stop))
    # wait_idle looks first, so a lost wake-up would hang (with it, passes either way)
    await asyncio.sleep(0.05)
    worker = asyncio.ensure_future(pipeline.splitting.run(stop))
    try:
        async with asyncio.timeout(30):
            await waiting
    finally:
        stop.set()
        await worker


# -- the daemon end to end -----------------------------------------------------------------------


async def run_once(daemon: Daemon) -> int:
    async with asyncio.timeout(60):
        return await daemon.run()


@pytest.fixture
async def sim(make_simulator: MakeSimulator) -> Simulator:
    return await make_simulator(**SIM_KNOBS)


async def test_run_once_packs_small_files_and_seals_when_drained_without_waiting(
    sim: Simulator, tmp_path: Path
) -> None:
    """pack_wait_seconds is an hour: run --once must seal once everything is split."""
    settings = fast_settings(
        sim.base_url, tmp_path, (LEADS, CARS, UNPACKED), pack_wait_seconds=NEVER
    )
    for i in range(5):
        drop_leads(tmp_path, f"l{i}.csv", 3, prefix=f"l{i}-")
    drop_leads(tmp_path, "big.csv", 100, prefix="big")
    for i in range(2):
        write_csv(
            tmp_path / "inbox" / "cars" / f"c{i}.csv", ["vin"], [[f"V{i}{j}"] for j in range(3)]
        )
        drop_leads(tmp_path, f"s{i}.csv", 2, prefix=f"s{i}-", route="solo")
    (tmp_path / "inbox" / "leads" / "bad.csv").write_text('email,firstName,note\nx@y,"oops\n')
    daemon = LockedDaemon(settings, once=True)
    with capture_logs() as logs:
        assert await run_once(daemon) == 1, "bad.csv failed; everything else complete"

    seals = [e for e in logs if e["event"] == "pack_sealed"]
    assert sorted(e["files"] for e in seals) == [2, 5]
    assert {e["reason"] for e in seals} == {"drained"}, "no pack waited out pack_wait_seconds"
    docs = {d["file"]: d for d in result_docs(tmp_path)}
    assert len(docs) == 11
    assert docs.pop("bad.csv")["status"] == "failed"
    assert {d["status"] for d in docs.values()} == {"complete"}
    assert all(d["rows"] == sum(c["rows"] for c in d["chunks"]) for d in docs.values())
    batch = {name: [c["batch_id"] for c in d["chunks"]] for name, d in docs.items()}
    assert len({tuple(batch[f"l{i}.csv"]) for i in range(5)}) == 1
    assert batch["c0.csv"] == batch["c1.csv"]
    assert batch["s0.csv"] != batch["s1.csv"], "pack = false"
    assert len(batch["big.csv"]) >= 2
    jobs = {b for bs in batch.values() for b in bs}
    assert len(imports(sim)) == len(jobs) == 1 + 1 + 2 + len(batch["big.csv"])
    emails = {r["email"] for r in sim.records("leads")}
    assert emails == {f"l{i}-{j}@example.com" for i in range(5) for j in range(3)} | {
        f"big{j}@example.com" for j in range(100)
    } | {f"s{i}-{j}@example.com" for i in range(2) for j in range(2)}
    assert len(sim.records("customobject", api_name="car_c")) == 6

    # /metrics: every job created counted, with the files each carried (big.csv is in
    # each of its own jobs).
    text = daemon.metrics.render().decode()
    carried = len(docs) - 1 + len(batch["big.csv"])
    assert f"marketo_orchestrator_jobs_created_total {float(len(jobs))}" in text
    assert f"marketo_orchestrator_files_per_job_count {float(len(jobs))}" in text
    assert f"marketo_orchestrator_files_per_job_sum {float(carried)}" in text
    assert 'marketo_orchestrator_files_per_job_bucket{le="1.0"} ' + f"{len(jobs) - 2.0}" in text


async def test_pack_wait_seals_a_lone_file_in_a_running_daemon(
    sim: Simulator, tmp_path: Path
) -> None:
    """No other file, no stop, no --once: the pack goes once pack_wait_seconds passed."""
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), pack_wait_seconds=0.2)
    daemon = LockedDaemon(settings, once=False)
    running = asyncio.ensure_future(daemon.run())
    try:
        drop_leads(tmp_path, "alone.csv", 3, prefix="alone")
        path = tmp_path / "done" / "leads" / "alone.csv.result.json"
        await wait_until(lambda: path.exists() or running.done(), "alone.csv's result")
        assert result(tmp_path, "done", "leads", "alone.csv")["status"] == "complete"
        assert {r["email"] for r in sim.records("leads")} == {
            f"alone{i}@example.com" for i in range(3)
        }
    finally:
        daemon.stop.set()
        assert await asyncio.wait_for(running, 30) == 0


async def test_a_stop_leaves_a_pack_open_and_the_next_start_seals_and_sends_it(
    sim: Simulator, tmp_path: Path
) -> None:
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), pack_wait_seconds=NEVER)
    daemon = LockedDaemon(settings, once=False)
    running = asyncio.ensure_future(daemon.run())
    try:
        for name in ("a.csv", "b.csv"):
            drop_leads(tmp_path, name, 2, prefix=name[0])

        async def both_packed() -> bool:
            async with await Store.open(settings.layout.state_db, check=False) as store:
                return [p.files for p in await store.open_packs()] == [2]

        await wait_until(both_packed, "a.csv and b.csv in one open pack")
    finally:
        daemon.stop.set()  # what SIGTERM does
        assert await asyncio.wait_for(running, 30) == 0
    assert imports(sim) == [], "an open pack is never sent, also not at a stop"

    assert await run_once(LockedDaemon(settings, once=True)) == 0
    assert len(imports(sim)) == 1
    async with await Store.open(settings.layout.state_db) as store:
        assert await store.open_packs() == []
        assert [(c.files, c.status) for c in await store.chunks()] == [(2, ChunkStatus.COMPLETE)]
    assert {r["email"] for r in sim.records("leads")} == {"a0@example.com", "a1@example.com"} | {
        "b0@example.com",
        "b1@example.com",
    }
    assert {d["status"] for d in result_docs(tmp_path)} == {"complete"}


def source_line_of(rows: list[list[str]], index: int) -> int:
    """The source line data row `index` starts on (header on line 1; quoted notes may span
    lines)."""
    return 2 + sum(row[2].count("\n") + 1 for row in rows[:index])


async def test_failed_and_warned_rows_of_a_pack_go_back_to_their_own_files_and_lines(
    sim: Simulator, tmp_path: Path
) -> None:
    """Three small files share one job; Marketo fails and warns rows in two of them. Each
    file's result counts only its own rows, and its failures and warnings files hold only
    its own rows, each with the line it has in that file."""
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), pack_wait_seconds=NEVER)
    plan = {  # file: (rows, failing rows, warned rows)
        "a.csv": (9, (), ()),
        "b.csv": (12, (0, 7, 11), (3,)),
        "c.csv": (8, (6,), (1, 7)),
    }
    sources = {}
    for name, (n, bad, warn) in plan.items():
        rows = lead_rows(n, prefix=name[0], bad=bad, warn=warn)
        write_csv(tmp_path / "inbox" / "leads" / name, LEAD_HEADER, rows)
        sources[name] = rows
    assert await run_once(LockedDaemon(settings, once=True)) == 0

    assert len(imports(sim)) == 1, "one job for the three files"
    for name, (n, bad, warn) in plan.items():
        doc = result(tmp_path, "done", "leads", name)
        (chunk,) = doc["chunks"]
        assert chunk["shared"] == {"files": 3, "rows": 29, "bytes": chunk["shared"]["bytes"]}
        assert (doc["rows"], chunk["rows"]) == (n, n)
        assert (doc["rows_processed"], doc["rows_failed"], doc["rows_with_warning"]) == (
            n - len(bad),
            len(bad),
            len(warn),
        )
        for kind, wanted in (("failures", bad), ("warnings", warn)):
            written = doc[f"{kind}_file"]
            if not wanted:
                assert written is None
                continue
            text = (tmp_path / "done" / "leads" / written).read_text(encoding="utf-8")
            header, *rows = list(csv.reader(io.StringIO(text, newline="")))
            assert header[-1] == "Source Line"
            rows_of = sources[name]
            assert [(r[0], int(r[-1])) for r in rows] == [
                (rows_of[i][0], source_line_of(rows_of, i)) for i in wanted
            ]
