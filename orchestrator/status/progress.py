"""The progress line: one line redrawn in place on a terminal (`logs.LiveLine`).

Two views draw it, with the same words in the same order: `run --once` over every
file of the store (`live_progress`, `run_line`) and `submit --wait` over one file
(`file_line`). Each says what it counts, chunks done of total, rows, the rate
since the line first showed, and what the work waits for now:

    files 3/10  chunks 7/12  rows 5200  1,300 rows/s  waiting for: Marketo's import
    importing  chunks 1/3  rows 2000/6000  950 rows/s  waiting for: Marketo's import
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Collection
from typing import Any, Final

from orchestrator import logs
from orchestrator.clock import wait_for_any
from orchestrator.metrics import StoreReader
from orchestrator.models import FINAL_CHUNK_STATUSES
from orchestrator.status.snapshot import WAITING_FOR, Query, load_snapshot

PROGRESS_SECONDS: Final = 1.0  # how often `live_progress` redraws the line
PROGRESS_FILES: Final = 100  # active files whose live state the run's line looks at
# What the run's line says the work waits for: the first of these live states that an
# active file is in (the one nearest to Marketo first).
WAITING_ORDER: Final = (
    "importing",
    "queued",
    "waiting",
    "held",
    "packing",
    "splitting",
    "claimed",
    "finishing",
)


def progress_line(
    head: str,
    *,
    chunks: str | None = None,
    rows: str | None = None,
    rate: float | None = None,
    waiting: str | None = None,
) -> str:
    """The line: `head` (what is counted, or a file's state), then what is known of the
    rest; two spaces between the parts."""
    parts = [head]
    if chunks is not None:
        parts.append(f"chunks {chunks}")
    if rows is not None:
        parts.append(f"rows {rows}")
    if rate:
        parts.append(f"{rate:,.0f} rows/s")
    if waiting:
        parts.append(f"waiting for: {waiting}")
    return "  ".join(parts)


def fraction(done: int, total: int | None) -> str:
    """`3/10`, or `3/?` while the total is not known (a file still being split)."""
    return f"{done}/{'?' if total is None else total}"


def waiting_for(
    states: Collection[str], backoff: float = 0.0, quota: dict[str, Any] | None = None
) -> str | None:
    """What work in these live states waits for (a backoff first, then the daily quota
    when it holds new jobs back from a file waiting for a slot), or None."""
    if backoff:
        return f"a backoff ({backoff:.0f}s)"
    if quota and quota["creates_paused"] and "waiting" in states:
        return f"the daily API quota (resets {quota['resets_at'][:16].replace('T', ' ')} UTC)"
    state = next((s for s in WAITING_ORDER if s in states), None)
    return None if state is None else WAITING_FOR[state]


class RateMeter:
    """Rows per second since the first rows were seen (the rows before do not count)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start: tuple[float, int] | None = None

    def rate(self, rows: int) -> float | None:
        now = self.clock()
        if self.start is None or rows < self.start[1]:
            self.start = (now, rows)
            return None
        began, first = self.start
        return (rows - first) / (now - began) if now > began and rows > first else None


def file_line(entry: dict[str, Any] | None, meter: RateMeter) -> str:
    """One file's line (`submit --wait`; its name is on the line above) from its snapshot
    entry, None while no daemon has claimed it."""
    if entry is None:
        return progress_line("unclaimed", waiting=WAITING_FOR["inbox"])
    return progress_line(
        entry["state"],
        chunks=fraction(entry["chunks_done"], entry["chunks_total"]),
        rows=fraction(entry["rows_processed"], entry["rows"]),
        rate=meter.rate(entry["rows_processed"]),
        waiting=waiting_for([entry["state"]]),
    )


async def run_line(store: StoreReader, backoff: float, meter: RateMeter) -> str:
    """The run's line (`run --once`): counts from the store's tallies (a few rows, however
    many files it holds); what the work waits for from the active files' live states."""
    snap = await load_snapshot(store, Query(active=True, limit=PROGRESS_FILES))
    files, chunks = snap["totals"]["files"], snap["totals"]["chunks"]
    rows = (await store.tallies()).get("rows:processed", 0)
    return progress_line(
        f"files {fraction(files['complete'] + files['failed'], sum(files.values()))}",
        chunks=fraction(sum(chunks[str(s)] for s in FINAL_CHUNK_STATUSES), sum(chunks.values())),
        rows=str(rows),
        rate=meter.rate(rows),
        waiting=waiting_for({f["state"] for f in snap["files"]}, backoff, snap["quota"]),
    )


async def live_progress(
    store: StoreReader, backoff_remaining: Callable[[], float], stop: asyncio.Event
) -> None:
    """The run's line on stderr, redrawn every `PROGRESS_SECONDS` until `stop`; kept apart
    from log lines (`logs.LiveLine`) and left as an ordinary line at the end."""
    live = logs.LiveLine(sys.stderr)
    meter = RateMeter()
    try:
        while True:
            live.show(await run_line(store, backoff_remaining(), meter))
            if stop.is_set():
                break
            await wait_for_any(stop, within=PROGRESS_SECONDS)
    finally:
        live.close(keep=True)
