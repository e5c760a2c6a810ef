"""Benchmark: what the key rule costs and what it prevents (issue 20, item 7).

Not a test. Three workloads, each run by the real daemon (`marketo-orchestrator run
--once`, a process of its own) with the key rule on and off (`limits.key_order`),
against the bundled simulator in this process (a fresh one per run):

- distinct: one leads file of --chunks chunks, every email once;
- repeats within files: the same, 1 % of rows repeating an earlier row's email (half
  within the last 2,000 rows, half anywhere before);
- repeats across files: --chunks / 5 files of 5 chunks, claimed one after another,
  1 % of each file's rows repeating an email of the file before.

The simulator applies a job's rows one at a time while it imports, two jobs at once
(Marketo's two slots), and makes a twin record when a job adds a key another job added
less than `twin_window` ago; our jobs stay within Marketo's 10. Per run, from the
simulator's jobs and records:

- makespan: the first job's start to the last job's end (Marketo's side; the split
  is the same with the rule on and off), and run --once's wall time;
- slot utilisation: seconds jobs spent importing / (2 x makespan);
- older values won: keys whose record does not hold their last row's value (the last
  row of the file claimed last); twins: records beyond one per email.

Then, in this process, the splitter's cost of keys on one file of Marketo's 9.5 MB
chunks (CPU per 100,000 rows with keys and without, the key set's bytes per chunk),
and the conflict check's cost for two such chunks (`keyorder.meeting`, read from their
key files slice by slice). Targets (issue 20): distinct keys within 5 % of the rule-off
makespan, 1 % repeats within 10 %.

Time is scaled (--scale, 200 by default: a benchmark second stands for 200 s at
Marketo). At scale 1 a chunk of Marketo's 9.5 MB takes JOB_SECONDS at Marketo, of
which JOB_OVERHEAD whatever its rows, and our durations are SPEC's defaults (polling
every 5 to 30 s, backoff 2 to 300 s, the 20 s rate window); all are divided by the
scale. A benchmark chunk holds ROWS_PER_CHUNK rows and stands for a 9.5 MB one (so
the split stays cheap; the splitter's own cost is measured apart, below).

    .venv/bin/python bench/keyrule.py               # about 2 minutes
    .venv/bin/python bench/keyrule.py --chunks 20   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import constants, splitter  # noqa: E402
from orchestrator.config import Settings  # noqa: E402
from orchestrator.keyorder import meeting  # noqa: E402
from orchestrator.keys import LEAD_NAMESPACE, keys_path  # noqa: E402
from orchestrator.store import Keyed  # noqa: E402
from tests.support.processes import CliRunner  # noqa: E402
from tests.support.settings import LEADS, fast_settings, with_sections  # noqa: E402
from tests.support.simulators import Simulators  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
HEADER = ["email", "firstName"]
ROWS_PER_CHUNK = 1_000  # rows are 40 bytes: max_chunk_bytes 40,000
CHUNK_BYTES = 40_000
FILE_CHUNKS = 5  # chunks per file in "repeats across files"
REPEAT_EVERY = 100  # 1 %
NEAR = 2_000  # rows back a near repeat reaches at most
# Marketo at scale 1: a chunk of 9.5 MB takes about three minutes, 20 s of it whatever
# its rows; our polling, backoff and rate window as SPEC section 3 has them.
JOB_SECONDS, JOB_OVERHEAD = 180.0, 20.0
POLL_INTERVAL, POLL_MAX = 5.0, 30.0
BACKOFF_INITIAL, BACKOFF_MAX = 2.0, 300.0
TARGETS = {"distinct": 0.05, "repeats within files": 0.10, "repeats across files": 0.10}


# -- the workloads ------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    files: list[list[list[str]]]  # per file, its rows, in claim order

    @property
    def rows(self) -> int:
        return sum(len(rows) for rows in self.files)

    def expected(self) -> dict[str, str]:
        """Each email's last value: the last row of the file claimed last."""
        last: dict[str, str] = {}
        for rows in self.files:
            for email, value in rows:
                last[email] = value
        return last


def row(person: int, file: int, place: int) -> list[str]:
    return [f"lead{person:07d}@example.com", f"f{file:02d}r{place:06d}-padding"]


