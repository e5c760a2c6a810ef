"""The snapshot as a table for `marketo-orchestrator status`: at most 100 columns (a
long file name wraps inside its column, never cut), or `--wide`, one line per file
with every value whole; then a summary of the counts by status.
"""

from __future__ import annotations

import textwrap
from datetime import datetime
from typing import Any, Final

from orchestrator.clock import utc_now

# (header, width, right-aligned); with two-space gutters the row is 96 columns. FILE wraps.
COLUMNS: Final = (
    ("ROUTE", 10, False),
    ("FILE", 20, False),
    ("STATE", 9, False),
    ("CHUNKS", 7, True),
    ("ROWS", 15, True),
    ("FAILED", 7, True),
    ("WARNED", 7, True),
    ("ELAPSED", 7, True),
)
# --wide: every value whole, the id and batch ids in columns of their own.
WIDE_COLUMNS: Final = (
    ("ID", 0, False),
    ("ROUTE", 0, False),
    ("FILE", 0, False),
    ("STATE", 0, False),
    ("CHUNKS", 0, True),
    ("ROWS", 0, True),
    ("FAILED", 0, True),
    ("WARNED", 0, True),
    ("ELAPSED", 0, True),
    ("BATCHES", 0, False),
)
GUTTER: Final = "  "
TABLE_WIDTH: Final = 100
FLATTEN: Final = str.maketrans({"\n": " ", "\r": " ", "\t": " "})
INDENT: Final = " " * (COLUMNS[0][1] + len(GUTTER))


def format_status_table(
    snapshot: dict[str, Any], *, wide: bool = False, now: datetime | None = None
) -> str:
    """The snapshot as a table with a summary line.

    Narrow (default): at most 100 columns; a long file name wraps inside its
    column, never cut; below each file a line with its id and batch ids, its
    error if it has one, and what its held chunk waits for if one is held (the
    key rule). Wide: one line per file, every value whole."""
    now = now or utc_now()
    if wide:
        return wide_table(snapshot, now)
    lines = [table_row([header for header, _, _ in COLUMNS])]
    for entry in snapshot["files"]:
        cells = file_cells(entry, now)
        name = cells[1].translate(FLATTEN)
        width = COLUMNS[1][1]
        pieces = [name[i : i + width] for i in range(0, len(name), width)] or [""]
        lines.append(table_row([cells[0], pieces[0], *cells[2:]]))
        blank = [""] * len(COLUMNS)
        for piece in pieces[1:]:
            lines.append(table_row([blank[0], piece, *blank[2:]]))
        detail = f"{INDENT}id {entry['id']}"
        if entry["batch_ids"]:
            detail += (
                f"  batches {batch_summary(entry['batch_ids'], TABLE_WIDTH - len(detail) - 10)}"
            )
        lines.append(detail.rstrip())
        if entry["error"]:
            lines.append(fit(f"{INDENT}error: {entry['error']}", TABLE_WIDTH))
        if entry.get("held"):
            lines.append(fit(f"{INDENT}held: {held_reason(entry['held'])}", TABLE_WIDTH))
    if not snapshot["files"]:
        lines.append("(no files)")
    lines += truncation_note(snapshot)
    lines.append(summary_line(snapshot["totals"]))
    lines += quota_note(snapshot, TABLE_WIDTH)
    return "\n".join(lines)


def wide_table(snapshot: dict[str, Any], now: datetime) -> str:
    rows = [[header for header, _, _ in WIDE_COLUMNS]]
    for entry in snapshot["files"]:
        batches = ",".join(str(b) for b in entry["batch_ids"]) or "-"
        rows.append([entry["id"], *file_cells(entry, now), batches])
    rows = [[cell.translate(FLATTEN) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(WIDE_COLUMNS))]
    lines = []
    for row in rows:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, _, right) in zip(row, widths, WIDE_COLUMNS, strict=True)
        ]
        lines.append(GUTTER.join(parts).rstrip())
    for entry in snapshot["files"]:
        if entry["error"]:
            lines.append(f"{entry['id']}: error: {entry['error'].translate(FLATTEN)}")
        if entry.get("held"):
            lines.append(f"{entry['id']}: held: {held_reason(entry['held']).translate(FLATTEN)}")
    if not snapshot["files"]:
        lines.append("(no files)")
    lines += truncation_note(snapshot)
    lines.append(summary_line(snapshot["totals"]))
    lines += quota_note(snapshot, None)
    return "\n".join(lines)


