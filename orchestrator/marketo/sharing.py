"""What the Marketo client needs of a coordination backend: one call budget and one
daily quota for every daemon of the subscription.

`orchestrator.coordination.postgres.PostgresCoordinator` is one; a daemon alone passes none, and the client keeps its
own window (`orchestrator.marketo.limits`) and daily count (`orchestrator.marketo.quota`).
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class SharedCalls(Protocol):
    """The subscription's call budget and daily quota, shared with other daemons."""

    async def acquire_call(self, operation: str, *, counted: bool) -> int:
        """Wait until a call may go (window, in flight, 606 hold, 607 pause); its id."""
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
        """When any daemon last read Marketo's usage (None: never today)."""
        ...
