"""One job's import as it happens: its rows applied one at a time, at the job's pace.

Marketo processes a job's rows while the job imports, and imports two jobs at once,
so two importing jobs touch records in turns; within one job it documents no order
at all. The queue (`simulator.queue`) asks each importing job when its next row is
due (`JobQueue.advance` applies rows of every importing job in time order): a job
that started at `s` applies its k-th row (from 1) at `s + job_overhead + k /
rows_per_second`, its last exactly when it finishes. With the `reverse_rows` knob a
job applies its rows last first.

Each row is checked and stored insert-or-update (`simulator.records`) when it is
applied; rows that fail or warn go to the job's failures and warnings files, in
the order of the file, with Marketo's reason column last. A file that cannot be
imported at all (not UTF-8, no header, a header without the lookup field, or
without `email` for program members) applies no row and ends the job `Failed`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator import constants, delimited
from orchestrator.models import ObjectType
from orchestrator.simulator.records import (
    Columns,
    JobSpec,
    RecordStore,
    Warned,
    partition_problem,
)


@dataclass(frozen=True, slots=True)
class ParsedFile:
    """An uploaded file read with the csv module; `error` set when it cannot be imported."""

    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished job reports and leaves behind."""

    processed: int = 0
    failed: int = 0
    warned: int = 0
    message: str = ""
    failures: bytes | None = None
    warnings: bytes | None = None


