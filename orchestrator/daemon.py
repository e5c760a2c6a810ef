"""The daemon: startup, loop, shutdown.

    watcher (spool) → store → splitter → scheduler → Marketo client → poller → results

The stages and their hand-offs are the `Pipeline`; housekeeping (token, API
call count, readiness) is `Upkeep`; `run --once` on a terminal shows the
progress line (`status.live_progress`). The daemon owns the phases. It is
given data_dir's lock, held by whoever builds it (the CLI: one daemon per data
directory). Startup opens the store, starts the status server (/readyz says
"recovering"), then repairs what a crash left half done (claims, splits,
submits of unknown outcome, results) and prepares the inbox. The loop runs
every long-lived task in one TaskGroup.
Shutdown begins at the first SIGTERM/SIGINT (or, with --once, when the inbox
is drained and every file has a result): claiming stops, in-flight calls get
`DRAIN_SECONDS` to end, then whatever is left is cancelled; the store already
holds every step, so the next start resumes. A second SIGINT exits at once.

With `[coordination] url` the daemon joins the daemons sharing its Marketo
subscription (`orchestrator.membership`): it registers at startup, renews its lease
in the TaskGroup, and leaves at shutdown. While the database is away or the lease is
lost, /readyz says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from orchestrator import constants, dirlock, logs, membership
from orchestrator.clock import wait_for_any
from orchestrator.config import Settings
from orchestrator.crashpoints import holdpoint
from orchestrator.errors import OrchestratorError, StoreError
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.models import UNFINISHED_FILE_STATUSES, ExitCode
from orchestrator.pipeline import Pipeline
from orchestrator.status import (
    DaemonSlots,
    PageSources,
    QueueView,
    Series,
    StatusServer,
    format_status_table,
    live_progress,
    load_snapshot,
)
from orchestrator.store import Store
from orchestrator.upkeep import Upkeep, quota_day

if TYPE_CHECKING:
    from orchestrator.coordination.postgres import PostgresCoordinator

log = structlog.get_logger(__name__)

DRAIN_SECONDS = 5.0  # in-flight calls get this long after SIGTERM; exit well within 10 s


def first_cause(exc: BaseException) -> BaseException | None:
    """The error a user can act on (ours, or a disk/permission problem naming a path),
    also from inside the TaskGroup's exception group; None for anything else (a bug)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_cause(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, OrchestratorError):
        return exc
    if isinstance(exc, OSError) and exc.filename:
        return exc
    return None


