"""The daemon: startup, loop, shutdown.

    watcher (spool) → store → splitter → scheduler → Marketo client → poller → results

Startup opens the store, repairs what a crash left half done (claims,
splits, submits of unknown outcome, results), prepares the inbox and starts
the status server. The loop runs every long-lived task in one TaskGroup.
Shutdown begins at the first SIGTERM/SIGINT (or, with --once, when the inbox
is drained and every file has a result): claiming stops, in-flight calls get
`DRAIN_SECONDS` to end, then whatever is left is cancelled; the store already
holds every step, so the next start resumes. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Coroutine
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from orchestrator import logs, results, splitter
from orchestrator.config import Route, Secret, Settings, with_marketo
from orchestrator.errors import (
    ConfigError,
    CredentialsError,
    FatalError,
    InputError,
    MarketoError,
    OrchestratorError,
    StoreError,
)
from orchestrator.faults import crashpoint
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    FINAL_FILE_STATUSES,
    ChunkRecord,
    FileRecord,
    FileStatus,
    ObjectType,
)
from orchestrator.poller import Poller
from orchestrator.scheduler import Scheduler, wait_for_any
from orchestrator.spool import Spool
from orchestrator.status import StatusServer, format_status_table, load_snapshot
from orchestrator.store import Store

log = structlog.get_logger(__name__)

DRAIN_SECONDS = 5.0  # in-flight calls get this long after SIGTERM; exit well within 10 s
PERSIST_SECONDS = 5.0  # how often the day's API call count is written to the store
DEMO_ROUTES = (
    Route(dir="leads", object=ObjectType.LEADS),
    Route(dir="cars", object=ObjectType.CUSTOM_OBJECT, api_name="car_c"),
    Route(
        dir="webinar",
        object=ObjectType.PROGRAM_MEMBERS,
        program_id=1001,
        program_member_status="Registered",
    ),
)


def main(settings: Settings, *, once: bool, simulate: bool) -> int:
    """Run the daemon to the end; the process exit code."""
    try:
        return asyncio.run(Daemon(settings, once=once, simulate=simulate).run())
    except ConfigError:
        raise  # the CLI reports it: one line naming the key, exit 2
    except (OrchestratorError, OSError, BaseExceptionGroup) as exc:
        cause = first_cause(exc)
        if cause is None:
            raise
        log.error("daemon_failed", error=str(cause))
        print(f"marketo-orchestrator: error: {cause}", file=sys.stderr)
        return 1


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
    def __init__(self, settings: Settings, *, once: bool, simulate: bool) -> None:
        self.settings = settings
        self.once = once
        self.simulate = simulate
        self.stop = asyncio.Event()
        self.metrics = Metrics()
        self.split_queue: asyncio.Queue[int] = asyncio.Queue()
        self.finish_lock = asyncio.Lock()
        self.finished_failed = 0
        self.finished_total = 0
        self.draining = False
        self.interrupts = 0
        self.credentials_refused: str | None = None

    # -- phases ------------------------------------------------------------

    async def run(self) -> int:
        async with contextlib.AsyncExitStack() as stack:
            await self.startup(stack)
            await self.loop()
            log.info(
                "daemon_stopped", files_finished=self.finished_total, failed=self.finished_failed
            )
        if self.once and sys.stderr.isatty():
            print(format_status_table(await self.final_snapshot()), file=sys.stderr)
        if self.credentials_refused:
            print(
                f"marketo-orchestrator: error: {self.credentials_refused}; "
                "claimed files wait in work/ for the next run",
                file=sys.stderr,
            )
            return 1
        return 1 if self.once and self.finished_failed else 0

    async def startup(self, stack: contextlib.AsyncExitStack) -> None:
        if self.simulate:
            await self.start_simulator(stack)
        settings = self.settings
        make_data_dir(settings.data_dir)
        refuse_orphaned_work(settings.data_dir)
        self.store = await Store.open(settings.data_dir / "state.db")
        stack.push_async_callback(self.store.close)
        recovery = await self.store.recover()
        if recovery.resubmit or recovery.resplit or recovery.finishing or recovery.claiming:
            log.info(
                "recovering",
                resubmit=len(recovery.resubmit),
                resplit=len(recovery.resplit),
                finishing=len(recovery.finishing),
                claiming=len(recovery.claiming),
            )
        secret = settings.marketo.client_secret.reveal()
        logs.register_secret(secret)
        calls = await self.store.api_calls(self.quota_day())
        self.client = MarketoClient(settings, observer=self.metrics, calls_today=calls)
        stack.push_async_callback(self.client.close)
        self.persisted_calls = calls
        self.scheduler = Scheduler(
            settings,
            self.store,
            self.client,
            on_submitted=self.submitted,
            on_chunk_final=self.chunk_refused,
            observer=self.metrics,
        )
        self.poller = Poller(
            settings,
            self.store,
            self.client,
            on_chunk_final=self.chunk_done,
            on_started=self.scheduler.foreign_job_left,
        )
        self.spool = Spool(settings, self.store, self.file_claimed)
        self.spool.prepare()
        await self.spool.recover_claims()
        for file in recovery.resplit:
            self.split_queue.put_nowait(file.id)
        for file in recovery.finishing:
            await self.maybe_finish(file.id)
        for file in await self.store.files([FileStatus.SPLIT]):
            await self.maybe_finish(file.id)
        await self.sweep_chunk_dirs()
        if settings.http.host_port:
            host, port = settings.http.host_port
            server = StatusServer(
                host, port, store=self.store, metrics=self.metrics, readiness=self.readiness
            )
            try:
                await server.start()
            except OSError as exc:
                raise OrchestratorError(
                    f"http.listen {settings.http.listen}: {exc.strerror}"
                ) from None
            stack.push_async_callback(server.stop)
            log.info("status_server", listen=f"{host}:{server.port}")
        self.install_signals()

    async def start_simulator(self, stack: contextlib.AsyncExitStack) -> None:
        from orchestrator.simulator import Simulator

        sim = Simulator()
        base_url = await sim.start("127.0.0.1", 0)
        stack.push_async_callback(sim.stop)
        self.settings = replace(
            with_marketo(
                self.settings,
                base_url=base_url,
                identity_url="",
                client_id="simulate",
                client_secret=Secret("simulate-secret"),
            ),
            routes=self.settings.routes or DEMO_ROUTES,
        )
        log.warning(
            "SIMULATION MODE: nothing goes to a real Marketo; rows land in the bundled simulator",
            simulator=base_url,
            routes=[r.dir for r in self.settings.routes],
        )

    async def loop(self) -> None:
        workers: list[asyncio.Task[None]] = []
        async with asyncio.TaskGroup() as group:

            def start(coro: Coroutine[Any, Any, None], name: str) -> None:
                workers.append(group.create_task(coro, name=name))

            start(self.split_worker(), "splitter")
            start(self.scheduler.run(self.stop), "scheduler")
            start(self.poller.run(self.stop), "poller")
            start(self.token_keeper(), "token")
            start(self.persist_calls(), "api-calls")
            if self.once:
                start(self.drain(), "drain")
                if sys.stderr.isatty():
                    start(self.progress(), "progress")
            else:
                start(self.spool.run(self.stop), "spool")
            await self.stop.wait()
            _, pending = await asyncio.wait(workers, timeout=DRAIN_SECONDS)
            for task in pending:
                log.warning("shutdown_cut_short", task=task.get_name())
                task.cancel()
        await self.save_calls()

    # -- the pipeline --------------------------------------------------------

    async def file_claimed(self, file: FileRecord) -> None:
        self.split_queue.put_nowait(file.id)

    async def split_worker(self) -> None:
        """Split claimed files one at a time, in claim order; chunks go out as they appear."""
        while not self.stop.is_set():
            getter = asyncio.ensure_future(self.split_queue.get())
            stopper = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({getter, stopper}, return_when="FIRST_COMPLETED")
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            file = await self.store.get_file(getter.result())
            with structlog.contextvars.bound_contextvars(route=file.route, file=file.name):
                await self.split(file)
            await self.maybe_finish(file.id)

    async def split(self, file: FileRecord) -> None:
        route = self.settings.route(file.route)
        if file.status is FileStatus.CLAIMED:
            file = await self.store.start_split(file.id)
        if file.status is not FileStatus.SPLITTING:
            return
        if file.error or route is None:
            if route is None:
                await self.store.set_file_error(file.id, f"route {file.route!r} is not configured")
            await self.end_split_early(file.id)
            return
        out = results.chunk_dir(self.settings, file.id)
        out.mkdir(parents=True, exist_ok=True)
        events = splitter.split_file_async(
            Path(file.work_path),
            out,
            max_bytes=file.max_chunk_bytes,
            fmt=route.format_for(file.name),
            fsync=True,
        )
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    await self.record_split_event(file.id, event)
        except InputError as exc:
            message = describe(exc, file.name)
            log.error("file_refused", error=message)
            await self.store.set_file_error(file.id, message)
            await self.end_split_early(file.id)
            self.scheduler.wake()

    async def sweep_chunk_dirs(self) -> None:
        """Remove chunk directories of finished files: a crash between finishing a file
        and cleaning up after it leaves one behind."""
        unfinished = await self.store.files(set(FileStatus) - FINAL_FILE_STATUSES)
        keep = {str(f.id) for f in unfinished}
        root = self.settings.data_dir / "work" / "chunks"
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name.isdigit() and entry.name not in keep:
                    log.info("stale_chunks_removed", path=str(entry))
                    await asyncio.to_thread(shutil.rmtree, entry, True)

    async def record_split_event(self, file_id: int, event: splitter.SplitEvent) -> None:
        """One chunk cut, record set aside, or the end of a split: into the store."""
        if isinstance(event, splitter.Chunk):
            await self.store.add_chunk(
                file_id,
                index=event.index,
                path=str(event.path),
                rows=event.rows,
                bytes=event.bytes,
                first_line=event.first_line,
            )
            crashpoint("chunk_added")
            self.scheduler.wake()
        elif isinstance(event, splitter.Rejected):
            await self.store.add_reject(
                file_id,
                line=event.line,
                offset=event.offset,
                size=event.size,
                reason=event.reason,
            )
            self.metrics.rows("rejected", 1)
            log.warning("record_rejected", line=event.line, reason=event.reason)
        else:
            await self.store.finish_split(file_id, rows=event.rows, chunks_total=event.chunks)
            log.info("file_split", rows=event.rows, chunks=event.chunks)

    async def end_split_early(self, file_id: int) -> None:
        """A file that will fail: close its split with the chunks it already has."""
        known = await self.store.chunks(file_id=file_id)
        await self.store.finish_split(
            file_id, rows=sum(c.rows for c in known), chunks_total=len(known)
        )

    def submitted(self, chunk: ChunkRecord) -> None:
        self.poller.submitted(chunk)

    async def chunk_done(self, chunk: ChunkRecord) -> None:
        """A batch reached Complete or Failed at Marketo: a queue slot is free."""
        self.scheduler.job_finished()
        await self.maybe_finish(chunk.file_id)

    async def chunk_refused(self, chunk: ChunkRecord) -> None:
        await self.maybe_finish(chunk.file_id)

    async def maybe_finish(self, file_id: int) -> None:
        """Write the file's result once it is split and every chunk is final."""
        async with self.finish_lock:
            file = await self.store.get_file(file_id)
            if file.status not in (FileStatus.SPLIT, FileStatus.FINISHING):
                return
            chunks = await self.store.chunks(file_id=file_id)
            if any(c.status not in FINAL_CHUNK_STATUSES for c in chunks):
                return
            structlog.contextvars.unbind_contextvars("chunk", "batch_id")
            with structlog.contextvars.bound_contextvars(route=file.route, file=file.name):
                record, document = await results.finish_file(self.settings, self.store, file)
                self.account(record, document)
            self.scheduler.forget(file_id)
            self.poller.forget(file_id)
        await self.stop_if_idle()

    def account(self, file: FileRecord, document: dict[str, Any]) -> None:
        """Metrics and the one canonical log line of a finished file."""
        self.metrics.rows("processed", document["rows_processed"])
        self.metrics.rows("warned", document["rows_with_warning"])
        # Rows the splitter set aside were counted as "rejected" when it did.
        self.metrics.rows("failed", sum(c["rows_failed"] for c in document["chunks"]))
        self.finished_total += 1
        if file.status is FileStatus.FAILED:
            self.finished_failed += 1
        log.info(
            "file_finished",
            status=document["status"],
            error=document["error"],
            rows=document["rows"],
            rows_processed=document["rows_processed"],
            rows_failed=document["rows_failed"],
            rows_with_warning=document["rows_with_warning"],
            chunks=len(document["chunks"]),
            result=Path(file.result_path or "").name,
        )

    # -- run --once ----------------------------------------------------------

    async def drain(self) -> None:
        await self.spool.drain()
        self.draining = True
        await self.stop_if_idle()

    async def stop_if_idle(self) -> None:
        """With --once: stop when the inbox is drained and every file has a result."""
        if not (self.once and self.draining):
            return
        unfinished = await self.store.files(set(FileStatus) - FINAL_FILE_STATUSES)
        if not unfinished and self.split_queue.empty():
            self.stop.set()

    async def progress(self) -> None:
        """A live line on the terminal: files, chunks, rows, backoff; drawn once more at the end."""
        while True:
            line = await self.progress_line()
            print(f"\r{line:<79}", end="", file=sys.stderr, flush=True)
            if self.stop.is_set():
                break
            await wait_for_any(self.stop, within=1.0)
        print(file=sys.stderr)

    async def progress_line(self) -> str:
        snap = await load_snapshot(self.store)
        files = snap["files"]
        done = sum(1 for f in files if f["status"] in ("complete", "failed"))
        chunks_done = sum(f["chunks_done"] for f in files)
        chunks_total = sum(f["chunks_total"] or 0 for f in files)
        rows = sum(f["rows_processed"] or 0 for f in files)
        line = f"files {done}/{len(files)}  chunks {chunks_done}/{chunks_total}  rows {rows}"
        wait = self.scheduler.backoff_remaining
        return line + (f"  backoff {wait:.0f}s" if wait else "")

    async def final_snapshot(self) -> dict[str, Any]:
        async with await Store.open(self.settings.data_dir / "state.db") as store:
            return await load_snapshot(store)

    # -- housekeeping ----------------------------------------------------------

    async def token_keeper(self) -> None:
        """Get a token early (readiness needs one); retry quietly while Marketo is unreachable."""
        attempt = 0
        while not self.stop.is_set() and not self.client.has_token:
            try:
                await self.client.ensure_token()
                return
            except CredentialsError as exc:
                self.credentials_refused = str(exc)
                log.error("identity_refused", error=str(exc))
                if self.once:  # nothing can be imported: stop, fail nothing, exit 1
                    self.stop.set()
                return
            except FatalError as exc:
                log.error("identity_refused", error=str(exc))
                return
            except MarketoError as exc:
                attempt += 1
                delay = self.scheduler.backoff.delay(attempt)
                log.warning("identity_unreachable", error=str(exc), retry_in=round(delay, 2))
                await wait_for_any(self.stop, within=delay)

    def quota_day(self) -> str:
        return datetime.now(ZoneInfo(self.settings.limits.quota_reset_tz)).date().isoformat()

    async def persist_calls(self) -> None:
        while not self.stop.is_set():
            await wait_for_any(self.stop, within=PERSIST_SECONDS)
            await self.save_calls()

    async def save_calls(self) -> None:
        used = self.client.calls_today
        delta = used - self.persisted_calls if used >= self.persisted_calls else used
        if delta:
            await self.store.add_api_calls(self.quota_day(), delta)
        self.persisted_calls = used
        self.metrics.set_api_calls_today(used)

    def readiness(self) -> str | None:
        if not self.spool.running and not self.once:
            return "the inbox watcher is not running"
        if self.credentials_refused:
            return self.credentials_refused
        if not self.client.has_token:
            return "no Marketo access token obtained yet"
        return None

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


def make_data_dir(path: Path) -> None:
    """Create data_dir; a path that cannot be one is a configuration error naming the key."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError("data_dir", f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot create {path}: {exc.strerror or exc}") from None


def refuse_orphaned_work(data_dir: Path) -> None:
    """A missing state.db next to claimed work would silently drop that work: refuse."""
    db = data_dir / "state.db"
    work = [data_dir / "work" / "incoming", data_dir / "work" / "chunks"]
    if db.exists() or not any(d.is_dir() and any(d.iterdir()) for d in work):
        return
    raise StoreError(
        db,
        "is missing, but work/ holds files claimed under it; to recover, move each "
        "work/incoming/<number>-<name> back to inbox/<route>/<name>, delete work/, "
        "and restart (Bulk Import is insert-or-update, so re-importing is harmless)",
    )


def describe(exc: InputError, name: str) -> str:
    """The splitter's error, naming the file as the user dropped it (not our work path)."""
    return str(exc).replace(exc.file, name, 1)
