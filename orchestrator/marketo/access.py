"""What Marketo refuses the client for a reason of configuration, by what it refuses.

Two refusals stop all work without failing any file, until the configuration is
fixed: the identity service refusing the client id or secret (`CREDENTIALS`), and
603 "Access denied", the API user's role lacking the permission a call needs (or
an IP allow-list refusing this address), kept under the permission's name
("Read-Write Lead", "Read-Write Custom Object"). A refusal stays until a call
that needs the same thing succeeds: a token for credentials, a call of the same
permission for a 603. So one object type granted and another not reads as
refused, not as a refusal that comes and goes with every call.

`changed` is set at every change (and every refusal again: its `last` moves), for
whoever mirrors the refusals (the daemon's upkeep writes them to the state store,
where `submit --wait` reads them).
"""

from __future__ import annotations

import asyncio
from typing import Final

from orchestrator.clock import stamp
from orchestrator.errors import AccessDeniedError, MarketoError
from orchestrator.models import Refusal

CREDENTIALS: Final = "credentials"


def describe_refusal(what: str, exc: MarketoError) -> str:
    """A refusal in one sentence an operator can act on."""
    if isinstance(exc, AccessDeniedError):
        suffix = f" (request id {exc.request_id})" if exc.request_id else ""
        return (
            f"Marketo answered {exc.code} {exc.message!r} to {exc.operation or 'a call'}"
            f"{suffix}: the API user's role lacks the {what} permission, or an IP "
            "allow-list (Admin > Web Services) refuses this address"
        )
    return str(exc)


class Access:
    """The refusals in force, by what is refused."""

    def __init__(self) -> None:
        self._refused: dict[str, Refusal] = {}
        self.changed = asyncio.Event()

    def refused(self, what: str, exc: MarketoError) -> None:
        """Marketo refused `what` (again): a refusal already known keeps the time it was
        learnt, and notes this one as its last."""
        now = stamp()
        known = self._refused.get(what)
        since = known.since if known is not None else now
        self._refused[what] = Refusal(what, exc.code, describe_refusal(what, exc), since, now)
        self.changed.set()

    def allowed(self, *whats: str) -> None:
        """Calls needing `whats` succeed again: their refusals are over."""
        gone = [what for what in whats if self._refused.pop(what, None) is not None]
        if gone:
            self.changed.set()

    @property
    def refusals(self) -> list[Refusal]:
        """The refusals in force, oldest first."""
        return sorted(self._refused.values(), key=lambda r: (r.since, r.what))

    @property
    def problem(self) -> str | None:
        """Why Marketo cannot be used now (the oldest refusal), or None."""
        refusals = self.refusals
        return refusals[0].message if refusals else None
