"""Benchmark: the whole pipeline against the bundled simulator, time-scaled.

Not a test. Cuts three files (leads, a custom object, program members) into
40 chunks of mixed sizes, then, each against a fresh in-process simulator with
the same knobs:

1. ours: the real daemon in --once mode, in-process, on a fresh data dir;
2. baseline: what most scripts do, written here on `MarketoClient` directly:
   submit one chunk, poll it every `polling.interval` until it is done, then
   the next chunk (the same chunks, cut with `splitter.split_file`);
3. foreign: ours again, with another integration's jobs holding 8 of the 10
   queue slots (and both import slots) for `--hold` seconds from the start.

Everything is measured from the simulator's own logs: the job log gives import
slot busy time and makespan (first submit = earliest queued_at, last Complete =
latest finished_at), the call log gives API calls per chunk (identity excluded)
and 1016 answers. Prints one line per target with PASS/FAIL; exit code 1 when
any target is missed.

Time scale: every duration of Marketo's is divided by SCALE, see docs/benchmarks.md, "Time scale".

    /tmp/venv/bin/python bench/pipeline.py
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the helpers live in tests/support

import structlog  # noqa: E402  (after the path set-up above)

from orchestrator import constants, splitter  # noqa: E402
from orchestrator.config import Route, Settings  # noqa: E402
from orchestrator.marketo import MarketoClient  # noqa: E402
from orchestrator.simulator import Simulator, SimulatorConfig  # noqa: E402
from tests.support.daemons import LockedDaemon  # noqa: E402
from tests.support.settings import CARS as CSV_CARS  # noqa: E402
from tests.support.settings import (  # noqa: E402
    CLIENT_ID,
    LEADS,
    MEMBERS,
    fast_settings,
    with_sections,
)

# --- time scale -------------------------------------------------------------------
# One benchmark second stands for SCALE seconds at Marketo. Polling, backoff and
# the rate-limit window are Marketo's numbers divided by SCALE, so the ratios
# that matter (polls per job, calls per window per job) are the production ones.
SCALE = 40.0
INTERVAL = 5.0 / SCALE  # polling.interval default 5 s
MAX_INTERVAL = 4 * INTERVAL  # polling.max_interval: ~4x interval
WINDOW = constants.API_WINDOW_SECONDS / SCALE  # 100 calls per 20 s -> per 0.5 s
BACKOFF_INITIAL = 2.0 / SCALE  # backoff.initial default 2 s
BACKOFF_MAX = 300.0 / SCALE  # backoff.max default 300 s
# Jobs: overhead plus time per row, so a job's duration is proportional to its rows.
JOB_OVERHEAD = 0.1
ROWS_PER_SECOND = 6000.0
MAX_CHUNK_BYTES = 100_000
CHUNKS = 40
HOLD_SECONDS = 3.0  # foreign jobs hold the import slots this long (scenario d)

# --- targets ----------------------------------------------------------------------
MIN_UTILIZATION = 0.98
MAX_MAKESPAN_RATIO = 0.55
BOUND_EXTRA = 2  # calls per chunk: 1 submit + duration / interval polls + 2

CARS = replace(CSV_CARS, format="tsv")  # the car file is tab-separated
ROUTES = (LEADS, CARS, MEMBERS)


# --- workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    route: Route
    name: str
    rows: int

    @property
    def fmt(self) -> str:
        return self.route.format_for(self.name)


# Rows per file, chosen so the three files cut into 40 chunks at MAX_CHUNK_BYTES:
# narrow car rows make long jobs, wide member rows short ones.
SOURCES = (
    Source(LEADS, "leads.csv", 26_500),
    Source(CARS, "cars.tsv", 46_000),
    Source(MEMBERS, "members.csv", 8_800),
)


def source_lines(source: Source, rng: random.Random) -> Iterator[str]:
    """Header and rows of one source file; a few rows fail or warn at Marketo."""
    d = "\t" if source.fmt == "tsv" else ","
    if source.route is CARS:
        yield d.join(("vin", "model", "year"))
        for i in range(source.rows):
            yield d.join((f"VIN{i:08d}", rng.choice(("T", "A", "Beetle")), str(1990 + i % 35)))
    elif source.route is LEADS:
        yield d.join(("email", "firstName", "lastName", "company"))
        for i in range(source.rows):
            email = f"lead{i}.example.com" if i % 997 == 0 else f"lead{i}@example.com"
            yield d.join((email, f"First{i % 500}", f"Last{i % 700}", f"Company {i % 97}"))
    else:
        yield d.join(("email", "firstName", "lastName", "note"))
        for i in range(source.rows):
            note = "__WARN__" if i % 1500 == 7 else "x" * rng.randint(80, 200)
            yield d.join((f"member{i}@example.com", f"M{i}", f"N{i}", note))


def write_sources(folder: Path) -> dict[Source, Path]:
    rng = random.Random(4)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for source in SOURCES:
        path = folder / source.name
        text = "\n".join(source_lines(source, rng)) + "\n"
        path.write_text(text, encoding="utf-8", newline="")
        paths[source] = path
    return paths


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk file the baseline submits."""

    route: Route
    path: Path
    fmt: str
    rows: int


