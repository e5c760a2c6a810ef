"""Benchmark: /metrics and status as the state store's history grows.

Not a test. Fills a real state store (schema, triggers and all) with finished
files, two chunks each, plus a handful of files still at work, in steps up to
--sizes (default 1,000, 10,000 and 100,000 finished files), and at each step
times, median of --runs:

- scrape: `GET /metrics` from the real status server over loopback,
- /jobs: `GET /jobs` (the bounded listing, active work first),
- status: what `marketo-orchestrator status` does in-process: open the store,
  snapshot, format the table, close,
- full scan: reading every file and chunk row and counting them, which is what
  a scrape did before the store kept tallies; the contrast.

Each figure is printed with its ratio to the smallest size measured in the same
run, so the numbers compare across machines. The seeding inserts rows with
sqlite3 in one transaction per step (the store's triggers keep the tallies, as
they do for the daemon's own writes): it is set-up, not what is measured.

    .venv/bin/python bench/retention.py [--sizes 1000,10000,100000] [--runs 25]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import logs  # noqa: E402
from orchestrator.metrics import Metrics  # noqa: E402
from orchestrator.status import StatusServer, format_status_table, read_snapshot  # noqa: E402
from orchestrator.store import Store  # noqa: E402

ACTIVE = 5  # files still at work, present at every step


def seed(db: Path, first: int, last: int) -> None:
    """Finished files first..last-1 (two complete chunks each), in one transaction."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO files (id, route, name, source_path, work_path, status,"
                " max_chunk_bytes, claimed_at, rows, chunks_total, result_path, finished_at,"
                " ticket) VALUES (?, 'leads', ?, ?, ?, 'complete', 9500000, ?, 20000, 2, ?, ?, ?)",
                (
                    (
                        n,
                        f"export-{n}.csv",
                        f"/data/inbox/leads/export-{n}.csv",
                        f"/data/work/incoming/{n}-export-{n}.csv",
                        moment(n),
                        f"/data/done/leads/export-{n}.csv.result.json",
                        moment(n, 30),
                        f"export-{n}",
                    )
                    for n in range(first, last)
                ),
            )
            conn.executemany(
                "INSERT INTO chunks (file_id, idx, path, rows, bytes, first_line, status,"
                " batch_id, submit_attempts, marketo_status, rows_processed, message,"
                " submitted_at, finished_at) VALUES (?, ?, ?, 10000, 9000000, ?, 'complete',"
                " ?, 1, 'Complete', 10000, 'Import succeeded', ?, ?)",
                (chunk_row(n, i) for n in range(first, last) for i in (1, 2)),
            )
    finally:
        conn.close()


def chunk_row(n: int, i: int) -> tuple[object, ...]:
    path = f"/data/work/chunks/{n}/{i}.csv"
    return (n, i, path, 2 + 10000 * (i - 1), n * 10 + i, moment(n, 1), moment(n, 29))


def seed_active(db: Path, first_id: int) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO files (id, route, name, source_path, work_path, status,"
                " max_chunk_bytes, claimed_at, ticket)"
                " VALUES (?, 'leads', ?, ?, ?, 'claimed', 9500000, ?, ?)",
                (
                    (
                        first_id + k,
                        f"new-{k}.csv",
                        f"/data/inbox/leads/new-{k}.csv",
                        f"/data/work/incoming/{k}-new-{k}.csv",
                        "2030-01-01T00:00:00.000000Z",
                        f"new-{k}",
                    )
                    for k in range(ACTIVE)
                ),
            )
    finally:
        conn.close()


def moment(n: int, second: int = 0) -> str:
    """A distinct, increasing time per file (one a minute from 2026-01-01)."""
    day, minute = divmod(n, 1440)
    hour, minute = divmod(minute, 60)
    return f"2026-{1 + day // 28 % 12:02d}-{1 + day % 28:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


async def median_ms(run: Callable[[], Awaitable[object]], runs: int) -> float:
    await run()  # warm the page cache and the connection
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        await run()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


async def measure(db: Path, runs: int) -> dict[str, float]:
    store = await Store.open(db)
    server = StatusServer("127.0.0.1", 0, store=store, metrics=Metrics(), readiness=lambda: None)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> None:
                async with http.get(base + path) as response:
                    assert response.status == 200, (path, response.status)
                    await response.read()

            async def status() -> None:
                format_status_table(await read_snapshot(db))

            async def full_scan() -> None:
                Metrics().update_from_snapshot(await store.files(), await store.chunks())

            return {
                "scrape": await median_ms(lambda: get("/metrics"), runs),
                "/jobs": await median_ms(lambda: get("/jobs"), runs),
                "status": await median_ms(status, runs),
                "full scan": await median_ms(full_scan, max(3, runs // 5)),
            }
    finally:
        await server.stop()
        await store.close()


async def bench(sizes: Sequence[int], runs: int) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        db = Path(tmp) / "state.db"
        await (await Store.open(db)).close()  # the schema, with its tallies and triggers
        seed_active(db, 10_000_000)
        have = 1
        for size in sizes:
            seed(db, have, size + 1)
            have = size + 1
            print(f"  {size:>7} finished files seeded; measuring ...", file=sys.stderr)
            rows.append((size, await measure(db, runs)))
    return rows


def report(rows: list[tuple[int, dict[str, float]]]) -> str:
    base = rows[0][1]
    names = list(base)
    lines = [
        "| finished files | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for size, figures in rows:
        cells = [f"{figures[n]:.2f} ms ({figures[n] / base[n]:.2f}x)" for n in names]
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--runs", type=int, default=25, help="median of this many per figure")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    logs.configure("warning", "json", sys.stderr)
    rows = asyncio.run(bench(sizes, args.runs))
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
