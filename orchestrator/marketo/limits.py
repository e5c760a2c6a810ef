"""The Marketo client's limits: calls per window, calls in flight, calls per day.

`Limiter` is two limits (STYLE.md 14): an `asyncio_throttle.Throttler` for
calls per window and an `asyncio.Semaphore` for calls in flight. The semaphore
is taken first and the window slot second, so a call is stamped in the window
right before it is sent; stamping first and then queueing on the semaphore
would let calls bunch up later than their stamps say. The window is widened by
a small margin because Marketo counts calls when they arrive, and arrival
jitters by some milliseconds against our send time. Identity calls do not count
toward Marketo's limits, so they take the semaphore only (they are requests in
flight all the same).

After a 606 the client calls `Limiter.hold`: no call is sent until the window
has slid (a full `api_window_seconds`), since the calls that filled it may be
another integration's that our own window never saw.

`DailyQuota` counts bulk calls per quota day (the day in `quota_reset_tz`) and
pauses every call of the client until the quota resets, when either the count
reaches `daily_api_calls` or Marketo says 607. Marketo says the quota "resets
daily at 12:00AM CST", which reads two ways: midnight in America/Chicago, or
midnight at a fixed UTC-6 (06:00 UTC, an hour later in summer). The pause ends
at the later of the two readings of the coming reset. If Marketo still says 607
after a pause ended, and no call succeeded since, the reset has not happened
yet: the quota probes again every `QUOTA_PROBE_SECONDS` instead of pausing a day.
The pause uses the client's injected wall clock and sleep, so tests step over
it without waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from zoneinfo import ZoneInfo

import structlog
from asyncio_throttle.throttler import Throttler

from orchestrator import constants

log = structlog.get_logger(__name__)

# The window is widened by this fraction (at most WINDOW_MARGIN_MAX seconds).
WINDOW_MARGIN_FRACTION = 0.05
WINDOW_MARGIN_MAX = 1.0


class Limiter:
    """At most `per_window` bulk calls per `window` seconds, `in_flight` calls at once."""

    def __init__(
        self,
        per_window: int,
        window: float,
        in_flight: int,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        margin = min(WINDOW_MARGIN_MAX, window * WINDOW_MARGIN_FRACTION)
        self._throttler = Throttler(rate_limit=per_window, period=window + margin)
        self._semaphore = asyncio.Semaphore(in_flight)
        self._sleep = sleep
        self._clock = clock
        self._hold_until = 0.0

    def hold(self, seconds: float) -> None:
        """Send no counted call for `seconds` from now (after a 606)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)

    @asynccontextmanager
    async def slot(self, *, counted: bool = True) -> AsyncIterator[None]:
        """Hold one in-flight slot (and one window slot when `counted`)."""
        if counted:
            held = self._hold_until - self._clock()
            if held > 0:
                await self._sleep(held)
        async with self._semaphore:
            if counted:
                # asyncio-throttle ships no annotations, so its acquire() is untyped.
                await self._throttler.acquire()  # type: ignore[no-untyped-call]
            yield


def next_midnight(now: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """The next midnight in `tz` (a zone or a fixed offset) after the aware `now`, in UTC."""
    local = now.astimezone(tz)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(0), tzinfo=tz)
    return midnight.astimezone(dt.UTC)


def next_reset(now: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """When the quota resets next: the later of midnight in `tz` and midnight at a
    fixed UTC-6 ("12:00AM CST" read literally), for the same coming reset."""
    fixed = dt.timezone(dt.timedelta(hours=constants.QUOTA_RESET_FIXED_OFFSET_HOURS))
    a, b = next_midnight(now, tz), next_midnight(now, fixed)
    if abs((a - b).total_seconds()) < 12 * 3600:
        return max(a, b)
    return min(a, b)  # one reading's midnight already passed today: the other is still ahead


def seconds_between(start: dt.datetime, end: dt.datetime) -> float:
    """Elapsed seconds, computed in UTC (same-zone aware subtraction ignores DST)."""
    return (end.astimezone(dt.UTC) - start.astimezone(dt.UTC)).total_seconds()


class DailyQuota:
    """Counts bulk calls per quota day; pauses all calls until the reset when spent."""

    def __init__(
        self,
        limit: int,
        tz_name: str,
        *,
        wall_clock: Callable[[], dt.datetime],
        sleep: Callable[[float], Awaitable[None]],
        used: int = 0,
    ) -> None:
        self._limit = limit
        self._tz = ZoneInfo(tz_name)
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._used = used
        self._day = self._today()
        self._resume_at: dt.datetime | None = None
        self._probing = False  # a pause ended and no call succeeded since

    @property
    def used(self) -> int:
        """Calls counted in the current quota day."""
        self._roll()
        return self._used

    def exhausted(self) -> dt.datetime:
        """Marketo said 607 (or our count is spent): pause every call until the reset,
        or, right after a pause that should have reached it, for a probe interval."""
        if self._resume_at is None:
            now = self._wall_clock()
            if self._probing:
                probe = dt.timedelta(seconds=constants.QUOTA_PROBE_SECONDS)
                self._resume_at = now.astimezone(dt.UTC) + probe
                log.warning("daily API quota not reset yet, probing", resume_at=self._resume_at)
            else:
                self._resume_at = next_reset(now, self._tz)
                log.warning("daily API quota spent, pausing until reset", resume_at=self._resume_at)
        return self._resume_at

    def succeeded(self) -> None:
        """A call went through: the quota is live again."""
        self._probing = False

    async def reserve(self, on_pause: Callable[[float], None]) -> None:
        """Count one call, first waiting out a pause; `on_pause(seconds)` before each wait."""
        while True:
            self._roll()
            if self._resume_at is None and self._used < self._limit:
                self._used += 1
                return
            resume_at = self.exhausted()
            seconds = max(0.0, seconds_between(self._wall_clock(), resume_at))
            on_pause(seconds)
            await self._sleep(seconds)
            self._resume(resume_at)

    def _today(self) -> dt.date:
        return self._wall_clock().astimezone(self._tz).date()

    def _roll(self) -> None:
        today = self._today()
        if today > self._day:
            self._day, self._used = today, 0

    def _resume(self, resume_at: dt.datetime) -> None:
        """The pause that ended at `resume_at` is over: a new quota day starts."""
        if self._resume_at != resume_at:
            return  # another waiter already resumed (or a new pause began)
        self._resume_at = None
        self._probing = True
        new_day = resume_at.astimezone(self._tz).date()
        if new_day > self._day:
            self._day, self._used = new_day, 0
