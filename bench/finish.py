"""Benchmark: finishing a large file with many failed rows, memory and speed.

Not a test. Generates a leads CSV of --size-mb (default 1,000 MB, cached under
bench/.cache/) where every 10th row has an invalid email, which the simulator
fails ("1003 Invalid email address"); every 50th row has a quoted note over two
lines. Then:

- starts the bundled simulator as a process of its own (this script with
  --serve), fast jobs and `keep_records` off, so the daemon's memory is its own;
- runs the real daemon, `marketo-orchestrator run --once`, on a fresh data_dir
  with the file in its inbox and Marketo's 9.5 MB chunks, polling the daemon's
  VmHWM (peak RSS) from /proc every 50 ms (the high-water mark: a poll misses
  only growth in the last 50 ms before exit);
- reads the daemon's JSON log: `chunk_attributed` (failed rows matched back to
  source lines, per chunk, as each chunk goes final, in a thread while other
  chunks import) and the time from the last chunk final to the file finished
  (its result.json written), which is what finishing costs the user;
- checks result.json and the failures file (every failed row, with its line);
- measures baselines in the same run: `cp` of the source, a plain Python
  read + write + fsync of it in 1 MiB blocks (the disk), and csv.reader over
  it (the floor for matching rows back, which parses every record).

MB/s are source megabytes (10^6 bytes) per second. `--key-order both` runs the
daemon twice on the same file, with the key rule (`limits.key_order`) on and off, and
prints both; the baselines are measured once.

    .venv/bin/python bench/finish.py                    # 1 GB: several minutes
    .venv/bin/python bench/finish.py --key-order both   # rule on, then off: twice that
    .venv/bin/python bench/finish.py --size-mb 100      # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import constants  # noqa: E402
from tests.support.processes import CliRunner  # noqa: E402
from tests.support.settings import LEADS, fast_settings, free_port  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
HEADER = ["email", "firstName", "lastName", "company", "note"]
FAIL_EVERY = 10  # every 10th row fails: 10 %
TARGET_RSS_MB = 64
TARGET_MB_S = 50.0
SIM_KNOBS: dict[str, Any] = {
    "job_overhead": 0.02,
    "rows_per_second": 5_000_000.0,
    "rate_window": 2.0,
    "keep_records": False,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1000, help="source size (default 1000)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the simulator process
    parser.add_argument("--limit", type=float, default=3600.0, help="seconds the run may take")
    parser.add_argument(
        "--key-order",
        choices=("on", "off", "both"),
        default="on",
        help="limits.key_order for the daemon (both: a run with each)",
    )
    return parser.parse_args(argv)


# -- the source -------------------------------------------------------------------------


def source_file(size_mb: int) -> tuple[Path, int, int]:
    """The cached source (path, rows, rows that fail), generated if missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"finish-{size_mb}mb.csv"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        known = json.loads(meta.read_text())
        return path, int(known["rows"]), int(known["failing"])
    target = size_mb * 1_000_000
    rows = failing = 0
    tmp = path.with_suffix(".part")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        while fh.tell() < target:
            batch = []
            for i in range(rows, rows + 10_000):
                bad = i % FAIL_EVERY == 3
                failing += bad
                email = f"lead{i}.example.com" if bad else f"lead{i}@example.com"
                note = 'said: "call back",\nthen hung up' if i % 50 == 7 else f"ref {i * 7919}"
                batch.append(
                    [email, f"First{i % 997}", f"Last{i % 1009}", f"Company {i % 89}", note]
                )
            writer.writerows(batch)
            rows += len(batch)
    tmp.rename(path)
    meta.write_text(json.dumps({"rows": rows, "failing": failing}))
    return path, rows, failing


# -- the disk, for comparison -----------------------------------------------------------------


