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
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import structlog

from orchestrator import attribution, constants, delimited
from orchestrator.clock import stamp
from orchestrator.config import Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.delimited import format_of, write_row
from orchestrator.durable import fsync_dir, write_atomic
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    RejectRecord,
)
from orchestrator.store import Store

log = structlog.get_logger(__name__)

RESULT_SUFFIX = ".result.json"
# A set-aside record larger than this goes to the failures file copied, not parsed.
RAW_REJECT_BYTES: Final = 1 << 20
COPY_BLOCK: Final = 1 << 16  # bytes per read, where part files cannot be copied in the kernel


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
            notes = [f"batch {chunk.batch_id}"] if chunk.batch_id else []
            if chunk.files > 1:  # a shared job fails every file in it: say so in each
                others = chunk.files - 1
                notes.append(f"shared with {others} other file{'' if others == 1 else 's'}")
            detail = f" ({', '.join(notes)})" if notes else ""
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


async def attribute_chunk(settings: Settings, store: Store, chunk_id: int) -> bool:
    """Match a final chunk's failed and warned rows back to each of its files: each file's
    rows with their source lines go to a part file in its own chunk directory, then the
    store records each file's share and the chunk as attributed. False when there was
    nothing to do (not final, or attributed already). Idempotent: a crash before the
    shares are recorded is repaired by running it again."""
    members = await store.members(chunk_id)
    if not members or members[0].attributed or members[0].status not in FINAL_CHUNK_STATUSES:
        return False
    job = members[0]  # the owner's view: its records come first
    owner = await store.get_file(job.file_id)
    route = settings.route(owner.route)
    fmt = format_of(owner.name, route.format if route else "")
    pieces: list[attribution.Piece] = []
    for member in members:
        file = await store.get_file(member.file_id)
        rejects = await store.rejects(member.file_id)
        gaps = await asyncio.to_thread(reject_gaps, Path(file.work_path), rejects)
        pieces.append(
            attribution.Piece(
                file_id=member.file_id,
                first_row=member.first_row,
                first_line=member.first_line,
                out_dir=settings.layout.chunk_dir(member.file_id),
                gaps=tuple(gaps),
            )
        )
    marketo = {
        "failures": Path(job.failures_path) if job.failures_path else None,
        "warnings": Path(job.warnings_path) if job.warnings_path else None,
    }
    started = time.monotonic()
    tallies = await asyncio.to_thread(
        attribution.attribute, chunk_id, Path(job.path), fmt, pieces, marketo, job.job_rows
    )
    failed, warned = tallies["failures"].rows, tallies["warnings"].rows
    shares: dict[int, tuple[int, int, int]] = {}
    for member in members:
        if member.files == 1:  # a chunk of its own: Marketo's counters, exactly
            shares[member.file_id] = (
                member.rows_processed,
                member.rows_failed,
                member.rows_with_warning,
            )
            continue
        its_failed = failed.get(member.file_id, 0)
        processed = member.rows - its_failed if member.status is ChunkStatus.COMPLETE else 0
        shares[member.file_id] = (processed, its_failed, warned.get(member.file_id, 0))
    await store.set_shares(chunk_id, shares)
    unmatched = tallies["failures"].unmatched + tallies["warnings"].unmatched
    (log.warning if unmatched else log.info)(
        "chunk_attributed",
        chunk=job.index,
        batch_id=job.batch_id,
        files=len(members),
        rows_failed=sum(failed.values()),
        rows_with_warning=sum(warned.values()),
        unmatched=unmatched,
        seconds=round(time.monotonic() - started, 3),
    )
    return True


async def finish_file(
    settings: Settings, store: Store, file: FileRecord
) -> tuple[FileRecord, dict[str, Any]]:
    """Write everything a finished file leaves behind; the final record and result document."""
    started = time.monotonic()
    for chunk in await store.chunks(file_id=file.id):
        if chunk.status in FINAL_CHUNK_STATUSES and not chunk.attributed:
            await attribute_chunk(settings, store, chunk.id)  # not done when it went final
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
    parts = settings.layout.chunk_dir(file.id)
    document = await asyncio.to_thread(
        write_outputs, file, chunks, rejects, result, fmt, finished_at, object_type, parts
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
    parts: Path,
) -> dict[str, Any]:
    """Blocking: failures, warnings (each file's parts of its chunks, then the records the
    splitter set aside), the source move, then result.json."""
    assert file.result_path is not None
    result_path = Path(file.result_path)
    target = result_path.with_name(result_path.name.removesuffix(RESULT_SUFFIX))
    delimiter = delimited.DELIMITERS[fmt]
    work = Path(file.work_path)
    source = work if os.path.lexists(work) else target  # moved already by an earlier run
    failures_name = write_merged(
        target.with_name(target.name + ".failures.csv"),
        [attribution.part_path(parts, c.id, "failures") for c in chunks],
        reject_rows(source, rejects, delimiter),
        delimiter,
    )
    warnings_name = write_merged(
        target.with_name(target.name + ".warnings.csv"),
        [attribution.part_path(parts, c.id, "warnings") for c in chunks],
        iter(()),
        delimiter,
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
    other files' records were in it too (None for a chunk of its own)."""
    if chunk.marketo_status:
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
        "message": chunk.message,
        "shared": shared,
    }


