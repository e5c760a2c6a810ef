"""Per-file results: the merged failures and warnings files, <name>.result.json,
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
import csv
import io
import itertools
import json
import os
import shutil
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import constants, splitter
from orchestrator.clock import stamp
from orchestrator.config import Settings
from orchestrator.faults import crashpoint
from orchestrator.models import (
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    RejectRecord,
)
from orchestrator.store import Store

RESULT_SUFFIX = ".result.json"

# A set-aside record can be as large as any field Marketo accepts: well over
# the csv module's 128 KiB default. Raised once, for the process.
csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))


@dataclass(frozen=True, slots=True)
class Outcome:
    status: FileStatus
    error: str | None


def outcome(file: FileRecord, chunks: list[ChunkRecord]) -> Outcome:
    """complete when every chunk reached Marketo's Complete, else failed with one sentence why."""
    if file.error:
        return Outcome(FileStatus.FAILED, file.error)
    for chunk in chunks:
        if chunk.status is not ChunkStatus.COMPLETE:
            batch = f" (batch {chunk.batch_id})" if chunk.batch_id else ""
            why = chunk.message or "import failed"
            return Outcome(FileStatus.FAILED, f"chunk {chunk.index}{batch} failed: {why}")
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
    fmt = route.format_for(file.name) if route else "csv"
    object_type = str(route.object) if route else ""
    document = await asyncio.to_thread(
        write_outputs, file, chunks, rejects, result, fmt, finished_at, object_type
    )
    record = await store.finish_file(
        file.id, status=result.status, error=result.error, finished_at=document["finished_at"]
    )
    crashpoint("file_finished")
    await asyncio.to_thread(shutil.rmtree, settings.layout.chunk_dir(file.id), True)
    return record, document


def write_outputs(
    file: FileRecord,
    chunks: list[ChunkRecord],
    rejects: list[RejectRecord],
    result: Outcome,
    fmt: str,
    finished_at: str,
    object_type: str,
) -> dict[str, Any]:
    """Blocking: failures, warnings, the source move, then result.json."""
    assert file.result_path is not None
    result_path = Path(file.result_path)
    target = result_path.with_name(result_path.name.removesuffix(RESULT_SUFFIX))
    delimiter = constants.DELIMITERS[fmt]
    work = Path(file.work_path)
    source = work if os.path.lexists(work) else target  # moved already by an earlier run
    gaps = reject_gaps(source, rejects)
    failures = merge_rows(
        chunks, "failures_path", fmt, gaps, reject_rows(source, rejects, delimiter)
    )
    warnings = merge_rows(chunks, "warnings_path", fmt, gaps, iter(()))
    failures_name = write_table(
        target.with_name(target.name + ".failures.csv"), failures, delimiter
    )
    warnings_name = write_table(
        target.with_name(target.name + ".warnings.csv"), warnings, delimiter
    )
    crashpoint("results_written")
    if os.path.lexists(work):
        os.replace(work, target)
    if result_path.exists():
        # A previous run got this far: keep its document (written once).
        existing: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        return existing
    document = {
        "id": file.job_id,
        "file": file.name,
        "route": file.route,
        "object": object_type,
        "status": str(result.status),
        "error": result.error,
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
    if chunk.marketo_status:
        status = chunk.marketo_status
    else:
        status = "NotSubmitted" if chunk.batch_id is None else str(chunk.status)
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
        "message": chunk.message,
    }


@dataclass
class Table:
    """Rows to write under one header; empty header means nothing to write."""

    header: list[str]
    rows: list[list[str]]


def merge_rows(
    chunks: list[ChunkRecord],
    attr: str,
    fmt: str,
    gaps: list[tuple[int, int]],
    extra: Iterator[tuple[list[str], list[str]]],
) -> Table:
    """Marketo's per-chunk files as one table, each row with its source line when known.

    `gaps` are the records the splitter set aside (see `reject_gaps`); `extra`
    yields (header, row) pairs from the daemon's own rejections.
    """
    delimiter = constants.DELIMITERS[fmt]
    table = Table([], [])
    for chunk in chunks:
        path = getattr(chunk, attr)
        if not path or not os.path.exists(path):
            continue
        lines = source_lines(chunk, fmt, gaps)
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                continue
            if not table.header:
                table.header = [*header, constants.SOURCE_LINE_COLUMN]
            for row in reader:
                queue = lines.get(tuple(row[:-1]))
                line = str(queue.popleft()) if queue else ""
                table.rows.append([*row, line])
    for header, row in extra:
        if not table.header:
            table.header = header
        width = len(table.header) - 2  # data columns before the reason and the line
        fields = (row[:-2] + [""] * width)[:width]
        table.rows.append([*fields, *row[-2:]])
    return table


def source_lines(
    chunk: ChunkRecord, fmt: str, gaps: list[tuple[int, int]]
) -> dict[tuple[str, ...], deque[int]]:
    """Each record of a chunk (as parsed fields) to the source line it starts on.

    A chunk's records are consecutive in the source but for records the splitter
    set aside between them: each gap (line, lines it spans) at or before a record
    moves that record and the ones after it down by its span."""
    delimiter = constants.DELIMITERS[fmt]
    found: dict[tuple[str, ...], deque[int]] = defaultdict(deque)
    if not os.path.exists(chunk.path):
        return found
    pending = deque(g for g in gaps if g[0] >= chunk.first_line)
    shift = 0
    for line, raw in splitter.iter_records(Path(chunk.path), fmt):
        source_line = chunk.first_line + line - 2 + shift
        while pending and pending[0][0] <= source_line:
            shift += pending[0][1]
            source_line += pending.popleft()[1]
        fields = next(
            csv.reader(io.StringIO(raw.decode("utf-8"), newline=""), delimiter=delimiter), []
        )
        found[tuple(fields)].append(source_line)
    return found


def reject_gaps(source: Path, rejects: Iterable[RejectRecord]) -> list[tuple[int, int]]:
    """(first line, lines spanned) of each set-aside record, in source order."""
    gaps: list[tuple[int, int]] = []
    if not source.is_file():
        return gaps
    with open(source, "rb") as raw:
        for reject in sorted(rejects, key=lambda r: r.offset):
            raw.seek(reject.offset)
            newlines, left = 0, reject.size
            while left > 0:
                block = raw.read(min(left, 1 << 20))
                if not block:
                    break
                newlines += block.count(b"\n")
                left -= len(block)
            gaps.append((reject.line, max(1, newlines)))
    return gaps


def reject_rows(
    source: Path, rejects: Iterable[RejectRecord], delimiter: str
) -> Iterator[tuple[list[str], list[str]]]:
    """(header, row) for each record the splitter set aside, read back from the source."""
    rejects = list(rejects)
    if not rejects or not source.is_file():
        return
    with open(source, encoding="utf-8-sig", newline="") as fh:
        columns = next(csv.reader(fh, delimiter=delimiter), [])
    header = [*columns, constants.FAILURE_REASON_COLUMN, constants.SOURCE_LINE_COLUMN]
    with open(source, "rb") as raw:
        for reject in rejects:
            raw.seek(reject.offset)
            text = raw.read(reject.size).decode("utf-8", "replace")
            fields = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
            yield header, [*fields, reject.reason, str(reject.line)]


def write_table(path: Path, table: Table, delimiter: str) -> str | None:
    """Write `table` atomically at `path`; returns the file name, or None when empty."""
    if not table.rows:
        return None
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(table.header)
    writer.writerows(table.rows)
    write_atomic(path, buffer.getvalue().encode("utf-8"))
    return path.name


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
