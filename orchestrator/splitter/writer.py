"""Chunk files: the header line they all start with, and how each is written whole.

A chunk is written to `chunk-NNNNN.<fmt>.tmp`, optionally fsynced, then renamed
into place and only then announced (a `Chunk`), so a chunk that was announced is
whole and a failed or abandoned split leaves no partial file.

A chunk of a route with key columns has files beside it, each written whole (and
fsynced with the chunk) before the chunk is renamed into place, so they exist
whenever the chunk does:
- `<chunk>.keys`: its key set (`orchestrator.keys`), which the submission rule reads;
- `<chunk>.gaps`: (source line, lines) of each record moved out of the chunk's stretch
  of the source to a tail chunk, like records set aside (only when some were);
- `<chunk>.lines`: the source line of each of its records, for a tail chunk, whose
  records come from all over the source.

The writer knows nothing of records or quotes: the cutter (`splitter.cutter`)
decides which bytes go into which chunk, in whole records, and the writer only
appends them. An OSError while writing names the chunk file: write(2) and close(2)
failing with ENOSPC or EFBIG raise one with no filename, which would leave the user
a full disk without saying where.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.durable import fsync_dir
from orchestrator.keys import keys_path
from orchestrator.splitter.scan import delimiter_for, line_ending

if TYPE_CHECKING:
    from orchestrator.splitter.keyed import KeyCollector

GAPS_SUFFIX = ".gaps"
LINES_SUFFIX = ".lines"


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
    keys: int | None = None  # keys in its key set (`<chunk>.keys`); None: no key columns


class ChunkWriter:
    """Writes one chunk at a time to a temp name; renames it into place when done."""

    def __init__(self, out_dir: Path, fmt: str, *, fsync: bool) -> None:
        self.header = b""  # the line every chunk starts with; set before the first write
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

    @property
    def out_dir(self) -> Path:
        return self._out_dir

    @property
    def open(self) -> bool:
        return self._file is not None

    def write(self, data: bytes | memoryview, line: int, rows: int) -> None:
        """Append `rows` whole records; `line` is the first one's source line."""
        if self._file is None:
            self._open(line)
        assert self._file is not None  # opened above; tells mypy
        with naming(self._tmp):
            self._file.write(data)
        self.fill += len(data)
        self._rows += rows

    def write_record(self, pieces: list[bytes | memoryview], line: int) -> None:
        """Append one record that arrived in pieces."""
        for piece in pieces:
            self.write(piece, line, 0)
        self._rows += 1

    def close(
        self,
        keys: KeyCollector | None = None,
        *,
        gaps: array[int] | None = None,
        lines: array[int] | None = None,
    ) -> Chunk:
        """Finish the open chunk: flush, fsync if asked, rename into place; its key set,
        gaps and line map (see the module docstring) written beside it first."""
        assert self._file is not None  # only called with a chunk open
        assert self._tmp is not None
        with naming(self._tmp):
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        self._file = None
        path = self._tmp.with_suffix("")
        count = None
        if keys is not None:
            count = write_numbers(keys_path(path), keys.sorted_buckets(), fsync=self._fsync)
        if gaps:
            write_numbers(gaps_path(path), [gaps], fsync=self._fsync)
        if lines is not None:
            write_numbers(lines_path(path), [lines], fsync=self._fsync)
        os.replace(self._tmp, path)
        self._tmp = None
        if self._fsync:
            fsync_dir(self._out_dir)
        size = len(self.header) + self.fill
        chunk = Chunk(
            self._index,
            path,
            self._rows,
            size,
            self._first_line,
            len(self.header),
            count,
        )
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

    def _open(self, line: int) -> None:
        self._index += 1
        self._rows = 0
        self._first_line = line
        self._tmp = self._out_dir / f"chunk-{self._index:05d}.{self._fmt}.tmp"
        self._file = self._tmp.open("wb")
        with naming(self._tmp):
            self._file.write(self.header)


def make_durable(chunk: Chunk) -> None:
    """fsync a chunk cut without fsync, the files beside it and its directory: a small
    file's chunk recorded on its own after all (keys moved some of its rows to a tail
    chunk, so it is not packed)."""
    for path in (chunk.path, keys_path(chunk.path), gaps_path(chunk.path), lines_path(chunk.path)):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # a side file it does not have
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(chunk.path.parent)


def gaps_path(chunk_path: Path) -> Path:
    """Where a chunk's gaps live: (line, lines) pairs of the records moved out of it."""
    return chunk_path.with_name(chunk_path.name + GAPS_SUFFIX)


def lines_path(chunk_path: Path) -> Path:
    """Where a tail chunk's line map lives: the source line of each of its records."""
    return chunk_path.with_name(chunk_path.name + LINES_SUFFIX)


def write_numbers(path: Path, parts: Iterable[array[int]], *, fsync: bool) -> int:
    """Arrays of unsigned 64-bit numbers, one after the other, to `path`, little-endian,
    whole (temp name, rename; the caller fsyncs the directory), as `KeySet.save` writes
    a key set; how many numbers."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with naming(tmp), open(tmp, "wb") as fh:
        for part in parts:
            if sys.byteorder != "little":
                part = array("Q", part)
                part.byteswap()
            part.tofile(fh)
            count += len(part)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return count


def read_numbers(path: Path) -> array[int]:
    """What `write_numbers` wrote; empty when there is no such file."""
    numbers = array("Q")
    try:
        with open(path, "rb") as fh:
            numbers.frombytes(fh.read())
    except FileNotFoundError:
        return numbers
    if sys.byteorder != "little":
        numbers.byteswap()
    return numbers


@contextlib.contextmanager
def naming(path: Path | None) -> Iterator[None]:
    """Re-raise an OSError that names no file as the same error naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or path is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def trimmed_header(raw: bytes, columns: tuple[str, ...], fmt: str) -> bytes:
    """The header line written again with every column name trimmed; line ending kept."""
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter_for(fmt), lineterminator="").writerow(
        [name.strip() for name in columns]
    )
    return out.getvalue().encode("utf-8") + line_ending(raw)
