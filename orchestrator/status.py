"""What the orchestrator is doing, for people and for monitoring.

- `jobs_snapshot`: files and chunks from the state store as JSON-ready data,
  the body of `GET /jobs` and of `marketo-orchestrator status --json`
  (`read_snapshot` opens the store for the CLI).
- `Query`: which files a snapshot shows: by id, name, activity, status, limit.
  `load_snapshot` is the one way from a query to the store: it asks the
  store's bounded `listing` (active work first in claim order, then the most
  recently finished; at most `limit` files, `JOBS_LIMIT` unless the query says
  otherwise), so its cost follows the limit and the active files, never the
  months of history; the totals count everything the store holds, from the
  tallies its triggers keep. `truncated` says more files matched than shown.
- `format_status_table`: the same snapshot as a table for
  `marketo-orchestrator status` (100 columns, or `--wide`).
- `StatusServer`: a small read-only aiohttp server with `/healthz`, `/readyz`,
  `/metrics`, `/jobs` (`?status=` and `?limit=`, default 100, at most 1000)
  and `/jobs/<id>` (one file by its hand-over id, 404 if unknown). Only GET
  and HEAD exist; every other method is 405.

Work paths and other internals stay out of the snapshot; the store holds no
secrets, so none can leak from here.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web

from orchestrator.clock import utc_now
from orchestrator.errors import StoreError
from orchestrator.metrics import Metrics, StoreReader
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    FINAL_FILE_STATUSES,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
)
from orchestrator.store import Store

log = structlog.get_logger(__name__)

Readiness = Callable[[], str | None]


# The snapshot.


@dataclass(frozen=True, slots=True)
class Query:
    """Which files a snapshot shows (the totals always count every file)."""

    ticket: str | None = None  # exactly this hand-over id
    name: str | None = None  # the file name, or a shell pattern (`nightly-*.csv`)
    active: bool = False  # only files without a result yet
    statuses: frozenset[str] | None = None  # file statuses or live states
    limit: int | None = None  # at most this many files


def jobs_snapshot(
    files: list[FileRecord],
    chunks: list[ChunkRecord],
    query: Query | None = None,
    tallies: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Files (active work first in claim order, then the latest finished) with their chunks
    (in file order), and totals by status: from the store's `tallies` when given
    (everything it holds), else counted over `files` and `chunks`."""
    query = query or Query()
    by_file: dict[int, list[ChunkRecord]] = defaultdict(list)
    for chunk in chunks:
        by_file[chunk.file_id].append(chunk)
    entries = [file_entry(f, sorted(by_file[f.id], key=lambda c: c.index)) for f in files]
    active = sorted(
        (e for e in entries if e["status"] not in FINAL),
        key=lambda e: (e["claimed_at"], e["file_id"]),
    )
    finished = sorted(
        (e for e in entries if e["status"] in FINAL),
        key=lambda e: (e["finished_at"] or "", e["file_id"]),
        reverse=True,
    )
    shown = [e for e in active + finished if matches(e, query)]
    limit = len(shown) if query.limit is None else query.limit
    return {
        "files": shown[:limit],
        "totals": totals(files, chunks) if tallies is None else totals_from_tallies(tallies),
        "truncated": len(shown) > limit,
    }


FINAL: Final = frozenset(str(s) for s in FINAL_FILE_STATUSES)


def matches(entry: dict[str, Any], query: Query) -> bool:
    if query.ticket is not None and entry["id"] != query.ticket:
        return False
    if query.name is not None and not fnmatch.fnmatchcase(entry["file"], query.name):
        return False
    if query.active and entry["status"] in FINAL:
        return False
    wanted = query.statuses
    return wanted is None or entry["status"] in wanted or entry["state"] in wanted


def live_state(file: FileRecord, chunks: list[ChunkRecord]) -> str:
    """What a file waits for now, in a word.

    claimed, splitting; packing (its records are in a pack that waits for more small
    files); then, while its chunks are at Marketo: importing (one of them is), queued
    (submitted, waiting in Marketo's queue), waiting (for a slot in our queue or a
    backoff); finishing; complete or failed."""
    if file.status in (FileStatus.CLAIMING, FileStatus.CLAIMED):
        return "claimed"
    if file.status in (FileStatus.FINISHING, *FINAL_FILE_STATUSES):
        return str(file.status)
    if any(c.marketo_status == "Importing" for c in chunks):
        return "importing"
    if any(c.status is ChunkStatus.SUBMITTED for c in chunks):
        return "queued"
    if file.status is FileStatus.SPLITTING and not any(
        c.status not in FINAL_CHUNK_STATUSES for c in chunks
    ):
        return "splitting"
    if any(not c.sealed for c in chunks):
        return "packing"
    return "waiting"


# What a file in each live state waits for (progress lines).
WAITING_FOR: Final = {
    "inbox": "a daemon to claim it",
    "claimed": "the splitter",
    "splitting": "the splitter",
    "packing": "more small files to share a job (limits.pack_wait_seconds)",
    "waiting": "a queue slot",
    "queued": "Marketo's queue",
    "importing": "Marketo's import",
    "finishing": "the result file",
}


