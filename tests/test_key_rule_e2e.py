"""The key rule end to end (SPEC section 5, issue 20 item 6): the daemon splits, holds and
sends real files to the simulator, which applies each job's rows one at a time while it
imports (two jobs at once) and keeps a per-key history. Every test asserts on that
history, the jobs' times and the result files: for one key, the last row of the source
(and of the file claimed last) wins, no job holds a key twice, and two of our jobs
sharing a key never import at once.

The simulator's jobs are slow enough here (tenths of a second) that, without the rule,
jobs sharing keys would import side by side; the scheduler and the poller run at
fast_settings' pace. test_engine.py has the scheduler and poller alone against the
simulator with hand-made key files; test_repeats.py and test_key_stages.py the
splitter and the packer.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.simulator import Simulator
from tests.support.daemons import LockedDaemon
from tests.support.data import all_results, result, write_csv
from tests.support.processes import MakeRunner
from tests.support.settings import CARS, LEADS, fast_settings
from tests.support.simulators import MakeSimulator

HEADER = ["email", "firstName", "leadScore"]
BAD_SCORE = "lots"  # the simulator fails the row: "Invalid data type in field Lead Score"


async def run_once(settings: Settings) -> int:
    async with asyncio.timeout(60):
        return await LockedDaemon(settings, once=True).run()


def jobs_of(sim: Simulator) -> dict[int, dict[str, Any]]:
    return {int(job["batch_id"]): job for job in sim.jobs()}


def value_of(sim: Simulator, email: str) -> list[str]:
    """firstName of every lead record with this email (two: a twin)."""
    wanted = email.strip().casefold()
    return [str(r["firstName"]) for r in sim.records("leads") if r["email"].casefold() == wanted]


def applied(sim: Simulator, email: str) -> list[tuple[int, str]]:
    """(batch id, firstName) of every row stored under this lead, in the order applied."""
    return [
        (int(h["batch_id"]), str(h["values"]["firstName"])) for h in sim.history("leads", email)
    ]


def one_after_another(jobs: dict[int, dict[str, Any]], batch_ids: list[int]) -> bool:
    """Whether each job started after the one before it finished (never side by side)."""
    return all(
        jobs[later]["started_at"] >= jobs[earlier]["finished_at"]
        for earlier, later in itertools.pairwise(batch_ids)
    )


def read_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def drop(settings: Settings, route: str, name: str, header: list[str], rows: list[list[str]],
         mtime: float) -> Path:  # fmt: skip
    return write_csv(settings.data_dir / "inbox" / route / name, header, rows, mtime=mtime)


# -- a big file, then a small one updating some of its keys -------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reverse-rows"])
async def test_a_small_file_after_a_big_one_wins_for_the_keys_they_share(
    make_simulator: MakeSimulator, tmp_path: Path, reverse: bool
) -> None:
    sim = await make_simulator(job_overhead=0.1, rows_per_second=400.0, reverse_rows=reverse)
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    t0 = time.time() - 100
    big = [[f"u{i}@x.com", "old", "1"] for i in range(600)]
    drop(settings, "leads", "big.csv", HEADER, big, t0)
    shared = [f"u{i}@x.com" for i in (*range(0, 5), *range(585, 600))]
    small = [[email.upper(), "new", "2"] for email in shared]
    small += [[f"n{i}@x.com", "new", "2"] for i in range(5)]
    drop(settings, "leads", "small.csv", HEADER, small, t0 + 1)

    assert await run_once(settings) == 0

    big_doc = result(settings.data_dir, "done", "leads", "big.csv")
    small_doc = result(settings.data_dir, "done", "leads", "small.csv")
    assert len(big_doc["chunks"]) >= 5, "the big file takes several jobs"
    (small_job,) = {c["batch_id"] for c in small_doc["chunks"]}
    jobs = jobs_of(sim)
    for email in shared:
        history = applied(sim, email)
        assert [value for _, value in history] == ["old", "new"], email
        assert history[1][0] == small_job
        assert one_after_another(jobs, [b for b, _ in history]), email
        assert value_of(sim, email) == ["new"]
    assert all(value_of(sim, f"u{i}@x.com") == ["old"] for i in range(5, 585))
    assert all(value_of(sim, f"n{i}@x.com") == ["new"] for i in range(5))
    # The big file's last job holds u585..u599: the small one waited for it.
    last_big = max(c["batch_id"] for c in big_doc["chunks"])
    assert jobs[small_job]["started_at"] >= jobs[last_big]["finished_at"]
    assert (big_doc["rows_processed"], small_doc["rows_processed"]) == (600, 25)


# -- keys repeated inside one file, near and far --------------------------------------------------


def repeating_rows(n: int) -> tuple[list[list[str]], set[int]]:
    """n lead rows, p{i}@x.com, with keys repeated near (3 rows back, one key three times,
    some in another case) and far (from the file's first chunk to its last), and failing
    rows among the repeats; the rows that fail."""
    keys = [f"p{i}@x.com" for i in range(n)]
    for i in range(103, n - 300, 97):  # near: the key of the row 3 before
        keys[i] = keys[i - 3].upper() if i % 2 else keys[i - 3]
    keys[700], keys[703] = keys[697], keys[697]  # three rows of one key, 3 apart
    for i, j in ((n - 40, 5), (n - 30, 6), (n - 20, 7)):  # far: the first chunk's keys
        keys[i] = keys[j]
    failing = {300, 303, 900, n - 30}  # 303 repeats 300 (both fail); n-30 repeats 6
    keys[303], keys[903] = keys[300], keys[900]  # 903 repeats a failed row and lands
    rows = [[key, f"v{i}", BAD_SCORE if i in failing else str(i)] for i, key in enumerate(keys)]
    return rows, failing


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reverse-rows"])
async def test_rows_repeating_a_key_in_one_file_land_in_source_order_the_last_wins(
    make_simulator: MakeSimulator, tmp_path: Path, reverse: bool
) -> None:
    sim = await make_simulator(job_overhead=0.05, rows_per_second=4000.0, reverse_rows=reverse)
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    n = 1800
    rows, failing = repeating_rows(n)
    drop(settings, "leads", "repeats.csv", HEADER, rows, time.time() - 100)

    assert await run_once(settings) == 0

    doc = result(settings.data_dir, "done", "leads", "repeats.csv")
    assert len(doc["chunks"]) >= 16, "row 5 and row n-40 are further apart than recent chunks"
    assert (doc["rows"], doc["rows_failed"]) == (n, len(failing))
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_key[row[0].casefold()].append(i)
    repeated = {key: places for key, places in by_key.items() if len(places) > 1}
    assert len(repeated) >= 15
    assert max(len(p) for p in repeated.values()) == 3
    jobs = jobs_of(sim)
    for key, places in by_key.items():
        landed = [i for i in places if i not in failing]
        history = applied(sim, key)
        assert [value for _, value in history] == [f"v{i}" for i in landed], key
        batches = [b for b, _ in history]
        assert len(set(batches)) == len(batches), f"no job holds {key} twice"
        assert one_after_another(jobs, batches), key
        assert value_of(sim, key) == ([f"v{landed[-1]}"] if landed else []), key

    failures = read_rows(settings.data_dir / "done" / "leads" / "repeats.csv.failures.csv")
    assert failures[0][:3] == HEADER
    assert failures[0][-1] == "Source Line"
    # No quoted line breaks here: row i starts on line i + 2.
    assert sorted((row[1], int(row[-1])) for row in failures[1:]) == sorted(
        (f"v{i}", i + 2) for i in failing
    )


# -- two custom-object files adding the same new keys ----------------------------------------------


@pytest.mark.parametrize("key_order", [True, False], ids=["rule-on", "rule-off"])
async def test_two_files_adding_the_same_new_records_make_no_twins(
    make_simulator: MakeSimulator, tmp_path: Path, key_order: bool
) -> None:
    """The simulator makes a twin when a job adds a record another job added less than
    twin_window ago: jobs importing side by side. A job started after another ended
    applies its first row job_overhead later, past the window. With the rule off the
    two jobs import at once and make twins: the test can tell."""
    sim = await make_simulator(job_overhead=1.0, rows_per_second=100.0, twin_window=0.9)
    settings = fast_settings(sim.base_url, tmp_path / "data", (CARS,), key_order=key_order)
    t0 = time.time() - 100
    drop(settings, "cars", "a.csv", ["vin", "color"], [[f"V{i}", "red"] for i in range(20)], t0)
    b_rows = [[f"V{i}", "blue"] for i in range(10, 30)]
    drop(settings, "cars", "b.csv", ["vin", "color"], b_rows, t0 + 1)

    assert await run_once(settings) == 0

    cars = sim.records("customobject", api_name="car_c")
    colours = defaultdict(list)
    for record in cars:
        colours[record["vin"]].append(record["color"])
    twins = sum(len(c) - 1 for c in colours.values())
    if not key_order:
        assert twins > 0, "without the rule the two jobs import at once"
        return
    assert twins == 0
    assert {vin: c[0] for vin, c in colours.items()} == {
        **{f"V{i}": "red" for i in range(10)},
        **{f"V{i}": "blue" for i in range(10, 30)},
    }
    a_job = result(settings.data_dir, "done", "cars", "a.csv")["chunks"][0]["batch_id"]
    b_job = result(settings.data_dir, "done", "cars", "b.csv")["chunks"][0]["batch_id"]
    assert one_after_another(jobs_of(sim), [a_job, b_job])
    assert result(settings.data_dir, "done", "cars", "b.csv")["rows_failed"] == 0


# -- kill -9 while a held chunk waits ----------------------------------------------------------------


async def test_kill_9_while_a_chunk_is_held_loses_nothing_and_the_rule_holds_after_restart(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(job_overhead=0.4, rows_per_second=200.0)
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    runner = daemons(settings)
    t0 = time.time() - 100
    big = [[f"u{i}@x.com", "old", "1"] for i in range(300)]
    drop(settings, "leads", "big.csv", HEADER, big, t0)
    shared = [f"u{i}@x.com" for i in range(280, 300)]
    drop(settings, "leads", "small.csv", HEADER, [[e, "new", "2"] for e in shared], t0 + 1)

    first = await runner.daemon("--once")
    (held,) = await first.wait_for_event("chunk_held", within=30.0)
    assert held["waits_for_file"] == "big.csv"
    first.kill()
    await first.wait()

    restart = await runner.once(within=60.0)
    assert restart.returncode == 0, restart.stderr()

    assert len(all_results(settings.data_dir)) == 2, "each result exactly once"
    big_doc = result(settings.data_dir, "done", "leads", "big.csv")
    small_doc = result(settings.data_dir, "done", "leads", "small.csv")
    assert (big_doc["rows_processed"], small_doc["rows_processed"]) == (300, 20)
    assert len(sim.records("leads")) == 300, "nothing lost, no twin"
    (small_job,) = {c["batch_id"] for c in small_doc["chunks"]}
    jobs = jobs_of(sim)
    for email in shared:
        # A create the kill left in doubt may have made two jobs of one big chunk.
        *olds, (last_job, last_value) = applied(sim, email)
        assert (last_job, last_value) == (small_job, "new"), email
        assert olds, email
        assert all(value == "old" for _, value in olds), email
        assert all(jobs[small_job]["started_at"] >= jobs[b]["finished_at"] for b, _ in olds)
        assert value_of(sim, email) == ["new"]
    assert all(value_of(sim, f"u{i}@x.com") == ["old"] for i in range(280))
