"""Cut a large delimited file into chunks Marketo accepts, in one streaming read.

Every chunk is the header line followed by whole records, strictly smaller than
`max_bytes`, filled greedily (for records in a fixed order that gives the fewest
chunks, so the fewest Marketo jobs). Record bytes are copied unchanged: no
re-quoting, no re-encoding, line endings kept.

How records are found. Quoting follows RFC 4180 with the format's delimiter; the
delimiter itself never matters for cutting, only quotes and LF bytes do. An LF
ends a record when the number of quotes since the record began is even. So the
scan works on whole blocks with C-speed bytes methods, never record by record:
a block without quotes is all `count`/`find`; a block with quotes is reduced to
its quotes and LFs by `translate`, quote pairs on one physical line cancel, and
the few odd lines that are left say which LFs are inside a quoted field.

Decisions (the issue left these open):
- Only LF ends a record; a CR before it is part of the line ending and kept. A
  lone CR outside quotes is ordinary data.
- A quote anywhere toggles quoting, as RFC 4180 reads it. A stray quote inside
  an unquoted field therefore opens a quoted section; if nothing closes it, the
  file ends inside a quote and `InputError` names the line of the record where
  it opened.
- A blank line is a record (an empty row, as `csv.reader` sees it): it is
  copied, counted, and Marketo decides about it. A final LF at the end of the
  file ends the last record; it is not a record of its own.
- The last record of the file keeps its bytes as they are, so if the file does
  not end with LF, neither does the last chunk. Every other chunk ends with the
  line ending of its last record, because a chunk is only ever cut after an LF.
- A UTF-8 byte order mark is dropped; it is never copied into a chunk.
- Header names are compared exactly after trimming surrounding spaces: an
  empty one (a trailing delimiter makes one) or a repeated one is an error.
- "line" in events and errors is the physical line: 1 + the LF bytes before
  the position (the header is line 1). "offset" is a byte offset in the source
  file as it is on disk (a BOM counts).
- `SplitDone.rows` counts every data record of the source, the rejected ones
  included; the chunks hold `rows - rejected` of them.

Chunks are written to `chunk-NNNNN.<fmt>.tmp`, optionally fsynced, then renamed
into place and only then announced, so a chunk that was announced is whole and
a failed or abandoned split leaves no partial file.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import io
import os
import threading
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from orchestrator.constants import DELIMITERS
from orchestrator.errors import InputError

DEFAULT_BLOCK_SIZE: Final = 1 << 20
# UTF-8 is checked in pieces this size, so that one wide character does not
# slow the decoding of a whole block, and pure-ASCII pieces are skipped.
_VALIDATE_PIECE: Final = 1 << 16
# Events the async wrapper's worker may run ahead of its consumer.
_ASYNC_AHEAD: Final = 2

_LF: Final = b"\n"
_QUOTE: Final = b'"'
_NUL: Final = b"\x00"
# Second argument to bytes.translate: delete every byte but the quote and LF.
_NOT_QUOTE_OR_LF: Final = bytes(b for b in range(256) if b not in b'"\n')
_UTF16_BOMS: Final = ((codecs.BOM_UTF16_LE, "FF FE"), (codecs.BOM_UTF16_BE, "FE FF"))


@dataclass(frozen=True, slots=True)
class Chunk:
    """A finished chunk file: in place, complete, fsynced if that was asked."""

    index: int  # 1-based
    path: Path
    rows: int  # data records, header excluded
    bytes: int  # file size, header included
    first_line: int  # source line of its first record


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


def parse_header(line: bytes, fmt: str, source: Path) -> tuple[str, ...]:
    """Column names of a header record; InputError for a header Marketo cannot map."""
    delimiter = _delimiter(fmt)
    raw = line.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(source, f"header is not valid UTF-8 ({exc.reason})", line=1) from None
    text = text.removesuffix("\n").removesuffix("\r")
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise InputError(source, f"header is not valid {fmt}: {exc}", line=1) from None
    if not rows or rows == [[]]:
        raise InputError(source, "header line is empty", line=1)
    if len(rows) > 1:
        raise InputError(source, "header spans more than one record", line=1)
    return _checked_columns(rows[0], source)


def _checked_columns(names: list[str], source: Path) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        key = name.strip()
        if not key:
            problem = f"header column {number} has an empty name"
            if number == len(names):
                problem += " (a trailing delimiter?)"
            raise InputError(source, problem, line=1)
        if key in seen:
            raise InputError(
                source,
                f"header column {number} {key!r} duplicates column {seen[key]}",
                line=1,
            )
        seen[key] = number
    return tuple(names)


def _delimiter(fmt: str) -> str:
    try:
        return DELIMITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(DELIMITERS)}") from None


# --- the scan: quote parity with bytes methods --------------------------------


@dataclass(frozen=True, slots=True)
class _Scan:
    """Where records end in one block, given whether it starts inside a quote."""

    lfs: int  # LF bytes in the block
    ends: int  # LFs that end a record
    first: int  # offset just past the first record-ending LF, -1 if none
    last: int  # offset just past the last record-ending LF, -1 if none
    parity: int  # 1 if the block ends inside a quoted field


def _scan(data: bytes, parity: int) -> _Scan:
    if data.find(_QUOTE) < 0:
        lfs = data.count(_LF)
        if parity or not lfs:
            return _Scan(lfs, 0, -1, -1, parity)
        return _Scan(lfs, lfs, data.find(_LF) + 1, data.rfind(_LF) + 1, 0)
    # Keep only quotes and LFs. The quotes of one physical line are then
    # adjacent; removing pairs leaves one quote per line with an odd count, and
    # parts[i] of the split lies inside a quote when parity + i is odd.
    marks = data.translate(None, _NOT_QUOTE_OR_LF).replace(b'""', b"")
    parts = marks.split(_QUOTE)
    lfs = marks.count(_LF)
    quoted = b"".join(parts[1 - parity :: 2]).count(_LF)
    end_parity = (parity + len(parts) - 1) & 1
    if quoted == lfs:
        return _Scan(lfs, 0, -1, -1, end_parity)
    before, after = _quoted_lfs_around(parts, parity)
    first = _past_nth_lf(data, before)
    last = _past_nth_lf_from_end(data, after)
    return _Scan(lfs, lfs - quoted, first, last, end_parity)


def _quoted_lfs_around(parts: list[bytes], parity: int) -> tuple[int, int]:
    """LFs before the first and after the last record-ending LF (parts has one)."""
    before = 0
    for i, part in enumerate(parts):
        if not (parity + i) & 1 and _LF in part:
            break
        before += part.count(_LF)
    after = 0
    for i in range(len(parts) - 1, -1, -1):
        if not (parity + i) & 1 and _LF in parts[i]:
            break
        after += parts[i].count(_LF)
    return before, after


def _past_nth_lf(data: bytes, n: int) -> int:
    pos = -1
    for _ in range(n + 1):
        pos = data.find(_LF, pos + 1)
    return pos + 1


def _past_nth_lf_from_end(data: bytes, n: int) -> int:
    pos = len(data)
    for _ in range(n + 1):
        pos = data.rfind(_LF, 0, pos)
    return pos + 1


def _last_end(data: bytes, start: int, limit: int) -> int:
    """Offset past the last record-ending LF in data[start:limit]; -1 if none.

    `start` is a record boundary. Walks back LF by LF only while the quote
    count since `start` is odd.
    """
    pos = data.rfind(_LF, start, limit)
    if pos < 0:
        return -1
    odd = data.count(_QUOTE, start, pos) & 1
    while odd:
        prev = data.rfind(_LF, start, pos)
        if prev < 0:
            return -1
        odd ^= data.count(_QUOTE, prev, pos) & 1
        pos = prev
    return pos + 1


def _first_end(data: bytes, start: int, parity: int) -> int:
    """Offset past the first record-ending LF at or after `start`; -1 if none."""
    pos = data.find(_LF, start)
    while pos >= 0:
        parity ^= data.count(_QUOTE, start, pos) & 1
        if not parity:
            return pos + 1
        start = pos
        pos = data.find(_LF, pos + 1)
    return -1


# --- reading and checking the source -------------------------------------------


def _blocks(fh: io.BufferedReader, source: Path, block_size: int) -> Iterator[tuple[bytes, int]]:
    """The file in blocks with their offsets; a UTF-8 BOM dropped, UTF-16 refused."""
    data = fh.read(block_size)
    offset = 0
    for bom, name in _UTF16_BOMS:
        if data.startswith(bom):
            raise InputError(
                source,
                f"file is UTF-16 (byte order mark {name}); save it as UTF-8",
                offset=0,
                line=1,
            )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
        offset = len(codecs.BOM_UTF8)
        if not data:
            data = fh.read(block_size)
    while data:
        yield data, offset
        offset += len(data)
        data = fh.read(block_size)


class _Validator:
    """Refuses NUL bytes and text that is not UTF-8, block by block at C speed."""

    def __init__(self, source: Path) -> None:
        self._source = source
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def check(self, data: bytes, offset: int, line: int) -> None:
        """`line` is the physical line at data[0]."""
        nul = data.find(_NUL)
        if nul >= 0:
            raise InputError(
                self._source,
                "NUL byte: binary data, or UTF-16/UTF-32 text without a byte order mark",
                offset=offset + nul,
                line=line + data.count(_LF, 0, nul),
            )
        if not self._held() and data.isascii():
            return
        for start in range(0, len(data), _VALIDATE_PIECE):
            piece = data[start : start + _VALIDATE_PIECE]
            held = self._held()
            if not held and piece.isascii():
                continue
            try:
                self._decoder.decode(piece)
            except UnicodeDecodeError as exc:
                bad = start - len(held) + exc.start
                self._fail(exc.reason, offset + bad, line + data.count(_LF, 0, max(bad, 0)))

    def finish(self, offset: int, line: int) -> None:
        """`offset` and `line` are those of the end of the file."""
        held = self._held()
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            self._fail(exc.reason, offset - len(held) + exc.start, line)

    def _held(self) -> bytes:
        return self._decoder.getstate()[0]

    def _fail(self, reason: str, offset: int, line: int) -> NoReturn:
        raise InputError(self._source, f"not valid UTF-8 ({reason})", offset=offset, line=line)


def _unterminated(source: Path, offset: int, line: int) -> InputError:
    return InputError(
        source,
        "unterminated quoted field: a quote opened in the record starting here is never closed",
        offset=offset,
        line=line,
    )


# --- writing chunks -----------------------------------------------------------


class _ChunkWriter:
    """Writes one chunk at a time to a temp name; renames it into place when done."""

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
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        path = self._tmp.with_suffix("")
        os.replace(self._tmp, path)
        self._tmp = None
        if self._fsync:
            _fsync_dir(self._out_dir)
        chunk = Chunk(self._index, path, self._rows, len(self.header) + self.fill, self._first_line)
        self.fill = 0
        return chunk

    def abort(self) -> None:
        """Drop the chunk being written, if any; idempotent."""
        if self._file is not None:
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
        self._file.write(self.header)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._validator = _Validator(source)
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
        scan = _scan(data, self._pending_parity)
        self._line += scan.lfs
        if scan.first < 0:
            self._hold(data, scan.parity)
            return
        view = memoryview(data)
        yield from self._finish_pending(view[: scan.first])
        if scan.last > scan.first:
            region_line = line + data.count(_LF, 0, scan.first)
            yield from self._place_region(
                data, offset, (scan.first, scan.last), region_line, scan.ends - 1
            )
        self._start_pending(data, offset, scan)

    def finish(self) -> Iterator[SplitEvent]:
        self._validator.finish(self._end, self._line)
        if self._pending_parity:
            raise _unterminated(self._source, self._pending_offset, self._pending_line)
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

    def _start_pending(self, data: bytes, offset: int, scan: _Scan) -> None:
        tail = data[scan.last :]
        self._pending = [tail] if tail else []
        self._pending_size = len(tail)
        self._pending_parity = scan.parity
        self._pending_offset = offset + scan.last
        self._pending_line = self._line - tail.count(_LF)
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
            cut = _last_end(data, pos, pos + space)
            if cut > pos:
                rows = _ends_between(data, pos, cut, end, ends)
                self._writer.write(view[pos:cut], line, rows)
            else:  # the next record does not fit in what is left of this chunk
                cut = _first_end(data, pos, 0)
                if cut - pos <= self._room:
                    yield self._writer.close()
                    continue
                yield self._reject(line, offset + pos, cut - pos)
                rows = 1
            ends -= rows
            line += data.count(_LF, pos, cut)
            pos = cut

    def _set_header(self, raw: bytes) -> None:
        self._columns = parse_header(raw, self._fmt, self._source)
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


def _ends_between(data: bytes, pos: int, cut: int, end: int, ends: int) -> int:
    """Record ends in data[pos:cut], both record boundaries; `ends` is for pos:end."""
    if cut - pos <= end - cut:
        return _scan(data[pos:cut], 0).ends
    return ends - _scan(data[cut:end], 0).ends


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
    _delimiter(fmt)
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
            for data, offset in _blocks(fh, source, block_size):
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


def iter_records(data_path: Path, fmt: str) -> Iterator[tuple[int, bytes]]:
    """(line, record bytes without its line ending) for each data record of a file.

    The file's first record is its header and is skipped. `line` is the
    physical line in this file where the record starts (header is line 1).
    Uses the splitter's reading, checks and quote rules; raises `InputError`.
    """
    _delimiter(fmt)
    validator = _Validator(data_path)
    buf = b""  # the unfinished record, then the new block
    scanned = 0  # buf[:scanned] holds no record end; quote parity there:
    parity = 0
    line = 1  # line where buf starts
    offset = 0  # file offset of buf[0]
    header_seen = False
    with data_path.open("rb") as fh:
        for data, at in _blocks(fh, data_path, DEFAULT_BLOCK_SIZE):
            if not buf:
                offset = at
            validator.check(data, at, line + buf.count(_LF))
            buf += data
            start = 0
            end = _first_end(buf, scanned, parity)
            while end >= 0:
                if header_seen:
                    yield line, _without_line_ending(buf[start:end])
                header_seen = True
                line += buf.count(_LF, start, end)
                start = end
                end = _first_end(buf, start, 0)
            if start:
                parity = buf.count(_QUOTE, start) & 1
            else:
                parity ^= buf.count(_QUOTE, scanned) & 1
            buf = buf[start:]
            offset += start
            scanned = len(buf)
        validator.finish(offset + len(buf), line + buf.count(_LF))
    if parity:
        raise _unterminated(data_path, offset, line)
    if not header_seen and not buf:
        raise InputError(data_path, "file is empty: no header line", offset=0, line=1)
    if buf and header_seen:
        yield line, _without_line_ending(buf)


def _without_line_ending(record: bytes) -> bytes:
    if record.endswith(_LF):
        return record[:-2] if record.endswith(b"\r\n") else record[:-1]
    return record
