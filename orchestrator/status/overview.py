"""The status page's data: one JSON answer (`GET /api/overview`) the page fetches every
few seconds and draws.

Every number in it comes from where /jobs and /metrics take theirs, read once per
answer: file and chunk counts from the store's tallies, files from the bounded
snapshot (`load_snapshot`), counters from the metrics registry (`Metrics.readings`).
What only the running daemon knows (the scheduler's model of Marketo's queue, the
poller's view of which of our jobs import) comes through `PageSources.queue`, a
callable the daemon hands over; the rates come from its `Series`.

Parts that other work fills in later are fields the page draws when present:
`held` (chunks the key rule holds back, with the reason), `quota.subscription`
(the subscription's own usage), `queue.daemons` beyond this one (several daemons
on one subscription). Like the snapshot, nothing here names a path or a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from orchestrator import __version__, constants
from orchestrator.clock import stamp, utc_now
from orchestrator.config import LimitSettings
from orchestrator.metrics import Metrics, StoreReader
from orchestrator.status.progress import waiting_for
from orchestrator.status.series import KEEP_SECONDS, SAMPLE_SECONDS, Series
from orchestrator.status.snapshot import Query, load_snapshot

FILES_SHOWN: Final = 25  # files on the page: active work first, then the latest finished
FAILURES_SHOWN: Final = 10  # failed files (and their failed chunks) on the page
REFRESH_SECONDS: Final = 2.0  # how often the page asks again
THIS_DAEMON: Final = "this daemon"


@dataclass(frozen=True, slots=True)
class DaemonSlots:
    """One daemon's jobs in Marketo's queue."""

    name: str
    importing: int
    queued: int  # at Marketo, not importing
    creating: int = 0  # creates sent, outcome not back yet
    local: bool = False  # the daemon answering


@dataclass(frozen=True, slots=True)
class QueueView:
    """What the daemon believes of Marketo's queue now: the scheduler's model (others'
    jobs learnt from 1016, creates of unknown outcome) and the poller's last word on
    which of our jobs import. Our queued jobs are counted from the store."""

    limit: int  # limits.queued_jobs: our own ceiling
    foreign: int
    phantoms: int
    importing: int
    backoff_seconds: float = 0.0
    others: tuple[DaemonSlots, ...] = ()  # other daemons sharing the subscription


def no_queue() -> QueueView | None:
    return None


@dataclass(frozen=True, slots=True)
class PageSources:
    """What the page shows beyond the store and the metrics; the daemon fills it in."""

    limits: LimitSettings = field(default_factory=LimitSettings)
    series: Series = field(default_factory=Series)
    queue: Callable[[], QueueView | None] = no_queue  # None: not known yet (recovering)
    refresh_seconds: float = REFRESH_SECONDS


async def overview(
    store: StoreReader,
    metrics: Metrics,
    readiness: Callable[[], str | None],
    sources: PageSources,
) -> dict[str, Any]:
    """The page's data, read now (raises StoreError when the store cannot be read)."""
    snapshot = await load_snapshot(store, Query(limit=FILES_SHOWN))
    failed = await load_snapshot(store, Query(statuses=frozenset({"failed"}), limit=FAILURES_SHOWN))
    readings = metrics.readings()
    totals = snapshot["totals"]
    rows_now = await store.tallies()
    view = sources.queue()
    backoff = view.backoff_seconds if view is not None else 0.0
    live = sources.series.now(rows_now.get("rows:processed", 0), readings.api_calls)
    reason = readiness()
    limits = sources.limits
    return {
        "version": __version__,
        "now": stamp(),
        "refresh_seconds": sources.refresh_seconds,
        "ready": {"ready": reason is None, "reason": reason},
        "queue": None if view is None else queue_entry(view, totals["chunks"]),
        "files": [page_file(e, backoff) for e in snapshot["files"]],
        "truncated": snapshot["truncated"],
        "totals": {
            **totals,
            "rows": readings.rows,
            "api_calls": readings.api_calls,
        },
        "held": held_chunks(snapshot["files"]),
        "rates": {
            "sample_seconds": SAMPLE_SECONDS,
            "span_seconds": KEEP_SECONDS,
            "points": [p.as_list() for p in sources.series.points(live)],
            "window_seconds": limits.api_window_seconds,
            "budget_per_window": limits.api_calls_per_window,
            "limit_per_window": constants.API_CALLS_PER_WINDOW,
        },
        "quota": quota_view(limits, readings.api_calls_today, snapshot.get("quota")),
        "failures": {
            "files": [failed_file(e) for e in failed["files"]],
            "chunks": failed_chunks([*snapshot["files"], *failed["files"]]),
            "errors": readings.errors,
        },
    }


# -- Marketo's queue ---------------------------------------------------------------------


def queue_entry(view: QueueView, chunks: dict[str, int]) -> dict[str, Any]:
    """The queue as counts per daemon and as places: `slots` are the queue's 10 places
    (ours first, then others', unknown creates, free), `import_slots` its 2 import places."""
    submitted = chunks.get("submitted", 0)
    importing = min(view.importing, submitted)
    here = DaemonSlots(
        THIS_DAEMON,
        importing=importing,
        queued=submitted - importing,
        creating=chunks.get("submitting", 0),
        local=True,
    )
    daemons = (here, *view.others)
    ours = sum(d.importing + d.queued + d.creating for d in daemons)
    held_elsewhere = view.foreign + view.phantoms
    free = max(0, constants.MAX_QUEUED_JOBS - ours - held_elsewhere)
    slots = [
        *(slot for d in daemons for slot in daemon_slots(d)),
        *places("foreign", view.foreign),
        *places("phantom", view.phantoms),
        *places("free", free),
    ]
    return {
        "places": constants.MAX_QUEUED_JOBS,
        "import_places": constants.MAX_IMPORTING_JOBS,
        "limit": view.limit,
        "daemons": [daemon_entry(d) for d in daemons],
        "foreign": view.foreign,
        "phantoms": view.phantoms,
        "free": free,
        "backoff_seconds": round(view.backoff_seconds, 1),
        "slots": slots[: constants.MAX_QUEUED_JOBS],
        "import_slots": import_slots(daemons, held_elsewhere),
    }


