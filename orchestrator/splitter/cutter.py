"""Cut a large delimited file into chunks Marketo accepts, in one streaming read.

Every chunk is the header line followed by whole records, strictly smaller than
`max_bytes`, filled greedily (for records in a fixed order that gives the fewest
chunks, so the fewest Marketo jobs). Record bytes are copied unchanged: no
re-quoting, no re-encoding, line endings kept, a UTF-8 BOM never copied.
Where records end and what makes a file unreadable is `splitter.scan`'s part.

Decisions (the issue left these open; the scanning ones are in `splitter.scan`):
- A blank line is a record: it is copied, counted, and Marketo decides about it.
- The last record of the file keeps its bytes as they are, so if the file does
  not end with LF, neither does the last chunk. Every other chunk ends with the
  line ending of its last record, because a chunk is only ever cut after an LF.
- `SplitDone.rows` counts every data record of the source, the rejected ones
  included; the chunks hold `rows - rejected` of them.
- The header is the one line that may change: column names with spaces around
  them (`" vin"`) are written trimmed in every chunk's header, with a warning
  naming them, since Marketo matches names exactly and would fail every row
  (missing.dedupe.fields). A header without such names is copied unchanged.

Chunks are written to `chunk-NNNNN.<fmt>.tmp`, optionally fsynced, then renamed
into place and only then announced, so a chunk that was announced is whole and
a failed or abandoned split leaves no partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import threading
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from orchestrator.durable import fsync_dir
from orchestrator.errors import InputError
from orchestrator.splitter.scan import (
    DEFAULT_BLOCK_SIZE,
    LF,
    Scan,
    Validator,
    delimiter_for,
    ends_between,
    first_end,
    last_end,
    parse_header,
    read_blocks,
    scan_block,
    unterminated_error,
)

log = structlog.get_logger(__name__)

# Re-exported: DEFAULT_BLOCK_SIZE, parse_header and iter_records are public here.
# Events the async wrapper's worker may run ahead of its consumer.
_ASYNC_AHEAD: Final = 2


@dataclass(frozen=True, slots=True)
class Chunk:
    """A finished chunk file: in place, complete, fsynced if that was asked."""

    index: int  # 1-based
    path: Path
    rows: int  # data records, header excluded
    bytes: int  # file size, header included
    first_line: int  # source line of its first record
    # Bytes of its header line (as written: trimmed names, line ending included); the
    # records are the rest, so packing appends `path` from this offset to another chunk.
    header_bytes: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record set aside because header plus record would reach max_bytes."""

    line: int  # source line where the record starts
    offset: int  # byte offset of the record in the source
    size: int  # bytes of the record, its line ending included
    reason: str


@dataclass(frozen=True, slots=True)
class SplitDone:
    """The last event: totals for the whole source file."""

    rows: int  # data records of the source, rejected ones included
    chunks: int
    rejected: int
    header: tuple[str, ...]  # header column names


SplitEvent = Chunk | Rejected | SplitDone


# --- writing chunks -----------------------------------------------------------


class _ChunkWriter:
    """Writes one chunk at a time to a temp name; renames it into place when done.

    An OSError while writing names the chunk file: write(2) and close(2) failing
    with ENOSPC or EFBIG raise one with no filename, which would leave the user
    a full disk without saying where (`_naming`)."""

    def __init__(self, out_dir: Path, fmt: str, *, fsync: bool) -> None:
        self.header = b""
        self.fill = 0  # data bytes in the open chunk
        self._out_dir = out_dir
        self._fmt = fmt
        self._fsync = fsync
        self._index = 0
        self._rows = 0
        self._first_line = 0
        self._file: io.BufferedWriter | None = None
        self._tmp: Path | None = None

    @property
    def chunks(self) -> int:
        return self._index

    def write(self, data: bytes | memoryview, line: int, rows: int) -> None:
        """Append `rows` whole records; `line` is the first one's source line."""
        if self._file is None:
            self._open(line)
        assert self._file is not None  # opened above; tells mypy
        with _naming(self._tmp):
            self._file.write(data)
        self.fill += len(data)
        self._rows += rows

    def write_record(self, pieces: list[bytes | memoryview], line: int) -> None:
        """Append one record that arrived in pieces."""
        for piece in pieces:
            self.write(piece, line, 0)
        self._rows += 1

    def close(self) -> Chunk:
        assert self._file is not None  # only called with a chunk open
        assert self._tmp is not None
        with _naming(self._tmp):
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        self._file = None
        path = self._tmp.with_suffix("")
        os.replace(self._tmp, path)
        self._tmp = None
        if self._fsync:
            fsync_dir(self._out_dir)
        size = len(self.header) + self.fill
        chunk = Chunk(self._index, path, self._rows, size, self._first_line, len(self.header))
        self.fill = 0
        return chunk

    def abort(self) -> None:
        """Drop the chunk being written, if any; idempotent."""
        if self._file is not None:
            # Flushing what is buffered can fail again (a full disk): the chunk is
            # being dropped anyway, and close() releases the descriptor regardless.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    @property
    def open(self) -> bool:
        return self._file is not None

    def _open(self, line: int) -> None:
        self._index += 1
        self._rows = 0
        self._first_line = line
        self._tmp = self._out_dir / f"chunk-{self._index:05d}.{self._fmt}.tmp"
        self._file = self._tmp.open("wb")
        with _naming(self._tmp):
            self._file.write(self.header)


