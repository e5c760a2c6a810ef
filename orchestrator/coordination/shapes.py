"""What coordination answers, as plain values: nothing here needs the PostgreSQL driver.

The scheduler, the orphan poller and the daemon take these types without importing
psycopg (an optional extra); the statements that produce them live beside it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Grant:
    """A chunk may be created now, in `slot`, under `epoch`."""

    chunk: int  # the coordination database's id of the chunk
    slot: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Deferral:
    """Not now: why, and when to ask again (None: when something changes)."""

    reason: str
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What one daemon runs with; the strictest of all live daemons' apply."""

    queued_jobs: int
    calls_per_window: int
    window_seconds: float
    calls_in_flight: int
    daily_quota: int
    daily_reserve: int


@dataclass(frozen=True, slots=True)
class Orphan:
    """A batch of a dead daemon, still at Marketo: polled by the living."""

    id: int
    instance: str
    batch_id: int
    object: str
    api_name: str
