"""Foreign load: other integrations hold 8 to 10 of the subscription's 10 queue slots.

Scaled: "minutes at a time" becomes seconds, backoff runs 0.05 s up to 0.4 s. Every
chunk must land, chunk order within a file must be kept, and the retries after 1016
must spread out exponentially with jitter, never waiting longer than backoff.max. The
spacing is measured where it happens, in the simulator's call log: from each 1016
answer to our next create.

With 8 or 9 slots foreign the scheduler's queue model holds back until one of our jobs
finishes, so 1016 comes rarely and the retry waits for that, not for the backoff. With
all 10 foreign and nothing of ours out, the scheduler probes one slot at a time, and
that test measures the exponential spacing of those probes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from orchestrator.backoff import Backoff
from orchestrator.config import Settings
from orchestrator.daemon import Daemon
from orchestrator.simulator import Simulator
from tests.conftest import MakeSimulator
from tests.engine_support import (
    CARS,
    LEADS,
    SIM_KNOBS,
    all_results,
    drop_leads,
    fast_settings,
    write_csv,
)
from tests.reliability.conftest import Record

SLACK = 0.15  # scheduling, SQLite commits and the HTTP round trip, on two busy cores


def drop_two_files(data_dir: Path) -> int:
    drop_leads(data_dir, "a.csv", 200, prefix="a", mtime=time.time() - 10)
    write_csv(
        data_dir / "inbox" / "cars" / "b.csv",
        ["vin", "model"],
        [[f"VIN{i:05d}", "Model T"] for i in range(150)],
    )
    return 350


def foreign_held(sim: Simulator) -> int:
    return sum(
        1 for j in sim.jobs() if j["owner"] == "foreign" and j["status"] in ("Queued", "Importing")
    )


async def hold_foreign(sim: Simulator, targets: tuple[int, ...], hold: float, total: float) -> None:
    """Keep `targets` (one drawn every 0.5 s) of the queue's slots foreign for `total` s."""
    rng = random.Random(8)
    end = time.monotonic() + total
    target, redraw = rng.choice(targets), time.monotonic() + 0.5
    while time.monotonic() < end:
        if time.monotonic() >= redraw:
            target, redraw = rng.choice(targets), time.monotonic() + 0.5
        missing = target - foreign_held(sim)
        if missing > 0:
            sim.add_foreign_jobs(missing, hold)
        await asyncio.sleep(0.02)  # the pace of the other integrations' submissions


def creates(sim: Simulator) -> list[dict[str, Any]]:
    calls = [c for c in sim.calls() if str(c["operation"]).startswith("import")]
    return sorted(calls, key=lambda c: float(c["t"]))


def retries_after_1016(sim: Simulator) -> list[tuple[int, float]]:
    """(attempt, seconds from a 1016 answer to our next create), attempt counted per streak."""
    calls = creates(sim)
    found, streak = [], 0
    for call, after in itertools.pairwise(calls):
        if call["code"] != "1016":
            streak = 0
            continue
        streak += 1
        answered = float(call["t"]) + float(call["duration"])
        found.append((streak, round(float(after["t"]) - answered, 4)))
    return found


def check_landed_in_order(sim: Simulator, data_dir: Path, rows: int) -> int:
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in all_results(data_dir)]
    assert [d["status"] for d in docs] == ["complete"] * 2
    for doc in docs:
        batches = [c["batch_id"] for c in doc["chunks"]]
        assert batches == sorted(batches), f"chunk order kept within {doc['file']}"
    assert len(sim.records("leads")) + len(sim.records("customobject", api_name="car_c")) == rows
    return sum(len(d["chunks"]) for d in docs)


async def run_under_load(
    sim: Simulator, settings: Settings, load: asyncio.Future[None] | None, within: float
) -> int:
    async with asyncio.timeout(within):
        code = await Daemon(settings, once=True).run()
        if load is not None:
            await load
    return code


async def test_eight_or_nine_foreign_slots_every_chunk_lands_in_order(
    make_simulator: MakeSimulator, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS), max_chunk_bytes=500)
    rows = drop_two_files(tmp_path)
    sim.add_foreign_jobs(9, 1.0)
    load = asyncio.ensure_future(hold_foreign(sim, (8, 9), hold=1.0, total=3.0))
    assert await run_under_load(sim, settings, load, within=60) == 0

    chunks = check_landed_in_order(sim, tmp_path, rows)
    refused = retries_after_1016(sim)
    assert refused, "the foreign jobs filled the queue at least once"
    backoff = Backoff(settings.backoff.initial, settings.backoff.max)
    for attempt, gap in refused:
        assert gap >= 0.5 * backoff.ceiling(attempt) - 0.005, "no retry before its backoff"
    figures(
        chunks=chunks,
        rows_landed=rows,
        answers_1016=len(refused),
        longest_1016_streak=max(a for a, _ in refused),
        max_outstanding_ours=sim.stats()["max_outstanding"],
        seconds_from_1016_to_retry=[gap for _, gap in refused],
    )


async def test_all_ten_slots_foreign_backs_off_exponentially_then_lands(
    make_simulator: MakeSimulator, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS), max_chunk_bytes=500)
    rows = drop_two_files(tmp_path)
    held = 2.5
    sim.add_foreign_jobs(10, held)
    started = time.monotonic()
    # The queue frees up after 2.5 s; the run then needs a second or two.
    assert await run_under_load(sim, settings, None, within=held + 5) == 0
    assert time.monotonic() - started >= held

    chunks = check_landed_in_order(sim, tmp_path, rows)
    refused = retries_after_1016(sim)
    backoff = Backoff(settings.backoff.initial, settings.backoff.max)
    assert len(refused) >= 5, "the scheduler keeps probing the full queue"
    for attempt, gap in refused:
        ceiling = backoff.ceiling(attempt)
        assert 0.5 * ceiling - 0.005 <= gap <= ceiling + SLACK, (attempt, gap)
        assert gap <= settings.backoff.max + SLACK
    gaps = [gap for _, gap in refused]
    assert gaps[0] < 0.5 * settings.backoff.max <= max(gaps), "the spacing grows"
    assert any(gap < 0.9 * backoff.ceiling(a) for a, gap in refused), "the spacing is jittered"
    figures(
        chunks=chunks,
        answers_1016=len(refused),
        seconds_from_1016_to_retry=gaps,
        backoff_ceilings=[backoff.ceiling(a) for a, _ in refused],
    )
