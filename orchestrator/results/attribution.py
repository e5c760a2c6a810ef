"""Attribution: a final chunk's failed and warned rows given back to the files in it.

Each file's rows, with the lines they have in its source (found by the forward
walk, `matching`), go to a part file in the file's own chunk directory, in the
chunk's column layout (the source's), written whole or not at all; rows of a
shared chunk that match no record go to every file's part (`Parts.spread`). Then
the store records each file's share of the chunk's counters, the rows no record
matched, and the chunk as attributed. A chunk is attributed once, when it goes
final, while its files (the chunk, Marketo's, a pack's) are all there; finishing
a file attributes only a final chunk that is not attributed yet (its attribution
failed, a full disk say: the store's `attributed` flag tells).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import time
from array import array
from collections.abc import Generator, Iterable
from contextlib import closing
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import structlog

if TYPE_CHECKING:
    from _csv import Writer

from orchestrator import constants, delimited, splitter
from orchestrator.config import Settings
from orchestrator.delimited import format_of, write_row
from orchestrator.durable import fsync_dir
from orchestrator.layout import part_name
from orchestrator.models import FINAL_CHUNK_STATUSES, ChunkStatus, RejectRecord
from orchestrator.results.matching import Match, Piece, Tally, walk
from orchestrator.results.merge import COPY_BLOCK, copy_rest
from orchestrator.store import Store

log = structlog.get_logger(__name__)

KINDS: Final = ("failures", "warnings")


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
    pieces: list[Piece] = []
    for member in members:
        file = await store.get_file(member.file_id)
        rejects = await store.rejects(member.file_id)
        gaps = await asyncio.to_thread(reject_gaps, Path(file.work_path), rejects)
        lines = None
        if len(members) == 1:  # rows moved to tail chunks: never from a shared chunk
            moved, lines = await asyncio.to_thread(moved_rows, Path(job.path))
            gaps = sorted(gaps + moved)
        pieces.append(
            Piece(
                file_id=member.file_id,
                first_row=member.first_row,
                first_line=member.first_line,
                out_dir=settings.layout.chunk_dir(member.file_id),
                gaps=tuple(gaps),
                lines=lines,
            )
        )
    marketo = {
        "failures": Path(job.failures_path) if job.failures_path else None,
        "warnings": Path(job.warnings_path) if job.warnings_path else None,
    }
    started = time.monotonic()
    tallies = await asyncio.to_thread(
        attribute, chunk_id, Path(job.path), fmt, pieces, marketo, job.job_rows
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
        # A shared chunk's rows that matched no record count in every file's share, so
        # no file is told fewer rows failed than may be its own.
        its_failed = failed.get(member.file_id, 0)
        processed = member.rows - its_failed if member.status is ChunkStatus.COMPLETE else 0
        shares[member.file_id] = (max(0, processed), its_failed, warned.get(member.file_id, 0))
    unmatched = tallies["failures"].unmatched + tallies["warnings"].unmatched
    await store.set_shares(chunk_id, shares, unmatched=unmatched)
    unknown = sorted({*tallies["failures"].unknown, *tallies["warnings"].unknown})
    (log.warning if unmatched or unknown else log.info)(
        "chunk_attributed",
        chunk=job.index,
        batch_id=job.batch_id,
        files=len(members),
        rows_failed=tallies["failures"].total,
        rows_with_warning=tallies["warnings"].total,
        unmatched=unmatched,
        **({"unknown_columns": unknown} if unknown else {}),
        seconds=round(time.monotonic() - started, 3),
    )
    return True


def attribute(
    chunk_id: int,
    chunk_path: Path,
    fmt: str,
    pieces: list[Piece],
    marketo: dict[str, Path | None],
    rows: int | None = None,
) -> dict[str, Tally]:
    """Write each piece's part files for every kind Marketo sent a file of; per kind, the
    rows each file got (a shared chunk's unmatched rows in every file's). A part file of
    a piece that got no rows is removed. `rows`, the chunk's records, lets the common
    case run in C (see `matching.Records._find`).

    Blocking: run it in a thread."""
    delimiter = delimited.DELIMITERS[fmt]
    ordered = sorted(pieces, key=lambda p: p.first_row)
    tallies: dict[str, Tally] = {}
    for kind in KINDS:
        source = marketo.get(kind)
        found = Tally()
        if source is not None and source.exists():
            matches = walk(chunk_path, delimiter, ordered, source, found, rows)
            write_parts(chunk_id, kind, delimiter, matches, ordered)
        for piece in ordered:
            if piece.file_id not in found.rows:
                (piece.out_dir / part_name(chunk_id, kind)).unlink(missing_ok=True)
        tallies[kind] = found
    return tallies


def write_parts(
    chunk_id: int,
    kind: str,
    delimiter: str,
    matches: Generator[Match, None, None],
    pieces: list[Piece],
) -> None:
    """Every match into its piece's part file, and the rows no record matched into every
    piece's; a walk that fails leaves no temp file."""
    # Rows of no piece wait in the owner's directory (the chunk's) until every piece's done.
    parts = Parts(chunk_id, kind, delimiter, pieces[0].out_dir if len(pieces) > 1 else None)
    try:
        with closing(matches):
            for match in matches:
                parts.write(match.piece, match.header, match.row)
        parts.close()
        parts.spread(pieces)
    finally:
        parts.abort()


