"""Chaos: SIGKILL the daemon (a real subprocess) 20 times during a 50-chunk run, restart it
each time, then drain with `run --once`.

A seeded loop picks the moments: each life runs until the simulator has seen a random
number (1 to 8) of its calls, plus a random fraction of a tick, and is then killed by
pid. Every fourth life instead arms one of the daemon's own crash points
(ORCHESTRATOR_CRASH_AT: before_submit, after_submit, polled, results_written), where
it SIGKILLs itself between an external effect and the commit that records it. A fifth
file arrives half way through, so claims happen under fire too.

Afterwards: no row lost, at most one extra submit per kill, one result per source
file (never a second one), work/ empty, and `PRAGMA integrity_check` ok, both on the
database the last kill left and after the drain.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections import Counter
from pathlib import Path

from orchestrator.simulator import Simulator
from tests.conftest import MakeSimulator
from tests.engine_support import (
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
from tests.reliability.conftest import DaemonRunner, Life, MakeRunner, Record, wait_until

KILLS = 20
SEED = 20261123
CRASH_POINTS = ("before_submit", "after_submit", "polled", "results_written")
LATE_FILE_AFTER_KILL = 5


def drop_sources(data_dir: Path) -> dict[str, set[str]]:
    """The first four files; returns the keys that must land, per object."""
    t0 = time.time() - 60
    drop_leads(data_dir, "a.csv", 300, prefix="a", mtime=t0)
    write_csv(
        data_dir / "inbox" / "cars" / "b.csv",
        ["vin", "model", "note"],
        [[f"VIN{i:05d}", "Model T", "z" * 20] for i in range(300)],
        mtime=t0 + 1,
    )
    write_csv(
        data_dir / "inbox" / "members" / "c.csv",
        ["email", "firstName"],
        [[f"m{i}@example.com", "M"] for i in range(400)],
        mtime=t0 + 2,
    )
    drop_leads(data_dir, "d.csv", 80, prefix="d", mtime=t0 + 3)
    return {
        "leads": {f"a{i}@example.com" for i in range(300)}
        | {f"d{i}@example.com" for i in range(80)},
        "cars": {f"VIN{i:05d}" for i in range(300)},
        "members": {f"m{i}@example.com" for i in range(400)},
    }


def landed(sim: Simulator) -> dict[str, set[str]]:
    return {
        "leads": {str(r["email"]) for r in sim.records("leads")},
        "cars": {str(r["vin"]) for r in sim.records("customobject", api_name="car_c")},
        "members": {str(r["email"]) for r in sim.records("programmembers", program_id=1001)},
    }


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


async def one_life(runner: DaemonRunner, sim: Simulator, rng: random.Random, n: int) -> str:
    """Start the daemon, let it work a little, see it SIGKILLed; returns how it died."""
    env, kind, wanted = {}, "external", rng.randint(1, 4)
    if n % 4 == 0:  # a longer life, so that the crash point has its chance
        point = rng.choice(CRASH_POINTS)
        env["ORCHESTRATOR_CRASH_AT"] = f"{point}:{rng.randint(1, 2)}"
        kind, wanted = f"crash point {point}", rng.randint(6, 16)
    calls_before = call_count(sim)
    life = await runner.start(env=env)

    def worked_enough() -> bool:
        died = life.returncode is not None
        return died or call_count(sim) - calls_before >= wanted

    await wait_until(worked_enough, f"life {n} to make {wanted} calls", within=20, poll=0.005)
    if life.returncode is None:
        await asyncio.sleep(rng.uniform(0.0, 0.02))  # the random moment (chaos, not a sync)
        if life.returncode is None:
            kind = "external"
        life.kill()
    code = await life.wait(10)
    assert code == -9, f"life {n} ended by itself ({code}): {life.stderr()[-2000:]}"
    return kind


def call_count(sim: Simulator) -> int:
    """Calls the simulator has answered (or dropped) so far."""
    return sum(sim.stats()["calls"].values())


def results_per_source(data_dir: Path) -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for path in all_results(data_dir):
        doc = json.loads(path.read_text(encoding="utf-8"))
        found[(doc["route"], doc["file"])] += 1
    return found


def drain_had_work(lives: list[Life]) -> bool:
    return any(e.get("event") == "file_finished" for e in lives[-1].events())


async def test_twenty_sigkills_lose_no_row_and_write_each_result_once(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.15})
    data = tmp_path / "data"
    settings = fast_settings(sim.base_url, data, (LEADS, CARS, MEMBERS), max_chunk_bytes=700)
    runner = daemons(settings)
    expected = drop_sources(data)
    rng = random.Random(SEED)

    kinds: Counter[str] = Counter()
    for n in range(1, KILLS + 1):
        if n == LATE_FILE_AFTER_KILL + 1:
            drop_leads(data, "e.csv", 60, prefix="e")
            expected["leads"] |= {f"e{i}@example.com" for i in range(60)}
        kinds[await one_life(runner, sim, rng, n)] += 1
    results_before_drain = len(all_results(data))
    integrity_after_kills = integrity(data / "state.db")
    assert integrity_after_kills == "ok"

    drain = await runner.once(within=90)
    assert drain.returncode == 0, drain.stderr()[-2000:]
    assert drain_had_work(runner.lives), "the kills all fell during the run"

    got = landed(sim)
    lost = {obj: expected[obj] - got[obj] for obj in expected}
    assert all(not keys for keys in lost.values()), f"rows lost: {lost}"
    per_source = results_per_source(data)
    sources = [("leads", "a.csv"), ("cars", "b.csv"), ("members", "c.csv")]
    sources += [("leads", "d.csv"), ("leads", "e.csv")]
    assert sorted(per_source) == sorted(sources)
    assert set(per_source.values()) == {1}, "each result written once, under one name"
    chunks = 0
    for path in all_results(data):
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert doc["status"] == "complete", doc["error"]
        assert doc["rows"] == doc["rows_processed"]
        chunks += len(doc["chunks"])
    assert chunks >= 50
    jobs = [j for j in sim.jobs() if j["owner"] == CLIENT_ID]
    extra = len(jobs) - chunks
    assert 0 <= extra <= KILLS, "at most one extra submit per kill"
    assert not list((data / "work" / "incoming").iterdir())
    assert not list((data / "work" / "chunks").iterdir())
    assert integrity(data / "state.db") == "ok"
    figures(
        kills=KILLS,
        kills_by_kind=dict(kinds),
        chunks=chunks,
        rows_expected=sum(len(v) for v in expected.values()),
        rows_lost=sum(len(v) for v in lost.values()),
        jobs_created=len(jobs),
        chunks_submitted_more_than_once=extra,
        results_written_before_drain=results_before_drain,
        results_per_source=sorted(set(per_source.values())),
        integrity_check=[integrity_after_kills, integrity(data / "state.db")],
    )
