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
import time
from pathlib import Path

from structlog.testing import capture_logs

from orchestrator.backoff import Backoff
from orchestrator.config import Settings
from orchestrator.simulator import Simulator
from tests.support.daemons import LockedDaemon
from tests.support.data import drop_workload, result_docs
from tests.support.faults import hold_foreign, retries_after_1016
from tests.support.reliability import Record
from tests.support.settings import CARS, LEADS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator


def drop_two_files(data_dir: Path) -> int:
    """a.csv (200 leads) claimed before b.csv (150 cars); returns the rows."""
    expected = drop_workload(
        data_dir,
        leads=200,
        cars=150,
        names=("a.csv", "b.csv", ""),
        prefix="a",
        car_note=None,
        mtime=time.time() - 10,
    )
    return sum(len(keys) for keys in expected.values())


def check_landed_in_order(sim: Simulator, data_dir: Path, rows: int) -> int:
    docs = result_docs(data_dir)
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
        code = await LockedDaemon(settings, once=True).run()
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
    with capture_logs() as logged:
        assert await run_under_load(sim, settings, None, within=60) == 0
    assert time.monotonic() - started >= held, "nothing of ours ran while the queue was full"

    chunks = check_landed_in_order(sim, tmp_path, rows)
    backoff = Backoff(settings.backoff.initial, settings.backoff.max)
    # The waits the scheduler chose (the property), then the gaps the simulator saw
    # (chosen wait plus however slow this machine is: only a lower bound holds there).
    chosen = [
        (e["attempt"], e["seconds"])
        for e in logged
        if e["event"] == "backoff" and e["reason"] == "1016"
    ]
    assert len(chosen) >= 5, "the scheduler keeps probing the full queue"
    for attempt, seconds in chosen:
        ceiling = backoff.ceiling(attempt)
        assert 0.5 * ceiling - 0.001 <= seconds <= ceiling + 0.001, (attempt, seconds)
        assert seconds <= settings.backoff.max + 0.001
    waits = [seconds for _, seconds in chosen]
    assert waits[0] < 0.5 * settings.backoff.max <= max(waits), "the spacing grows"
    assert any(s < 0.9 * backoff.ceiling(a) for a, s in chosen), "the spacing is jittered"
    refused = retries_after_1016(sim)
    assert len(refused) >= 5
    for attempt, gap in refused:
        assert gap >= 0.5 * backoff.ceiling(attempt) - 0.005, "no retry before its backoff"
    gaps = [gap for _, gap in refused]
    figures(
        chunks=chunks,
        answers_1016=len(refused),
        seconds_from_1016_to_retry=gaps,
        backoff_chosen=waits,
        backoff_ceilings=[backoff.ceiling(a) for a, _ in chosen],
    )