def daemon_entry(d: DaemonSlots) -> dict[str, Any]:
    return {
        "name": d.name,
        "local": d.local,
        "importing": d.importing,
        "queued": d.queued,
        "creating": d.creating,
    }


def daemon_slots(d: DaemonSlots) -> list[dict[str, Any]]:
    """A daemon's places in the queue: importing, then queued, then being created."""
    kinds = (("importing", d.importing), ("queued", d.queued), ("creating", d.creating))
    return [{"kind": kind, "daemon": d.name} for kind, n in kinds for _ in range(n)]


def places(kind: str, n: int) -> list[dict[str, Any]]:
    """`n` places nobody of ours holds."""
    return [{"kind": kind, "daemon": None} for _ in range(n)]


def import_slots(daemons: Iterable[DaemonSlots], held_elsewhere: int) -> list[dict[str, Any]]:
    """Marketo's 2 import places: ours where the poller last saw a job of ours importing.
    Marketo does not say whose job holds another place: it is "free" only when nobody
    else is believed to hold a place and none of ours waits, else "unknown"."""
    ours = [s for d in daemons for s in daemon_slots(d) if s["kind"] == "importing"]
    ours = ours[: constants.MAX_IMPORTING_JOBS]
    waiting = any(d.queued or d.creating for d in daemons)
    rest = "unknown" if held_elsewhere or waiting else "free"
    return ours + places(rest, constants.MAX_IMPORTING_JOBS - len(ours))


# -- files, held chunks, failures --------------------------------------------------------


def page_file(entry: dict[str, Any], backoff: float) -> dict[str, Any]:
    """A snapshot entry without its chunks, with what it waits for in `status`'s words."""
    state = entry["state"]
    return {
        "id": entry["id"],
        "route": entry["route"],
        "file": entry["file"],
        "status": entry["status"],
        "state": state,
        "waiting_for": waiting_for([state], backoff if state == "waiting" else 0.0),
        "chunks_done": entry["chunks_done"],
        "chunks_total": entry["chunks_total"],
        "rows": entry["rows"],
        "rows_processed": entry["rows_processed"],
        "rows_failed": entry["rows_failed"],
        "rows_with_warning": entry["rows_with_warning"],
        "error": entry["error"],
        "claimed_at": entry["claimed_at"],
        "finished_at": entry["finished_at"],
    }


def held_chunks(files: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks the key rule holds back, with why: the earlier chunks (`held_by`) that share
    record keys with them and are not done yet."""
    return [
        {
            "id": f["id"],
            "route": f["route"],
            "file": f["file"],
            "chunk": c["index"],
            "reason": held_reason(c["held_by"]),
        }
        for f in files
        for c in f["chunks"]
        if c.get("held_by")
    ]


def held_reason(held_by: list[dict[str, Any]]) -> str:
    """`waits for big.csv chunk 3 (and 2 more): they share record keys`."""
    first, *more = held_by
    also = f" (and {len(more)} more)" if more else ""
    return f"waits for {first['file']} chunk {first['chunk']}{also}: they share record keys"


def failed_file(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry["id"],
        "route": entry["route"],
        "file": entry["file"],
        "error": entry["error"],
        "finished_at": entry["finished_at"],
    }


def failed_chunks(files: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks that ended Failed, each once (a file may be in both lists), latest file first."""
    seen: set[tuple[str, int]] = set()
    found = []
    for f in files:
        for c in f["chunks"]:
            if c["status"] != "failed" or (f["id"], c["index"]) in seen:
                continue
            seen.add((f["id"], c["index"]))
            found.append(
                {
                    "id": f["id"],
                    "route": f["route"],
                    "file": f["file"],
                    "chunk": c["index"],
                    "batch_id": c["batch_id"],
                    "message": c["message"],
                }
            )
    return found[:FAILURES_SHOWN]


def quota_view(limits: LimitSettings, ours: float, kept: dict[str, Any] | None) -> dict[str, Any]:
    """Our calls today against the limit new jobs stop at (daily_quota - daily_reserve),
    and the subscription's own count (every integration's) as the daemon last reckoned
    it (`quota_entry`; None before it ever did)."""
    limit = max(0, limits.daily_quota - limits.daily_reserve)
    subscription = None
    if kept is not None:
        subscription = {
            "used": kept["used"],
            "quota": kept["daily_quota"],
            "reserve": kept["daily_reserve"],
            "read_at": kept["read_at"],
            "creates_paused": kept["creates_paused"],
            "reason": kept["reason"],
        }
    resets_at = kept["resets_at"] if kept else quota_resets_at(limits.quota_reset_tz, utc_now())
    return {
        "calls_today": ours,
        "daily_limit": limit,
        "reset_tz": limits.quota_reset_tz,
        "resets_at": resets_at,
        "subscription": subscription,
    }


def quota_resets_at(tz: str, now: datetime) -> str:
    """The next midnight where Marketo resets the daily quota, as a UTC stamp."""
    zone = ZoneInfo(tz)
    tomorrow = now.astimezone(zone).date() + timedelta(days=1)
    return stamp(datetime.combine(tomorrow, time(0), zone).astimezone(UTC))
