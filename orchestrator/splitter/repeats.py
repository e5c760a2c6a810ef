"""Placing records of a route with key columns: no chunk holds a key twice, and a key's
rows stay in source order, the repeats nearby moved to the tail of the file.

Marketo documents no order inside a job, and two of our jobs whose rows share a key
must not import at once (the submission rule holds the later one back). So a record
goes to a tail chunk (`splitter.tail`) instead of the chunk being cut when its key

- is in the chunk being cut (two rows of one key in one job), or in one of the recent
  chunks before it (`splitter.recent`: at least 12, which covers the 10 jobs Marketo
  lets us queue plus a margin; a repeat that far back would make its chunk wait for
  the earlier one, and the earlier one is most likely imported by then), or
- was moved already: the row after a moved row must come after it, however far.

Level j of the tail holds the (j+1)-th rows of keys so moved, in source order. A
record without a key (all key values empty) is never moved. A repeat further back
than the recent chunks stays where it is: its chunk comes after the earlier one, and
the submission rule makes it wait for it. The recent chunks are remembered by a
filter that may take a new key for a recent one (about once in 300: that row moves
needlessly, still after every earlier row of its key) but never misses one.

A moved record leaves a gap in its chunk's stretch of the source, recorded beside the
chunk (`<chunk>.gaps`) so failed rows of the chunk still get their source lines, as
for records set aside; a tail chunk has the line of each record (`<chunk>.lines`).

Work per record: its key fields split out and hashed, a region (a block's whole
records) at a time in C; one look at the filter for all of a region's keys; the
records that stay copied in runs, as without keys.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from itertools import repeat
from typing import Final

from orchestrator.keys import keys_path
from orchestrator.splitter.keyed import BUCKET_SHIFT, KeyCollector, RowKeys
from orchestrator.splitter.placing import Placed, Placement
from orchestrator.splitter.recent import MovedKeys, RecentKeys
from orchestrator.splitter.scan import LF, QUOTE, first_end, last_end
from orchestrator.splitter.tail import Tail
from orchestrator.splitter.writer import Chunk, ChunkWriter

SLICE: Final = 1 << 16  # bytes of records read into Python objects at a time


class KeyedPlacement(Placement):
    """`Placement` that keeps each key once per chunk and in source order (see above)."""

    def __init__(self, writer: ChunkWriter, max_bytes: int, keys: RowKeys) -> None:
        super().__init__(writer, max_bytes)
        self.keys = keys
        self.moved_keys = MovedKeys()
        self.recent: RecentKeys | None = None  # sized at the first records
        self.tail = Tail(writer.out_dir)
        self._collector = KeyCollector()  # keys of the chunk being cut
        self._gaps = array("Q")  # (line, lines) of records moved out of the chunk being cut

    @property
    def moved(self) -> int:
        return self.tail.rows

    def _recent(self, data_bytes: int, records: int) -> RecentKeys:
        if self.recent is None:  # about as many keys a chunk as records of this size fit
            per_chunk = self.room * max(1, records) // max(1, data_bytes)
            self.recent = RecentKeys(per_chunk)
        return self.recent

    # -- the two ways records arrive -----------------------------------------------------

    def region(
        self, data: bytes, offset: int, span: tuple[int, int], line: int, ends: int
    ) -> Iterator[Placed]:
        """A slice of at most `SLICE` bytes of whole records at a time, so the records
        and their keys, as Python objects, take a few hundred KB at most. A slice is
        never larger than a chunk, so a key repeated inside one is repeated nearby."""
        pos, end = span
        most = min(SLICE, self.room)
        while pos < end:
            cut = last_end(data, pos, min(end, pos + most))
            if cut <= pos:  # one record longer than a slice
                cut = first_end(data, pos, 0)
            text = data[pos:cut]
            records = text.split(LF)
            records.pop()  # the slice ends with LF: nothing after it
            lfs = None if QUOTE not in text else _join_quoted(records)
            recent = self._recent(cut - pos, len(records))
            hashes = self.keys.hashes(records, ascii=text.isascii())
            moving = {i for i in recent.maybe(hashes) if self._seen(hashes[i])}
            moving |= _repeated(hashes)
            yield from self._walk(data, offset, pos, line, records, lfs, hashes, moving)
            recent.add_all([key for key in hashes if key is not None])
            line += text.count(LF)
            pos = cut

    def record(
        self, pieces: list[bytes | memoryview], size: int, line: int, offset: int
    ) -> Iterator[Placed]:
        if size > self.room:
            yield self.reject(line, offset, size)
            return
        record = b"".join(pieces)
        recent = self._recent(size, 1)
        (key,) = self.keys.hashes([record], ascii=record.isascii())
        if key is not None and key in recent and self._seen(key):
            self._move(record, line, key, record.count(LF))
        else:
            if self.writer.fill + size > self.room:
                yield self.close()
            self.writer.write_record([record], line)
            if key is not None:
                self._collector.add(key)
        if key is not None:
            recent.add_all([key])

    # -- placing a region's records ------------------------------------------------------

    def _walk(
        self,
        data: bytes,
        offset: int,
        pos: int,
        line: int,
        records: list[bytes],
        lfs: list[int] | None,
        hashes: list[int | None],
        moving: set[int],
    ) -> Iterator[Placed]:
        """Each record stays (copied with its neighbours in one write) or moves."""
        view, writer, room = memoryview(data), self.writer, self.room
        buckets = self._collector.buckets
        start, start_line, rows = pos, line, 0  # the run of records staying, not yet written
        for i, record in enumerate(records):
            size = len(record) + 1
            lines = 1 if lfs is None else lfs[i]
            key = hashes[i]
            if size > room:
                if rows:
                    writer.write(view[start:pos], start_line, rows)
                yield self.reject(line, offset + pos, size)
                start, start_line, rows = pos + size, line + lines, 0
            elif i in moving and key is not None:
                if rows:
                    writer.write(view[start:pos], start_line, rows)
                self._move(view[pos : pos + size], line, key, lines)
                start, start_line, rows = pos + size, line + lines, 0
            else:
                if writer.fill + (pos - start) + size > room:
                    if rows:
                        writer.write(view[start:pos], start_line, rows)
                    yield self.close()
                    start, start_line, rows = pos, line, 0
                rows += 1
                if key is not None:
                    buckets[key >> BUCKET_SHIFT].append(key)
            pos += size
            line += lines
        if rows:
            writer.write(view[start:pos], start_line, rows)

    def _seen(self, key: int | None) -> bool:
        """Whether a key the filter let through was moved, or is in a recent chunk."""
        if key is None:
            return False
        assert self.recent is not None
        bucket = self._collector.buckets[key >> BUCKET_SHIFT]
        return self.moved_keys.level(key) > 0 or self.recent.holds(key, bucket)

    def _move(self, record: bytes | memoryview, line: int, key: int, lines: int) -> None:
        level = self.moved_keys.level(key) + 1
        self.moved_keys.set(key, level)
        self.tail.add(level, record, line, key)
        if self.writer.open:  # a gap in the chunk being cut; before its first record none
            self._gaps.extend((line, max(1, lines)))

    # -- chunks --------------------------------------------------------------------------

    def close(self) -> Chunk:
        chunk = self.writer.close(self._collector, gaps=self._gaps)
        self._gaps = array("Q")
        if self.recent is not None:
            self.recent.chunk_closed(keys_path(chunk.path), chunk.keys or 0, self.moved_keys)
        return chunk

    def finish(self) -> Iterator[Chunk]:
        """The chunk being cut, then the tail, level by level."""
        if self.writer.open:
            yield self.close()
        if self.recent is not None:
            self.recent.close()
        yield from self.tail.chunks(self.writer, self.room)

    def abort(self) -> None:
        if self.recent is not None:
            self.recent.close()
        self.tail.discard()
        super().abort()


def _join_quoted(records: list[bytes]) -> list[int] | None:
    """Join, in place, the physical lines of `records` that a quoted field ran across
    (a line with an odd count of quotes opens a field, the next such line closes it);
    the LFs each record spans, or None when every record is one line."""
    odd = [i for i, n in enumerate(map(bytes.count, records, repeat(QUOTE))) if n & 1]
    if not odd:
        return None
    assert len(odd) % 2 == 0, "a slice holds whole records only"
    joined: list[bytes] = []
    lfs: list[int] = []
    start = 0
    for opens, closes in zip(odd[::2], odd[1::2], strict=True):
        joined += records[start:opens]
        lfs += repeat(1, opens - start)
        joined.append(LF.join(records[opens : closes + 1]))
        lfs.append(closes + 1 - opens)
        start = closes + 1
    joined += records[start:]
    lfs += repeat(1, len(records) - start)
    records[:] = joined
    return lfs


def _repeated(hashes: list[int | None]) -> set[int]:
    """The places of keys that repeat an earlier one in the same list."""
    keys = [h for h in hashes if h is not None]
    if len(set(keys)) == len(keys):
        return set()
    seen: set[int] = set()
    again: set[int] = set()
    for i, key in enumerate(hashes):
        if key is not None:
            if key in seen:
                again.add(i)
            seen.add(key)
    return again
