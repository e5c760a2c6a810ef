"""Attribution: a final chunk's failed and warned rows given back to the files in it.

Each file's rows, with the lines they have in its source (found by the forward
walk, `matching`), go to a part file in the file's own chunk directory, written
whole or not at all; then the store records each file's share of the chunk's
counters and the chunk as attributed. A chunk is attributed once, when it goes
final, while its files (the chunk, Marketo's, a pack's) are all there; finishing
a file attributes only a final chunk that is not attributed yet (its attribution
failed, a full disk say: the store's `attributed` flag tells).
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import time
from collections.abc import Generator, Iterable
from contextlib import closing
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import structlog

if TYPE_CHECKING:
    from _csv import Writer

from orchestrator import constants, delimited
from orchestrator.config import Settings
from orchestrator.delimited import format_of, write_row
from orchestrator.durable import fsync_dir
from orchestrator.layout import part_name
from orchestrator.models import FINAL_CHUNK_STATUSES, ChunkStatus, RejectRecord
from orchestrator.results.matching import Match, Piece, Tally, walk
from orchestrator.results.merge import COPY_BLOCK
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
        pieces.append(
            Piece(
                file_id=member.file_id,
                first_row=member.first_row,
                first_line=member.first_line,
                out_dir=settings.layout.chunk_dir(member.file_id),
                gaps=tuple(gaps),
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
        its_failed = failed.get(member.file_id, 0)
        processed = member.rows - its_failed if member.status is ChunkStatus.COMPLETE else 0
        shares[member.file_id] = (processed, its_failed, warned.get(member.file_id, 0))
    await store.set_shares(chunk_id, shares)
    unmatched = tallies["failures"].unmatched + tallies["warnings"].unmatched
    (log.warning if unmatched else log.info)(
        "chunk_attributed",
        chunk=job.index,
        batch_id=job.batch_id,
        files=len(members),
        rows_failed=sum(failed.values()),
        rows_with_warning=sum(warned.values()),
        unmatched=unmatched,
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
    rows each file got. A part file of a piece that got no rows is removed. `rows`, the
    chunk's records, lets the common case run in C (see `matching.Records._find`).

    Blocking: run it in a thread."""
    delimiter = delimited.DELIMITERS[fmt]
    ordered = sorted(pieces, key=lambda p: p.first_row)
    tallies: dict[str, Tally] = {}
    for kind in KINDS:
        source = marketo.get(kind)
        found = Tally()
        if source is not None and source.exists():
            write_parts(
                chunk_id, kind, delimiter, walk(chunk_path, delimiter, ordered, source, found, rows)
            )
        for piece in ordered:
            if piece.file_id not in found.rows:
                (piece.out_dir / part_name(chunk_id, kind)).unlink(missing_ok=True)
        tallies[kind] = found
    return tallies


def write_parts(
    chunk_id: int, kind: str, delimiter: str, matches: Generator[Match, None, None]
) -> None:
    """Every match into its piece's part file; a walk that fails leaves no temp file."""
    parts = Parts(chunk_id, kind, delimiter)
    try:
        with closing(matches):
            for match in matches:
                parts.write(match.piece, match.header, match.row)
        parts.close()
    finally:
        parts.abort()


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
    or the walk ends."""

    def __init__(self, chunk_id: int, kind: str, delimiter: str) -> None:
        self.chunk_id = chunk_id
        self.kind = kind
        self.delimiter = delimiter
        self._piece: Piece | None = None
        self._fh: IO[str] | None = None
        self._tmp: Path | None = None
        self._csv: Writer | None = None
        self._done: set[int] = set()  # files whose part is in place

    def write(self, piece: Piece, header: list[str], row: list[str]) -> None:
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

    def abort(self) -> None:
        """A walk that failed leaves no temp file behind."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
