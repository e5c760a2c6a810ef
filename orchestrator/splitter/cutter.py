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

The cutter finds the records; which chunk each goes to is `splitter.placing`'s part
(and `splitter.repeats`' for a route with key columns), writing a chunk file whole
(temp name, fsync, rename) `splitter.writer`'s. Each record is handed over in one of
two places: `_place_region`, for the run of whole records inside one block (copied at
C speed), and `_finish_pending`, for the one record that ran on from an earlier block
(or is the file's last).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from orchestrator.errors import InputError
from orchestrator.splitter.keyed import KeyRule, RowKeys, key_indexes
from orchestrator.splitter.placing import Placement, Rejected
from orchestrator.splitter.repeats import KeyedPlacement
from orchestrator.splitter.scan import (
    DEFAULT_BLOCK_SIZE,
    LF,
    Scan,
    Validator,
    delimiter_for,
    empty_file_error,
    parse_header,
    read_blocks,
    scan_block,
    unterminated_error,
)
from orchestrator.splitter.writer import Chunk, ChunkWriter, trimmed_header

log = structlog.get_logger(__name__)

# Events the async wrapper's worker may run ahead of its consumer.
_ASYNC_AHEAD: Final = 2


@dataclass(frozen=True, slots=True)
class SplitDone:
    """The last event: totals for the whole source file."""

    rows: int  # data records of the source, rejected ones included
    chunks: int
    rejected: int
    header: tuple[str, ...]  # header column names
    moved: int = 0  # records moved to the file's tail chunks (a key repeated nearby)


# What a split yields, in source order; `Chunk` (a finished chunk file) is the writer's.
SplitEvent = Chunk | Rejected | SplitDone


# --- the cutter ---------------------------------------------------------------


class _Cutter:
    """Turns validated blocks into chunk files and events.

    Between blocks it holds the record that is not finished yet ("pending"):
    its bytes, unless it already is too large for any chunk, in which case it
    is only measured until it ends and then reported as rejected.
    """

    def __init__(
        self,
        source: Path,
        out_dir: Path,
        *,
        max_bytes: int,
        fmt: str,
        fsync: bool,
        keys: KeyRule | None,
    ):
        self._source = source
        self._fmt = fmt
        self._max_bytes = max_bytes
        self._keys = keys
        self._writer = ChunkWriter(out_dir, fmt, fsync=fsync)
        self._placement: Placement | None = None  # made once the header is known
        self._validator = Validator(source)
        self._columns: tuple[str, ...] | None = None
        self._room = 0  # most data bytes a chunk can take
        self._line = 1  # physical line at the start of the next block
        self._end = 0  # offset of the end of what was fed
        self._rows = 0
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
            raise empty_file_error(self._source)
        if self._pending_size:
            yield from self._finish_pending(b"")
        placing = self._placing()  # made with the header, checked above
        yield from placing.finish()
        assert self._columns is not None
        moved = placing.moved if isinstance(placing, KeyedPlacement) else 0
        yield SplitDone(self._rows, placing.chunks, placing.rejected, self._columns, moved)

    def abort(self) -> None:
        if self._placement is not None:
            self._placement.abort()
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
        self._too_large = False  # measured only: `size` says it is too large
        yield from self._placing().record(pieces, size, line, self._pending_offset)

    def _place_region(
        self, data: bytes, offset: int, span: tuple[int, int], line: int, ends: int
    ) -> Iterator[SplitEvent]:
        """Place data[pos:end], whole records (`ends` of them), into chunks."""
        self._require_room()
        self._rows += ends
        yield from self._placing().region(data, offset, span, line, ends)

    def _placing(self) -> Placement:
        assert self._placement is not None  # made with the header, before any record
        return self._placement

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
        if self._keys is not None and (indexes := key_indexes(self._keys, self._columns)):
            self._placement = KeyedPlacement(
                self._writer, self._max_bytes, RowKeys(self._keys, indexes, self._fmt)
            )
        else:
            if self._keys is not None:
                log.warning(
                    "key_columns_missing",
                    file=str(self._source),
                    key_columns=list(self._keys.columns),
                    note="rows of this file are not checked for repeated keys",
                )
            self._placement = Placement(self._writer, self._max_bytes)

    def _require_room(self) -> None:
        if self._room < 1:
            raise InputError(
                self._source,
                f"the header alone is {len(self._writer.header)} bytes: "
                f"no record fits under max_bytes={self._max_bytes}",
                line=1,
            )


# --- public entry points --------------------------------------------------------


def split_file(
    source: Path,
    out_dir: Path,
    *,
    max_bytes: int,
    fmt: str,
    fsync: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    keys: KeyRule | None = None,
) -> Generator[SplitEvent, None, None]:
    """Cut `source` into `out_dir/chunk-NNNNN.<fmt>`, yielding events as it goes.

    Yields a `Chunk` once its file is complete and in place, a `Rejected` for
    each record too large for any chunk, and `SplitDone` last. With `keys`, each
    chunk's key set is saved beside it and a record whose key is repeated nearby
    goes to a tail chunk at the end (`splitter.repeats`). Raises
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
    cutter = _Cutter(source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync, keys=keys)
    return _split(cutter, source, out_dir, block_size)


def _split(
    cutter: _Cutter, source: Path, out_dir: Path, block_size: int
) -> Generator[SplitEvent, None, None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with source.open("rb") as fh:
            for data, offset in read_blocks(fh, source, block_size):
                yield from cutter.feed(data, offset)
        yield from cutter.finish()
    finally:
        cutter.abort()


async def split_file_async(
    source: Path,
    out_dir: Path,
    *,
    max_bytes: int,
    fmt: str,
    fsync: bool = False,
    keys: KeyRule | None = None,
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

    events = split_file(source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync, keys=keys)

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
