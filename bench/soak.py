"""Soak: the reliability suite's scenarios at scale, for the README's reliability table.

Not a test. Each phase runs against its own simulator (in this process, on loopback)
and the real daemon as a subprocess, driven by the same helpers as tests/reliability:

- faults: every fault the simulator injects, each at 10 % of calls at once (HTTP 500
  and 503; 601, 602, 606, 608, 611, 615; connections dropped before and after the
  call took effect; answers slower than request_timeout), tokens living 2 s, over
  --fault-chunks chunks across three routes. Retries by cause from both sides: the
  simulator's call log and the daemon's /metrics.
- chaos: --kills SIGKILLs at seeded random moments (every fourth life arms one of the
  daemon's own crash points instead) during a run of about --chaos-chunks chunks,
  then a drain with `run --once`: rows lost, extra submits, results per source file,
  `PRAGMA integrity_check`.
- foreign: other integrations hold 8 or 9 of the 10 queue slots for
  --foreign-seconds; foreign-all: all 10 for 3 s while nothing of ours is out (a
  known stall today: the phase reports it, and the exit code is 1 until it is fixed).
- flood: --files one-row files dropped at once into a running daemon: time, files per
  second, resident memory over the run and its peak.

    /tmp/venv/bin/python bench/soak.py                       # all phases, a few minutes
    /tmp/venv/bin/python bench/soak.py --phases flood --files 2000
    /tmp/venv/bin/python bench/soak.py --out soak.json       # the figures as JSON too

Prints a markdown table (what was injected, how often, what was lost) and the details
of each phase; exit code 1 when a row was lost or a phase did not finish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the suite's helpers live in tests/

import aiohttp  # noqa: E402  (after the path set-up above)

from orchestrator.backoff import Backoff  # noqa: E402
from orchestrator.config import (  # noqa: E402
    HttpSettings,
    PollingSettings,
    Settings,
)
from orchestrator.simulator import Simulator, SimulatorConfig  # noqa: E402
from tests.engine_support import (  # noqa: E402
    CARS,
    CLIENT_ID,
    LEADS,
    MEMBERS,
    SIM_KNOBS,
    all_results,
    drop_leads,
    fast_settings,
    write_csv,
)
from tests.reliability import test_chaos, test_faults, test_foreign_load  # noqa: E402
from tests.reliability.conftest import DaemonRunner, Life, daemon_toml, wait_until  # noqa: E402

PHASES = ("faults", "chaos", "foreign", "foreign-all", "flood")


@dataclass
class Outcome:
    """One row of the table, and the figures behind it."""

    phase: str
    injected: str
    how_often: str
    scale: str
    lost: int
    finished: bool
    details: dict[str, Any] = field(default_factory=dict)


# -- plumbing ---------------------------------------------------------------------------


class Bench:
    """A scratch directory, and simulators and daemons that are stopped at the end."""

    def __init__(self, keep: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="soak-"))
        self.keep = keep
        self._sims: list[Simulator] = []
        self._runners: list[DaemonRunner] = []

    async def simulator(self, **knobs: Any) -> Simulator:
        sim = Simulator(SimulatorConfig().with_knobs(**knobs))
        await sim.start()
        self._sims.append(sim)
        return sim

    def runner(self, name: str, settings: Settings) -> DaemonRunner:
        folder = self.root / name / "daemon"
        folder.mkdir(parents=True)
        config = folder / "orchestrator.toml"
        config.write_text(daemon_toml(settings), encoding="utf-8")
        runner = DaemonRunner(config, folder)
        self._runners.append(runner)
        return runner

    async def close(self) -> None:
        for runner in self._runners:
            await runner.close()
        for sim in self._sims:
            await sim.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def three_routes(data: Path, leads: int, cars: int, members: int) -> dict[str, set[str]]:
    """Source files for leads, a custom object and program members; the keys that must land."""
    drop_leads(data, "leads.csv", leads, prefix="s")
    write_csv(
        data / "inbox" / "cars" / "cars.csv",
        ["vin", "model", "note"],
        [[f"VIN{i:06d}", "Model T", "y" * 12] for i in range(cars)],
    )
    write_csv(
        data / "inbox" / "members" / "members.csv",
        ["email", "firstName"],
        [[f"m{i}@example.com", "M"] for i in range(members)],
    )
    return {
        "leads": {f"s{i}@example.com" for i in range(leads)},
        "cars": {f"VIN{i:06d}" for i in range(cars)},
        "members": {f"m{i}@example.com" for i in range(members)},
    }


def lost_rows(sim: Simulator, expected: dict[str, set[str]]) -> int:
    got = test_chaos.landed(sim)
    return sum(len(keys - got[obj]) for obj, keys in expected.items())


def result_docs(data: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in all_results(data)]


async def scrape_metrics(port: int) -> dict[str, dict[str, float]]:
    """marketo_orchestrator_* counters by their one label, from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    found: dict[str, dict[str, float]] = {}
    for match in re.finditer(
        r'^(marketo_orchestrator_\w+_total)\{\w+="([^"]*)"\} (\S+)$', text, re.M
    ):
        found.setdefault(match[1], {})[match[2]] = float(match[3])
    return found


