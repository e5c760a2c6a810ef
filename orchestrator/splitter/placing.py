"""Where whole records go: into the chunk being filled, or set aside as too large.

The cutter (`splitter.cutter`) finds whole records and hands them over in two shapes:
a region of whole records inside one block (`region`, copied at C speed in as few
writes as the chunk limit allows) and one record that ran on from an earlier block,
or is the file's last (`record`). `Placement` fills chunks greedily in source order;
a route with key columns places through `splitter.repeats.KeyedPlacement`, which also
moves repeated keys to later chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.splitter.scan import LF, ends_between, first_end, last_end
from orchestrator.splitter.writer import Chunk, ChunkWriter


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record set aside because header plus record would reach max_bytes."""

    line: int  # source line where the record starts
    offset: int  # byte offset of the record in the source
    size: int  # bytes of the record, its line ending included
    reason: str


Placed = Chunk | Rejected


class Placement:
    """Fills chunks with whole records, in source order, each as full as they allow."""

    def __init__(self, writer: ChunkWriter, max_bytes: int) -> None:
        self.writer = writer
        self.max_bytes = max_bytes
        self.room = max_bytes - 1 - len(writer.header)  # most data bytes a chunk can take
        self.rejected = 0

    @property
    def chunks(self) -> int:
        return self.writer.chunks

    def region(
        self, data: bytes, offset: int, span: tuple[int, int], line: int, ends: int
    ) -> Iterator[Placed]:
        """Place data[pos:end], whole records (`ends` of them), into chunks.

        `offset` is the source offset of data[0]; `line` the source line at pos.
        """
        pos, end = span
        view = memoryview(data)
        writer = self.writer
        while pos < end:
            space = self.room - writer.fill
            if end - pos <= space:
                writer.write(view[pos:end], line, ends)
                return
            cut = last_end(data, pos, pos + space)
            if cut > pos:
                rows = ends_between(data, pos, cut, end, ends)
                writer.write(view[pos:cut], line, rows)
            else:  # the next record does not fit in what is left of this chunk
                cut = first_end(data, pos, 0)
                if cut - pos <= self.room:
                    yield self.close()
                    continue
                yield self.reject(line, offset + pos, cut - pos)
                rows = 1
            ends -= rows
            line += data.count(LF, pos, cut)
            pos = cut

    def record(
        self, pieces: list[bytes | memoryview], size: int, line: int, offset: int
    ) -> Iterator[Placed]:
        """Place one record that arrived in pieces (`size` bytes in all)."""
        if size > self.room:
            yield self.reject(line, offset, size)
            return
        if self.writer.fill + size > self.room:
            yield self.close()
        self.writer.write_record(pieces, line)

    def close(self) -> Chunk:
        """The chunk being filled, finished."""
        return self.writer.close()

    def finish(self) -> Iterator[Chunk]:
        """The end of the file: the chunk being filled, if any."""
        if self.writer.open:
            yield self.close()

    def abort(self) -> None:
        self.writer.abort()

    def reject(self, line: int, offset: int, size: int) -> Rejected:
        self.rejected += 1
        header = len(self.writer.header)
        reason = (
            f"record of {size} bytes is too large: with the {header}-byte header a chunk "
            f"would be {header + size} bytes, and chunks must stay under {self.max_bytes}"
        )
        return Rejected(line, offset, size, reason)
