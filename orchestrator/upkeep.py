"""Housekeeping beside the pipeline: the token, the day's API call count,
readiness, and the `--once` progress line on a terminal.

None of it moves a file forward; all of it runs as long-lived tasks in the
daemon's TaskGroup and stops when the daemon's `stop` event is set.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import structlog

from orchestrator import logs
from orchestrator.backoff import Backoff
from orchestrator.clock import wait_for_any
from orchestrator.config import Settings
from orchestrator.errors import CredentialsError, FatalError, MarketoError
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.status import WAITING_FOR, load_snapshot
from orchestrator.store import Store

log = structlog.get_logger(__name__)

PERSIST_SECONDS = 5.0  # how often the day's API call count is written to the store
PROGRESS_SECONDS = 1.0  # how often the progress line is redrawn


def quota_day(settings: Settings) -> str:
    """The date of the quota's day, in the zone where Marketo resets it."""
    return datetime.now(ZoneInfo(settings.limits.quota_reset_tz)).date().isoformat()


class Upkeep:
    """Token, API call count and readiness of one daemon."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: MarketoClient,
        metrics: Metrics,
        *,
        persisted_calls: int,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.metrics = metrics
        self.persisted_calls = persisted_calls
        self.credentials_refused: str | None = None
        # Set once Marketo answered the first token request (a token, or a refusal).
        self.token_settled = asyncio.Event()
        self.backoff = Backoff(settings.backoff.initial, settings.backoff.max)

    async def token_keeper(self, stop: asyncio.Event, *, once: bool) -> None:
        """Get a token early (readiness needs one); retry quietly while Marketo is unreachable.

        Refused credentials end `run --once` (nothing can be imported; nothing is failed)."""
        try:
            await self._get_first_token(stop, once=once)
        finally:
            self.token_settled.set()

    async def _get_first_token(self, stop: asyncio.Event, *, once: bool) -> None:
        attempt = 0
        while not stop.is_set() and not self.client.has_token:
            try:
                await self.client.ensure_token()
                return
            except CredentialsError as exc:
                self.credentials_refused = str(exc)
                log.error("identity_refused", error=str(exc))
                if once:
                    stop.set()
                return
            except FatalError as exc:
                log.error("identity_refused", error=str(exc))
                return
            except MarketoError as exc:
                attempt += 1
                delay = self.backoff.delay(attempt)
                log.warning("identity_unreachable", error=str(exc), retry_in=round(delay, 2))
                await wait_for_any(stop, within=delay)

    async def persist_calls(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_for_any(stop, within=PERSIST_SECONDS)
            await self.save_calls()

    async def save_calls(self) -> None:
        used = self.client.calls_today
        delta = used - self.persisted_calls if used >= self.persisted_calls else used
        if delta:
            await self.store.add_api_calls(quota_day(self.settings), delta)
        self.persisted_calls = used
        self.metrics.set_api_calls_today(used)

    def token_problem(self) -> str | None:
        """Why Marketo cannot be called now (readiness), or None."""
        if self.credentials_refused:
            return self.credentials_refused
        if not self.client.has_token:
            return "no Marketo access token obtained yet"
        return None


async def progress(
    store: Store, backoff_remaining: Callable[[], float], stop: asyncio.Event
) -> None:
    """A live line on the terminal: files, chunks, rows, rate, what the work waits for;
    kept apart from log lines (`logs.LiveLine`), left as an ordinary line at the end."""
    live = logs.LiveLine(sys.stderr)
    start = time.monotonic()
    try:
        while True:
            live.show(await progress_line(store, backoff_remaining(), time.monotonic() - start))
            if stop.is_set():
                break
            await wait_for_any(stop, within=PROGRESS_SECONDS)
    finally:
        live.close(keep=True)


async def progress_line(store: Store, backoff: float, elapsed: float) -> str:
    snap = await load_snapshot(store)
    files = snap["files"]
    done = sum(1 for f in files if f["status"] in ("complete", "failed"))
    chunks_done = sum(f["chunks_done"] for f in files)
    chunks_total = sum(f["chunks_total"] or 0 for f in files)
    rows = sum(f["rows_processed"] or 0 for f in files)
    line = f"files {done}/{len(files)}  chunks {chunks_done}/{chunks_total}  rows {rows}"
    if rows and elapsed > 0:
        line += f"  {rows / elapsed:,.0f} rows/s"
    if backoff:
        return line + f"  waiting for: a backoff ({backoff:.0f}s)"
    states = [f["state"] for f in files if f["status"] not in ("complete", "failed")]
    for state in ("importing", "queued", "waiting", "splitting", "claimed", "finishing"):
        if state in states:
            return line + f"  waiting for: {WAITING_FOR[state]}"
    return line