def status_port(life: Life) -> int | None:
    for event in life.events():
        if event.get("event") == "status_server":
            return int(str(event["listen"]).rpartition(":")[2])
    return None


# -- phases -------------------------------------------------------------------------------


async def faults(bench: Bench, args: argparse.Namespace) -> Outcome:
    sim = await bench.simulator(**SIM_KNOBS, **test_faults.FAULT_KNOBS)
    data = bench.root / "faults" / "data"
    settings = fast_settings(sim.base_url, data, (LEADS, CARS, MEMBERS), max_chunk_bytes=400)
    settings = replace(
        settings,
        marketo=replace(settings.marketo, request_timeout=test_faults.REQUEST_TIMEOUT),
        http=HttpSettings(listen="127.0.0.1:0"),
    )
    per = args.fault_chunks * 10  # about ten rows per 400-byte chunk
    expected = three_routes(data, per * 4 // 10, per * 3 // 10, per * 3 // 10)
    runner = bench.runner("faults", settings)
    started = time.monotonic()
    life = await runner.start()
    port = await wait_until(lambda: status_port(life), "the status server")
    await wait_until(lambda: len(all_results(data)) >= 3, "three results", within=args.limit)
    seconds = time.monotonic() - started
    metrics = await scrape_metrics(port)
    life.process.send_signal(signal.SIGTERM)
    await life.wait(15)
    docs = result_docs(data)
    stats = sim.stats()
    jobs = len([j for j in sim.jobs() if j["owner"] == CLIENT_ID])
    chunks = sum(len(d["chunks"]) for d in docs)
    return Outcome(
        "faults",
        "HTTP 500, 503; 601, 602, 606, 608, 611, 615; dropped before/after effect; "
        f"slower than request_timeout; token TTL {test_faults.FAULT_KNOBS['token_ttl']:g} s",
        "10 % of calls each, all at once",
        f"{chunks} chunks, 3 routes",
        lost_rows(sim, expected),
        all(d["status"] == "complete" for d in docs) and len(docs) == 3,
        {
            "seconds": round(seconds, 1),
            "bulk_calls": sum(n for op, n in stats["calls"].items() if op != "identity"),
            "answered_by_simulator": test_faults.answered(sim),
            "errors_counted_by_daemon": metrics.get("marketo_orchestrator_marketo_errors_total"),
            "backoff_waits_by_reason": metrics.get("marketo_orchestrator_backoff_waits_total"),
            "tokens_issued": stats["tokens_issued"],
            "jobs_created": jobs,
            "extra_jobs_from_unknown_outcomes": jobs - chunks,
            "violations": stats["violations"],
            "files_failed": sum(1 for d in docs if d["status"] != "complete"),
        },
    )


async def chaos(bench: Bench, args: argparse.Namespace) -> Outcome:
    sim = await bench.simulator(**{**SIM_KNOBS, "job_overhead": 0.15})
    data = bench.root / "chaos" / "data"
    settings = fast_settings(sim.base_url, data, (LEADS, CARS, MEMBERS), max_chunk_bytes=700)
    n = args.chaos_chunks
    expected = three_routes(data, n * 8, n * 7, n * 9)  # ~1/3 of the chunks each
    runner = bench.runner("chaos", settings)
    rng = random.Random(test_chaos.SEED)
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    for life in range(1, args.kills + 1):
        kinds[await test_chaos.one_life(runner, sim, rng, life)] += 1
    before_drain = len(all_results(data))
    integrity_after_kills = test_chaos.integrity(data / "state.db")
    drain = await runner.once(within=args.limit)
    seconds = time.monotonic() - started
    docs = result_docs(data)
    chunks = sum(len(d["chunks"]) for d in docs)
    per_source = Counter((d["route"], d["file"]) for d in docs)
    jobs = len([j for j in sim.jobs() if j["owner"] == CLIENT_ID])
    return Outcome(
        "chaos",
        "SIGKILL of the daemon process at random moments, restart each time",
        f"{args.kills} kills ({sum(v for k, v in kinds.items() if k != 'external')} "
        "at crash points)",
        f"{chunks} chunks, 3 routes",
        lost_rows(sim, expected),
        drain.returncode == 0 and len(docs) == 3,
        {
            "seconds": round(seconds, 1),
            "kills_by_kind": dict(kinds),
            "results_before_drain": before_drain,
            "jobs_created": jobs,
            "chunks_submitted_more_than_once": jobs - chunks,
            "results_per_source_file": sorted(set(per_source.values())),
            "integrity_check": [integrity_after_kills, test_chaos.integrity(data / "state.db")],
        },
    )


async def foreign(bench: Bench, args: argparse.Namespace) -> Outcome:
    sim = await bench.simulator(**SIM_KNOBS)
    data = bench.root / "foreign" / "data"
    settings = fast_settings(sim.base_url, data, (LEADS, CARS), max_chunk_bytes=500)
    drop_leads(data, "a.csv", 2000, prefix="a", mtime=time.time() - 10)
    write_csv(
        data / "inbox" / "cars" / "b.csv",
        ["vin", "model"],
        [[f"VIN{i:05d}", "Model T"] for i in range(1500)],
    )
    expected = {
        "leads": {f"a{i}@example.com" for i in range(2000)},
        "cars": {f"VIN{i:05d}" for i in range(1500)},
    }
    runner = bench.runner("foreign", settings)
    sim.add_foreign_jobs(9, 2.0)
    load = asyncio.ensure_future(
        test_foreign_load.hold_foreign(sim, (8, 9), hold=2.0, total=args.foreign_seconds)
    )
    started = time.monotonic()
    drain = await runner.once(within=args.limit)
    await load
    seconds = time.monotonic() - started
    docs = result_docs(data)
    in_order = all(
        [c["batch_id"] for c in d["chunks"]] == sorted(c["batch_id"] for c in d["chunks"])
        for d in docs
    )
    refused = test_foreign_load.retries_after_1016(sim)
    got = test_chaos.landed(sim)
    lost = sum(len(keys - got[obj]) for obj, keys in expected.items())
    return Outcome(
        "foreign",
        "other integrations' jobs in the import queue",
        f"8-9 of the 10 slots for {args.foreign_seconds:g} s",
        f"{sum(len(d['chunks']) for d in docs)} chunks, 2 routes",
        lost,
        drain.returncode == 0 and in_order,
        {
            "seconds": round(seconds, 1),
            "answers_1016": len(refused),
            "attempt_and_seconds_from_1016_to_retry": refused,
            "chunk_order_kept": in_order,
        },
    )


async def foreign_all(bench: Bench, args: argparse.Namespace) -> Outcome:
    """Every queue slot foreign for 3 s while nothing of ours is out: does it resume?"""
    sim = await bench.simulator(**SIM_KNOBS)
    data = bench.root / "foreign-all" / "data"
    settings = fast_settings(sim.base_url, data, (LEADS,), max_chunk_bytes=500)
    drop_leads(data, "a.csv", 300, prefix="z")
    sim.add_foreign_jobs(10, 3.0)
    runner = bench.runner("foreign-all", settings)
    started = time.monotonic()
    life = await runner.start("--once")
    try:
        async with asyncio.timeout(20):
            await life.process.wait()
    except TimeoutError:
        life.kill()
        await life.process.wait()
    backoff = Backoff(settings.backoff.initial, settings.backoff.max)
    refused = test_foreign_load.retries_after_1016(sim)
    landed = len(sim.records("leads"))
    return Outcome(
        "foreign-all",
        "other integrations' jobs in the import queue",
        "all 10 slots for 3 s, nothing of ours outstanding",
        "1 file",
        300 - landed,
        life.returncode == 0 and landed == 300,
        {
            "seconds": round(time.monotonic() - started, 1),
            "stalled_until_killed_after_20_s": life.returncode != 0,
            "attempt_and_seconds_from_1016_to_retry": refused,
            "backoff_ceilings": [backoff.ceiling(a) for a, _ in refused],
        },
    )


def drop_flood(inbox: Path, n: int) -> None:
    staging = inbox.parent.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        part = staging / f"t{i:06d}.csv"
        part.write_text(f"email,firstName\nt{i}@example.com,T\n", encoding="utf-8")
        part.rename(inbox / part.name)


async def flood(bench: Bench, args: argparse.Namespace) -> Outcome:
    sim = await bench.simulator(**{**SIM_KNOBS, "job_overhead": 0.002, "rate_limit": 1_000_000})
    data = bench.root / "flood" / "data"
    settings = fast_settings(sim.base_url, data, (LEADS,), api_calls_per_window=1_000_000)
    settings = replace(settings, polling=PollingSettings(interval=0.01, max_interval=0.05))
    runner = bench.runner("flood", settings)
    life = await runner.start()
    await wait_until(lambda: any(e["event"] == "spool_started" for e in life.events()), "start")
    inbox = data / "inbox" / "leads"
    done = data / "done" / "leads"
    await asyncio.to_thread(drop_flood, inbox, args.files)
    started = time.monotonic()
    samples: list[tuple[float, int, int]] = []  # seconds, results, RSS KiB
    while True:
        results = await asyncio.to_thread(lambda: sum(1 for _ in done.glob("*.result.json")))
        samples.append((time.monotonic() - started, results, life.memory_kib() or 0))
        if results >= args.files or life.returncode is not None:
            break
        if time.monotonic() - started > args.limit:
            break
        await asyncio.sleep(2.0)  # the sampling period of this report
    seconds = time.monotonic() - started
    peak = life.memory_kib("VmHWM") or 0
    life.process.send_signal(signal.SIGTERM)
    code = await life.wait(30)
    landed = len(sim.records("leads"))
    marks = [samples[int(f * (len(samples) - 1))] for f in (0.1, 0.5, 1.0)]
    return Outcome(
        "flood",
        "tiny files dropped at once into a running daemon",
        f"{args.files} one-row files",
        f"{args.files} files",
        args.files - landed,
        samples[-1][1] >= args.files and code == 0,
        {
            "seconds": round(seconds, 1),
            "files_per_second": round(args.files / seconds, 1),
            "peak_rss_mib": round(peak / 1024, 1),
            "rss_mib_at_10_50_100_percent_of_time": [round(s[2] / 1024, 1) for s in marks],
            "results_at_10_50_100_percent_of_time": [s[1] for s in marks],
            "exit_code_after_sigterm": code,
            "failed_files": len(list((data / "failed" / "leads").glob("*.result.json"))),
        },
    )


RUNS: dict[str, Callable[[Bench, argparse.Namespace], Awaitable[Outcome]]] = {
    "faults": faults,
    "chaos": chaos,
    "foreign": foreign,
    "foreign-all": foreign_all,
    "flood": flood,
}


# -- report -------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| phase | injected | how often | scale | rows lost | finished |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        done = "yes" if o.finished else "NO"
        lines.append(
            f"| {o.phase} | {o.injected} | {o.how_often} | {o.scale} | {o.lost} | {done} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    parser.add_argument("--fault-chunks", type=int, default=300)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--chaos-chunks", type=int, default=200)
    parser.add_argument("--foreign-seconds", type=float, default=20.0)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--limit", type=float, default=3600.0, help="seconds a phase may take")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return args


async def soak(args: argparse.Namespace) -> list[Outcome]:
    bench = Bench(args.keep)
    outcomes = []
    try:
        for phase in args.phases:
            print(f"-- {phase} ...", file=sys.stderr, flush=True)
            outcome = await RUNS[phase](bench, args)
            print(json.dumps(outcome.details, indent=1), file=sys.stderr, flush=True)
            outcomes.append(outcome)
    finally:
        await bench.close()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # dropped connections, by design
    started = time.monotonic()
    outcomes = asyncio.run(soak(args))
    print(table(outcomes))
    print(f"\nsoak took {time.monotonic() - started:.0f} s: {' '.join(sys.argv)}")
    for o in outcomes:
        print(f"\n{o.phase}: {json.dumps(o.details, sort_keys=True)}")
    if args.out:
        args.out.write_text(json.dumps([o.__dict__ for o in outcomes], indent=2) + "\n")
    return 0 if all(o.finished and o.lost == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
