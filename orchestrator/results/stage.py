"""The results stage: what happens when a chunk goes final, in one place.

- chunk final: a chunk reached Complete or Failed at Marketo, or was refused
  before it went. Its failed and warned rows are matched back to its files now
  (`attribution`), while its files (Marketo's, and a pack's) are all there; then
  every file in it may be finished, members before the owner, whose chunk
  directory holds the pack and the files Marketo gave for it.
- finished: a file split whose every chunk is final gets its result (`finish`),
  is counted, and the one canonical log line is written; `on_finished` says so.
- recovery: files a crash left finishing, or split with every chunk final, are
  finished; chunk directories of files finished before a crash cleaned up after
  them are removed.

One lock over attributing and finishing: a file finishing removes its chunk
directory, which holds the chunk files of the chunks it owns.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from orchestrator.config import Settings
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    UNFINISHED_FILE_STATUSES,
    ChunkRecord,
    FileRecord,
    FileStatus,
)
from orchestrator.results.attribution import attribute_chunk
from orchestrator.results.finish import finish_file
from orchestrator.store import Store

log = structlog.get_logger(__name__)


class Observer(Protocol):
    """What the results stage reports (orchestrator.metrics.Metrics)."""

    def rows(self, outcome: str, n: int) -> None: ...


@dataclass
class Results:
    settings: Settings
    store: Store
    observer: Observer | None = None
    on_finished: Callable[[FileRecord], None] = lambda _: None  # a file has its result
    finished_total: int = 0  # files finished by this process
    finished_failed: int = 0  # ... of which failed
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def chunk_final(self, chunk: ChunkRecord) -> None:
        """Match the chunk's failed and warned rows back to its files, then finish each
        file in it that can be. Should matching fail here (a full disk, say), finishing
        the file tries again."""
        async with self._lock:
            try:
                await attribute_chunk(self.settings, self.store, chunk.id)
            except (OSError, csv.Error) as exc:
                log.error("attribution_deferred", chunk=chunk.index, error=str(exc))
        for member in reversed(await self.store.members(chunk.id)):
            await self.maybe_finish(member.file_id)

    async def maybe_finish(self, file_id: int) -> None:
        """Write the file's result once it is split and every chunk is final."""
        async with self._lock:
            file = await self.store.get_file(file_id)
            if file.status not in (FileStatus.SPLIT, FileStatus.FINISHING):
                return
            chunks = await self.store.chunks(file_id=file_id)
            if any(c.status not in FINAL_CHUNK_STATUSES for c in chunks):
                return
            structlog.contextvars.unbind_contextvars("chunk", "batch_id")
            with structlog.contextvars.bound_contextvars(route=file.route, file=file.name):
                record, document = await finish_file(self.settings, self.store, file)
                self.account(record, document)
        self.on_finished(record)

    def account(self, file: FileRecord, document: dict[str, Any]) -> None:
        """Metrics and the one canonical log line of a finished file."""
        if self.observer:
            self.observer.rows("processed", document["rows_processed"])
            self.observer.rows("warned", document["rows_with_warning"])
            # Rows the splitter set aside were counted as "rejected" when it did.
            self.observer.rows("failed", sum(c["rows_failed"] for c in document["chunks"]))
        self.finished_total += 1
        if file.status is FileStatus.FAILED:
            self.finished_failed += 1
        # The canonical line: error level for a failed file, so alerting on errors sees it.
        emit = log.error if file.status is FileStatus.FAILED else log.info
        emit(
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

    # -- after a crash --------------------------------------------------------------

    async def recover(self, finishing: list[FileRecord]) -> None:
        """Finish what a crash left finishing or ready to finish, then clean up after
        files finished before it."""
        for file in finishing:
            await self.maybe_finish(file.id)
        for file in await self.store.files([FileStatus.SPLIT]):
            await self.maybe_finish(file.id)
        await self.sweep_chunk_dirs()

    async def sweep_chunk_dirs(self) -> None:
        """Remove chunk directories of finished files: a crash between finishing a file
        and cleaning up after it leaves one behind."""
        unfinished = await self.store.files(UNFINISHED_FILE_STATUSES)
        keep = {str(f.id) for f in unfinished}
        root = self.settings.layout.chunks
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name.isdigit() and entry.name not in keep:
                    log.info("stale_chunks_removed", path=str(entry))
                    await asyncio.to_thread(shutil.rmtree, entry, True)
