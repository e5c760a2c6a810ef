"""Finishing a file: its merged failures and warnings files, <name>.result.json,
and the source moved to done/<route>/ or failed/<route>/.

Finishing is idempotent, so a crash at any point is repaired by running it
again: the result name is reserved in the store first (FINISHING), every file
is written atomically (temp file, fsync, rename) under that reserved name, the
source is moved, result.json is written last (a pipeline that sees it sees
everything), and only then is the file marked finished and work/ cleaned.

A result is never overwritten: a second `big.csv` gets `big.2.csv`,
`big.2.csv.result.json` and so on.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from orchestrator import delimited
from orchestrator.clock import stamp
from orchestrator.config import Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.delimited import format_of
from orchestrator.durable import write_atomic
from orchestrator.layout import Layout
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    RejectRecord,
)
from orchestrator.results.attribution import KINDS, attribute_chunk
from orchestrator.results.merge import reject_rows, source_columns, write_merged
from orchestrator.store import Store

log = structlog.get_logger(__name__)

RESULT_SUFFIX = ".result.json"
# A chunk's "status" in result.json when Marketo refused to tell its outcome for good.
UNKNOWN_STATUS = "Unknown"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: FileStatus
    error: str | None


def outcome(file: FileRecord, chunks: list[ChunkRecord]) -> Outcome:
    """complete when every chunk reached Marketo's Complete, else failed with one sentence why.

    A chunk whose outcome is unknown fails its file too (a pipeline must not read it
    as complete), with a sentence that says so, and why."""
    if file.error:
        return Outcome(FileStatus.FAILED, file.error)
    for chunk in chunks:
        if chunk.status is not ChunkStatus.COMPLETE:
            notes = [f"batch {chunk.batch_id}"] if chunk.batch_id else []
            if chunk.files > 1:  # a shared job fails every file in it: say so in each
                others = chunk.files - 1
                notes.append(f"shared with {others} other file{'' if others == 1 else 's'}")
            detail = f" ({', '.join(notes)})" if notes else ""
            if chunk.status is ChunkStatus.UNKNOWN:
                return Outcome(
                    FileStatus.FAILED,
                    f"the outcome of chunk {chunk.index}{detail} is unknown: {chunk.message}; "
                    "its rows may or may not have been imported, and it was not sent again",
                )
            why = chunk.message or "import failed"
            return Outcome(FileStatus.FAILED, f"chunk {chunk.index}{detail} failed: {why}")
    return Outcome(FileStatus.COMPLETE, None)


async def choose_name(store: Store, directory: Path, name: str) -> Path:
    """`directory/name`, or name.2, name.3 ... (before the extension) if it was used."""
    stem, suffix = os.path.splitext(name)
    for n in itertools.count(1):
        candidate = directory / (name if n == 1 else f"{stem}.{n}{suffix}")
        result = candidate.with_name(candidate.name + RESULT_SUFFIX)
        on_disk = candidate.exists() or candidate.is_symlink() or result.exists()
        if not on_disk and not await store.result_path_taken(str(result)):
            return candidate
    raise AssertionError("unreachable: itertools.count never ends")


async def finish_file(
    settings: Settings, store: Store, file: FileRecord
) -> tuple[FileRecord, dict[str, Any]]:
    """Write everything a finished file leaves behind; the final record and result document."""
    started = time.monotonic()
    for chunk in await store.chunks(file_id=file.id):
        if chunk.status in FINAL_CHUNK_STATUSES and not chunk.attributed:
            # Its attribution when it went final failed (a full disk, say): once more now.
            await attribute_chunk(settings, store, chunk.id)
    chunks = await store.chunks(file_id=file.id)
    rejects = await store.rejects(file.id)
    result = outcome(file, chunks)
    if file.result_path is None:
        complete = result.status is FileStatus.COMPLETE
        directory = settings.layout.results(file.route, complete=complete)
        directory.mkdir(parents=True, exist_ok=True)
        target = await choose_name(store, directory, file.name)
        file = await store.reserve_result(file.id, result_path=str(target) + RESULT_SUFFIX)
    assert file.result_path is not None
    finished_at = stamp()
    route = settings.route(file.route)
    fmt = format_of(file.name, route.format if route else "")
    object_type = str(route.object) if route else ""
    document = await asyncio.to_thread(
        write_outputs, file, chunks, rejects, result, fmt, finished_at, object_type, settings.layout
    )
    record = await store.finish_file(
        file.id, status=result.status, error=result.error, finished_at=document["finished_at"]
    )
    crashpoint("file_finished")
    await asyncio.to_thread(shutil.rmtree, settings.layout.chunk_dir(file.id), True)
    log.info("results_written", seconds=round(time.monotonic() - started, 3))
    return record, document


def write_outputs(
    file: FileRecord,
    chunks: list[ChunkRecord],
    rejects: list[RejectRecord],
    result: Outcome,
    fmt: str,
    finished_at: str,
    object_type: str,
    layout: Layout,
) -> dict[str, Any]:
    """Blocking: failures, warnings (each file's parts of its chunks, then the records the
    splitter set aside), the source move, then result.json."""
    assert file.result_path is not None
    result_path = Path(file.result_path)
    target = result_path.with_name(result_path.name.removesuffix(RESULT_SUFFIX))
    delimiter = delimited.DELIMITERS[fmt]
    work = Path(file.work_path)
    source = work if os.path.lexists(work) else target  # moved already by an earlier run
    parts = {kind: [layout.part_file(file.id, c.id, kind) for c in chunks] for kind in KINDS}
    merging = rejects or any(p.exists() for kind in KINDS for p in parts[kind])
    # Merged files carry the source's header in full, whatever Marketo's files left out.
    columns = source_columns(source, delimiter) if merging else None
    failures_name = write_merged(
        target.with_name(target.name + ".failures.csv"),
        parts["failures"],
        reject_rows(source, rejects, delimiter),
        delimiter,
        columns,
    )
    warnings_name = write_merged(
        target.with_name(target.name + ".warnings.csv"),
        parts["warnings"],
        iter(()),
        delimiter,
        columns,
    )
    crashpoint("results_written")
    if os.path.lexists(work):
        os.replace(work, target)
    if result_path.exists():
        # A previous run got this far: keep its document (written once).
        existing: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        return existing
    document = {
        "id": file.ticket,
        "file": file.name,
        "route": file.route,
        "object": object_type,
        "status": str(result.status),
        "error": result.error,
        "warnings": list(file.warnings),  # the header check's; [] when none
        "rows": file.rows or 0,
        "rows_processed": sum(c.rows_processed for c in chunks),
        "rows_failed": sum(c.rows_failed for c in chunks) + len(rejects),
        "rows_with_warning": sum(c.rows_with_warning for c in chunks),
        "chunks": [chunk_summary(c) for c in chunks],
        "failures_file": failures_name,
        "warnings_file": warnings_name,
        "claimed_at": file.claimed_at,
        "finished_at": finished_at,
    }
    write_atomic(result_path, (json.dumps(document, indent=2) + "\n").encode())
    return document


def chunk_summary(chunk: ChunkRecord) -> dict[str, Any]:
    """One batch as the file sees it: its share; `shared` describes the whole job when
    other files' records were in it too (None for a chunk of its own); `unmatched_rows`
    counts Marketo's failed and warned rows of the job that matched no record, and the
    message then says what became of them."""
    if chunk.status is ChunkStatus.UNKNOWN:
        status = UNKNOWN_STATUS  # whatever Marketo said last, its last word is missing
    elif chunk.marketo_status:
        status = chunk.marketo_status
    else:
        status = "NotSubmitted" if chunk.batch_id is None else str(chunk.status)
    shared = None
    if chunk.files > 1:
        shared = {"files": chunk.files, "rows": chunk.job_rows, "bytes": chunk.job_bytes}
    return {
        "index": chunk.index,
        "rows": chunk.rows,
        "bytes": chunk.bytes,
        "batch_id": chunk.batch_id,
        "status": status,
        "rows_processed": chunk.rows_processed,
        "rows_failed": chunk.rows_failed,
        "rows_with_warning": chunk.rows_with_warning,
        "submits": chunk.submits,
        "message": with_unmatched(chunk),
        "shared": shared,
        "unmatched_rows": chunk.unmatched_rows,
    }


def with_unmatched(chunk: ChunkRecord) -> str:
    """The chunk's message, and a sentence on rows no record matched, if there were any."""
    n = chunk.unmatched_rows
    if not n:
        return chunk.message
    rows = f"{n} row{'' if n == 1 else 's'}"
    if chunk.files > 1:
        note = (
            f"{rows} of Marketo's failures and warnings for this shared job matched no record"
            f" of its files, so each of its {chunk.files} files lists and counts them"
            " (Source Line empty)."
        )
    else:
        note = (
            f"{rows} of Marketo's failures and warnings matched no record of this chunk"
            " (Source Line empty)."
        )
    return f"{chunk.message} {note}" if chunk.message else note
