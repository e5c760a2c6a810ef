"""The scheduler's gate before a create: the subscription's daily quota.

The daily quota belongs to every integration of the subscription, so before each
create the gate asks the Marketo client how much of it the subscription used
today (`QuotaState`: Marketo's own count, read every few minutes, plus our calls
since; with several daemons on a coordination database, plus every daemon's calls
since, and a 607 any of them met shuts every daemon's gate). Once that reaches daily_quota - daily_reserve, or while Marketo says 607,
no new job is created: the gate stays shut until the quota resets or, earlier,
until Marketo's count is next read (a reading may show room: our estimate only
grows between readings). Jobs already at Marketo are not the gate's business:
the poller polls them to their end.

The wait is said once in the log (`quota_spent`, with the reset time) and again
when it ends (`quota_room`); the daemon's upkeep keeps the same state in the
store for `status` and in /metrics.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from orchestrator.clock import stamp
from orchestrator.models import QuotaState

log = structlog.get_logger(__name__)

MIN_WAIT = 1.0  # seconds: a shut gate stays shut at least this long


class QuotaSource(Protocol):
    """The part of the Marketo client that reckons the subscription's daily quota."""

    @property
    def quota(self) -> QuotaState: ...
    @property
    def quota_day_began(self) -> dt.datetime: ...
    async def refresh_usage(self) -> QuotaState: ...


class WaitObserver(Protocol):
    """Where a wait is reported (orchestrator.metrics.Metrics)."""

    def backoff(self, reason: str, seconds: float) -> None: ...


@dataclass
class QuotaGate:
    """Says whether a create may go now; `until` (monotonic) is when to ask again."""

    source: QuotaSource | None  # None: no gate (a stage test without a client)
    clock: Callable[[], float] = time.monotonic
    observer: WaitObserver | None = None
    until: float = 0.0
    shut: bool = False

    def closed(self) -> bool:
        """Still inside a wait: do not even ask."""
        return self.until > self.clock()

    async def allows(self) -> bool:
        """Whether the daily quota lets a new job be created now."""
        if self.source is None:
            return True
        state = self.source.quota
        if state.paused_until is None:  # a reading during a 607 pause would wait it out
            state = await self.source.refresh_usage()
        if not state.creates_paused:
            if self.shut:
                log.info("quota_room", used=state.used, limit=state.limit)
            self.shut, self.until = False, 0.0
            return True
        seconds = max(MIN_WAIT, (state.resumes_at - state.as_of).total_seconds())
        if not self.shut:  # said once per wait, not at every look
            log.warning(
                "quota_spent",
                used=state.used,
                limit=state.limit,
                daily_quota=state.quota,
                daily_reserve=state.reserve,
                marketo_count=state.marketo_count,
                resets_at=stamp(state.resets_at),
                paused_until=stamp(state.paused_until) if state.paused_until else None,
                note="no new import job until the quota resets or Marketo's count shows "
                "room; jobs already at Marketo are still polled",
            )
        self.shut, self.until = True, self.clock() + seconds
        if self.observer:
            self.observer.backoff("quota", seconds)
        return False
