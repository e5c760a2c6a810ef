"""Time and waiting, shared by every stage: wall-clock stamps and waits on events.

Stages take their clocks injected (tests drive them); these are the defaults
and the one way to wait for "whichever comes first" of several events.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta


def utc_now() -> datetime:
    """The wall clock, as an aware datetime in UTC."""
    return datetime.now(UTC)


def stamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with microseconds and a `Z`, as the store and result files keep times."""
    return (moment or utc_now()).isoformat(timespec="microseconds").replace("+00:00", "Z")


def stamp_ns(ns: int) -> str:
    """`stamp` for a time in nanoseconds since the epoch, computed exactly."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return stamp(datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000))


async def wait_for_any(*events: asyncio.Event, within: float | None) -> None:
    """Return when one of `events` is set or `within` seconds passed (None: no limit)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