def cut(paths: dict[Source, Path], out: Path) -> list[Piece]:
    """The same chunks the daemon cuts, in the daemon's submit order (claim order)."""
    pieces = []
    for source, path in paths.items():
        for event in splitter.split_file(
            path, out / source.route.dir, max_bytes=MAX_CHUNK_BYTES, fmt=source.fmt
        ):
            if isinstance(event, splitter.Chunk):
                pieces.append(Piece(source.route, event.path, source.fmt, event.rows))
    return pieces


# --- the three runs ---------------------------------------------------------------


def sim_config() -> SimulatorConfig:
    return SimulatorConfig(
        job_overhead=JOB_OVERHEAD, rows_per_second=ROWS_PER_SECOND, rate_window=WINDOW
    )


def bench_settings(base_url: str, data_dir: Path) -> Settings:
    """fast_settings at this benchmark's time scale."""
    return with_sections(
        fast_settings(
            base_url, data_dir, ROUTES, max_chunk_bytes=MAX_CHUNK_BYTES, api_window_seconds=WINDOW
        ),
        polling={"interval": INTERVAL, "max_interval": MAX_INTERVAL},
        backoff={"initial": BACKOFF_INITIAL, "max": BACKOFF_MAX},
    )


async def run_ours(sim: Simulator, paths: dict[Source, Path], data_dir: Path) -> None:
    """Drop the files into the inbox (claim order = SOURCES order) and drain it."""
    t0 = time.time() - 60
    for n, (source, path) in enumerate(paths.items()):
        target = data_dir / "inbox" / source.route.dir / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        os.utime(target, (t0 + n, t0 + n))
    daemon = LockedDaemon(bench_settings(sim.base_url, data_dir), once=True)
    async with asyncio.timeout(300):
        code = await daemon.run()
    if code != 0:
        raise SystemExit(f"the daemon exited with {code}: a file failed (--keep, then {data_dir})")


async def run_baseline(sim: Simulator, pieces: list[Piece], data_dir: Path) -> None:
    """One chunk at a time: submit, poll every interval until final, next."""
    async with MarketoClient(bench_settings(sim.base_url, data_dir)) as client:
        for piece in pieces:
            batch = await client.submit(piece.route, piece.path, piece.fmt)
            while batch.status not in constants.FINAL_STATUSES:
                await asyncio.sleep(INTERVAL)
                batch = await client.status(piece.route, batch.batch_id)


# --- measuring from the simulator's logs ------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    start: float
    end: float

    @property
    def length(self) -> float:
        return max(0.0, self.end - self.start)

    def clip(self, other: Span) -> Span:
        return Span(max(self.start, other.start), min(self.end, other.end))


@dataclass(frozen=True, slots=True)
class Measure:
    chunks: int
    makespan: float
    busy: float  # import-slot seconds our jobs used
    held: float  # import-slot seconds foreign jobs held inside the makespan
    mean_job: float
    calls: int
    calls_by_kind: dict[str, int]
    code_1016: int
    max_outstanding: int

    @property
    def utilization(self) -> float:
        free = constants.MAX_IMPORTING_JOBS * self.makespan - self.held
        return self.busy / free if free > 0 else 0.0

    @property
    def calls_per_chunk(self) -> float:
        return self.calls / self.chunks

    @property
    def bound(self) -> float:
        return 1 + self.mean_job / INTERVAL + BOUND_EXTRA


def call_kind(operation: str) -> str:
    for kind in ("Status", "Failures", "Warnings"):
        if kind in operation:
            return kind.lower()
    return "submit" if operation.startswith("import") else operation


def measure(sim: Simulator) -> Measure:
    jobs = sim.jobs()
    ours = [j for j in jobs if j["owner"] == CLIENT_ID]
    unfinished = [j["batch_id"] for j in ours if j["finished_at"] is None]
    if unfinished:
        raise SystemExit(f"jobs never finished: {unfinished}")
    window = Span(min(j["queued_at"] for j in ours), max(j["finished_at"] for j in ours))
    spans = [Span(j["started_at"], j["finished_at"]) for j in ours]
    foreign = [
        Span(j["started_at"], j["finished_at"]).clip(window)
        for j in jobs
        if j["owner"] != CLIENT_ID and j["started_at"] is not None
    ]
    calls = [c for c in sim.calls() if c["operation"] != "identity"]
    kinds: dict[str, int] = {}
    for c in calls:
        kinds[call_kind(c["operation"])] = kinds.get(call_kind(c["operation"]), 0) + 1
    return Measure(
        chunks=len(ours),
        makespan=window.length,
        busy=sum(s.length for s in spans),
        held=sum(s.length for s in foreign),
        mean_job=statistics.fmean(s.length for s in spans),
        calls=len(calls),
        calls_by_kind=kinds,
        code_1016=sum(1 for c in calls if c["code"] == "1016"),
        max_outstanding=sim.stats()["max_outstanding"].get(CLIENT_ID, 0),
    )