def write_merged(
    path: Path,
    parts: list[Path],
    extra: Iterator[tuple[list[str], list[str] | RawRecord]],
    delimiter: str,
) -> str | None:
    """Concatenate part files (their header once), then `extra`'s (header, row) pairs,
    streaming, into a temp file renamed to `path`; the file name, or None when no row.

    Each part starts with the same header line (Marketo's columns and the source line);
    `extra`'s rows are fitted to it: data columns padded or cut, reason and line last
    (a `RawRecord` is copied with its own fields, neither padded nor cut)."""
    parts = [part for part in parts if part.exists()]
    first = next(extra, None)
    if not parts and first is None:
        return None  # most files: nothing failed or warned; no temp file made and removed
    extra = itertools.chain([] if first is None else [first], extra)
    tmp = path.with_name(f".{path.name}.tmp")
    header: list[str] | None = None
    rows = False
    with open(tmp, "wb") as out:
        for part in parts:
            columns, head = part_header(part, delimiter)
            with open(part, "rb") as fh:
                if fh.read(len(head)) != head:
                    fh.seek(0)  # not our header line: keep every byte rather than lose a row
                elif header is not None:
                    pass  # the header once, at the top
                else:
                    out.write(head)
                if header is None:
                    header = columns
                rows = copy_rest(fh, out) > 0 or rows
        text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        writer = csv.writer(text, delimiter=delimiter, lineterminator="\n")
        for columns, row in extra:
            if header is None:
                header = columns
                writer.writerow(header)
            rows = True
            if isinstance(row, RawRecord):  # its own fields, as they are, then ours
                text.flush()
                with open(row.source, "rb") as fh:
                    fh.seek(row.offset)
                    copy_rest(fh, out, row.size)
                out.write(delimiter.encode())
                writer.writerow([row.reason, str(row.line)])
                continue
            width = len(header) - 2  # data columns before the reason and the line
            fields = (row[:-2] + [""] * width)[:width]
            write_row(writer, text, [*fields, *row[-2:]], delimiter)
        text.flush()
        text.detach()
        out.flush()
        os.fsync(out.fileno())
    if not rows:
        tmp.unlink()
        return None
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path.name


def copy_rest(source: BinaryIO, out: BinaryIO, size: int | None = None) -> int:
    """Copy `source` from where it is, to its end or `size` bytes, onto `out`; the bytes
    copied. In the kernel (sendfile) where it can, so no block of it passes through
    Python."""
    out.flush()
    offset = source.tell()
    end = os.fstat(source.fileno()).st_size
    if size is not None:
        end = min(end, offset + size)
    copied = 0
    try:
        while offset + copied < end:
            sent = os.sendfile(
                out.fileno(), source.fileno(), offset + copied, end - offset - copied
            )
            if sent == 0:
                break
            copied += sent
    except OSError:
        if copied:
            raise  # part of it went: do not copy that part twice
        source.seek(offset)
        while copied < end - offset:
            block = source.read(min(COPY_BLOCK, end - offset - copied))
            if not block:
                break
            out.write(block)
            copied += len(block)
        return copied
    out.seek(0, os.SEEK_END)
    return copied


def part_header(part: Path, delimiter: str) -> tuple[list[str], bytes]:
    """A part file's header record, and its bytes as `attribution` wrote them."""
    with open(part, encoding="utf-8", newline="") as fh:
        columns = next(csv.reader(fh, delimiter=delimiter), [])
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerow(columns)
    return columns, buffer.getvalue().encode("utf-8")


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
                block = raw.read(min(left, COPY_BLOCK))
                if not block:
                    break
                newlines += block.count(b"\n")
                left -= len(block)
            gaps.append((reject.line, max(1, newlines)))
    return gaps


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A set-aside record too large to parse in memory: its bytes are copied as they are."""

    source: Path
    offset: int
    size: int  # its line ending excluded
    reason: str
    line: int


def reject_rows(
    source: Path, rejects: Iterable[RejectRecord], delimiter: str
) -> Iterator[tuple[list[str], list[str] | RawRecord]]:
    """(header, row) for each record the splitter set aside, read back from the source;
    one above RAW_REJECT_BYTES as a `RawRecord` (a set-aside record is at least a chunk's
    size, so parsing it could take several times that in memory)."""
    rejects = list(rejects)
    if not rejects or not source.is_file():
        return
    with open(source, encoding="utf-8-sig", newline="") as fh:
        columns = next(csv.reader(fh, delimiter=delimiter), [])
    header = [*columns, constants.FAILURE_REASON_COLUMN, constants.SOURCE_LINE_COLUMN]
    with open(source, "rb") as raw:
        for reject in rejects:
            if reject.size > RAW_REJECT_BYTES:
                raw.seek(max(reject.offset, reject.offset + reject.size - 2))
                ending = raw.read(2)
                cut = 2 if ending == b"\r\n" else 1 if ending.endswith(b"\n") else 0
                yield (
                    header,
                    RawRecord(source, reject.offset, reject.size - cut, reject.reason, reject.line),
                )
                continue
            raw.seek(reject.offset)
            text = raw.read(reject.size).decode("utf-8", "replace")
            fields = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
            yield header, [*fields, reject.reason, str(reject.line)]