@dataclass(eq=False, slots=True)
class Importing:
    """A job's rows being applied: which come next, and the failed and warned so far
    (each with its row's place in the file)."""

    spec: JobSpec
    parsed: ParsedFile
    store: RecordStore
    batch_id: int
    warn_marker: str
    reverse: bool = False
    twin_window: float = 0.0
    omit_empty_values: bool = False
    refused: str | None = None  # every row fails alike (a partition the user may not use)
    applied: int = 0
    failures: list[tuple[int, list[str]]] = field(default_factory=list)
    warnings: list[tuple[int, list[str]]] = field(default_factory=list)
    error: str | None = None  # the file cannot be imported: no row is applied
    store_row: Callable[[dict[str, str]], str | None] = field(init=False)

    @classmethod
    def begin(
        cls,
        spec: JobSpec,
        parsed: ParsedFile,
        store: RecordStore,
        batch_id: int,
        *,
        warn_marker: str,
        dedupe: tuple[str, ...] = (),
        lead_fields: tuple[str, ...] = (),
        partitions: tuple[str, ...] = (),
        reverse: bool = False,
        twin_window: float = 0.0,
        omit_empty_values: bool = False,
    ) -> Importing:
        """The import of a job that starts now (its file is checked first). `dedupe`: a
        custom object's dedupe fields; `lead_fields`: the lead fields a row may set (none:
        any); `partitions`: the lead partitions the API user may import to (none: not
        checked); `omit_empty_values`: failures and warnings files without their empty
        values and columns."""
        run = cls(spec, parsed, store, batch_id, warn_marker, reverse, twin_window)
        run.omit_empty_values = omit_empty_values
        run.error = file_problem(spec, parsed)
        run.refused = partition_problem(spec, partitions)
        if run.error is None:
            partitioned = bool(partitions)
            run.store_row = store.importer(
                spec, parsed.header, dedupe, lead_fields, partitioned=partitioned
            )
        else:
            run.store_row = no_row
        return run

    @property
    def rows(self) -> int:
        """Rows this import applies (none when its file cannot be imported)."""
        return 0 if self.error is not None else len(self.parsed.rows)

    @property
    def remaining(self) -> int:
        return self.rows - self.applied

    def apply_next(self, now: float) -> None:
        """Check and store the next row, at time `now`."""
        place = self.rows - 1 - self.applied if self.reverse else self.applied
        self.applied += 1
        row, width = self.parsed.rows[place], len(self.parsed.header)
        if len(row) != width:  # short rows are padded so the reason lands in its column
            reason = f"1003 Row has {len(row)} fields, the header has {width}"
            self.failures.append((place, [*row, *[""] * (width - len(row)), reason]))
            return
        if self.refused:
            self.failures.append((place, [*row, self.refused]))
            return
        values = dict(zip(self.parsed.header, row, strict=True))
        ignored = (
            [k for k, v in values.items() if v == self.warn_marker]
            if self.warn_marker in row
            else []
        )
        for name in ignored:
            del values[name]
        self.store.moment(now, self.batch_id, self.twin_window)
        failure = self.store_row(values)
        if isinstance(failure, Warned):
            self.warnings.append((place, [*row, str(failure)]))
        elif failure:
            self.failures.append((place, [*row, failure]))
        elif ignored:
            reason = f"1005 Value ignored for field(s): {', '.join(ignored)}"
            self.warnings.append((place, [*row, reason]))

    def finish(self) -> tuple[str, Outcome]:
        """The job's final status and outcome, once every row was applied."""
        if self.error is not None:
            return constants.STATUS_FAILED, Outcome(message=f"Import failed: {self.error}")
        total, failed = len(self.parsed.rows), len(self.failures)
        processed = total - failed
        message = f"{processed} records imported ({processed} members)"  # Adobe's words
        if failed:
            message = f"Import completed with errors, {message}, {failed} failed"
        else:
            message = f"Import succeeded, {message}"
        header, delimiter = self.parsed.header, delimited.DELIMITERS[self.spec.fmt.lower()]
        failures = [row for _, row in sorted(self.failures, key=lambda f: f[0])]
        warnings = [row for _, row in sorted(self.warnings, key=lambda w: w[0])]
        if warnings:  # "1 warning." in Adobe's example; the plural is assumed
            message += f", {len(warnings)} warning{'s' if len(warnings) > 1 else ''}."
        omit = self.omit_empty_values
        return constants.STATUS_COMPLETE, Outcome(
            processed=processed,
            failed=failed,
            warned=len(warnings),
            message=message,
            failures=write_rows(header, constants.FAILURE_REASON_COLUMN, failures, delimiter, omit),
            warnings=write_rows(header, constants.WARNING_REASON_COLUMN, warnings, delimiter, omit),
        )

    def progress(self) -> dict[str, Any]:
        """What a state file keeps of an import under way (`resume` takes it back)."""
        return {
            "applied": self.applied,
            "reverse": self.reverse,
            "twin_window": self.twin_window,
            "omit_empty_values": self.omit_empty_values,
            "refused": self.refused,
            "failures": [[place, row] for place, row in self.failures],
            "warnings": [[place, row] for place, row in self.warnings],
        }

    def resume(self, progress: dict[str, Any]) -> None:
        self.applied = int(progress["applied"])
        self.reverse = bool(progress["reverse"])
        self.twin_window = float(progress["twin_window"])
        self.omit_empty_values = bool(progress.get("omit_empty_values", False))
        self.refused = progress.get("refused")
        self.failures = [(int(p), [str(v) for v in row]) for p, row in progress["failures"]]
        self.warnings = [(int(p), [str(v) for v in row]) for p, row in progress["warnings"]]


def no_row(values: dict[str, str]) -> str | None:
    raise AssertionError("a job whose file cannot be imported applies no row")


def file_problem(spec: JobSpec, parsed: ParsedFile) -> str | None:
    """Why a job's file cannot be imported at all, or None."""
    if parsed.error:
        return parsed.error
    key = spec.lookup_field if spec.object_type is ObjectType.LEADS else "email"
    if spec.object_type is not ObjectType.CUSTOM_OBJECT and not Columns.of(parsed.header, key).key:
        return f"field '{key}' is not a column of the file"
    return None


def write_rows(
    header: list[str],
    reason: str,
    rows: list[list[str]],
    delimiter: str,
    omit_empty: bool = False,
) -> bytes | None:
    """A failures or warnings file: header plus reason column, then the rows; None if none.
    `omit_empty`: only the columns with a value in at least one row (see the knob)."""
    if not rows:
        return None
    if omit_empty:
        width = len(header)
        kept = [i for i in range(width) if any(row[i] for row in rows if i < len(row) - 1)]
        header = [header[i] for i in kept]
        rows = [[*(row[i] for i in kept), row[-1]] for row in rows]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow([*header, reason])
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")