def moved_rows(chunk: Path) -> tuple[list[tuple[int, int]], array[int] | None]:
    """What the splitter wrote beside a chunk of a route with key columns: (line, lines
    spanned) of the records moved out of its stretch of the source, and for a tail chunk
    the source line of each of its records (None for any other chunk)."""
    numbers = splitter.read_numbers(splitter.gaps_path(chunk))
    gaps = list(zip(numbers[::2], numbers[1::2], strict=True))
    lines_file = splitter.lines_path(chunk)
    return gaps, splitter.read_numbers(lines_file) if lines_file.exists() else None


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


class Parts:
    """One piece's part file open at a time (Marketo's rows come in piece order): written
    to a temp file, then fsynced and renamed into place whole when the next piece starts
    or the walk ends. Rows of no piece (a shared chunk's unmatched rows) go to a spill
    file meanwhile, and `spread` adds them to every piece's part at the end."""

    def __init__(
        self, chunk_id: int, kind: str, delimiter: str, spill_dir: Path | None = None
    ) -> None:
        self.chunk_id = chunk_id
        self.kind = kind
        self.delimiter = delimiter
        self.spill_dir = spill_dir  # where rows of no piece wait; None: there are none
        self._piece: Piece | None = None
        self._fh: IO[str] | None = None
        self._tmp: Path | None = None
        self._csv: Writer | None = None
        self._done: set[int] = set()  # files whose part is in place
        self._header: list[str] = []  # the parts' header (the walk's), without Source Line
        self._spill: Path | None = None
        self._spill_fh: IO[str] | None = None
        self._spill_csv: Writer | None = None

    def write(self, piece: Piece | None, header: list[str], row: list[str]) -> None:
        self._header = header
        if piece is None:
            self._unmatched(row)
            return
        if piece is not self._piece:
            self.close()
            self._piece = piece
            target = piece.out_dir / part_name(self.chunk_id, self.kind)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = target.with_name(f".{target.name}.tmp")
            again = piece.file_id in self._done  # never expected: rows come in piece order
            if again:  # but should a piece come back, its rows so far are kept
                shutil.copyfile(target, self._tmp)
            # Open until the next piece starts: closed by close() or abort().
            self._fh = open(self._tmp, "a" if again else "w", encoding="utf-8", newline="")  # noqa: SIM115
            self._csv = csv.writer(self._fh, delimiter=self.delimiter, lineterminator="\n")
            if not again:
                self._csv.writerow([*header, constants.SOURCE_LINE_COLUMN])
        assert self._csv is not None
        assert self._fh is not None
        write_row(self._csv, self._fh, row, self.delimiter)

    def close(self) -> None:
        """The open part, if any, into place."""
        if self._fh is None or self._piece is None or self._tmp is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        target = self._piece.out_dir / part_name(self.chunk_id, self.kind)
        os.replace(self._tmp, target)
        fsync_dir(target.parent)
        self._tmp = None
        self._done.add(self._piece.file_id)

    def _unmatched(self, row: list[str]) -> None:
        """A row no record matched, kept in the spill file for every piece."""
        if self._spill_csv is None:
            if self.spill_dir is None:
                raise AssertionError("a row of no piece in a chunk of one file")
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill = self.spill_dir / f".unmatched-{self.chunk_id}.{self.kind}.tmp"
            # Open until spread() or abort().
            self._spill_fh = open(self._spill, "w", encoding="utf-8", newline="")  # noqa: SIM115
            self._spill_csv = csv.writer(
                self._spill_fh, delimiter=self.delimiter, lineterminator="\n"
            )
        assert self._spill_fh is not None
        write_row(self._spill_csv, self._spill_fh, row, self.delimiter)

    def spread(self, pieces: list[Piece]) -> None:
        """The rows no record matched, after each piece's own rows in its part (one made
        for a piece that had none): each part written again whole. Only this walk's parts
        are kept; one an earlier, interrupted walk left is written anew."""
        if self._spill_fh is None or self._spill is None:
            return
        self._spill_fh.close()
        self._spill_fh = None
        buffer = io.StringIO(newline="")
        csv.writer(buffer, delimiter=self.delimiter, lineterminator="\n").writerow(
            [*self._header, constants.SOURCE_LINE_COLUMN]
        )
        head = buffer.getvalue().encode("utf-8")
        for piece in pieces:
            target = piece.out_dir / part_name(self.chunk_id, self.kind)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = target.with_name(f".{target.name}.tmp")
            with open(self._tmp, "wb") as out:
                if piece.file_id in self._done:
                    with open(target, "rb") as own:
                        copy_rest(own, out)
                else:
                    out.write(head)
                with open(self._spill, "rb") as spill:
                    copy_rest(spill, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(self._tmp, target)
            fsync_dir(target.parent)
            self._tmp = None
            self._done.add(piece.file_id)

    def abort(self) -> None:
        """A walk that failed leaves no temp file behind (nor does one that ended)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if self._spill_fh is not None:
            self._spill_fh.close()
            self._spill_fh = None
        if self._spill is not None:
            self._spill.unlink(missing_ok=True)
            self._spill = None