def workloads(chunks: int, seed: int = 20) -> list[Workload]:
    rng = random.Random(seed)
    n = chunks * ROWS_PER_CHUNK
    distinct = [row(i, 0, i) for i in range(n)]
    within = []
    for i in range(n):
        person = i
        if i and i % REPEAT_EVERY == 0:
            near = rng.random() < 0.5
            person = i - rng.randrange(1, min(i, NEAR) + 1) if near else rng.randrange(i)
        within.append(row(person, 0, i))
    per_file = FILE_CHUNKS * ROWS_PER_CHUNK
    across: list[list[list[str]]] = []
    for f in range(max(2, chunks // FILE_CHUNKS)):
        first = f * per_file
        rows = []
        for i in range(per_file):
            person = first + i
            if f and i % REPEAT_EVERY == 0:
                person = first - per_file + rng.randrange(per_file)  # the file before's
            rows.append(row(person, f, i))
        across.append(rows)
    return [
        Workload("distinct", [distinct]),
        Workload("repeats within files", [within]),
        Workload("repeats across files", across),
    ]


def drop(workload: Workload, data_dir: Path) -> None:
    """The workload's files in the inbox, claimed in order (mtimes a second apart)."""
    inbox = data_dir / "inbox" / "leads"
    inbox.mkdir(parents=True, exist_ok=True)
    t0 = time.time() - 1000
    for number, rows in enumerate(workload.files):
        path = inbox / f"f{number:02d}.csv"
        part = path.with_name(path.name + ".part")
        with part.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(rows)
        os.utime(part, (t0 + number, t0 + number))
        part.rename(path)


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Run:
    workload: str
    key_order: bool
    wall: float
    jobs: list[dict[str, Any]] = field(default_factory=list)
    older_won: int = 0
    twins: int = 0
    missing: int = 0

    @property
    def makespan(self) -> float:
        return max(j["finished_at"] for j in self.jobs) - min(j["started_at"] for j in self.jobs)

    @property
    def utilisation(self) -> float:
        busy = sum(j["finished_at"] - j["started_at"] for j in self.jobs)
        return busy / (constants.MAX_IMPORTING_JOBS * self.makespan)


def sim_knobs(scale: float) -> dict[str, Any]:
    overhead = JOB_OVERHEAD / scale
    return {
        "job_overhead": overhead,
        "rows_per_second": ROWS_PER_CHUNK / ((JOB_SECONDS - JOB_OVERHEAD) / scale),
        "rate_window": constants.API_WINDOW_SECONDS / scale,
        # Below job_overhead: a job started after another ended applies its first row
        # job_overhead after that end, so only jobs importing side by side make twins.
        "twin_window": overhead * 0.8,
    }


def daemon_settings(base_url: str, data_dir: Path, scale: float, key_order: bool) -> Settings:
    return with_sections(
        fast_settings(base_url, data_dir, (LEADS,)),
        limits={
            "max_chunk_bytes": CHUNK_BYTES,
            "api_window_seconds": constants.API_WINDOW_SECONDS / scale,
            "key_order": key_order,
        },
        polling={"interval": POLL_INTERVAL / scale, "max_interval": POLL_MAX / scale},
        backoff={"initial": BACKOFF_INITIAL / scale, "max": BACKOFF_MAX / scale},
    )


async def run_one(workload: Workload, key_order: bool, scale: float, scratch: Path) -> Run:
    simulators = Simulators()
    sim = await simulators.start(**sim_knobs(scale))
    home = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    try:
        settings = daemon_settings(sim.base_url, home / "data", scale, key_order)
        drop(workload, settings.data_dir)
        runner = CliRunner.for_settings(home / "daemon", settings)
        started = time.monotonic()
        proc = await runner.once(within=600.0)
        wall = time.monotonic() - started
        await runner.close()
        if proc.returncode != 0:
            raise SystemExit(f"run --once exited {proc.returncode}: {proc.stderr()[-2000:]}")
        done = Run(workload.name, key_order, wall, jobs=sim.jobs())
        values: dict[str, list[str]] = defaultdict(list)
        for record in sim.records("leads"):
            values[record["email"]].append(record["firstName"])
    finally:
        await simulators.close()
        shutil.rmtree(home, ignore_errors=True)
    for email, value in workload.expected().items():
        found = values.get(email, [])
        done.missing += not found
        done.twins += max(0, len(found) - 1)
        done.older_won += len(found) == 1 and found[0] != value
    return done


# -- the splitter's and the check's cost ------------------------------------------------------------


def split_cost(source: Path, out: Path, keys: bool) -> dict[str, float]:
    rule = splitter.KeyRule(LEAD_NAMESPACE, ("email",)) if keys else None
    cpu = time.process_time()
    chunks, rows = [], 0
    for event in splitter.split_file(
        source, out, max_bytes=constants.DEFAULT_MAX_CHUNK_BYTES, fmt="csv", keys=rule
    ):
        if isinstance(event, splitter.Chunk):
            chunks.append(event)
        elif isinstance(event, splitter.SplitDone):
            rows = event.rows
    found: dict[str, float] = {"cpu": time.process_time() - cpu, "rows": rows}
    if keys:
        first = max(chunks, key=lambda c: c.rows)
        found["key_bytes"] = keys_path(first.path).stat().st_size
        found["chunk_rows"] = first.rows
        found["pair_ms"] = float("nan")
        if len(chunks) >= 2:  # two chunks share no key: every slice of both is read
            a, b = (Keyed(i, i, str(c.path), False) for i, c in enumerate(chunks[:2]))
            cpu, pairs = time.process_time(), 20
            for _ in range(pairs):
                assert not meeting(b, [a])
            found["pair_ms"] = (time.process_time() - cpu) / pairs * 1000
    return found


def costs(scratch: Path, rows: int) -> dict[str, float]:
    source = scratch / "cost.csv"
    with source.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([*HEADER, "lastName", "company"])
        writer.writerows([*row(i, 0, i), f"Last{i % 1009}", "Company"] for i in range(rows))
    plain = split_cost(source, scratch / "plain", keys=False)
    keyed = split_cost(source, scratch / "keyed", keys=True)
    return {
        "rows": keyed["rows"],
        "plain_per_100k": plain["cpu"] / plain["rows"] * 1e5,
        "keys_per_100k": keyed["cpu"] / keyed["rows"] * 1e5,
        "key_bytes": keyed["key_bytes"],
        "chunk_rows": keyed["chunk_rows"],
        "pair_ms": keyed["pair_ms"],
    }


# -- the report -----------------------------------------------------------------------------------


def report(runs: list[Run], cost: dict[str, float], args: argparse.Namespace) -> bool:
    knobs = sim_knobs(args.scale)
    print(
        f"{args.chunks} chunks of {ROWS_PER_CHUNK:,} rows a workload, scale {args.scale:g}: "
        f"a job {JOB_SECONDS / args.scale:.2f} s ({knobs['job_overhead']:.3f} s + rows at "
        f"{knobs['rows_per_second']:,.0f}/s), polling {POLL_INTERVAL / args.scale:.3f} to "
        f"{POLL_MAX / args.scale:.3f} s, twin_window {knobs['twin_window']:.3f} s"
    )
    print()
    print(
        "| workload | rule | jobs | makespan s | vs rule off | slot utilisation "
        "| older values won | twins | run --once s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    by = {(r.workload, r.key_order): r for r in runs}
    for (name, key_order), one in by.items():
        off = by[(name, False)]
        ratio = one.makespan / off.makespan - 1
        if key_order:
            ok &= ratio <= TARGETS[name] and one.older_won == one.twins == 0
        ok &= one.missing == 0
        print(
            f"| {name} | {'on' if key_order else 'off'} | {len(one.jobs)} | "
            f"{one.makespan:.2f} | {ratio:+.1%} | {one.utilisation:.0%} | "
            f"{one.older_won:,} | {one.twins:,} | {one.wall:.1f} |"
        )
    print()
    print(
        f"Keys while splitting ({cost['rows']:,.0f} rows, 9.5 MB chunks): "
        f"{cost['keys_per_100k']:.3f} s CPU per 100,000 rows with keys, "
        f"{cost['plain_per_100k']:.3f} s without; key set "
        f"{cost['key_bytes'] / 1e6:.2f} MB for a chunk of {cost['chunk_rows']:,.0f} rows "
        f"({cost['key_bytes'] / cost['chunk_rows'] * 1e5 / 1e6:.2f} MB per 100,000 rows); "
        f"conflict check of two such chunks {cost['pair_ms']:.1f} ms CPU"
    )
    targets = ", ".join(f"{name} within {t:.0%}" for name, t in TARGETS.items())
    print()
    print(f"targets ({targets}; rule on: no older value won, no twin; nothing missing):")
    print("targets met" if ok else "TARGET MISSED")
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=40, help="chunks a workload (40)")
    parser.add_argument("--scale", type=float, default=200.0, help="Marketo s per bench s")
    parser.add_argument("--cost-rows", type=int, default=300_000, help="rows for the split cost")
    return parser.parse_args(argv)


async def bench(args: argparse.Namespace, scratch: Path) -> int:
    runs = []
    for workload in workloads(args.chunks):
        for key_order in (False, True):
            runs.append(await run_one(workload, key_order, args.scale, scratch))
    cost = await asyncio.to_thread(costs, scratch, args.cost_rows)
    return 0 if report(runs, cost, args) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="keyrule-", dir=CACHE))
    try:
        return asyncio.run(bench(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