# --- report -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: str
    target: str
    ok: bool | None  # None: reported, no target

    @property
    def verdict(self) -> str:
        return "INFO" if self.ok is None else "PASS" if self.ok else "FAIL"


def checks(ours: Measure, base: Measure, foreign: Measure, hold: float) -> list[Check]:
    ratio = ours.makespan / base.makespan
    return [
        Check(
            "(a) slot utilization",
            f"{ours.utilization:.3f}",
            f">= {MIN_UTILIZATION}",
            ours.utilization >= MIN_UTILIZATION,
        ),
        Check(
            "(b) makespan ours / baseline",
            f"{ours.makespan:.2f} s / {base.makespan:.2f} s = {ratio:.3f}",
            f"<= {MAX_MAKESPAN_RATIO}",
            ratio <= MAX_MAKESPAN_RATIO,
        ),
        Check(
            "(c) API calls per chunk",
            f"{ours.calls_per_chunk:.2f}",
            f"<= {ours.bound:.2f}",
            ours.calls_per_chunk <= ours.bound,
        ),
        Check(
            "(d) utilization while not held",
            f"{foreign.utilization:.3f}",
            f">= {MIN_UTILIZATION}",
            foreign.utilization >= MIN_UTILIZATION,
        ),
        Check(
            "(d) API calls per chunk",
            f"{foreign.calls_per_chunk:.2f}",
            f"<= {foreign.bound:.2f}",
            foreign.calls_per_chunk <= foreign.bound,
        ),
        Check("(d) makespan", f"{foreign.makespan:.2f} s (hold {hold:.2f} s)", "-", None),
        Check("(d) 1016 answers", str(foreign.code_1016), "-", None),
    ]


def describe(label: str, m: Measure) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(m.calls_by_kind.items()))
    return (
        f"{label:<9} chunks {m.chunks}  makespan {m.makespan:6.2f} s  "
        f"utilization {m.utilization:.3f}  mean job {m.mean_job:.3f} s  "
        f"calls {m.calls} ({kinds})  per chunk {m.calls_per_chunk:.2f} "
        f"(bound {m.bound:.2f})  1016 x{m.code_1016}  max outstanding {m.max_outstanding}"
    )


# --- main -------------------------------------------------------------------------


async def bench(work: Path, hold: float) -> list[Check]:
    paths = write_sources(work / "sources")
    pieces = cut(paths, work / "chunks")
    if len(pieces) != CHUNKS:
        raise SystemExit(f"workload cut into {len(pieces)} chunks, expected {CHUNKS}")
    rows = sorted(p.rows for p in pieces)
    print(
        f"workload: {len(pieces)} chunks from {len(paths)} files, rows per chunk "
        f"{rows[0]}..{rows[-1]}, jobs {JOB_OVERHEAD + rows[0] / ROWS_PER_SECOND:.2f}.."
        f"{JOB_OVERHEAD + rows[-1] / ROWS_PER_SECOND:.2f} s; interval {INTERVAL} s, "
        f"max_interval {MAX_INTERVAL} s, {constants.API_CALLS_PER_WINDOW} calls / {WINDOW} s"
    )

    async with Simulator(sim_config()) as sim:
        await run_ours(sim, paths, work / "ours")
        ours = measure(sim)
    print(describe("ours", ours))

    async with Simulator(sim_config()) as sim:
        await run_baseline(sim, pieces, work / "baseline")
        base = measure(sim)
    print(describe("baseline", base))

    async with Simulator(sim_config()) as sim:
        sim.add_foreign_jobs(8, hold)
        await run_ours(sim, paths, work / "foreign")
        foreign = measure(sim)
    print(describe("foreign", foreign))
    print(f"          foreign jobs held {foreign.held:.2f} slot-seconds of the makespan")
    return checks(ours, base, foreign, hold)


def quiet_logs() -> None:
    """The daemon logs at info by default: keep only warnings and errors, on stderr."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=HOLD_SECONDS, help="foreign hold, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    quiet_logs()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    started = time.monotonic()
    try:
        results = asyncio.run(bench(work, args.hold))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    for check in results:
        print(f"{check.verdict}  {check.name:<32} {check.value:<36} target {check.target}")
    print(f"(bench took {time.monotonic() - started:.0f} s)")
    return 1 if any(c.ok is False for c in results) else 0


if __name__ == "__main__":
    sys.exit(main())
