"""What the orchestrator is doing, for people and for monitoring.

- `snapshot`: files and chunks from the state store as JSON-ready data (`GET /jobs`,
  `status --json`), by `Query`; what a file waits for now (`live_state`, `WAITING_FOR`).
- `table`: the snapshot as the table `marketo-orchestrator status` prints.
- `endpoints`: `StatusServer`, /healthz, /readyz, /metrics and /jobs over HTTP.
- `progress`: the one progress line on a terminal (`run --once`, `submit --wait`).
"""

from orchestrator.status.endpoints import Readiness, StatusServer, jobs_query
from orchestrator.status.progress import RateMeter, file_line, live_progress, run_line
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
    "Query",
    "RateMeter",
    "Readiness",
    "StatusServer",
    "file_entry",
    "file_line",
    "format_status_table",
    "jobs_query",
    "jobs_snapshot",
    "live_progress",
    "live_state",
    "load_snapshot",
    "quota_entry",
    "read_snapshot",
    "run_line",
    "totals",
]
