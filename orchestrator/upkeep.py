"""Housekeeping beside the pipeline: the token, the day's API call count, the
daily quota, readiness, Marketo's refusals and retention.

Refusals: what Marketo refuses for a reason of configuration (refused
credentials, 603: the API role or an IP allow-list), as the client learns it
from every call (`marketo.access`), is mirrored into the state store whenever it
changes, empty again once calls succeed, so `submit --wait` and the Python API
learn why nothing moves; readiness says it; `run --once` stops on it (exit 3,
nothing failed). A long-running daemon keeps working at it: the scheduler's next
create after a backoff, and the poller's next status call, are the probes.

The daily quota: Marketo's own count of the subscription's calls today is read
at the start and whenever a reading is due (`usage_keeper`; the scheduler reads
it too before a create when it is due), and every `PERSIST_SECONDS` the quota as
reckoned goes to the store (for `status`) and to /metrics, with the day's count
of our own calls. With several daemons (a coordination database), the figure is
the subscription's: the keeper takes it from the database every
`SHARED_USAGE_LOOK_SECONDS` (the others' calls move it), and only the daemon that
finds the shared reading old reads Marketo's count.

Retention: every `retention.interval` seconds, finished files that finished
more than `retention.keep_days` ago leave the state store (with their chunks
and set-aside records), `PRUNE_BATCH` files per transaction, so the daemon's
own writes never wait long behind a sweep. Their result files stay on disk.

None of it moves a file forward; all of it runs as long-lived tasks in the
daemon's TaskGroup and stops when the daemon's `stop` event is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog

from orchestrator.backoff import Backoff
from orchestrator.clock import stamp, utc_now, wait_for_any
from orchestrator.config import Settings
from orchestrator.errors import CredentialsError, FatalError, MarketoError
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.store import Store

log = structlog.get_logger(__name__)

PERSIST_SECONDS = 5.0  # how often the day's API call count is written to the store
USAGE_LOOK_SECONDS = 1.0  # the least time between two looks at whether a reading is due
SHARED_USAGE_LOOK_SECONDS = PERSIST_SECONDS  # several daemons: the shared figure, this often
PRUNE_BATCH = 200  # finished files forgotten per transaction


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
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.pruned_total = 0
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

        Refused credentials end `run --once` (nothing can be imported; nothing is failed);
        a long-running daemon keeps asking, with backoff: the client reads its secret file
        again on each refusal, so a rotated secret is picked up without a restart."""
        try:
            await self._get_first_token(stop, once=once)
        finally:
            self.token_settled.set()

    async def _get_first_token(self, stop: asyncio.Event, *, once: bool) -> None:
        attempt = 0
        while not stop.is_set() and not self.client.has_token:
            unreachable: MarketoError | None = None
            try:
                await self.client.ensure_token()
                break
            except CredentialsError as exc:
                self.credentials_refused = str(exc)
                log.error("identity_refused", error=str(exc))
                self.token_settled.set()  # Marketo answered: a refusal
                if once:
                    stop.set()
                    return
            except FatalError as exc:
                log.error("identity_refused", error=str(exc))
                return
            except MarketoError as exc:
                unreachable = exc
            attempt += 1
            delay = self.backoff.delay(attempt)
            if unreachable is not None:
                log.warning(
                    "identity_unreachable", error=str(unreachable), retry_in=round(delay, 2)
                )
            await wait_for_any(stop, within=delay)
        if self.client.has_token:
            self.credentials_refused = None

    async def watch_refusals(self, stop: asyncio.Event, *, once: bool) -> None:
        """Mirror Marketo's refusals into the state store at every change (at start:
        none yet, whatever an earlier run left); with `once`, a refusal ends the run."""
        access = self.client.access
        while not stop.is_set():
            access.changed.clear()
            refusals = access.refusals
            await self.store.set_refusals(refusals)
            if refusals and once:
                log.error("marketo_refused", error=refusals[0].message)
                stop.set()
                return
            await wait_for_any(access.changed, stop, within=None)

    def refusal(self) -> str | None:
        """Why Marketo refuses the daemon (credentials, 603), or None."""
        return self.credentials_refused or self.client.access.problem

    async def usage_keeper(self, stop: asyncio.Event) -> None:
        """Read Marketo's count of the subscription's calls today now and whenever a
        reading is due, while the credentials hold (the token keeper sees to them)."""
        await wait_for_any(self.token_settled, stop, within=None)
        while not stop.is_set():
            if self.client.identity_ok:
                await self.client.refresh_usage()
                await self.save_calls()
            quota = self.client.quota
            due = quota.next_read_at or quota.as_of
            seconds = max(USAGE_LOOK_SECONDS, (due - quota.as_of).total_seconds())
            if self.client.shared is not None:
                seconds = min(seconds, SHARED_USAGE_LOOK_SECONDS)
            await wait_for_any(stop, within=seconds)

    async def persist_calls(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_for_any(stop, within=PERSIST_SECONDS)
            await self.save_calls()

    async def save_calls(self) -> None:
        """Our calls of the day and the quota as reckoned, to the store and /metrics."""
        used = self.client.calls_today
        delta = used - self.persisted_calls if used >= self.persisted_calls else used
        if delta:
            await self.store.add_api_calls(quota_day(self.settings), delta)
        self.persisted_calls = used
        quota = self.client.quota
        await self.store.save_quota(quota)
        self.metrics.set_api_calls_today(used)
        self.metrics.set_quota(quota)

    async def retention(self, stop: asyncio.Event) -> None:
        """Prune finished files past `retention.keep_days`, now and every interval."""
        keep = self.settings.retention
        if keep.keep_days <= 0:
            return
        while not stop.is_set():
            await self.prune(stop)
            await wait_for_any(stop, within=keep.interval)

    async def prune(self, stop: asyncio.Event | None = None) -> int:
        """One sweep, in small transactions; how many files left the store."""
        cutoff = stamp(self.clock() - timedelta(days=self.settings.retention.keep_days))
        pruned = 0
        while stop is None or not stop.is_set():
            n = await self.store.prune_finished(before=cutoff, limit=PRUNE_BATCH)
            pruned += n
            if n < PRUNE_BATCH:
                break
        if pruned:
            self.pruned_total += pruned
            log.info("retention_pruned", files=pruned, finished_before=cutoff)
        return pruned

    def token_problem(self) -> str | None:
        """Why Marketo cannot be called now (readiness), or None.

        Ready means the last identity call succeeded, the credentials were not
        refused and no call is refused for the API role's permissions (603); a
        token that merely expired while the daemon was idle is no problem (the next
        call fetches another)."""
        ok = self.client.identity_ok
        if ok is None:
            return self.refusal() or "no Marketo access token obtained yet"
        if not ok:
            return self.refusal() or "the last Marketo identity call failed"
        return self.client.access.problem
