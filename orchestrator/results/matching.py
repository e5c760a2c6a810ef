"""The forward walk: each of Marketo's failed or warned rows matched to the chunk's
record it came from, and that record's file and source line.

A chunk is one Marketo job; it may hold the records of several source files (a
pack), each file's records one run of them (a piece). Marketo's failures and
warnings files repeat each row it failed or warned, plus a reason, in the order of
the import file; but not always every column: Marketo leaves empty values, and
their columns, out (a row that failed for an empty email comes back without the
email column). So each row is first placed under the chunk's columns by name
(`Placing`: names trimmed, as Marketo matches them; a column Marketo left out is
empty), then one forward walk over the chunk's records, side by side with
Marketo's rows, finds the record each row came from: its piece names the file, and
its physical line in the chunk gives the line in that file's source (the piece's
first line, plus the lines since the piece's first record, plus the lines of
records the splitter set aside, or moved to a tail chunk, before it). A tail
chunk's records come from all over the source: the splitter wrote each one's
line beside it (`Piece.lines`), looked up by the record's place. When Marketo's
header is the chunk's, rows are compared as they are.

Memory: one record and one of Marketo's rows at a time, plus at most `KEEP_RECORDS`
records (and `KEEP_CHARS` characters) kept while looking ahead; nothing grows with
the chunk, the file or the share of failed rows.

A row that matches no record is not lost, and never charged to a file that did not
send it: in a chunk of one file it is that file's, with a blank source line; in a
shared chunk it belongs to no file that can be named, so it goes to every file of
the chunk (`Match.piece` None), counted in each. Looking for it read ahead to the
end of the chunk, so the walk steps back to where it was. To keep that from making
the cost rows times records, a chunk's walk may read at most `REREAD_FACTOR` times
its records again; past that a row is looked for only among the next
`KEEP_RECORDS` records (or `KEEP_CHARS` characters), so each such row costs a
bounded amount.

Pure reading: what the walk finds is written elsewhere (`attribution`). Blocking:
run it in a thread.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from orchestrator.results.columns import Placing

KEEP_RECORDS: Final = 1000  # records kept while looking ahead, to step back without rereading
KEEP_CHARS: Final = 1 << 20  # ... and at most this many characters of them
REREAD_FACTOR: Final = 3  # records a chunk's walk may read again, times the chunk's records


@dataclass(frozen=True, slots=True)
class Piece:
    """One file's records in a chunk, and where its part files go."""

    file_id: int
    first_row: int  # its first record among the chunk's records, from 0
    first_line: int  # source line (in its own file) of that record
    out_dir: Path  # the file's own chunk directory
    # (line, lines spanned) of records set aside, or moved out of the chunk, by line
    gaps: tuple[tuple[int, int], ...] = ()
    lines: Sequence[int] | None = None  # a tail chunk's: the source line of each record


@dataclass(slots=True)
class Tally:
    """What one walk found: rows per file, and the rows no record matched."""

    rows: dict[int, int] = field(default_factory=dict)  # a shared chunk's unmatched in each
    unmatched: int = 0
    total: int = 0  # Marketo's rows
    reads: int = 0  # records read (or read again) to match them
    unknown: tuple[str, ...] = ()  # Marketo's columns the chunk has not (not compared)


@dataclass(frozen=True, slots=True)
class Match:
    """One of Marketo's rows and where it came from."""

    # The piece of the record it matched (or of the chunk's one file); None: no record
    # matched in a shared chunk, the row goes to every piece.
    piece: Piece | None
    header: list[str]  # the chunk's columns, then Marketo's reason column
    row: list[str]  # the row under those columns, its reason, then the source line ("" if none)


