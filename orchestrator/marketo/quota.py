"""The daily quota: the subscription's, shared with every other integration.

Marketo allocates a subscription `daily_quota` calls a day for all its API users
together, so our own count says little about what is left. `DailyQuota` keeps
Marketo's count (GET /rest/v1/stats/usage.json, read by the client whenever
`reading_due`: at the start and every `USAGE_READ_SECONDS`) and adds our calls
since that reading; `state()` says what that comes to (`models.QuotaState`).
The scheduler creates no new job once it reaches daily_quota - daily_reserve;
every other call still goes (jobs at Marketo are polled to their end).

Marketo says the quota "resets daily at 12:00AM CST", which reads two ways:
midnight in America/Chicago, or midnight at a fixed UTC-6 (06:00 UTC, an hour
later in summer). The reset is taken at the later of the two (`next_reset`):
then the reading is stale, our count since starts again, and a reading is due.

607 ("Daily quota reached") means the quota is spent whatever we counted: every
call of the client pauses until the reset (`exhausted`, `wait`). If Marketo
still says 607 after a pause ended, and no call succeeded since, the reset has
not happened yet: the quota probes again every `QUOTA_PROBE_SECONDS` instead of
pausing a day.

Several daemons on one subscription (`marketo.sharing`) keep one figure: the usage
reading any of them took last and all their counted calls since, from the
coordination database (`refresh_shared`, `adopt`); a reading is due when the
shared one is `USAGE_READ_SECONDS` old, so one daemon's reading serves them all.
`ours_since` in `state()` then counts every daemon's calls since the reading, and
a 607 pause another daemon met pauses this one too (`paused_elsewhere`).

Our own calls of the day (`used`) are counted too, by the date in
`quota_reset_tz`: the daemon keeps them in the state store and in /metrics.
Calls Marketo does not count (601, 602, 604, 605, 608, 611) are not counted
here either (`marketo.retry` decides). Everything runs on the client's injected
wall clock and sleep, so tests step over a day without waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import structlog

from orchestrator import constants
from orchestrator.errors import CoordinationUnavailable, MarketoError
from orchestrator.marketo.sharing import SharedCalls, SharedUsage
from orchestrator.models import QuotaState

log = structlog.get_logger(__name__)


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
    """The subscription's calls today (Marketo's reading plus ours since), our own
    calls today, and the pause after a 607."""

    def __init__(
        self,
        quota: int,
        reserve: int,
        tz_name: str,
        *,
        wall_clock: Callable[[], dt.datetime],
        sleep: Callable[[float], Awaitable[None]],
        used: int = 0,
    ) -> None:
        self._quota = quota
        self._reserve = reserve
        self._tz = ZoneInfo(tz_name)
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._used = used
        self._day = self._today()
        self._resume_at: dt.datetime | None = None
        self._probing = False  # a pause ended and no call succeeded since
        now = self._now()
        self._resets_at = next_reset(now, self._tz)
        self._marketo: int | None = None  # Marketo's count at the last reading
        self._read_at: dt.datetime | None = None
        self._next_read = now  # a reading is due at once
        self._retry_at: dt.datetime | None = None  # after a reading failed, not before
        self._since = 0  # our counted calls since the reading (or the reset)
        self._reading = asyncio.Lock()

    @property
    def used(self) -> int:
        """Our calls counted in the current quota day."""
        self._roll()
        return self._used

    def state(self) -> QuotaState:
        """The quota as reckoned now."""
        self._roll()
        return QuotaState(
            as_of=self._now(),
            quota=self._quota,
            reserve=self._reserve,
            resets_at=self._resets_at,
            marketo_count=self._marketo,
            read_at=self._read_at,
            next_read_at=self._next_read,
            ours_since=self._since,
            ours_today=self._used,
            paused_until=self._resume_at,
        )

    # -- Marketo's count -----------------------------------------------------------

    def reading_due(self) -> bool:
        """Whether Marketo's count should be read now."""
        self._roll()
        now = self._now()
        return now >= self._next_read and (self._retry_at is None or now >= self._retry_at)

    def day_began(self) -> dt.datetime:
        """When the current quota day began (the last reset), in UTC."""
        now = self._now()
        began = next_reset(now - dt.timedelta(hours=26), self._tz)  # a day is 23 to 25 hours
        while (following := next_reset(began, self._tz)) <= now:
            began = following
        return began

    def read(self, total: int) -> None:
        """Marketo counts `total` calls of the subscription today (our earlier ones too)."""
        self._roll()
        now = self._now()
        self._marketo, self._read_at, self._since = max(0, total), now, 0
        self._next_read = now + dt.timedelta(seconds=constants.USAGE_READ_SECONDS)
        self._retry_at = None

    async def refresh(self, read: Callable[[], Awaitable[int]]) -> QuotaState:
        """Take a reading with `read` if one is due; the quota as reckoned now. A reading
        that fails is logged and tried again a little later, our own count going on."""
        async with self._reading:  # the scheduler and the upkeep may ask at once
            if self.reading_due():
                try:
                    self.read(await read())
                except MarketoError as exc:
                    self.read_failed()
                    log.warning("usage_unreadable", code=exc.code, error=str(exc))
                else:
                    state = self.state()
                    log.info("usage_read", used=state.used, limit=state.limit)
        return self.state()

    def read_failed(self) -> None:
        """A reading could not be had: keep counting ours, ask again a little later."""
        self._retry_at = self._now() + dt.timedelta(seconds=constants.USAGE_RETRY_SECONDS)
        self._next_read = self._retry_at

    # -- several daemons ------------------------------------------------------------

    async def refresh_shared(
        self, shared: SharedCalls, read: Callable[[], Awaitable[int]]
    ) -> QuotaState:
        """`refresh` for a daemon among several: take the subscription's figure from the
        coordination database, read Marketo's count if the shared reading is due (and
        share it); the quota as reckoned now. While the database is away, this daemon
        reckons alone from its last figure (and reads Marketo itself when that is due)."""
        async with self._reading:
            try:
                self.adopt(await shared.usage(self.day_began()))
            except CoordinationUnavailable as exc:
                log.debug("shared_usage_unavailable", error=str(exc))
            # During a 607 pause a reading would only wait for the reset with the lock held.
            if self.reading_due() and self._resume_at is None:
                try:
                    total = await read()
                except MarketoError as exc:
                    self.read_failed()
                    log.warning("usage_unreadable", code=exc.code, error=str(exc))
                else:
                    self.read(total)
                    try:
                        await shared.record_usage(total)
                        self.adopt(await shared.usage(self.day_began()))
                    except CoordinationUnavailable as exc:
                        log.debug("shared_usage_unavailable", error=str(exc))
                    state = self.state()
                    log.info("usage_read", used=state.used, limit=state.limit, shared=True)
        return self.state()

    def adopt(self, usage: SharedUsage) -> None:
        """The subscription's figure as all daemons know it: Marketo's count at the last
        reading any of them took this quota day, their counted calls since, a 607 pause."""
        self._roll()
        self._marketo, self._read_at, self._since = usage.total, usage.read_at, usage.calls_since
        if usage.read_at is None:
            self._next_read = self._now()
        else:
            self._next_read = usage.read_at + dt.timedelta(seconds=constants.USAGE_READ_SECONDS)
        if self._retry_at is not None:
            self._next_read = max(self._next_read, self._retry_at)
        if usage.paused_until is not None:
            self.paused_elsewhere(usage.paused_until)

    def paused_elsewhere(self, until: dt.datetime) -> bool:
        """Another daemon met 607: every call of this one waits until `until` too. False
        when, by this daemon's clock, that time has already come."""
        self._roll()
        if until <= self._now():
            return False
        if self._resume_at is None or self._resume_at < until:
            self._resume_at = until
            log.warning("daily API quota spent, paused by another daemon", resume_at=until)
        return True

    def count(self) -> None:
        """One of our calls that Marketo counts."""
        self._roll()
        self._used += 1
        self._since += 1

    # -- 607 ------------------------------------------------------------------------

    def exhausted(self) -> dt.datetime:
        """Marketo said 607: pause every call until the reset, or, right after a pause
        that should have reached it, for a probe interval."""
        if self._resume_at is None:
            now = self._now()
            if self._probing:
                probe = dt.timedelta(seconds=constants.QUOTA_PROBE_SECONDS)
                self._resume_at = now + probe
                log.warning("daily API quota not reset yet, probing", resume_at=self._resume_at)
            else:
                self._resume_at = next_reset(now, self._tz)
                log.warning("daily API quota spent, pausing until reset", resume_at=self._resume_at)
        return self._resume_at

    def succeeded(self) -> None:
        """A call went through: the quota is live again."""
        self._probing = False

    async def wait(self, on_pause: Callable[[float], None]) -> None:
        """Wait out a 607 pause, if one runs; `on_pause(seconds)` before each wait."""
        while True:
            self._roll()
            resume_at = self._resume_at
            if resume_at is None:
                return
            seconds = max(0.0, seconds_between(self._now(), resume_at))
            on_pause(seconds)
            await self._sleep(seconds)
            self._resume(resume_at)

    # -- days -------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return self._wall_clock().astimezone(dt.UTC)

    def _today(self) -> dt.date:
        return self._wall_clock().astimezone(self._tz).date()

    def _roll(self) -> None:
        """A new day for our own count, the quota's reset, a pause that ended."""
        today = self._today()
        if today > self._day:
            self._day, self._used = today, 0
        now = self._now()
        if now >= self._resets_at:
            self._resets_at = next_reset(now, self._tz)
            self._marketo, self._read_at, self._since, self._next_read = None, None, 0, now
        if self._resume_at is not None and now >= self._resume_at:
            self._resume(self._resume_at)

    def _resume(self, resume_at: dt.datetime) -> None:
        """The pause that ended at `resume_at` is over: a new quota day starts."""
        if self._resume_at != resume_at:
            return  # another waiter already resumed (or a new pause began)
        self._resume_at = None
        self._probing = True
        new_day = resume_at.astimezone(self._tz).date()
        if new_day > self._day:
            self._day, self._used = new_day, 0
        if resume_at >= self._resets_at:  # the reset came, even if no clock said so yet
            self._resets_at = next_reset(resume_at, self._tz)
            self._marketo, self._read_at, self._since = None, None, 0
            self._next_read = resume_at
