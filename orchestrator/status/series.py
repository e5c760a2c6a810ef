"""The last hour of two counters, for the status page's charts: kept in memory only.

Every `SAMPLE_SECONDS` the daemon notes the rows Marketo reported processed so far
(the store's tally, which grows as each job reports progress) and the API calls made
(the same counter /metrics exports). The page draws rates from the differences
between points, so a point is two totals and a time, and an hour is a few
hundred points. Nothing is written to disk: a restarted daemon starts a new line.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from orchestrator.clock import wait_for_any
from orchestrator.errors import StoreError
from orchestrator.metrics import Metrics, StoreReader

log = structlog.get_logger(__name__)

SAMPLE_SECONDS: Final = 5.0  # how often a point is taken
KEEP_SECONDS: Final = 3600.0  # the charts' span: an hour
CAPACITY: Final = int(KEEP_SECONDS / SAMPLE_SECONDS) + 1


@dataclass(frozen=True, slots=True)
class Point:
    """Two running totals at one moment (seconds since the epoch)."""

    at: float
    rows_processed: int
    api_calls: int

    def as_list(self) -> list[float | int]:
        return [round(self.at, 3), self.rows_processed, self.api_calls]


class Series:
    """A ring of points, the oldest dropped once an hour old or once the ring is full."""

    def __init__(self, *, capacity: int = CAPACITY, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._points: deque[Point] = deque(maxlen=capacity)

    def __repr__(self) -> str:
        return f"<Series {len(self._points)} points>"

    def add(self, rows_processed: int, api_calls: int) -> Point:
        """Note the totals now; forget points older than `KEEP_SECONDS`."""
        point = Point(self.clock(), rows_processed, api_calls)
        self._points.append(point)
        while self._points and self._points[0].at < point.at - KEEP_SECONDS:
            self._points.popleft()
        return point

    def points(self, live: Point | None = None) -> list[Point]:
        """The points of the last hour, oldest first, with `live` (the totals read for
        this very answer) at the end, so the newest stretch is never older than a request."""
        kept = list(self._points)
        if live is not None and (not kept or live.at > kept[-1].at):
            kept.append(live)
        return kept

    def now(self, rows_processed: int, api_calls: int) -> Point:
        """A point for the totals read now, not kept."""
        return Point(self.clock(), rows_processed, api_calls)

    async def sample(self, store: StoreReader, metrics: Metrics) -> None:
        """Take one point: the store's rows tally and the metrics' API call counter."""
        try:
            tallies = await store.tallies()
        except StoreError as exc:
            log.warning("series_store_unreadable", error=exc.problem)
            return
        self.add(tallies.get("rows:processed", 0), metrics.readings().api_calls)

    async def run(self, stop: asyncio.Event, store: StoreReader, metrics: Metrics) -> None:
        """Take a point now and every `SAMPLE_SECONDS` until `stop` is set."""
        while not stop.is_set():
            await self.sample(store, metrics)
            await wait_for_any(stop, within=SAMPLE_SECONDS)