def file_entry(file: FileRecord, chunks: list[ChunkRecord]) -> dict[str, Any]:
    final = file.status in FINAL_FILE_STATUSES
    return {
        "id": file.ticket,
        "file_id": file.id,
        "route": file.route,
        "file": file.name,
        "status": file.status.value,
        "state": live_state(file, chunks),
        "error": file.error,
        "rows": file.rows,
        "rows_processed": sum(c.rows_processed for c in chunks),
        "rows_failed": sum(c.rows_failed for c in chunks),
        "rows_with_warning": sum(c.rows_with_warning for c in chunks),
        "chunks_done": sum(1 for c in chunks if c.status in FINAL_CHUNK_STATUSES),
        "chunks_total": file.chunks_total,
        "batch_ids": [c.batch_id for c in chunks if c.batch_id is not None],
        "claimed_at": file.claimed_at,
        "finished_at": file.finished_at,
        "result": result_in_data_dir(file.result_path) if final else None,
        "chunks": [chunk_entry(c) for c in chunks],
    }


def result_in_data_dir(path: str | None) -> str | None:
    """A result path as `<done|failed>/<route>/<name>.result.json`, relative to data_dir
    (the store keeps it as the daemon spelled data_dir; a pipeline may mount it elsewhere)."""
    if not path:
        return None
    return "/".join(Path(path).parts[-3:])


def chunk_entry(chunk: ChunkRecord) -> dict[str, Any]:
    return {
        "index": chunk.index,
        "rows": chunk.rows,
        "bytes": chunk.bytes,
        "status": chunk.status.value,
        "batch_id": chunk.batch_id,
        "marketo_status": chunk.marketo_status,
        "rows_processed": chunk.rows_processed,
        "rows_failed": chunk.rows_failed,
        "rows_with_warning": chunk.rows_with_warning,
        "message": chunk.message,
        "submit_attempts": chunk.submit_attempts,
        "shared": shared_entry(chunk),
    }


def shared_entry(chunk: ChunkRecord) -> dict[str, int] | None:
    """For a chunk several small files share (a pack), the whole job: how many files,
    rows and bytes (the chunk's own rows, bytes and counters are this file's share)."""
    if chunk.files == 1:
        return None
    return {"files": chunk.files, "rows": chunk.job_rows, "bytes": chunk.job_bytes}


def totals(files: list[FileRecord], chunks: list[ChunkRecord]) -> dict[str, Any]:
    file_counts = Counter(f.status for f in files)
    chunk_counts = Counter(c.status for c in chunks)
    return {
        "files": {s.value: file_counts[s] for s in FileStatus},
        "chunks": {s.value: chunk_counts[s] for s in ChunkStatus},
        "jobs_outstanding": chunk_counts[ChunkStatus.SUBMITTED],
    }


def totals_from_tallies(tallies: Mapping[str, int]) -> dict[str, Any]:
    """`totals` from the counts the store keeps as rows change."""
    return {
        "files": {s.value: tallies.get(f"files:{s.value}", 0) for s in FileStatus},
        "chunks": {s.value: tallies.get(f"chunks:{s.value}", 0) for s in ChunkStatus},
        "jobs_outstanding": tallies.get(f"chunks:{ChunkStatus.SUBMITTED.value}", 0),
    }


# The file statuses a file in each live state can have (live states are read from chunks).
LIVE_STATES: Final = {
    "claimed": frozenset({FileStatus.CLAIMING, FileStatus.CLAIMED}),
    "splitting": frozenset({FileStatus.SPLITTING}),
    "packing": frozenset({FileStatus.SPLIT}),
    "waiting": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
    "queued": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
    "importing": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
}


FILE_STATUSES: Final = frozenset(s.value for s in FileStatus)


def store_statuses(query: Query) -> tuple[set[FileStatus] | None, bool]:
    """The file statuses to ask the store for, and whether a live state must then be
    checked on each file (`matches`) so that the store cannot apply the limit itself."""
    wanted: set[FileStatus] | None = None
    live = False
    if query.statuses is not None:
        wanted = set()
        for name in query.statuses:
            if name in LIVE_STATES:
                wanted |= LIVE_STATES[name]
            if name in FILE_STATUSES:
                wanted.add(FileStatus(name))
            else:
                live = True
    if query.active:
        wanted = (set(FileStatus) if wanted is None else wanted) - FINAL_FILE_STATUSES
    return wanted, live


def glob_of(pattern: str) -> str:
    """A shell pattern (fnmatch) as SQLite's GLOB spells it: `[!...]` is `[^...]`."""
    return pattern.replace("[!", "[^")


