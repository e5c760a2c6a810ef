"""The PostgreSQL backend: daemons that name one database share one Marketo subscription.

`PostgresCoordinator` is what one daemon holds: its lease (registered at `start`,
renewed by `run` every `lease_seconds / RENEWALS_PER_LEASE`, each renewal also taking
silent daemons as dead), and async forms of the statements in `registering`, `admission`,
`outcomes`, `budget` and `leases`, each one short transaction in the database's worker thread.

While the database cannot be reached, every operation raises
`CoordinationUnavailable` and `problem` says so: the daemon sends nothing new (it
cannot know the shared state) and /readyz reports it; the next operation that gets
through clears it. A renewal refused because the lease ran out (SIGSTOP, a long
pause, an outage longer than the lease) makes the daemon register again, with a new
epoch, before anything else: until then `problem` says why and admission refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any, Final

import structlog

from orchestrator.clock import wait_for_any
from orchestrator.coordination import admission, budget, leases, outcomes, registering
from orchestrator.coordination.database import IDLE_IN_TRANSACTION_SECONDS, Database, redact
from orchestrator.coordination.leases import Conn
from orchestrator.coordination.shapes import Deferral, Grant, Limits, Orphan
from orchestrator.errors import CoordinationUnavailable, LeaseLost

log = structlog.get_logger(__name__)

RENEWALS_PER_LEASE: Final = 5  # a lease is renewed this many times per lease_seconds
PRUNE_EVERY: Final = 100  # renewals between two prunings of old call rows


class PostgresCoordinator:
    """One daemon's membership of a subscription shared through PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        subscription: str,
        instance: str,
        limits: Limits,
        lease_seconds: float,
    ) -> None:
        self.subscription = subscription
        self.instance = instance
        self.limits = limits
        self.lease_seconds = lease_seconds
        # A transaction this daemon leaves open (stopped mid-way) ends well inside a lease.
        idle = min(IDLE_IN_TRANSACTION_SECONDS, lease_seconds / RENEWALS_PER_LEASE)
        self._db = Database(url, idle_in_transaction_seconds=idle)
        self._epoch: int | None = None
        self._problem: str | None = "not registered yet"
        self._renewals = 0
        self._unreleased: dict[int, bool] = {}  # calls ended whose release is not written yet
        self.changed = asyncio.Event()  # something shared moved: a waiting scheduler looks again

    def __repr__(self) -> str:
        return f"<PostgresCoordinator {self.instance} of {self.subscription} at {self._db!r}>"

    @property
    def location(self) -> str:
        """The database, its password blanked (for logs and status)."""
        return redact(self._db.url)

    @property
    def problem(self) -> str | None:
        """Why nothing new may be sent now (database away, lease lost), or None."""
        return self._problem

    @property
    def epoch(self) -> int | None:
        return self._epoch

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Register; if the database is away, stay up and keep trying in `run`."""
        try:
            await self._register()
        except CoordinationUnavailable as exc:
            self._note(str(exc))

    async def run(self, stop: asyncio.Event) -> None:
        """Renew the lease and take silent daemons as dead, until `stop` is set."""
        every = self.lease_seconds / RENEWALS_PER_LEASE
        while not stop.is_set():
            await self.renew()
            await wait_for_any(stop, within=every)

    async def renew(self) -> None:
        try:
            if self._epoch is None:
                await self._register()
                return
            epoch = self._epoch
            kept = await self._db.run(
                "renew",
                lambda c: leases.renew(
                    c, self.subscription, self.instance, epoch, self.lease_seconds
                ),
            )
            if not kept:
                log.warning("coordination_lease_lost", instance=self.instance, epoch=epoch)
                self._epoch = None
                self._problem = "this daemon's lease ran out: registering again"
                await self._register()
                return
            dead = await self._db.run("reap", lambda c: leases.reap(c, self.subscription))
            for instance in dead:
                log.warning("coordination_daemon_dead", instance=instance)
            await self._release_kept()
            self._renewals += 1
            if self._renewals % PRUNE_EVERY == 0:
                await self._db.run("prune", lambda c: budget.prune(c, self.subscription))
            self._clear()
        except CoordinationUnavailable as exc:
            self._note(str(exc))

    async def close(self) -> None:
        """Leave cleanly (the lease ends now) and close the connection."""
        epoch = self._epoch
        if epoch is not None:
            # If the database is away, the lease runs out on its own.
            with contextlib.suppress(CoordinationUnavailable):
                await self._db.run(
                    "leave", lambda c: leases.leave(c, self.subscription, self.instance, epoch)
                )
        await self._db.close()

    async def _register(self) -> None:
        epoch = await self._db.run(
            "register",
            lambda c: leases.register(
                c, self.subscription, self.instance, self.limits, self.lease_seconds
            ),
        )
        self._epoch = epoch
        self._clear()
        log.info(
            "coordination_registered",
            instance=self.instance,
            epoch=epoch,
            subscription=self.subscription,
            database=self.location,
        )

    def _note(self, problem: str) -> None:
        if problem != self._problem:
            log.warning("coordination_unavailable", problem=problem)
        self._problem = problem

    def _clear(self) -> None:
        if self._problem is not None and self._epoch is not None:
            log.info("coordination_available", instance=self.instance)
            self._problem = None
            self.changed.set()

    def _need_epoch(self) -> int:
        if self._epoch is None:
            raise LeaseLost(self._problem or "not registered")
        return self._epoch

    async def _run(self, operation: str, body: Callable[[Conn], Any]) -> Any:
        """One operation; its failure is the daemon's problem until one gets through."""
        try:
            result = await self._db.run(operation, body)
        except CoordinationUnavailable as exc:
            self._note(str(exc))
            raise
        if self._epoch is not None:
            self._clear()
        return result

    # -- chunks ----------------------------------------------------------------------------

    async def register_chunk(
        self,
        *,
        file_ref: int,
        chunk_ref: int,
        index: int,
        list_id: int,
        object: str,
        api_name: str,
        keys: Iterable[int],
    ) -> int:
        hashes = list(keys)
        return int(
            await self._run(
                "register_chunk",
                lambda c: registering.register_chunk(
                    c,
                    self.subscription,
                    self.instance,
                    file_ref=file_ref,
                    chunk_ref=chunk_ref,
                    index=index,
                    list_id=list_id,
                    object=object,
                    api_name=api_name,
                    keys=hashes,
                ),
            )
        )

    async def chunk_id(self, chunk_ref: int) -> int | None:
        """The id this daemon's chunk was registered under (None: never registered)."""
        found: int | None = await self._run(
            "chunk_id",
            lambda c: registering.chunk_id(c, self.subscription, self.instance, chunk_ref),
        )
        return found

    async def unfinished_chunks(self) -> list[tuple[int, int, str, int]]:
        """This daemon's chunks not yet ended in the database (see `registering`)."""
        found: list[tuple[int, int, str, int]] = await self._run(
            "unfinished", lambda c: registering.unfinished(c, self.subscription, self.instance)
        )
        return found

    async def admit(
        self, chunk: int, *, quota_since: dt.datetime, quota_resets_in: float
    ) -> Grant | Deferral:
        epoch = self._need_epoch()
        try:
            answer: Grant | Deferral = await self._run(
                "admit",
                lambda c: admission.admit(
                    c,
                    self.subscription,
                    self.instance,
                    epoch,
                    chunk,
                    quota_since=quota_since,
                    quota_resets_in=quota_resets_in,
                ),
            )
        except LeaseLost:
            self._epoch = None
            self._problem = "this daemon's lease ran out: registering again"
            raise
        return answer

    async def created(self, grant: Grant, batch_id: int) -> bool:
        kept: bool = await self._run(
            "created", lambda c: outcomes.created(c, self.subscription, grant, batch_id)
        )
        self.changed.set()
        return kept

    async def not_created(
        self,
        grant: Grant,
        *,
        reason: str,
        delay: Callable[[int], float] | None = None,
        queue_full: bool = False,
        unknown: bool = False,
    ) -> None:
        await self._run(
            "not_created",
            lambda c: outcomes.not_created(
                c,
                self.subscription,
                grant,
                reason=reason,
                delay=delay,
                queue_full=queue_full,
                unknown=unknown,
            ),
        )
        self.changed.set()

    async def dropped(self, chunk: int) -> None:
        await self._run("dropped", lambda c: outcomes.dropped(c, self.subscription, chunk))
        self.changed.set()

    async def finished(self, chunk: int) -> bool:
        done: bool = await self._run(
            "finished", lambda c: outcomes.finished(c, self.subscription, chunk)
        )
        self.changed.set()
        return done

    async def job_left(self) -> None:
        await self._run("job_left", lambda c: outcomes.job_left(c, self.subscription))
        self.changed.set()

    async def orphans(self) -> list[Orphan]:
        found: list[Orphan] = await self._run(
            "orphans", lambda c: leases.orphans(c, self.subscription, self.instance)
        )
        return found

    async def daemons(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._run(
            "daemons", lambda c: leases.daemons(c, self.subscription)
        )
        return found

    async def set_paused(self, reason: str) -> None:
        """This daemon cannot send (refused credentials, 603): the shared FIFO passes
        its chunks meanwhile ("" when it can again)."""
        await self._run(
            "paused",
            lambda c: c.execute(
                """UPDATE marketo_orchestrator.daemons SET paused_reason = %s
                   WHERE subscription = %s AND instance = %s""",
                (reason, self.subscription, self.instance),
            ),
        )

    # -- calls -----------------------------------------------------------------------------

    async def acquire_call(self, operation: str, *, counted: bool) -> int | budget.Wait:
        """A place for one call now (window, in flight, 606 hold, 607 pause): its id, or
        when to ask again. Releases an outage kept back are written first."""
        epoch = self._need_epoch()
        await self._release_kept()
        try:
            answer: int | budget.Wait = await self._run(
                "call",
                lambda c: budget.acquire(
                    c, self.subscription, self.instance, epoch, operation, counted=counted
                ),
            )
        except LeaseLost:
            # Taken as dead (SIGSTOP, a long pause): register again now, rather than at
            # the next renewal; the caller asks again once it has.
            log.warning("coordination_lease_lost", instance=self.instance, epoch=epoch)
            self._epoch = None
            self._problem = "this daemon's lease ran out: registering again"
            await self.renew()
            raise
        return answer

    async def release_call(self, call: int, *, counted: bool) -> None:
        """The call ended. Never raises for the database: a release that cannot be written
        now is kept and written with the next one (or the next renewal), for until then
        the call would count as in flight."""
        self._unreleased[call] = self._unreleased.get(call, True) and counted
        with contextlib.suppress(CoordinationUnavailable):
            await self._release_kept()

    async def _release_kept(self) -> None:
        if not self._unreleased:
            return
        ends = dict(self._unreleased)

        def write(c: budget.Conn) -> None:
            for call, counted in ends.items():
                budget.release(c, call, counted=counted)

        await self._run("call_done", write)
        for call in ends:
            if self._unreleased.get(call) == ends[call]:
                del self._unreleased[call]

    async def hold(self, seconds: float) -> None:
        await self._run("hold", lambda c: budget.hold(c, self.subscription, seconds))

    async def pause(self, until: dt.datetime) -> None:
        await self._run("pause", lambda c: budget.pause(c, self.subscription, until))

    async def record_usage(self, total: int) -> None:
        await self._run("usage", lambda c: budget.record_usage(c, self.subscription, total))

    async def usage_read_at(self) -> dt.datetime | None:
        value: dt.datetime | None = await self._run(
            "usage_read_at", lambda c: budget.usage_read_at(c, self.subscription)
        )
        return value

    async def usage(self, since: dt.datetime) -> budget.Usage:
        value: budget.Usage = await self._run(
            "usage_today", lambda c: budget.usage(c, self.subscription, since)
        )
        return value