@contextlib.contextmanager
def _naming(path: Path | None) -> Iterator[None]:
    """Re-raise an OSError that names no file as the same error naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or path is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


# --- the cutter ---------------------------------------------------------------


class _Cutter:
    """Turns validated blocks into chunk files and events.

    Between blocks it holds the record that is not finished yet ("pending"):
    its bytes, unless it already is too large for any chunk, in which case it
    is only measured until it ends and then reported as rejected.
    """

    def __init__(self, source: Path, out_dir: Path, *, max_bytes: int, fmt: str, fsync: bool):
        self._source = source
        self._fmt = fmt
        self._max_bytes = max_bytes
        self._writer = _ChunkWriter(out_dir, fmt, fsync=fsync)
        self._validator = Validator(source)
        self._columns: tuple[str, ...] | None = None
        self._room = 0  # most data bytes a chunk can take
        self._line = 1  # physical line at the start of the next block
        self._end = 0  # offset of the end of what was fed
        self._rows = 0
        self._rejected = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_parity = 0
        self._pending_offset = 0
        self._pending_line = 1
        self._too_large = False  # the pending record cannot fit in any chunk

    def feed(self, data: bytes, offset: int) -> Iterator[SplitEvent]:
        if not self._end:  # the first block: the header starts here, after any BOM
            self._pending_offset = offset
        self._end = offset + len(data)
        line = self._line
        self._validator.check(data, offset, line)
        scan = scan_block(data, self._pending_parity)
        self._line += scan.lfs
        if scan.first < 0:
            self._hold(data, scan.parity)
            return
        view = memoryview(data)
        yield from self._finish_pending(view[: scan.first])
        if scan.last > scan.first:
            region_line = line + data.count(LF, 0, scan.first)
            yield from self._place_region(
                data, offset, (scan.first, scan.last), region_line, scan.ends - 1
            )
        self._start_pending(data, offset, scan)

    def finish(self) -> Iterator[SplitEvent]:
        self._validator.finish(self._end, self._line)
        if self._pending_parity:
            raise unterminated_error(self._source, self._pending_offset, self._pending_line)
        if self._columns is None and not self._pending_size:
            raise InputError(self._source, "file is empty: no header line", offset=0, line=1)
        if self._pending_size:
            yield from self._finish_pending(b"")
        if self._writer.open:
            yield self._writer.close()
        assert self._columns is not None  # set by the first record, checked above
        yield SplitDone(self._rows, self._writer.chunks, self._rejected, self._columns)

    def abort(self) -> None:
        self._writer.abort()

    def _hold(self, data: bytes, parity: int) -> None:
        """Keep a block that ends no record: all of it belongs to the pending one."""
        self._pending_parity = parity
        self._pending_size += len(data)
        if self._columns is None and self._pending_size > self._max_bytes:
            raise InputError(
                self._source,
                f"header line is longer than max_bytes={self._max_bytes}",
                offset=self._pending_offset,
                line=1,
            )
        if not self._too_large:
            self._pending.append(data)
            self._check_pending_size()

    def _check_pending_size(self) -> None:
        if self._columns is not None and self._pending_size > self._room:
            self._too_large = True
            self._pending.clear()

    def _start_pending(self, data: bytes, offset: int, scan: Scan) -> None:
        tail = data[scan.last :]
        self._pending = [tail] if tail else []
        self._pending_size = len(tail)
        self._pending_parity = scan.parity
        self._pending_offset = offset + scan.last
        self._pending_line = self._line - tail.count(LF)
        self._too_large = False
        self._check_pending_size()

    def _finish_pending(self, rest: bytes | memoryview) -> Iterator[SplitEvent]:
        """The pending record ends with `rest`: set the header or place the record."""
        size = self._pending_size + len(rest)
        pieces: list[bytes | memoryview] = [*self._pending, rest]
        line = self._pending_line
        self._pending = []
        self._pending_size = 0
        if self._columns is None:
            self._set_header(b"".join(pieces))
            return
        self._require_room()
        self._rows += 1
        if self._too_large or size > self._room:
            self._too_large = False
            yield self._reject(line, self._pending_offset, size)
            return
        if self._writer.fill + size > self._room:
            yield self._writer.close()
        self._writer.write_record(pieces, line)

    def _place_region(
        self, data: bytes, offset: int, span: tuple[int, int], line: int, ends: int
    ) -> Iterator[SplitEvent]:
        """Place data[pos:end], whole records (`ends` of them), into chunks.

        `offset` is the source offset of data[0]; `line` the source line at pos.
        """
        pos, end = span
        self._require_room()
        self._rows += ends
        view = memoryview(data)
        while pos < end:
            space = self._room - self._writer.fill
            if end - pos <= space:
                self._writer.write(view[pos:end], line, ends)
                return
            cut = last_end(data, pos, pos + space)
            if cut > pos:
                rows = ends_between(data, pos, cut, end, ends)
                self._writer.write(view[pos:cut], line, rows)
            else:  # the next record does not fit in what is left of this chunk
                cut = first_end(data, pos, 0)
                if cut - pos <= self._room:
                    yield self._writer.close()
                    continue
                yield self._reject(line, offset + pos, cut - pos)
                rows = 1
            ends -= rows
            line += data.count(LF, pos, cut)
            pos = cut

    def _set_header(self, raw: bytes) -> None:
        self._columns = parse_header(raw, self._fmt, self._source)
        padded = [name for name in self._columns if name != name.strip()]
        if padded:
            raw = trimmed_header(raw, self._columns, self._fmt)
            log.warning(
                "header_names_trimmed",
                file=str(self._source),
                columns=padded,
                note="Marketo matches column names exactly; chunks carry them trimmed",
            )
        self._writer.header = raw
        self._room = self._max_bytes - 1 - len(raw)

    def _require_room(self) -> None:
        if self._room < 1:
            raise InputError(
                self._source,
                f"the header alone is {len(self._writer.header)} bytes: "
                f"no record fits under max_bytes={self._max_bytes}",
                line=1,
            )

    def _reject(self, line: int, offset: int, size: int) -> Rejected:
        self._rejected += 1
        header = len(self._writer.header)
        reason = (
            f"record of {size} bytes is too large: with the {header}-byte header a chunk "
            f"would be {header + size} bytes, and chunks must stay under {self._max_bytes}"
        )
        return Rejected(line, offset, size, reason)


def trimmed_header(raw: bytes, columns: tuple[str, ...], fmt: str) -> bytes:
    """The header line written again with every column name trimmed; line ending kept."""
    ending = b"\r\n" if raw.endswith(b"\r\n") else b"\n" if raw.endswith(b"\n") else b""
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter_for(fmt), lineterminator="").writerow(
        [name.strip() for name in columns]
    )
    return out.getvalue().encode("utf-8") + ending


# --- public entry points --------------------------------------------------------


def split_file(
    source: Path,
    out_dir: Path,
    *,
    max_bytes: int,
    fmt: str,
    fsync: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Generator[SplitEvent, None, None]:
    """Cut `source` into `out_dir/chunk-NNNNN.<fmt>`, yielding events as it goes.

    Yields a `Chunk` once its file is complete and in place, a `Rejected` for
    each record too large for any chunk, and `SplitDone` last. Raises
    `InputError` for a file that cannot be split; a chunk being written is then
    removed (chunks already yielded stay). Closing the generator early also
    removes the chunk being written. Blocking: run it in a worker thread.
    ValueError (at the call) for an unknown format or a limit below 2 bytes.
    """
    delimiter_for(fmt)
    if max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2, not {max_bytes}")
    if block_size < 4:
        raise ValueError(f"block_size must be at least 4, not {block_size}")
    return _split(source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync, block_size=block_size)


def _split(
    source: Path, out_dir: Path, *, max_bytes: int, fmt: str, fsync: bool, block_size: int
) -> Generator[SplitEvent, None, None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cutter = _Cutter(source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync)
    try:
        with source.open("rb") as fh:
            for data, offset in read_blocks(fh, source, block_size):
                yield from cutter.feed(data, offset)
        yield from cutter.finish()
    finally:
        cutter.abort()


async def split_file_async(
    source: Path, out_dir: Path, *, max_bytes: int, fmt: str, fsync: bool = False
) -> AsyncGenerator[SplitEvent, None]:
    """`split_file` in a worker thread, its events handed over as they come.

    The worker runs at most a couple of events ahead of the consumer. Errors
    are raised in the consumer. When the consumer stops early (aclose, or
    cancellation; use `contextlib.aclosing` with `async for ... break`), the
    worker stops before cutting the next chunk and its partial chunk is removed
    before the close returns.
    """
    loop = asyncio.get_running_loop()
    handoff: asyncio.Queue[SplitEvent | BaseException | None] = asyncio.Queue()
    slots = threading.Semaphore(_ASYNC_AHEAD)
    stop = threading.Event()

    def hand_over(item: SplitEvent | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
            loop.call_soon_threadsafe(handoff.put_nowait, item)

    events = split_file(source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync)

    def work() -> None:
        try:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                event = next(events, None)
                hand_over(event)
                if event is None:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(exc)
        finally:
            events.close()

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        while True:
            item = await handoff.get()
            slots.release()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        slots.release()
        await worker
