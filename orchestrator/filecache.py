"""File records by id, read from the store once and shared by the stages that ask often.

The scheduler looks at a file's route and name for every pending chunk at every
round, and the poller for every batch it polls: with thousands of small files
that would be thousands of reads per round. What they read changes rarely: only
a file's error, set where a file is refused, and whoever sets it drops the file
from the cache, as the pipeline does once the file is finished. One cache, built
by the pipeline and passed to each stage that reads through it.
"""

from __future__ import annotations

from typing import Protocol

from orchestrator.models import FileRecord


class FileSource(Protocol):
    """Where records come from (orchestrator.store.Store)."""

    async def get_file(self, file_id: int) -> FileRecord: ...


class FileCache:
    def __init__(self, source: FileSource) -> None:
        self._source = source
        self._files: dict[int, FileRecord] = {}

    async def get(self, file_id: int) -> FileRecord:
        """The file's record, from the store the first time it is asked for."""
        found = self._files.get(file_id)
        if found is None:
            found = self._files[file_id] = await self._source.get_file(file_id)
        return found

    def forget(self, file_id: int) -> None:
        """The record changed (an error) or is no longer needed (finished): drop it."""
        self._files.pop(file_id, None)

    def __len__(self) -> int:
        return len(self._files)
