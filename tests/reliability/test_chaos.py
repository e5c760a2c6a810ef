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

import random
import time
from collections import Counter
from pathlib import Path

from tests.support.data import (
    all_results,
    drop_leads,
    drop_workload,
    integrity,
    landed,
    result_docs,
    results_per_source,
)
from tests.support.faults import SEED, one_life
from tests.support.processes import CliProcess, MakeRunner
from tests.support.reliability import Record
from tests.support.settings import CARS, CLIENT_ID, LEADS, MEMBERS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator

KILLS = 20
LATE_FILE_AFTER_KILL = 5


def drop_sources(data_dir: Path) -> dict[str, set[str]]:
    """The first four files; returns the keys that must land, per object."""
    t0 = time.time() - 60
    expected = drop_workload(
        data_dir,
        leads=300,
        cars=300,
        members=400,
        names=("a.csv", "b.csv", "c.csv"),
        prefix="a",
        car_note="z" * 20,
        mtime=t0,
    )
    drop_leads(data_dir, "d.csv", 80, prefix="d", mtime=t0 + 3)
    expected["leads"] |= {f"d{i}@example.com" for i in range(80)}
    return expected


def drain_had_work(lives: list[CliProcess]) -> bool:
    return bool(lives[-1].events("file_finished"))


async def test_twenty_sigkills_lose_no_row_and_write_each_result_once(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.15})
    data = tmp_path / "data"
    # A kill while a create is in flight is an unknown outcome, counted against
    # max_resubmits (issue 10): twenty kills may hit one chunk more than twice, so the
    # cap is raised to the number of kills here; "at most one extra submit per kill"
    # below is the bound that matters for this test.
    settings = fast_settings(
        sim.base_url, data, (LEADS, CARS, MEMBERS), max_chunk_bytes=700, max_resubmits=KILLS
    )
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
    assert drain_had_work(runner.started), "the kills all fell during the run"

    got = landed(sim)
    lost = {obj: expected[obj] - got[obj] for obj in expected}
    assert all(not keys for keys in lost.values()), f"rows lost: {lost}"
    per_source = results_per_source(data)
    sources = [("leads", "a.csv"), ("cars", "b.csv"), ("members", "c.csv")]
    sources += [("leads", "d.csv"), ("leads", "e.csv")]
    assert sorted(per_source) == sorted(sources)
    assert set(per_source.values()) == {1}, "each result written once, under one name"
    chunks = 0
    for doc in result_docs(data):
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
