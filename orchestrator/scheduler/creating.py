"""One create call and what its answer does: to the store, the queue model, the
backoffs, and (shared) to the other daemons' picture of the queue.

See the package's docstring for the rules; `Creates.submit` returns what happened,
and the round goes on or ends by it:
"submitted", "failed" (Marketo made no job that holds a slot), "refused" (the file
failed), "list-busy" (1019: the rest of this file waits) and "queue-full" (the round
ends: 1016, an unknown outcome, refused credentials, a retried error).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from orchestrator import constants
from orchestrator.clock import stamp
from orchestrator.config import Route, Settings
from orchestrator.coordination.shapes import Grant
from orchestrator.crashpoints import crashpoint
from orchestrator.errors import (
    AccessDeniedError,
    CredentialsError,
    FatalError,
    ImportInProgressError,
    MarketoError,
    QueueFullError,
    UnknownOutcomeError,
)
from orchestrator.filecache import FileCache
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord
from orchestrator.queuemodel import QueueModel
from orchestrator.scheduler.shared import SharedAdmission
from orchestrator.scheduler.waits import Observer, Waits
from orchestrator.store import Store

log = structlog.get_logger(__name__)


class Submitter(Protocol):
    """The part of the Marketo client the scheduler uses."""

    async def submit(self, route: Route, path: Path, fmt: str) -> BatchStatus: ...


@dataclass
class Creates:
    """Creates import jobs, one at a time, and records what each answer means."""

    settings: Settings
    store: Store
    client: Submitter
    model: QueueModel
    waits: Waits
    files: FileCache
    on_submitted: Callable[[ChunkRecord], None]
    on_chunk_final: Callable[[ChunkRecord], Awaitable[None]]
    wake: Callable[[], None]
    observer: Observer | None = None
    shared: SharedAdmission | None = None

    async def submit(
        self,
        chunk: ChunkRecord,
        file: FileRecord,
        route: Route,
        outstanding: int,
        grant: Grant | None = None,
    ) -> str:
        """One submit with its state transitions; returns what happened."""
        bound = structlog.contextvars.bound_contextvars(
            route=file.route, file=file.name, chunk=chunk.index
        )
        with bound:
            outcome = await self.create(chunk, file, route, outstanding, grant)
        if self.shared is not None:
            await self.shared.flush()  # the next admission sees what this answer did
        return outcome

    async def create(
        self,
        chunk: ChunkRecord,
        file: FileRecord,
        route: Route,
        outstanding: int,
        grant: Grant | None,
    ) -> str:
        await self.store.mark_submitting(chunk.id)
        crashpoint("before_submit")
        try:
            batch = await self.client.submit(route, Path(chunk.path), route.format_for(file.name))
        except QueueFullError:
            await self.store.mark_pending(chunk.id)
            self.model.queue_full(outstanding)
            self.waits.start_queue("1016")
            self.tell(grant, "1016", queue_full=True, backoff=True)
            log.info("queue_full", outstanding=outstanding, foreign=self.model.foreign)
            return "queue-full"
        except ImportInProgressError:
            await self.store.mark_pending(chunk.id)
            self.waits.start_list(route.list_id, "1019")
            self.tell(grant, "1019")
            return "list-busy"
        except UnknownOutcomeError as exc:
            self.tell(grant, f"unknown outcome ({exc.code})", unknown=True)
            self.pause_shared(f"backing off after an unknown outcome ({exc.code})")
            return await self.unknown_outcome(chunk, exc)
        except CredentialsError as exc:
            # Nothing can go until the configuration changes (credentials, or the
            # API role's permissions: 603): wait, fail nothing.
            await self.store.mark_pending(chunk.id)
            denied = isinstance(exc, AccessDeniedError)
            self.waits.start_queue("access-denied" if denied else "credentials")
            self.tell(grant, "access denied" if denied else "credentials refused")
            self.pause_shared("access denied (603)" if denied else "credentials refused")
            log.error("access_denied" if denied else "credentials_refused", error=str(exc))
            return "queue-full"
        except FatalError as exc:
            self.tell(grant, f"refused ({exc.code})")
            await self.refuse(chunk, str(exc))
            return "refused"
        except MarketoError as exc:
            # Retryable trouble the client already retried: try again later.
            await self.store.mark_pending(chunk.id)
            self.waits.start_queue(exc.code)
            self.tell(grant, exc.code)
            self.pause_shared(f"backing off after {exc.code}")
            log.warning(
                "submit_deferred", code=exc.code, request_id=exc.request_id or None, error=str(exc)
            )
            return "queue-full"
        crashpoint("after_submit")
        record = await self.store.mark_submitted(
            chunk.id, batch_id=batch.batch_id, marketo_status=batch.status, submitted_at=stamp()
        )
        if self.shared is not None and grant is not None:
            self.shared.created(grant, batch.batch_id)
            self.shared.pause("")
        if batch.status == constants.STATUS_FAILED:
            return await self.failed_at_create(record, batch)
        if self.observer:
            self.observer.job_created(record.files)
        self.waits.answered(route.list_id)
        log.info(
            "chunk_submitted",
            batch_id=batch.batch_id,
            rows=chunk.rows,
            bytes=chunk.bytes,
            files=chunk.files,
        )
        self.on_submitted(record)
        return "submitted"

    def pause_shared(self, reason: str) -> None:
        """This daemon waits on a trouble of its own (credentials, 603, a 5xx, an unknown
        outcome): the other daemons' FIFO passes its chunks until its next create goes
        through, rather than wait for a daemon that cannot send (up to `backoff.max`)."""
        if self.shared is not None:
            self.shared.pause(reason)

    def tell(
        self,
        grant: Grant | None,
        reason: str,
        *,
        queue_full: bool = False,
        unknown: bool = False,
        backoff: bool = False,
    ) -> None:
        """The create made no job we know of: the shared model hears why."""
        if self.shared is None or grant is None:
            return
        delay = self.waits.backoff.delay if backoff else None
        self.shared.not_created(grant, reason, delay=delay, queue_full=queue_full, unknown=unknown)

    async def failed_at_create(self, chunk: ChunkRecord, batch: BatchStatus) -> str:
        """Marketo answered the create `Failed`: the chunk ends now, with its message."""
        message = batch.message or "Import failed when the job was created"
        log.warning("chunk_failed_at_create", batch_id=batch.batch_id, error=message)
        self.model.abandon(chunk.id)  # copies an unknown outcome may have left stay counted
        self.waits.answered(0)  # Marketo answered: the queue itself is not in trouble
        if self.shared is not None:
            self.shared.finished(chunk.id)  # its job holds no slot
        finished = await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.FAILED, message=message, finished_at=stamp(), batch=batch
        )
        await self.on_chunk_final(finished)
        return "failed"

    @property
    def max_resubmits(self) -> int:
        return self.settings.limits.max_resubmits

    def past_cap(self, chunk: ChunkRecord) -> str:
        """The file's error once a chunk used up its resubmits."""
        n = chunk.unknown_outcomes
        return (
            f"chunk {chunk.index}: {n} creates of its import job had an unknown outcome "
            f"(limits.max_resubmits = {self.max_resubmits}); Marketo may hold up to {n} "
            "copies of it, so it is not sent again"
        )

    async def unknown_outcome(self, chunk: ChunkRecord, exc: UnknownOutcomeError) -> str:
        """The create went out and we cannot know whether Marketo made the job."""
        record = await self.store.mark_unknown_outcome(chunk.id)
        self.model.unknown_outcome(chunk.id)
        log.warning(
            "submit_outcome_unknown",
            code=exc.code,
            request_id=exc.request_id or None,
            unknown_outcomes=record.unknown_outcomes,
            max_resubmits=self.max_resubmits,
            phantoms=self.model.phantoms,
        )
        if record.unknown_outcomes > self.max_resubmits:
            await self.refuse(record, self.past_cap(record))
            return "refused"
        self.waits.start_queue("unknown-outcome")
        return "queue-full"

    async def refuse(self, chunk: ChunkRecord, message: str) -> None:
        """A fatal refusal fails this chunk and keeps the file's later chunks from going."""
        log.error("chunk_refused", error=message)
        self.model.abandon(chunk.id)
        await self.store.set_file_error(chunk.file_id, message)
        self.files.forget(chunk.file_id)
        finished = await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.FAILED, message=message, finished_at=stamp()
        )
        later = await self.store.chunks(file_id=chunk.file_id, statuses=[ChunkStatus.PENDING])
        note = f"not submitted: chunk {chunk.index} of this file was refused"
        for other in later:
            await self.store.finish_chunk(
                other.id, status=ChunkStatus.FAILED, message=note, finished_at=stamp()
            )
        if self.shared is not None:
            for dropped in (chunk, *later):
                self.shared.dropped(dropped.id)
        self.wake()  # chunks it held back may go now
        await self.on_chunk_final(finished)
