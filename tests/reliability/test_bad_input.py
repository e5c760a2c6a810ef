"""Bad input: the corpus in tests/data/bad/, a 12 MB record among good rows, and a
flood of tiny files.

The daemon never crashes; every good row lands; every bad file ends in failed/ with a
result.json whose error names the problem. The 12 MB record is generated here (never
committed): it is set aside into the failures file with its source line, and the rows
around it land. A header-only file is an empty export, not an error: it completes
with 0 rows and sends nothing to Marketo.

The flood: 1,000 one-row files dropped at once into a running daemon (a real
subprocess, `run` without --once), every one processed, resident memory sampled all
along; bench/soak.py does the same with 20,000.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import shutil
import tracemalloc
from dataclasses import replace
from pathlib import Path

from orchestrator.config import PollingSettings
from tests.support.daemons import LockedDaemon
from tests.support.data import all_results, drop_leads, drop_tiny_files, result
from tests.support.processes import CliProcess, MakeRunner
from tests.support.reliability import Record
from tests.support.settings import LEADS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until

CORPUS = Path(__file__).resolve().parent.parent / "data" / "bad"
# File -> what its result's error must say (every one also names nothing but its own problem).
FAILS_WITH: dict[str, tuple[tuple[str, ...], ...]] = {
    "empty.csv": (("empty",),),
    "binary_junk.csv": (("NUL", "UTF-8"),),
    "invalid_utf8.csv": (("UTF-8",), ("line 3",)),
    "utf16.csv": (("UTF-16",),),
    "unterminated_quote.csv": (("unterminated",), ("line 3",)),
    "duplicate_header.csv": (("duplicate",), ("email",)),
    "trailing_delimiter.csv": (("trailing delimiter",),),
    "tsv_named.csv": (("email",), ("lacks the key column",)),
}
BIG_RECORD_BYTES = 12 * 1024 * 1024


def write_big_record_file(path: Path) -> int:
    """50 good rows, one 12 MB record (line 52), 50 good rows; returns the big record's line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["email", "firstName", "note"])
        writer.writerows([[f"g{i}@example.com", "G", "fine"] for i in range(50)])
        writer.writerow(["huge@example.com", "H", "h" * BIG_RECORD_BYTES])
        writer.writerows([[f"g{i}@example.com", "G", "fine"] for i in range(50, 100)])
    tmp.rename(path)
    return 52


async def test_bad_corpus_fails_each_file_with_its_problem_and_good_rows_land(
    make_simulator: MakeSimulator, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), max_chunk_bytes=9_500_000)
    inbox = tmp_path / "inbox" / "leads"
    inbox.mkdir(parents=True)
    for source in sorted(CORPUS.iterdir()):
        shutil.copyfile(source, inbox / source.name)
    drop_leads(tmp_path, "good.csv", 40, prefix="ok")

    async with asyncio.timeout(60):
        code = await LockedDaemon(settings, once=True).run()
    assert code == 1, "some files failed, the daemon did not crash"

    errors = {}
    for name, needs in FAILS_WITH.items():
        doc = result(tmp_path, "failed", "leads", name)
        assert doc["status"] == "failed"
        assert (tmp_path / "failed" / "leads" / name).is_file(), "the source is kept"
        for alternatives in needs:
            assert any(word in doc["error"] for word in alternatives), (name, doc["error"])
        assert "Traceback" not in doc["error"]
        errors[name] = doc["error"]
    empty = result(tmp_path, "done", "leads", "header_only.csv")
    assert (empty["status"], empty["rows"], empty["chunks"]) == ("complete", 0, [])
    assert result(tmp_path, "done", "leads", "good.csv")["rows_processed"] == 40
    assert {str(r["email"]) for r in sim.records("leads")} == {
        f"ok{i}@example.com" for i in range(40)
    }
    assert len(all_results(tmp_path)) == len(FAILS_WITH) + 2
    figures(errors=errors)


async def test_twelve_megabyte_record_is_set_aside_and_the_rest_lands(
    make_simulator: MakeSimulator, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,), max_chunk_bytes=9_500_000)
    source = tmp_path / "inbox" / "leads" / "big_record.csv"
    big_line = await asyncio.to_thread(write_big_record_file, source)

    async with asyncio.timeout(60):
        assert await LockedDaemon(settings, once=True).run() == 0

    big = result(tmp_path, "done", "leads", "big_record.csv")
    assert big["status"] == "complete"
    assert (big["rows"], big["rows_processed"], big["rows_failed"]) == (101, 100, 1)
    with (tmp_path / "done" / "leads" / big["failures_file"]).open(newline="") as fh:
        failures = list(csv.reader(fh))
    assert failures[1][0] == "huge@example.com"
    assert "too large" in failures[1][-2]
    assert failures[1][-1] == str(big_line)
    landed = {str(r["email"]) for r in sim.records("leads")}
    assert landed == {f"g{i}@example.com" for i in range(100)}, "every good row lands"
    figures(big_record=failures[1][-2])


