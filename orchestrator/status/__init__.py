"""What the orchestrator is doing, for people and for monitoring.

- `snapshot`: files and chunks from the state store as JSON-ready data (`GET /jobs`,
  `status --json`), by `Query`; what a file waits for now (`live_state`, `WAITING_FOR`).
- `table`: the snapshot as the table `marketo-orchestrator status` prints.
- `endpoints`: `StatusServer`, /healthz, /readyz, /metrics, /jobs and the page over HTTP.
- `overview`: the status page's data (`GET /api/overview`); `PageSources` and
  `QueueView`, what the daemon hands the page beyond the store and the metrics.
- `series`: the last hour of rows processed and API calls, for the page's charts.
- `page`: the page's HTML, CSS and script (package data under static/).
- `progress`: the one progress line on a terminal (`run --once`, `submit --wait`).
"""

from orchestrator.status.endpoints import Readiness, StatusServer, jobs_query
from orchestrator.status.overview import DaemonSlots, PageSources, QueueView, overview
from orchestrator.status.page import load_assets, page_bytes
from orchestrator.status.progress import RateMeter, file_line, live_progress, run_line
from orchestrator.status.series import Series
from orchestrator.status.snapshot import (
    JOBS_LIMIT,
    WAITING_FOR,
    Query,
    file_entry,
    jobs_snapshot,
    live_state,
    load_snapshot,
    quota_entry,
    read_snapshot,
    totals,
)
from orchestrator.status.table import TABLE_WIDTH, format_status_table

__all__ = [
    "JOBS_LIMIT",
    "TABLE_WIDTH",
    "WAITING_FOR",
    "DaemonSlots",
    "PageSources",
    "Query",
    "QueueView",
    "RateMeter",
    "Readiness",
    "Series",
    "StatusServer",
    "file_entry",
    "file_line",
    "format_status_table",
    "jobs_query",
    "jobs_snapshot",
    "live_progress",
    "live_state",
    "load_assets",
    "load_snapshot",
    "overview",
    "page_bytes",
    "quota_entry",
    "read_snapshot",
    "run_line",
    "totals",
]
