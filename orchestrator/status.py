"""What the orchestrator is doing, for people and for monitoring.

- `jobs_snapshot`: files and chunks from the state store as JSON-ready data,
  the body of `GET /jobs` and of `marketo-orchestrator status --json`
  (`read_snapshot` opens the store for the CLI).
- `format_status_table`: the same snapshot as a fixed-width table for
  `marketo-orchestrator status`.
- `StatusServer`: a small read-only aiohttp server with `/healthz`, `/readyz`,
  `/metrics` and `/jobs`. Only GET and HEAD exist; every other method is 405.

Work paths and other internals stay out of the snapshot; the store holds no
secrets, so none can leak from here.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web

from orchestrator.errors import StoreError
from orchestrator.metrics import Metrics, StoreReader
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
)
from orchestrator.store import Store

log = structlog.get_logger(__name__)

Readiness = Callable[[], str | None]


# The snapshot.


def jobs_snapshot(files: list[FileRecord], chunks: list[ChunkRecord]) -> dict[str, Any]:
    """Files (in claim order) with their chunks (in file order), and totals by status."""
    by_file: dict[int, list[ChunkRecord]] = defaultdict(list)
    for chunk in chunks:
        by_file[chunk.file_id].append(chunk)
    ordered = sorted(files, key=lambda f: f.id)
    return {
        "files": [file_entry(f, sorted(by_file[f.id], key=lambda c: c.index)) for f in ordered],
        "totals": totals(files, chunks),
    }


def file_entry(file: FileRecord, chunks: list[ChunkRecord]) -> dict[str, Any]:
    return {
        "id": file.id,
        "route": file.route,
        "file": file.name,
        "status": file.status.value,
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
        "chunks": [chunk_entry(c) for c in chunks],
    }


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
    }


def totals(files: list[FileRecord], chunks: list[ChunkRecord]) -> dict[str, Any]:
    file_counts = Counter(f.status for f in files)
    chunk_counts = Counter(c.status for c in chunks)
    return {
        "files": {s.value: file_counts[s] for s in FileStatus},
        "chunks": {s.value: chunk_counts[s] for s in ChunkStatus},
        "jobs_outstanding": chunk_counts[ChunkStatus.SUBMITTED],
    }


async def load_snapshot(store: StoreReader) -> dict[str, Any]:
    """Read the store and build `jobs_snapshot` from it."""
    files = await store.files()
    chunks = await store.chunks()
    return jobs_snapshot(files, chunks)


async def read_snapshot(db_path: Path) -> dict[str, Any]:
    """Open the state store at `db_path` (read, then close) and snapshot it.

    No store yet (the daemon never ran with this data_dir) is an empty snapshot,
    and nothing is created on disk.
    """
    if not await asyncio.to_thread(db_path.exists):
        return jobs_snapshot([], [])
    store = await Store.open(db_path)
    try:
        return await load_snapshot(store)
    finally:
        await store.close()


# The table.

# (header, width, right-aligned); with two-space gutters the row is 97 columns.
COLUMNS: Final = (
    ("ROUTE", 10, False),
    ("FILE", 20, False),
    ("STATUS", 9, False),
    ("CHUNKS", 7, True),
    ("BATCHES", 14, False),
    ("PROCESSED", 9, True),
    ("FAILED", 7, True),
    ("WARNED", 7, True),
)
GUTTER: Final = "  "
TABLE_WIDTH: Final = sum(w for _, w, _ in COLUMNS) + len(GUTTER) * (len(COLUMNS) - 1)
FLATTEN: Final = str.maketrans({"\n": " ", "\r": " ", "\t": " "})


def format_status_table(snapshot: dict[str, Any]) -> str:
    """The snapshot as a fixed-width table, at most 100 columns wide, with a summary line."""
    lines = [table_row([header for header, _, _ in COLUMNS])]
    for entry in snapshot["files"]:
        lines.append(table_row(file_cells(entry)))
        if entry["error"]:
            indent = " " * (COLUMNS[0][1] + len(GUTTER))
            lines.append(fit(f"{indent}error: {entry['error']}", TABLE_WIDTH))
    if not snapshot["files"]:
        lines.append("(no files)")
    lines.append(summary_line(snapshot["totals"]))
    return "\n".join(lines)


def file_cells(entry: dict[str, Any]) -> list[str]:
    total = entry["chunks_total"]
    chunks = f"{entry['chunks_done']}/{'?' if total is None else total}"
    return [
        entry["route"],
        entry["file"],
        entry["status"],
        chunks,
        batch_summary(entry["batch_ids"], COLUMNS[4][1]),
        str(entry["rows_processed"]),
        str(entry["rows_failed"]),
        str(entry["rows_with_warning"]),
    ]


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
            snapshot = await load_snapshot(self._store)
        except StoreError as exc:
            log.warning("jobs_store_unreadable", error=exc.problem)
            return web.json_response({"error": "state store unreadable"}, status=503)
        return web.json_response(snapshot)


async def _no_store_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