FLOOD = 1_000  # bench/soak.py drops 20,000


async def sample_memory(life: CliProcess, samples: list[int], stop: asyncio.Event) -> None:
    """VmRSS of the daemon every 0.2 s until `stop` (a sampler, not a synchronisation)."""
    while not stop.is_set():
        rss = life.memory_kib()
        if rss is not None:
            samples.append(rss)
        await asyncio.sleep(0.2)


async def test_a_thousand_tiny_files_all_processed_memory_flat(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.002, "rate_limit": 100_000})
    data = tmp_path / "data"
    settings = fast_settings(
        sim.base_url, data, (LEADS,), api_calls_per_window=100, api_window_seconds=0.002
    )
    settings = replace(settings, polling=PollingSettings(interval=0.01, max_interval=0.05))
    runner = daemons(settings)
    life = await runner.daemon()
    await life.wait_for_event("spool_started")
    inbox = data / "inbox" / "leads"
    await asyncio.to_thread(drop_tiny_files, inbox, FLOOD)
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_memory(life, samples, stop))
    started = asyncio.get_running_loop().time()

    done = data / "done" / "leads"

    def finished() -> bool:
        return len(list(done.glob("*.result.json"))) >= FLOOD or life.returncode is not None

    await wait_until(finished, f"{FLOOD} results", within=300, poll=0.5)
    seconds = asyncio.get_running_loop().time() - started
    peak = life.memory_kib("VmHWM")
    stop.set()
    await sampler
    life.terminate()  # SIGTERM: a clean exit 0 within 10 s
    assert await life.wait(60) == 0

    assert len(list(done.glob("*.result.json"))) == FLOOD
    assert not list(inbox.iterdir())
    assert not list((data / "failed" / "leads").iterdir())
    assert len(sim.records("leads")) == FLOOD
    assert peak is not None
    early = max(samples[: max(1, len(samples) // 5)])
    assert max(samples) - early < 40 * 1024, "resident memory stays flat"
    figures(
        files=FLOOD,
        seconds=round(seconds, 1),
        files_per_second=round(FLOOD / seconds, 1),
        peak_rss_mib=round(peak / 1024, 1),
        rss_first_fifth_mib=round(early / 1024, 1),
        rss_max_mib=round(max(samples) / 1024, 1),
    )


async def drop_and_finish(data: Path, first: int, count: int) -> None:
    """Drop `count` one-row files and wait until each has its result."""
    inbox, done = data / "inbox" / "leads", data / "done" / "leads"
    await asyncio.to_thread(drop_tiny_files, inbox, count, first)
    total = first + count
    await wait_until(
        lambda: len(list(done.glob("*.result.json"))) >= total, f"{total} results", within=300
    )


async def test_memory_held_per_finished_file_is_released(
    make_simulator: MakeSimulator, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.002, "rate_limit": 100_000})
    settings = fast_settings(
        sim.base_url, tmp_path, (LEADS,), api_calls_per_window=100, api_window_seconds=0.002
    )
    settings = replace(settings, polling=PollingSettings(interval=0.01, max_interval=0.05))
    daemon = LockedDaemon(settings, once=False)
    running = asyncio.ensure_future(daemon.run())
    await wait_until(lambda: (tmp_path / "inbox" / "leads").is_dir(), "the inbox")
    ours = [
        tracemalloc.Filter(True, "*/orchestrator/*"),
        tracemalloc.Filter(False, "*/orchestrator/simulator*"),  # the fake Marketo keeps records
    ]
    tracemalloc.start(1)
    try:
        await drop_and_finish(tmp_path, 0, 50)  # warm-up: caches, pools, first tokens
        gc.collect()
        before = tracemalloc.take_snapshot().filter_traces(ours)
        await drop_and_finish(tmp_path, 50, 150)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(ours)
    finally:
        tracemalloc.stop()
        daemon.stop.set()
        await asyncio.wait_for(running, 60)
    growth = sum(stat.size_diff for stat in after.compare_to(before, "lineno"))
    figures(bytes_kept_per_finished_file=round(growth / 150))
    assert growth < 64 * 1024, f"{growth} bytes still held after 150 more files"
