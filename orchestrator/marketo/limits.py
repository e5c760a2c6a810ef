"""The Marketo client's rate limits: calls per window and calls in flight.

`Limiter` is two limits (STYLE.md 14): a sliding window of send times for calls
per window and an `asyncio.Semaphore` for calls in flight. The semaphore is
taken first and the window slot second, so a call is stamped in the window right
before it is sent; stamping first and then queueing on the semaphore would let
calls bunch up later than their stamps say. The window is widened by a small
margin because Marketo counts calls when they arrive, and arrival jitters by
some milliseconds against our send time. Identity calls do not count toward
Marketo's limits, so they take the semaphore only (they are requests in flight
all the same).

The window is ours rather than asyncio-throttle's because a slot must be given
back: Marketo does not count a call it answered 601, 602, 604, 605, 608 or 611
(its error-code page), so neither do we (`Slot.refund`). A deque of send times
also makes the window plain data that can be shared later (several daemons on
one subscription keep one window in PostgreSQL). Its clock and sleep are
injected: tests step time instead of waiting it out.

After a 606 the client calls `Limiter.hold`: no call is sent until the window
has slid (a full `api_window_seconds`), since the calls that filled it may be
another integration's that our own window never saw.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

# The window is widened by this fraction (at most WINDOW_MARGIN_MAX seconds).
WINDOW_MARGIN_FRACTION = 0.05
WINDOW_MARGIN_MAX = 1.0


class Slot:
    """One call's place in the window; `refund` gives it back (a call Marketo did not count)."""

    def __init__(self, limiter: Limiter, stamp: float | None) -> None:
        self._limiter = limiter
        self._stamp = stamp

    def refund(self) -> None:
        if self._stamp is not None:
            self._limiter.refund(self._stamp)
            self._stamp = None


class Limiter:
    """At most `per_window` counted calls per `window` seconds, `in_flight` calls at once."""

    def __init__(
        self,
        per_window: int,
        window: float,
        in_flight: int,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_window = max(1, per_window)
        self._window = window + min(WINDOW_MARGIN_MAX, window * WINDOW_MARGIN_FRACTION)
        self._sent: deque[float] = deque()  # send times of the counted calls, oldest first
        self._turn = asyncio.Lock()  # one waiter at a time takes the next free slot (FIFO)
        self._semaphore = asyncio.Semaphore(in_flight)
        self._sleep = sleep
        self._clock = clock
        self._hold_until = 0.0

    @property
    def window(self) -> float:
        """The window calls are counted in, margin included (seconds)."""
        return self._window

    @property
    def in_window(self) -> int:
        """Counted calls sent within the last window."""
        self._slide(self._clock())
        return len(self._sent)

    def hold(self, seconds: float) -> None:
        """Send no counted call for `seconds` from now (after a 606)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)

    def refund(self, stamp: float) -> None:
        """Forget the call sent at `stamp` (already slid out of the window: nothing to do)."""
        with suppress(ValueError):
            self._sent.remove(stamp)

    @asynccontextmanager
    async def slot(self, *, counted: bool = True) -> AsyncIterator[Slot]:
        """Hold one in-flight slot (and one window slot when `counted`)."""
        if counted:
            held = self._hold_until - self._clock()
            if held > 0:
                await self._sleep(held)
        async with self._semaphore:
            yield Slot(self, await self._stamp() if counted else None)

    async def _stamp(self) -> float:
        """Wait for room in the window, then count a call sent now; its send time."""
        async with self._turn:
            while True:
                now = self._clock()
                self._slide(now)
                if len(self._sent) < self._per_window:
                    self._sent.append(now)
                    return now
                await self._sleep(self._sent[0] + self._window - now)

    def _slide(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self._window:
            self._sent.popleft()