def walk(
    chunk_path: Path,
    delimiter: str,
    pieces: list[Piece],
    source: Path,
    tally: Tally,
    rows: int | None = None,
) -> Generator[Match, None, None]:
    """Marketo's rows in `source`, matched in order against the chunk's records (`pieces`
    in record order); `tally` counts them as they go. `rows`, the chunk's records, lets
    the common case run in C (see `Records._find`)."""
    starts = [p.first_row for p in pieces]
    lines = Lines(pieces)
    shared = len(pieces) > 1
    with (
        Records(chunk_path, delimiter, starts, rows) as records,
        open(source, encoding="utf-8-sig", newline="") as fh,
    ):
        marketo = csv.reader(fh, delimiter=delimiter)
        header = next((row for row in marketo if row), None)
        if header is None:
            return
        placing = Placing.of(header, records.header)
        tally.unknown = placing.unknown
        for row in marketo:
            if not row:
                continue  # a blank line in Marketo's file is no row
            wanted = placing.place(row)
            tally.total += 1
            found = records.search(wanted)
            piece: Piece | None
            if found is None:
                piece = None if shared else pieces[0]
                line = ""
                tally.unmatched += 1
            else:
                index, chunk_line = found
                number = piece_at(starts, index)
                piece = pieces[number]
                mapped = piece.lines
                if mapped is not None and index - starts[number] < len(mapped):
                    line = str(mapped[index - starts[number]])
                else:
                    line = str(lines.source_line(number, chunk_line, records.base_lines))
            if piece is not None:
                tally.rows[piece.file_id] = tally.rows.get(piece.file_id, 0) + 1
            yield Match(piece, placing.header, [*wanted, *row[-1:], line])
        if shared and tally.unmatched:  # each file of the chunk lists and counts them
            for each in pieces:
                tally.rows[each.file_id] = tally.rows.get(each.file_id, 0) + tally.unmatched
        tally.reads = records.read


def piece_at(starts: list[int], index: int) -> int:
    """The position in `starts` (first rows, ascending) of the piece holding record `index`."""
    return max(0, bisect.bisect_right(starts, index) - 1)


class Lines:
    """Source lines of a chunk's records, per piece: lines since the piece's first record
    plus the records the splitter set aside before (asked in ascending order per piece)."""

    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self.pending = [deque(g for g in p.gaps if g[0] >= p.first_line) for p in pieces]
        self.shift = [0] * len(pieces)

    def source_line(self, number: int, chunk_line: int, base_lines: dict[int, int]) -> int:
        piece = self.pieces[number]
        line = piece.first_line + chunk_line - base_lines[number] + self.shift[number]
        pending = self.pending[number]
        while pending and pending[0][0] <= line:
            span = pending.popleft()[1]
            self.shift[number] += span
            line += span
        return line