async def load_snapshot(store: StoreReader, query: Query | None = None) -> dict[str, Any]:
    """The snapshot of at most `query.limit` files (`JOBS_LIMIT` by default), read through
    the store's bounded listing, with their chunks and the store's tallies."""
    query = query or Query()
    limit = JOBS_LIMIT if query.limit is None else query.limit
    bounded = replace(query, limit=limit)
    tallies = await store.tallies()
    statuses, live = store_statuses(query)
    # One more than the limit tells whether there are more (`truncated`). A live state
    # (waiting, queued, importing) is known only from a file's chunks: the store returns
    # every active file of the statuses it allows (active work is what is in flight,
    # not the history) and `jobs_snapshot` keeps those in that state.
    files = await store.listing(
        limit=None if live else limit + 1,
        statuses=statuses,
        ticket=query.ticket,
        name_glob=None if query.name is None else glob_of(query.name),
    )
    chunks = await store.chunks_of(f.id for f in files)
    return jobs_snapshot(files, chunks, bounded, tallies)


async def read_snapshot(db_path: Path, query: Query | None = None) -> dict[str, Any]:
    """Open the state store at `db_path` (read, then close) and snapshot it.

    No store there is a `StoreError` (a wrong data_dir, or a daemon that never
    ran with it); nothing is created on disk.
    """
    if not await asyncio.to_thread(db_path.is_file):
        raise StoreError(
            db_path,
            "no state store here: is data_dir right (--config, ORCHESTRATOR_DATA_DIR)? "
            "It appears once a daemon has run with this data_dir",
        )
    store = await Store.open(db_path, check=False)  # the daemon checked it at its start
    try:
        return await load_snapshot(store, query)
    finally:
        await store.close()


# The table.

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
    column, never cut; below each file a line with its id and batch ids, and
    its error if it has one. Wide: one line per file, every value whole."""
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
    if not snapshot["files"]:
        lines.append("(no files)")
    lines += truncation_note(snapshot)
    lines.append(summary_line(snapshot["totals"]))
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
    if not snapshot["files"]:
        lines.append("(no files)")
    lines += truncation_note(snapshot)
    lines.append(summary_line(snapshot["totals"]))
    return "\n".join(lines)


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


# The server.


class StatusServer:
    """Read-only HTTP server for health, readiness, metrics and the job list."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        store: StoreReader,
        metrics: Metrics,
        readiness: Readiness,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._store = store
        self._metrics = metrics
        self._readiness = readiness
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port_or_none()}"
        return f"<StatusServer {where} {'running' if self._runner else 'stopped'}>"

    @property
    def port(self) -> int:
        """The port the server is bound to (useful when it was asked for port 0)."""
        port = self._port_or_none()
        if port is None:
            raise RuntimeError("StatusServer is not running")
        return port

    def _port_or_none(self) -> int | None:
        if self._runner is None:
            return None
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return None

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        if self._runner is not None:
            raise RuntimeError("StatusServer is already running")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/jobs", self._jobs)
        app.router.add_get("/jobs/{id}", self._job)
        app.on_response_prepare.append(_no_store_headers)
        # access_log=None: a scraper every few seconds must not flood the info log.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("status_server_listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Close the listener and any open connections. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self._readiness()
        if reason is None:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": reason}, status=503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        try:
            await self._metrics.refresh_from_store(self._store)
        except StoreError as exc:
            log.warning("metrics_store_unreadable", error=exc.problem)
            return web.Response(status=503, text="state store unreadable\n")
        # CONTENT_TYPE_LATEST carries parameters (version, charset): pass it as a raw header.
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": self._metrics.content_type}
        )

    async def _jobs(self, request: web.Request) -> web.Response:
        try:
            query = jobs_query(request.query.getall("status", []), request.query.get("limit"))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        snapshot = await self._snapshot(query)
        if snapshot is None:
            return web.json_response({"error": "state store unreadable"}, status=503)
        return web.json_response(snapshot)

    async def _job(self, request: web.Request) -> web.Response:
        ticket = request.match_info["id"]
        snapshot = await self._snapshot(Query(ticket=ticket, limit=1))
        if snapshot is None:
            return web.json_response({"error": "state store unreadable"}, status=503)
        if not snapshot["files"]:
            return web.json_response({"error": f"no file with id {ticket!r}"}, status=404)
        return web.json_response(snapshot["files"][0])

    async def _snapshot(self, query: Query) -> dict[str, Any] | None:
        try:
            return await load_snapshot(self._store, query)
        except StoreError as exc:
            log.warning("jobs_store_unreadable", error=exc.problem)
            return None


JOBS_LIMIT: Final = 100  # GET /jobs without ?limit=
JOBS_LIMIT_MAX: Final = 1000
STATES: Final = frozenset(
    {str(s) for s in FileStatus} | {"packing", "waiting", "queued", "importing"}
)


def jobs_query(statuses: list[str], limit: str | None) -> Query:
    """`?status=a,b&status=c&limit=N` as a Query; ValueError saying what is wrong."""
    wanted = {s.strip() for value in statuses for s in value.split(",") if s.strip()}
    unknown = wanted - STATES
    if unknown:
        raise ValueError(
            f"unknown status {sorted(unknown)[0]!r}; one of: {', '.join(sorted(STATES))}"
        )
    count = JOBS_LIMIT
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= JOBS_LIMIT_MAX:
            raise ValueError(f"limit must be a whole number from 1 to {JOBS_LIMIT_MAX}")
        count = int(limit)
    return Query(statuses=frozenset(wanted) if wanted else None, limit=count)


async def _no_store_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
