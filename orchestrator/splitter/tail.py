"""The tail of a file: rows moved out of its chunks, cut into chunks of their own at the
end of the split.

A row whose key was seen nearby goes to level 1 of the tail, the row after it of the
same key to level 2, and so on (`splitter.repeats` decides), so each level holds a key
at most once, in source order. Until the source is read to its end the moved rows wait
on disk, beside the chunks (`.tail-NNNNN.rows`, their bytes, and `.tail-NNNNN.index`,
each row's source line, key and size): memory does not grow with them. Then each level,
in order, is cut into chunks like any other (header, whole records, under the same
byte limit), a new chunk for each level, numbered on from the file's last chunk; each
tail chunk carries its key set and its line map (`splitter.writer`).

A split again after a crash writes the same spill files anew: the first write of a
level in a split truncates them.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

from orchestrator.splitter.keyed import KeyCollector
from orchestrator.splitter.writer import Chunk, ChunkWriter

OPEN_LEVELS: Final = 8  # spill files kept open at once (a key repeated often makes many)
_INDEX_BATCH: Final = 3 * 4096  # numbers read from an index file at a time


class Tail:
    """Moved rows by level, spilled to disk until the end of the split."""

    def __init__(self, out_dir: Path) -> None:
        self._dir = out_dir
        self._levels: set[int] = set()
        self._open: OrderedDict[int, tuple[BinaryIO, BinaryIO]] = OrderedDict()
        self.rows = 0

    def _paths(self, level: int) -> tuple[Path, Path]:
        return (
            self._dir / f".tail-{level:05d}.rows",
            self._dir / f".tail-{level:05d}.index",
        )

    def _files(self, level: int) -> tuple[BinaryIO, BinaryIO]:
        if level in self._open:
            self._open.move_to_end(level)
            return self._open[level]
        if len(self._open) >= OPEN_LEVELS:
            _, (rows, index) = self._open.popitem(last=False)
            rows.close()
            index.close()
        append = level in self._levels  # a new split starts them empty
        files = (_open(self._paths(level)[0], append), _open(self._paths(level)[1], append))
        self._levels.add(level)
        self._open[level] = files
        return files

    def add(self, level: int, record: bytes | memoryview, line: int, key: int) -> None:
        """One moved row (its bytes, line ending included), at the end of its level."""
        rows, index = self._files(level)
        rows.write(record)
        array("Q", (line, key, len(record))).tofile(index)
        self.rows += 1

    def _close_files(self) -> None:
        for rows, index in self._open.values():
            rows.close()
            index.close()
        self._open.clear()

    def chunks(self, writer: ChunkWriter, room: int) -> Iterator[Chunk]:
        """Each level, in order, cut into chunks of at most `room` data bytes."""
        self._close_files()
        for level in sorted(self._levels):
            yield from self._cut(level, writer, room)
        self.discard()

    def _cut(self, level: int, writer: ChunkWriter, room: int) -> Iterator[Chunk]:
        keys = KeyCollector()
        lines = array("Q")
        rows_path, index_path = self._paths(level)
        with open(rows_path, "rb") as rows, open(index_path, "rb") as index:
            for line, key, size in _entries(index):
                if writer.fill + size > room:
                    yield writer.close(keys, lines=lines)
                    lines = array("Q")
                record = rows.read(size)
                writer.write(record, line, 1)
                lines.append(line)
                keys.add(key)
        if writer.open:
            yield writer.close(keys, lines=lines)

    def discard(self) -> None:
        """Remove the spill files (the end of a split, or one abandoned)."""
        self._close_files()
        for level in self._levels:
            for path in self._paths(level):
                path.unlink(missing_ok=True)
        self._levels.clear()


def _open(path: Path, append: bool) -> BinaryIO:
    # Kept open across rows: closed by `Tail._close_files`.
    return open(path, "ab") if append else open(path, "wb")


def _entries(index: BinaryIO) -> Iterator[tuple[int, int, int]]:
    """(line, key, size) of each row in an index file, in the order they were added."""
    while True:
        numbers = array("Q")
        data = index.read(_INDEX_BATCH * numbers.itemsize)
        if not data:
            return
        numbers.frombytes(data)
        for at in range(0, len(numbers), 3):
            yield numbers[at], numbers[at + 1], numbers[at + 2]
