"""What the Marketo client needs of a coordination backend: one call budget and one
daily quota for every daemon of the subscription.

`orchestrator.coordination.postgres.PostgresCoordinator` is one; a daemon alone passes
none, and the client keeps its own window (`orchestrator.marketo.limits`) and daily
count (`orchestrator.marketo.quota`). The client asks once per attempt
(`acquire_call`) and does the waiting itself (`orchestrator.marketo.calls`), with its
own sleep, so that a pause another daemon met shows in this daemon's quota, its log
and its metrics too.

The answers are described structurally (`CallWait`, `SharedUsage`): the backend's own
frozen dataclasses fit them, and this package never imports the backend (the
coordination package ranks beside it, and needs psycopg).
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class CallWait(Protocol):
    """No call now: ask again in `seconds`. `paused_until` is set when the wait is the
    607 pause (every daemon stops counted calls until then)."""

    @property
    def seconds(self) -> float: ...
    @property
    def reason(self) -> str: ...
    @property
    def paused_until(self) -> dt.datetime | None: ...


class SharedUsage(Protocol):
    """The subscription's calls today as the daemons together know them."""

    @property
    def as_of(self) -> dt.datetime: ...
    @property
    def total(self) -> int | None:
        """Marketo's own count at the last reading of this quota day (None: none yet)."""

    @property
    def read_at(self) -> dt.datetime | None: ...
    @property
    def calls_since(self) -> int:
        """Counted calls of every daemon since that reading (or since the day began)."""

    @property
    def paused_until(self) -> dt.datetime | None: ...


class SharedCalls(Protocol):
    """The subscription's call budget and daily quota, shared with other daemons.

    Any method may raise `errors.CoordinationUnavailable` but `release_call`, which
    keeps what it could not write and writes it once the database answers again."""

    async def acquire_call(self, operation: str, *, counted: bool) -> int | CallWait:
        """A place for one call now (window, in flight, 606 hold, 607 pause): its id, or
        when to ask again."""
        ...

    async def release_call(self, call: int, *, counted: bool) -> None:
        """The call ended; `counted` False gives its window place back."""
        ...

    async def hold(self, seconds: float) -> None:
        """Marketo answered 606: no daemon sends a counted call for `seconds`."""
        ...

    async def pause(self, until: dt.datetime) -> None:
        """Marketo answered 607: no daemon sends a counted call before `until`."""
        ...

    async def record_usage(self, total: int) -> None:
        """Marketo's own count of today's calls (the usage reading)."""
        ...

    async def usage_read_at(self) -> dt.datetime | None:
        """When any daemon last read Marketo's usage (None: never)."""
        ...

    async def usage(self, since: dt.datetime) -> SharedUsage:
        """The subscription's calls in the quota day that began at `since`."""
        ...