def disk_baselines(source: Path, scratch: Path) -> dict[str, float]:
    """Seconds for `cp` of the source, for a read + write + fsync of it in 1 MiB blocks,
    and for parsing it with csv.reader alone (what matching rows to lines must do)."""
    found = {}
    target = scratch / "copy.csv"
    started = time.monotonic()
    subprocess.run(["cp", str(source), str(target)], check=True)
    subprocess.run(["sync", str(target)], check=True)
    found["cp"] = time.monotonic() - started
    target.unlink()
    started = time.monotonic()
    with source.open("rb") as src, target.open("wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    found["read+write+fsync"] = time.monotonic() - started
    target.unlink()
    started = time.monotonic()
    with source.open(encoding="utf-8", newline="") as fh:
        deque(csv.reader(fh), maxlen=0)
    found["csv.reader over the source (matching's floor)"] = time.monotonic() - started
    return found


# -- the simulator, a process of its own --------------------------------------------------------


def serve(port: int) -> int:
    from orchestrator.simulator import SimulatorConfig
    from orchestrator.simulator import serve as run_server

    config = SimulatorConfig().with_knobs(**SIM_KNOBS)
    asyncio.run(run_server(config, "127.0.0.1", port))
    return 0


async def wait_port(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # polling a port that is not open yet
            continue
        writer.close()
        await writer.wait_closed()
        return


# -- the run -------------------------------------------------------------------------------


def when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def daemon_run(
    args: argparse.Namespace, source: Path, failing: int, key_order: bool
) -> dict[str, Any]:
    """One `run --once` of the daemon on the source, against a simulator process of its
    own: what it measured, the result checked."""
    root = Path(tempfile.mkdtemp(prefix="finish-", dir=CACHE))
    port = free_port()
    simulator = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything runs
        [sys.executable, __file__, "--serve", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(root / "simulator.stderr").open("wb"),
    )
    try:
        await wait_port(port)
        data = root / "data"
        settings = fast_settings(
            f"http://127.0.0.1:{port}",
            data,
            (LEADS,),
            max_chunk_bytes=constants.DEFAULT_MAX_CHUNK_BYTES,
            key_order=key_order,
        )
        inbox = data / "inbox" / "leads"
        inbox.mkdir(parents=True)
        try:
            os.link(source, inbox / "big.csv")
        except OSError:
            shutil.copyfile(source, inbox / "big.csv")
        runner = CliRunner.for_settings(root / "daemon", settings)
        started = time.monotonic()
        proc = await runner.daemon("--once")
        peak_kib = 0
        while proc.returncode is None:
            peak_kib = max(peak_kib, proc.memory_kib("VmHWM") or 0)
            try:
                await asyncio.wait_for(proc.process.wait(), 0.05)
            except TimeoutError:
                if time.monotonic() - started > args.limit:
                    proc.kill()
                    raise
        wall = time.monotonic() - started
        code = proc.returncode
        await runner.close()
    finally:
        simulator.terminate()
        simulator.wait()
    events = proc.events()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_name.setdefault(str(event.get("event")), []).append(event)
    (finished,) = by_name["file_finished"]
    chunks = by_name.get("chunk_finished", [])
    attributed = by_name.get("chunk_attributed", [])
    (written,) = by_name["results_written"]
    result = json.loads((data / "done" / "leads" / "big.csv.result.json").read_text())
    failures = data / "done" / "leads" / "big.csv.failures.csv"
    with failures.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        failed_rows = blank = 0
        for row in reader:
            failed_rows += 1
            blank += row[-1] == ""
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "key_order": key_order,
        "code": code,
        "wall": wall,
        "peak_mb": peak_kib / 1024,
        "chunks": len(chunks),
        "finishing": when(finished) - max(when(e) for e in chunks),
        "finish_file": float(written["seconds"]),
        "attribution": sum(float(e["seconds"]) for e in attributed),
        "result": result,
        "failed_rows": failed_rows,
        "ok": code == 0 and result["rows_failed"] == failing == failed_rows and blank == 0,
        "blank": blank,
    }


async def run(args: argparse.Namespace) -> int:
    source, rows, failing = source_file(args.size_mb)
    mb = source.stat().st_size / 1e6
    modes = {"on": (True,), "off": (False,), "both": (True, False)}[args.key_order]
    runs = [await daemon_run(args, source, failing, key_order) for key_order in modes]
    scratch = Path(tempfile.mkdtemp(prefix="finish-disk-", dir=CACHE))
    try:
        disk = disk_baselines(source, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"source: {mb:,.0f} MB, {rows:,} rows, {failing:,} failing")
    for one in runs:
        result = one["result"]
        print(
            f"key rule {'on' if one['key_order'] else 'off'}: exit code {one['code']}, "
            f"{result['status']}, rows_failed {result['rows_failed']:,}, failures file "
            f"{one['failed_rows']:,} rows ({one['blank']} without a line); {one['chunks']} "
            f"chunks; run --once took {one['wall']:.1f} s"
        )
    print()
    heads = " | ".join(f"rule {'on' if one['key_order'] else 'off'}" for one in runs)
    print(f"| measure | {heads} | target |")
    print("|---|" + "---:|" * len(runs) + "---|")

    def row(name: str, cells: list[str], target: str = "") -> None:
        print(f"| {name} | {' | '.join(cells)} | {target} |")

    def rate(seconds: float) -> str:
        return f"{seconds:.2f} s, {mb / max(seconds, 1e-9):,.0f} MB/s"

    row(
        "daemon peak RSS (VmHWM)", [f"{r['peak_mb']:.1f} MB" for r in runs], f"< {TARGET_RSS_MB} MB"
    )
    row(
        "finishing: last chunk final to result.json",
        [rate(r["finishing"]) for r in runs],
        f">= {TARGET_MB_S:.0f} MB/s",
    )
    row("of which finish_file (merge, move, result.json)", [rate(r["finish_file"]) for r in runs])
    row(
        "matching rows to lines, all chunks (as each went final)",
        [rate(r["attribution"]) for r in runs],
    )
    for name, seconds in disk.items():
        row(f"baseline: {name}", [rate(seconds)] * len(runs))
    ok = all(
        one["ok"]
        and one["peak_mb"] < TARGET_RSS_MB
        and mb / max(one["finishing"], 1e-9) >= TARGET_MB_S
        for one in runs
    )
    print()
    print("targets met" if ok else "TARGET MISSED (or the result is wrong)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args.serve)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