class Records:
    """A chunk's data records in order, as (index, physical line in the chunk, fields),
    that can step back to an earlier record: from the records it kept, else by reading
    the file again from the top. Notes the line of each piece's first record.

    The common case, every row found ahead, runs in `_find`: a loop over the csv
    reader doing little more than comparing lists."""

    def __init__(
        self, path: Path, delimiter: str, starts: list[int], total: int | None = None
    ) -> None:
        self.path = path
        self.total = total  # records in the chunk, if known
        self.delimiter = delimiter
        self.starts = {row: n for n, row in enumerate(starts)}
        self.ordered_starts = sorted(self.starts)
        self.base_lines: dict[int, int] = {}  # piece number -> chunk line of its first record
        self.header: list[str] = []  # the chunk's header record ([] when it is gone)
        self.index = 0  # the next record's index
        self.read = 0  # records read or replayed, the first reading included
        self.first_pass = 0  # records in the chunk, as far as the first reading went
        self._replay: deque[tuple[int, int, list[str]]] = deque()
        self._fh: IO[str] | None = None
        self._open()

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()

    def _open(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.path.exists():
            # Kept open across calls and reopened to step back; closed by __exit__.
            self._fh = open(self.path, encoding="utf-8", newline="")  # noqa: SIM115
        else:  # gone (it never should be before its rows are matched): no record matches
            self._fh = io.StringIO("")
        self._reader = csv.reader(self._fh, delimiter=self.delimiter)
        self.header = next(self._reader, [])
        self._next_index = 0  # the index of the record the reader gives next

    def _advanced(self, count: int) -> None:
        self._next_index += count
        self.read += count
        self.first_pass = max(self.first_pass, self._next_index)

    def _note_start(self) -> None:
        """The reader is before a record: note its line if it is a piece's first."""
        number = self.starts.get(self._next_index)
        if number is not None:
            self.base_lines.setdefault(number, self._reader.line_num + 1)

    def _from_file(self) -> tuple[int, int, list[str]] | None:
        self._note_start()
        line = self._reader.line_num + 1
        fields = next(self._reader, None)
        if fields is None:
            return None
        record = (self._next_index, line, fields)
        self._advanced(1)
        return record

    def next(self) -> tuple[int, int, list[str]] | None:
        if self._replay:
            record: tuple[int, int, list[str]] | None = self._replay.popleft()
            self.read += 1
        else:
            record = self._from_file()
        if record is not None:
            self.index = record[0] + 1
        return record

    def search(self, wanted: list[str]) -> tuple[int, int] | None:
        """The next record equal to `wanted` (index, chunk line), the walk then past it; or
        None, the walk back where it was."""
        start = self.index
        # To the end of the chunk while the allowance for reading again lasts, else only
        # as far as the records it can keep.
        whole = self.read <= REREAD_FACTOR * max(self.first_pass, 1)
        if whole and not self._replay:
            found = self._find(wanted)
            if found is not None:
                self.index = found[0] + 1
                return found
            self._reopen_at(start)
            return None
        kept: list[tuple[int, int, list[str]]] | None = []
        chars = 0
        while (record := self.next()) is not None:
            if same(record[2], wanted):
                return record[0], record[1]
            if kept is not None:
                kept.append(record)
                chars += sum(map(len, record[2]))
                if len(kept) >= KEEP_RECORDS or chars >= KEEP_CHARS:
                    if not whole:
                        break
                    kept = None
        if kept is not None:
            self._replay.extendleft(reversed(kept))
            self.index = start
        else:
            self._reopen_at(start)
        return None

    def _find(self, wanted: list[str]) -> tuple[int, int] | None:
        """Read on from the file to the first record equal to `wanted`: (index, line).

        Between two pieces' first records (whose lines are noted on the way) the records
        are compared in C: compress(count(), map(wanted.__eq__, records)) gives the index
        of the first equal one, and its line is the reader's last line less the line
        breaks inside its fields. A row ending in an empty field may match a shorter
        record, and without the chunk's record count the end cannot be placed: both go
        record by record in `_find_slowly`."""
        if (wanted and wanted[-1] == "") or self.total is None:
            return self._find_slowly(wanted)
        reader = self._reader
        for count in self._runs():
            start = self._next_index
            equal = map(wanted.__eq__, itertools.islice(reader, count))
            index = next(itertools.compress(itertools.count(start), equal), None)
            if index is not None:
                self._advanced(index - start + 1)
                return index, reader.line_num - line_breaks(wanted)
            if count is None:
                self._advanced(max(0, self.total - start))
                return None  # the end of the chunk
            self._advanced(count)
        raise AssertionError("unreachable: _runs never ends")

    def _runs(self) -> Iterator[int | None]:
        """The records from here on, as runs up to the next piece's first record: before
        each run, that record's line is noted and the run's length given (None: the last
        run, to the end of the chunk). The caller reads the run before asking again."""
        at = bisect.bisect_left(self.ordered_starts, self._next_index)
        while True:
            self._note_start()
            if at < len(self.ordered_starts) and self.ordered_starts[at] <= self._next_index:
                at += 1
            upto = self.ordered_starts[at] if at < len(self.ordered_starts) else None
            yield None if upto is None else upto - self._next_index

    def _find_slowly(self, wanted: list[str]) -> tuple[int, int] | None:
        """`_find`, one record at a time."""
        reader = self._reader
        for count in self._runs():
            line = reader.line_num
            seen = 0
            for fields in itertools.islice(reader, count):
                if same(fields, wanted):
                    index = self._next_index + seen
                    self._advanced(seen + 1)
                    return index, line + 1
                seen += 1
                line = reader.line_num
            self._advanced(seen)
            if count is None or seen < count:
                return None  # the end of the chunk
        raise AssertionError("unreachable: _runs never ends")

    def _reopen_at(self, index: int) -> None:
        """Step back to record `index` by reading the file again from the top."""
        self._replay.clear()
        self._open()
        deque(itertools.islice(self._reader, index), maxlen=0)
        self._advanced(index)
        self.index = index


def line_breaks(fields: list[str]) -> int:
    """Line breaks inside a record's fields, as the csv reader counts lines (LF, CRLF
    and a lone CR each end one)."""
    text = "\0".join(fields)  # NUL (refused by the splitter) keeps a CR | LF from pairing
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def same(fields: list[str], wanted: list[str]) -> bool:
    """A record is the row Marketo sent back; a short record counts as padded with empty
    fields (Marketo pads a short row so its reason lands in its column)."""
    if fields == wanted:
        return True
    n = len(fields)
    return n < len(wanted) and fields == wanted[:n] and not any(wanted[n:])
