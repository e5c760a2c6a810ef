"""Orphans: the jobs of a daemon taken as dead, polled by the living until they end.

With a shared queue (`[coordination] url`), a daemon silent for `lease_seconds` is
taken as dead, but its jobs are still at Marketo, each holding one of the
subscription's ten slots. Every live daemon asks, every `polling.interval`, for its
share of the batches of dead daemons (`orphans`: each is one live daemon's, so none
is polled twice a round) and polls each one's status through its own
Marketo client; once Marketo says Complete or Failed the job is recorded as finished
(`finished`), so its slot frees for every daemon. Nothing else happens to it here:
no orphan is ever created again, and its rows' results are the dead daemon's to
write when it returns with its data directory (its own poller asks again then).

A status call Marketo refuses for good (an expired batch id: Marketo keeps one seven
days) also ends the orphan: nobody can ever learn more of it, and its slot is long
free. Refused credentials, 603 and retryable errors leave it for the next round;
so does a coordination database that cannot be reached.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import structlog

from orchestrator import constants
from orchestrator.clock import wait_for_any
from orchestrator.config import Route
from orchestrator.coordination.shapes import Orphan
from orchestrator.errors import (
    CoordinationUnavailable,
    CredentialsError,
    FatalError,
    LeaseLost,
    MarketoError,
)
from orchestrator.models import BatchStatus, ObjectType

log = structlog.get_logger(__name__)

ENDED = (constants.STATUS_COMPLETE, constants.STATUS_FAILED)


class OrphanSource(Protocol):
    """The part of the coordination backend that knows dead daemons' jobs."""

    async def orphans(self) -> list[Orphan]: ...
    async def finished(self, chunk: int) -> bool: ...


class OrphanStatus(Protocol):
    """The part of the Marketo client that asks a job's status."""

    async def status(self, route: Route, batch_id: int) -> BatchStatus: ...


def route_of(orphan: Orphan) -> Route:
    """Enough of a route to ask for the orphan's status (its object and API name)."""
    return Route(
        dir=f"orphan of {orphan.instance}",
        object=ObjectType(orphan.object),
        api_name=orphan.api_name,
    )


@dataclass
class OrphanPoller:
    """Polls dead daemons' jobs so their slots free when Marketo ends them."""

    source: OrphanSource
    client: OrphanStatus
    interval: float  # seconds between two rounds

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll_round()
            await wait_for_any(stop, within=self.interval)

    async def poll_round(self) -> int:
        """Ask about every orphan once; how many were recorded as finished."""
        try:
            found = await self.source.orphans()
        except (CoordinationUnavailable, LeaseLost):
            return 0  # the coordinator says why; the next round asks again
        ended = 0
        for orphan in found:
            with structlog.contextvars.bound_contextvars(
                orphan_of=orphan.instance, batch_id=orphan.batch_id
            ):
                if await self.ended(orphan):
                    try:
                        if await self.source.finished(orphan.id):
                            ended += 1
                            log.info("orphan_finished")
                    except (CoordinationUnavailable, LeaseLost):
                        return ended
        return ended

    async def ended(self, orphan: Orphan) -> bool:
        """Whether Marketo has ended the orphan's job (or will never say more of it)."""
        try:
            batch = await self.client.status(route_of(orphan), orphan.batch_id)
        except CredentialsError as exc:
            log.warning("orphan_poll_refused", error=str(exc))
            return False
        except FatalError as exc:
            log.warning("orphan_status_refused_for_good", error=str(exc))
            return True
        except MarketoError as exc:
            log.warning("orphan_poll_deferred", code=exc.code, error=str(exc))
            return False
        return batch.status in ENDED
