"""Merged files: a finished file's failures and warnings, each one CSV file.

The parts (each file's share of each chunk's failed or warned rows, written by
`attribution`) are concatenated with their header once; the failures file then
gets the records the splitter set aside, read back from the source and fitted to
that header, with their reason and line. Streaming throughout: part files are
copied in the kernel where it can, and a set-aside record too large to parse in
memory is copied as it is. Written to a temp file, fsynced, renamed.

Blocking: run it in a thread.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from orchestrator import constants
from orchestrator.delimited import write_row
from orchestrator.durable import fsync_dir
from orchestrator.models import RejectRecord
from orchestrator.results.columns import placed, places_of

if TYPE_CHECKING:
    from _csv import Writer

# A set-aside record larger than this goes to the failures file copied, not parsed.
RAW_REJECT_BYTES: Final = 1 << 20
COPY_BLOCK: Final = 1 << 16  # bytes per read, where part files cannot be copied in the kernel


def write_merged(
    path: Path,
    parts: list[Path],
    extra: Iterator[tuple[list[str], list[str] | RawRecord]],
    delimiter: str,
    columns: list[str] | None = None,
) -> str | None:
    """Concatenate part files (their header once), then `extra`'s (header, row) pairs,
    streaming, into a temp file renamed to `path`; the file name, or None when no row.

    The header is `columns` (the source's, in full), then the reason column and the
    source line. `attribution` writes parts in that layout, so they are copied as they
    are; a part in another layout (an earlier release wrote Marketo's) has its rows
    placed under the header's columns by name. Without `columns`, the first part's
    header rules. `extra`'s rows are fitted to the header: data columns padded or cut,
    reason and line last (a `RawRecord` is copied with its own fields, neither padded
    nor cut)."""
    parts = [part for part in parts if part.exists()]
    first = next(extra, None)
    if not parts and first is None:
        return None  # most files: nothing failed or warned; no temp file made and removed
    extra = itertools.chain([] if first is None else [first], extra)
    heads = [part_header(part, delimiter) for part in parts]
    if columns is None:
        columns = heads[0][0][:-2] if heads else first[0][:-2] if first else []
    reason = (heads[0][0] if heads else first[0] if first else [""])[-2:-1]
    header = [*columns, *reason, constants.SOURCE_LINE_COLUMN]
    tmp = path.with_name(f".{path.name}.tmp")
    rows = False
    with open(tmp, "wb") as out:
        text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        writer = csv.writer(text, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        for part, (names, head) in zip(parts, heads, strict=True):
            with open(part, "rb") as fh:
                if fh.read(len(head)) != head:
                    fh.seek(0)  # not our header line: keep every byte rather than lose a row
                elif places_of(names[:-2], columns) is not None:
                    rows = replace_rows(fh, names[:-2], columns, writer, text, delimiter) or rows
                    continue
                rows = copy_rest(fh, out) > 0 or rows
        for _, row in extra:
            rows = True
            if isinstance(row, RawRecord):  # its own fields, as they are, then ours
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


def replace_rows(
    fh: BinaryIO,
    names: list[str],
    columns: list[str],
    writer: Writer,
    text: io.TextIOWrapper,
    delimiter: str,
) -> bool:
    """The rest of a part whose data columns are `names`, each row placed under `columns`
    by name (its reason and line kept last); whether there was a row."""
    places = places_of(names, columns)
    source = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    rows = False
    try:
        for row in csv.reader(source, delimiter=delimiter):
            if row:
                write_row(writer, text, [*placed(row[:-2], places), *row[-2:]], delimiter)
                rows = True
    finally:
        source.detach()  # `fh` is the caller's to close
    return rows


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


def source_columns(source: Path, delimiter: str) -> list[str] | None:
    """The source's header, names trimmed as its chunks carry them; None when it cannot be
    read. Asked only of a file that was split (whose header is sound)."""
    if not source.is_file():
        return None
    try:
        with open(source, encoding="utf-8-sig", newline="") as fh:
            columns = next(csv.reader(fh, delimiter=delimiter), None)
    except (ValueError, csv.Error):
        return None
    return None if not columns else [name.strip() for name in columns]


def part_header(part: Path, delimiter: str) -> tuple[list[str], bytes]:
    """A part file's header record, and its bytes as `attribution` wrote them."""
    with open(part, encoding="utf-8", newline="") as fh:
        columns = next(csv.reader(fh, delimiter=delimiter), [])
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerow(columns)
    return columns, buffer.getvalue().encode("utf-8")


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