class Daemon:
    def __init__(self, settings: Settings, *, once: bool, lock: dirlock.DataDirLock) -> None:
        self.settings = settings
        self.once = once
        # data_dir's lock, taken (and let go) by whoever builds the daemon, before it
        # touches anything there: `cli.run.lock_data_dir`.
        self.lock = lock
        self.recovering = True  # until startup has repaired what a crash left
        self.stop = asyncio.Event()
        self.metrics = Metrics()
        self.series = Series()  # the status page's last hour of rows and API calls
        self.interrupts = 0
        self.coordinator: PostgresCoordinator | None = None  # [coordination] url set
        self.others: tuple[DaemonSlots, ...] = ()  # the other daemons' jobs, last read

    # -- phases ------------------------------------------------------------

    async def run(self) -> int:
        """Startup, loop, shutdown; the process exit code (`ExitCode`)."""
        async with contextlib.AsyncExitStack() as stack:
            await self.startup(stack)
            await self.loop()
            outstanding = await self.outstanding() if self.once else 0
            log.info(
                "daemon_stopped",
                files_finished=self.pipeline.finished_total,
                failed=self.pipeline.finished_failed,
                outstanding=outstanding,
            )
        if self.once and sys.stderr.isatty():
            print(format_status_table(await self.final_snapshot()), file=sys.stderr)
        return self.exit_code(outstanding)

    def exit_code(self, outstanding: int) -> ExitCode:
        """Refused credentials (or 603), then work left over (--once), then a failed file
        (--once)."""
        refusal = self.upkeep.refusal()
        if refusal:
            print(
                f"marketo-orchestrator: error: {refusal}; "
                "files wait in inbox/ (and claimed ones in work/) for the next run",
                file=sys.stderr,
            )
            return ExitCode.CREDENTIALS
        if not self.once:
            return ExitCode.COMPLETE  # SIGTERM ends a daemon normally
        if outstanding:
            print(
                f"marketo-orchestrator: interrupted with {outstanding} file(s) outstanding; "
                f"nothing is lost: they wait in {self.settings.layout.work} and "
                f"{self.settings.layout.inbox} for the next run",
                file=sys.stderr,
            )
            return ExitCode.OUTSTANDING
        return ExitCode.FAILED if self.pipeline.finished_failed else ExitCode.COMPLETE

    async def outstanding(self) -> int:
        """Files without a result: unfinished in the store, or seen in the inbox unclaimed."""
        unfinished = await self.store.files(UNFINISHED_FILE_STATUSES)
        return len(unfinished) + self.pipeline.pending()

    async def startup(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the store in data_dir (whose lock the daemon holds), serve health and
        readiness, then recover.

        The status server starts before recovery (which can take a while: finishing
        a large file), so /healthz answers and /readyz says "recovering" meanwhile."""
        settings = self.settings
        if not self.lock.held:
            raise RuntimeError(f"{self.lock!r}: a daemon needs data_dir's lock held")
        refuse_orphaned_work(settings)
        self.store = await Store.open(settings.layout.state_db)
        stack.push_async_callback(self.store.close)
        await self.start_status_server(stack)
        await holdpoint("recovery")
        recovery = await self.store.recover()
        found = (recovery.resubmit, recovery.resplit, recovery.finishing, recovery.claiming)
        if any(found) or recovery.open_packs:
            log.info(
                "recovering",
                resubmit=len(recovery.resubmit),
                resplit=len(recovery.resplit),
                finishing=len(recovery.finishing),
                claiming=len(recovery.claiming),
                open_packs=len(recovery.open_packs),
            )
        logs.register_secret(settings.marketo.client_secret.reveal())
        self.coordinator = await membership.join(settings, stack)
        calls = await self.store.api_calls(quota_day(settings))
        client = MarketoClient(
            settings, observer=self.metrics, calls_today=calls, shared=self.coordinator
        )
        stack.push_async_callback(client.close)
        self.upkeep = Upkeep(settings, self.store, client, self.metrics, persisted_calls=calls)
        self.pipeline = Pipeline(
            settings, self.store, client, self.metrics, shared=self.coordinator
        )
        await self.pipeline.recover(recovery)
        self.recovering = False
        self.install_signals()

    async def start_status_server(self, stack: contextlib.AsyncExitStack) -> None:
        if not self.settings.http.host_port:
            return
        host, port = self.settings.http.host_port
        page = PageSources(limits=self.settings.limits, series=self.series, queue=self.queue_view)
        server = StatusServer(
            host, port, store=self.store, metrics=self.metrics, readiness=self.readiness, page=page
        )
        try:
            await server.start()
        except OSError as exc:
            raise OrchestratorError(
                f"http.listen {self.settings.http.listen}: {exc.strerror}"
            ) from None
        stack.push_async_callback(server.stop)
        log.info("status_server", listen=f"{host}:{server.port}")

    async def loop(self) -> None:
        pipeline, upkeep, stop = self.pipeline, self.upkeep, self.stop
        workers: list[asyncio.Task[None]] = []
        async with asyncio.TaskGroup() as group:

            def start(coro: Coroutine[Any, Any, None], name: str) -> None:
                workers.append(group.create_task(coro, name=name))

            for name, coro in pipeline.loops(stop, once=self.once):
                start(coro, name)
            start(upkeep.token_keeper(stop, once=self.once), "token")
            start(upkeep.watch_refusals(stop, once=self.once), "refusals")
            start(upkeep.persist_calls(stop), "api-calls")
            start(upkeep.usage_keeper(stop), "usage")
            start(upkeep.retention(stop), "retention")
            if self.coordinator is not None:
                start(self.coordinator.run(stop), "lease")
                if self.settings.http.host_port:
                    others = membership.watch_others(
                        self.coordinator, self.set_others, stop, self.settings.polling.interval
                    )
                    start(others, "daemons")
            if self.settings.http.host_port:
                start(self.series.run(stop, self.store, self.metrics), "series")
            if self.once:
                start(self.drain(), "drain")
                if sys.stderr.isatty():
                    backoff = pipeline.backoff_remaining
                    start(live_progress(self.store, backoff, stop), "progress")
            await stop.wait()
            _, pending = await asyncio.wait(workers, timeout=DRAIN_SECONDS)
            for task in pending:
                log.warning("shutdown_cut_short", task=task.get_name())
                task.cancel()
        await upkeep.save_calls()

    async def drain(self) -> None:
        """--once: claim what the inbox holds, wait until every file has a result, stop.

        Nothing is claimed before Marketo gave a token: refused credentials leave
        the inbox as it was."""
        await wait_for_any(self.upkeep.token_settled, self.stop, within=None)
        if self.stop.is_set() or self.upkeep.credentials_refused:
            return
        await self.pipeline.drain(self.stop)
        self.stop.set()

    async def final_snapshot(self) -> dict[str, Any]:
        async with await Store.open(self.settings.layout.state_db, check=False) as store:
            return await load_snapshot(store)

    def set_others(self, others: tuple[DaemonSlots, ...]) -> None:
        self.others = others

    def readiness(self) -> str | None:
        if self.recovering:
            return "recovering"
        if not self.pipeline.watching and not self.once:
            return "the inbox watcher is not running"
        if self.coordinator is not None and self.coordinator.problem:
            return f"coordination: {self.coordinator.problem}"
        return self.upkeep.token_problem()

    def queue_view(self) -> QueueView | None:
        """Marketo's queue as the scheduler models it and the poller last saw our jobs
        (the status page); None until recovery is over."""
        if self.recovering:
            return None
        scheduler, tracks = self.pipeline.scheduler, self.pipeline.poller.tracks.values()
        return QueueView(
            limit=scheduler.model.limit,
            foreign=scheduler.model.foreign,
            phantoms=scheduler.model.phantoms,
            importing=sum(1 for t in tracks if t.status == constants.STATUS_IMPORTING),
            backoff_seconds=scheduler.backoff_remaining(),
            others=self.others,
        )

    # -- signals -------------------------------------------------------------------

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: signal.Signals) -> None:
        self.interrupts += 1
        if self.interrupts > 1 and sig is signal.SIGINT:
            log.warning("forced_exit")
            os._exit(130)
        log.info("shutdown_requested", signal=sig.name)
        self.stop.set()


def refuse_orphaned_work(settings: Settings) -> None:
    """A missing state.db next to claimed work would silently drop that work: refuse."""
    layout = settings.layout
    db = layout.state_db
    work = [layout.incoming, layout.chunks]
    if db.exists() or not any(d.is_dir() and any(d.iterdir()) for d in work):
        return
    raise StoreError(
        db,
        "is missing, but work/ holds files claimed under it; to recover, move each "
        "work/incoming/<number>-<name> back to inbox/<route>/<name>, delete work/, "
        "and restart (Bulk Import is insert-or-update, so re-importing is harmless)",
    )
