"""Where one Marketo call takes its place: this process's limiter and, with several
daemons on the subscription, their one shared budget.

`CallBudget.place` is entered around every request (the retry loop's attempts and the
identity request alike):

1. the local `Limiter` (`marketo.limits`): calls in flight in this process and its own
   window, exactly as for a daemon alone;
2. with `shared` (`marketo.sharing.SharedCalls`): a place in the subscription's budget,
   one row per call timed by the database's clock, so the window, the calls in flight,
   the 606 hold and the 607 pause are all daemons' together. The budget says when to ask
   again; this module waits (with the client's sleep) and asks again. A 607 pause that
   another daemon met becomes this daemon's quota pause (`DailyQuota.paused_elsewhere`):
   `place` then yields None and the retry loop waits it out like its own 607.

When the call ends, its place is released, as uncounted when Marketo did not count the
answer (`Place.refund`: 601, 602, 604, 605, 608, 611), which gives its window place
back in both budgets.

While the coordination database cannot be reached (`CoordinationUnavailable`), no
counted call is sent: the place is asked for again after a short backoff
(`OUTAGE_BACKOFF_MAX` at most), for as long as it takes; nothing fails because of it.
An identity request, which Marketo counts against no limit, goes without a shared row
meanwhile (the local limiter still bounds it), so a token can be had during an outage.
A daemon taken as dead (its lease ran out: SIGSTOP, a long pause) sends nothing at
all, identity included, until it has registered again (`LeaseLost`).

After a 606 (`hold`) and a 607 (`pause`) every daemon is told; if the database is away
then, this daemon holds or pauses alone, and the others learn from Marketo themselves.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import structlog

from orchestrator.backoff import Backoff
from orchestrator.errors import CoordinationUnavailable, LeaseLost
from orchestrator.marketo.limits import Limiter, Slot
from orchestrator.marketo.quota import DailyQuota
from orchestrator.marketo.sharing import SharedCalls

log = structlog.get_logger(__name__)

OUTAGE_BACKOFF_MAX: Final = 5.0  # seconds at most between two asks while the database is away


class Paused:
    """The subscription is paused after a 607 (`_shared_place`): no call now."""


PAUSED: Final = Paused()


class Place:
    """One call's place; `refund` when Marketo did not count the call after all."""

    def __init__(self, slot: Slot) -> None:
        self._slot = slot
        self.counted = True

    def refund(self) -> None:
        self._slot.refund()
        self.counted = False


class CallBudget:
    """The local limiter, and with `shared` the subscription's budget of all daemons."""

    def __init__(
        self,
        limiter: Limiter,
        quota: DailyQuota,
        shared: SharedCalls | None,
        *,
        sleep: Callable[[float], Awaitable[None]],
        backoff: Backoff,
    ) -> None:
        self.limiter = limiter
        self._quota = quota
        self._shared = shared
        self._sleep = sleep
        self._backoff = Backoff(backoff.initial, min(backoff.max, OUTAGE_BACKOFF_MAX))

    @asynccontextmanager
    async def place(self, operation: str, *, counted: bool = True) -> AsyncIterator[Place | None]:
        """A place for one call of `operation` while the body runs; None (counted calls
        only) when the subscription turned out to be paused after a 607: the quota now
        knows until when (`DailyQuota.wait`)."""
        async with self.limiter.slot(counted=counted) as slot:
            place = Place(slot)
            if self._shared is None:
                yield place
                return
            call = await self._shared_place(self._shared, operation, counted)
            if isinstance(call, Paused):
                slot.refund()  # nothing went
                yield None
                return
            try:
                yield place
            finally:
                if isinstance(call, int):
                    await self._shared.release_call(call, counted=place.counted)

    async def hold(self, seconds: float) -> None:
        """606: no counted call for `seconds`, in this process and every daemon."""
        self.limiter.hold(seconds)
        if self._shared is not None:
            try:
                await self._shared.hold(seconds)
            except CoordinationUnavailable as exc:
                log.warning("shared_hold_not_recorded", seconds=round(seconds, 3), error=str(exc))

    async def pause(self, until: dt.datetime) -> None:
        """607: no counted call of any daemon before `until` (this one's quota knows)."""
        if self._shared is not None:
            try:
                await self._shared.pause(until)
            except CoordinationUnavailable as exc:
                log.warning("shared_pause_not_recorded", until=until.isoformat(), error=str(exc))

    async def _shared_place(
        self, shared: SharedCalls, operation: str, counted: bool
    ) -> int | Paused | None:
        """The call's row id; None for an uncounted call sent without a row (the database
        is away); PAUSED for a counted call while the subscription is paused."""
        outages = 0
        while True:
            try:
                answer = await shared.acquire_call(operation, counted=counted)
            except LeaseLost as exc:
                # Taken as dead: nothing goes, not even an identity call, until this
                # daemon has registered again (its coordinator is doing so).
                outages += 1
                if outages == 1:
                    log.warning("call_waits_for_registration", operation=operation, error=str(exc))
                await self._sleep(self._backoff.delay(outages))
                continue
            except CoordinationUnavailable as exc:
                if not counted:
                    return None
                outages += 1
                delay = self._backoff.delay(outages)
                if outages == 1:
                    log.warning("call_waits_for_coordination", operation=operation, error=str(exc))
                await self._sleep(delay)
                continue
            if isinstance(answer, int):
                return answer
            if answer.paused_until is not None and self._quota.paused_elsewhere(
                answer.paused_until
            ):
                return PAUSED
            await self._sleep(answer.seconds)