def quota_note(snapshot: dict[str, Any], width: int | None) -> list[str]:
    """While the daily quota holds new jobs back: why, and until when (wrapped to `width`)."""
    quota = snapshot.get("quota")
    if not quota or not quota["creates_paused"]:
        return []
    text = f"waiting for the daily quota: {quota['reason']}"
    return textwrap.wrap(text, width, break_on_hyphens=False) if width else [text]


def held_reason(held: dict[str, Any]) -> str:
    """`chunk 2 waits for big.csv chunk 3 (id ...)`: the first earlier chunk it shares
    record keys with, and how many more."""
    first, *more = held["waits_for"]
    also = f" and {len(more)} more" if more else ""
    return (
        f"chunk {held['chunk']} waits for {first['file']} chunk {first['chunk']}"
        f" (id {first['id']}){also}: they share record keys"
    )


def truncation_note(snapshot: dict[str, Any]) -> list[str]:
    """A line saying the list was cut at the limit, or none."""
    if not snapshot.get("truncated"):
        return []
    shown, held = len(snapshot["files"]), sum(snapshot["totals"]["files"].values())
    return [f"(showing {shown} of {held} files: active first, then the latest finished)"]


def file_cells(entry: dict[str, Any], now: datetime) -> list[str]:
    """ROUTE, FILE, STATE, CHUNKS, ROWS, FAILED, WARNED, ELAPSED."""
    total = entry["chunks_total"]
    rows_total = "?" if entry["rows"] is None else str(entry["rows"])
    return [
        entry["route"],
        entry["file"],
        entry["state"],
        f"{entry['chunks_done']}/{'?' if total is None else total}",
        f"{entry['rows_processed']}/{rows_total}",
        str(entry["rows_failed"]),
        str(entry["rows_with_warning"]),
        elapsed(entry["claimed_at"], entry["finished_at"], now),
    ]


def elapsed(claimed_at: str, finished_at: str | None, now: datetime) -> str:
    """Time from claim to result (or to now): 42s, 3m05s, 2h03m, 4d02h."""
    try:
        start = datetime.fromisoformat(claimed_at)
        end = datetime.fromisoformat(finished_at) if finished_at else now
    except ValueError:
        return "?"
    seconds = max(0, int((end - start).total_seconds()))
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    if days:
        return f"{days}d{hour:02d}h"
    if hours:
        return f"{hours}h{minute:02d}m"
    if minutes:
        return f"{minutes}m{sec:02d}s"
    return f"{sec}s"


def table_row(cells: list[str]) -> str:
    parts = []
    for cell, (_, width, right) in zip(cells, COLUMNS, strict=True):
        text = fit(cell, width)
        parts.append(text.rjust(width) if right else text.ljust(width))
    return GUTTER.join(parts).rstrip()


def fit(text: str, width: int) -> str:
    """Cut `text` to `width` columns, marking the cut with '~'."""
    text = text.translate(FLATTEN)  # no newlines or tabs inside a cell
    return text if len(text) <= width else text[: width - 1] + "~"


def batch_summary(batch_ids: list[int], width: int) -> str:
    """As many batch ids as fit in `width`, then '+N' for the rest."""
    if not batch_ids:
        return "-"
    ids = [str(b) for b in batch_ids]
    for shown in range(len(ids), 0, -1):
        hidden = len(ids) - shown
        text = ",".join(ids[:shown]) + (f",+{hidden}" if hidden else "")
        if len(text) <= width:
            return text
    return fit(f"+{len(ids)}", width)


def summary_line(totals_: dict[str, Any]) -> str:
    """Two lines of counts by status (so all seven file statuses still fit in 100 columns)."""
    files = ", ".join(f"{n} {s}" for s, n in totals_["files"].items() if n)
    chunks = ", ".join(f"{n} {s}" for s, n in totals_["chunks"].items() if n)
    outstanding = totals_["jobs_outstanding"]
    return f"files: {files or 'none'}\nchunks: {chunks or 'none'}; jobs at Marketo: {outstanding}"
