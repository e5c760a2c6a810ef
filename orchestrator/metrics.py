"""Prometheus metrics of one orchestrator, in a registry of its own.

`Metrics` is the observer the Marketo client and the scheduler report to
(`api_call`, `marketo_error`, `backoff`, `job_created`), plus a few setters for gauges the
daemon owns. File and chunk counts come from the state store's tallies at
scrape time (`refresh_from_store`): counts its triggers keep in the same
transaction as every change, so they never drift from the truth, and a scrape
reads a dozen rows however long the history (finished files stay counted until
retention prunes them).

Every label value comes from a bounded set: statuses are enums, error codes are
folded into Marketo's code ranges or a handful of transport names, and anything
that does not look like an identifier becomes "other". No file name is ever a
label value.
"""

from __future__ import annotations

import re
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from orchestrator import __version__
from orchestrator.models import (
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    Hold,
    QuotaState,
)

PREFIX: Final = "marketo_orchestrator"
ROW_OUTCOMES: Final = ("processed", "failed", "warned", "rejected")
OTHER: Final = "other"
# Files per job: 1 is a file of its own; packs of a few KB files reach the hundreds.
FILES_PER_JOB_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
TRANSPORT_CODES: Final = frozenset({"network", "timeout", "http-413"})
# Operation ids and reason names: letters, digits, '_' and '-'. No dots, so no file names.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


class StoreReader(Protocol):
    """The part of the state store that metrics and the status server read."""

    async def tallies(self) -> dict[str, int]: ...

    async def listing(
        self,
        *,
        limit: int | None,
        statuses: Iterable[FileStatus] | None = None,
        ticket: str | None = None,
        name_glob: str | None = None,
    ) -> list[FileRecord]: ...

    async def chunks_of(self, file_ids: Iterable[int]) -> list[ChunkRecord]: ...

    async def quota(self) -> QuotaState | None: ...

    async def holds(
        self, chunk_ids: Iterable[int] | None = None
    ) -> dict[int, tuple[Hold, ...]]: ...

    async def held_chunks(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Readings:
    """The counters a person reads on the status page, as /metrics has them now."""

    api_calls: int  # every operation together
    api_calls_today: int
    rows: dict[str, int]  # by outcome (ROW_OUTCOMES)
    errors: dict[str, int]  # by folded code, those seen at least once
    backoff_current: float


def error_code_label(code: str) -> str:
    """Fold an error code into a bounded label value.

    Marketo's REST codes live in 600-799 and its bulk codes in 1000-1099; those
    stay as they are. HTTP statuses fold to "http-4xx" / "http-5xx" (413 stays:
    it means a chunk of ours was too large). Anything else is "other".
    """
    if code in TRANSPORT_CODES:
        return code
    if code.isdigit() and (600 <= int(code) <= 799 or 1000 <= int(code) <= 1099):
        return code
    if code.startswith("http-") and code[5:].isdigit() and len(code) == 8:
        return f"http-{code[5]}xx" if code[5] in "45" else OTHER
    return OTHER


def name_label(value: str) -> str:
    """An operation name as a label value; odd strings become "other"."""
    return value if _IDENTIFIER.fullmatch(value) else OTHER


def reason_label(reason: str) -> str:
    """A backoff reason: error codes fold as in `error_code_label`, names stay."""
    folded = error_code_label(reason)
    return folded if folded != OTHER else name_label(reason)


class Metrics:
    """The orchestrator's metrics and the observer calls that feed them."""

    content_type: Final = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._define()
        self._build_info.labels(version=__version__).set(1)
        self.update_from_snapshot([], [])
        for outcome in ROW_OUTCOMES:
            self._rows.labels(outcome=outcome)

    def _define(self) -> None:
        reg = self.registry
        self._files = Gauge(f"{PREFIX}_files", "Source files by status.", ["status"], registry=reg)
        self._chunks = Gauge(f"{PREFIX}_chunks", "Chunks by status.", ["status"], registry=reg)
        self._jobs_outstanding = Gauge(
            f"{PREFIX}_jobs_outstanding",
            "Our import jobs at Marketo (chunks submitted, not yet finished).",
            registry=reg,
        )
        self._api_calls = Counter(
            f"{PREFIX}_api_calls_total",
            "Marketo API calls by operation (swagger operationId, or identity).",
            ["operation"],
            registry=reg,
        )
        self._api_calls_today = Gauge(
            f"{PREFIX}_api_calls_today",
            "Our API calls counted against today's quota.",
            registry=reg,
        )
        self._subscription_calls = Gauge(
            f"{PREFIX}_subscription_api_calls_today",
            "The subscription's API calls today, every integration's, as Marketo last "
            "counted them (stats/usage.json).",
            registry=reg,
        )
        self._quota_limit = Gauge(
            f"{PREFIX}_daily_quota_limit",
            "Calls the subscription may reach before no new job is created "
            "(limits.daily_quota - limits.daily_reserve).",
            registry=reg,
        )
        self._quota_paused = Gauge(
            f"{PREFIX}_quota_creates_paused",
            "1 while no new import job is created because of the daily quota.",
            registry=reg,
        )
        self._quota_reset = Gauge(
            f"{PREFIX}_quota_reset_timestamp_seconds",
            "When the daily quota resets next (Unix time).",
            registry=reg,
        )
        self._errors = Counter(
            f"{PREFIX}_marketo_errors_total",
            "Marketo error codes, HTTP failures and transport errors seen.",
            ["code"],
            registry=reg,
        )
        self._rows = Counter(f"{PREFIX}_rows_total", "Rows by outcome.", ["outcome"], registry=reg)
        self._jobs_created = Counter(
            f"{PREFIX}_jobs_created_total",
            "Import jobs Marketo created for us (a create answered with a batch id).",
            registry=reg,
        )
        self._files_per_job = Histogram(
            f"{PREFIX}_files_per_job",
            "Source files whose records each import job created carries (above 1: packed).",
            buckets=FILES_PER_JOB_BUCKETS,
            registry=reg,
        )
        self._backoff_seconds = Counter(
            f"{PREFIX}_backoff_seconds_total",
            "Seconds spent waiting in backoff, by reason.",
            ["reason"],
            registry=reg,
        )
        self._backoff_waits = Counter(
            f"{PREFIX}_backoff_waits_total", "Backoff waits, by reason.", ["reason"], registry=reg
        )
        self._held = Gauge(
            f"{PREFIX}_chunks_held",
            "Chunks the key rule holds back: an earlier chunk sharing record keys is not done.",
            registry=reg,
        )
        self._backoff_current = Gauge(
            f"{PREFIX}_backoff_current_seconds",
            "The scheduler's current backoff wait (0 when none).",
            registry=reg,
        )
        self._build_info = Gauge(
            f"{PREFIX}_build_info", "Version of the orchestrator.", ["version"], registry=reg
        )

    # The observer protocol of the Marketo client and the scheduler.

    def api_call(self, operation: str) -> None:
        """One API call was made (whatever its outcome)."""
        self._api_calls.labels(operation=name_label(operation)).inc()

    def marketo_error(self, code: str) -> None:
        """Marketo (or the way to it) answered with an error."""
        self._errors.labels(code=error_code_label(code)).inc()

    def backoff(self, reason: str, seconds: float) -> None:
        """A wait of `seconds` started because of `reason`."""
        label = reason_label(reason)
        self._backoff_waits.labels(reason=label).inc()
        self._backoff_seconds.labels(reason=label).inc(max(seconds, 0.0))

    def job_created(self, files: int) -> None:
        """Marketo gave a batch id for a chunk holding the records of `files` source files."""
        self._jobs_created.inc()
        self._files_per_job.observe(files)

    # Setters for what the daemon owns.

    def rows(self, outcome: str, n: int) -> None:
        """Count `n` rows with `outcome` (processed, failed, warned or rejected)."""
        if outcome not in ROW_OUTCOMES:
            raise ValueError(f"unknown row outcome {outcome!r}; expected one of {ROW_OUTCOMES}")
        if n > 0:
            self._rows.labels(outcome=outcome).inc(n)

    def set_backoff_current(self, seconds: float) -> None:
        self._backoff_current.set(max(seconds, 0.0))

    def set_api_calls_today(self, n: int) -> None:
        self._api_calls_today.set(n)

    def set_quota(self, state: QuotaState) -> None:
        """The daily quota as the Marketo client reckons it."""
        self._subscription_calls.set(state.marketo_count or 0)
        self._quota_limit.set(state.limit)
        self._quota_paused.set(1 if state.creates_paused else 0)
        self._quota_reset.set(state.resets_at.timestamp())

    # Gauges read from the store.

    def update_from_snapshot(
        self, files: Iterable[FileRecord], chunks: Iterable[ChunkRecord]
    ) -> None:
        """Set the file, chunk and outstanding-job gauges from store records."""
        file_counts = Tally(f.status for f in files)
        chunk_counts = Tally(c.status for c in chunks)
        for file_status in FileStatus:
            self._files.labels(status=file_status.value).set(file_counts[file_status])
        for chunk_status in ChunkStatus:
            self._chunks.labels(status=chunk_status.value).set(chunk_counts[chunk_status])
        self._jobs_outstanding.set(chunk_counts[ChunkStatus.SUBMITTED])

    def update_from_tallies(self, tallies: Mapping[str, int]) -> None:
        """Set the file, chunk and outstanding-job gauges from the store's tallies."""
        for file_status in FileStatus:
            self._files.labels(status=file_status.value).set(
                tallies.get(f"files:{file_status.value}", 0)
            )
        for chunk_status in ChunkStatus:
            self._chunks.labels(status=chunk_status.value).set(
                tallies.get(f"chunks:{chunk_status.value}", 0)
            )
        self._jobs_outstanding.set(tallies.get(f"chunks:{ChunkStatus.SUBMITTED.value}", 0))

    async def refresh_from_store(self, store: StoreReader) -> None:
        """Read the store's tallies (a few rows, whatever the history) and the chunks held
        back (chunks in flight only), and set the gauges."""
        self.update_from_tallies(await store.tallies())
        self._held.set(await store.held_chunks())

    def readings(self) -> Readings:
        """The values the status page shows beside its charts, read from the registry, so
        they are the numbers a scrape of /metrics gives at the same moment."""
        return Readings(
            api_calls=int(sum(by_label(self._api_calls, "operation").values())),
            api_calls_today=int(self._gauge("api_calls_today")),
            rows={k: int(v) for k, v in by_label(self._rows, "outcome").items()},
            errors={k: int(v) for k, v in by_label(self._errors, "code").items() if v},
            backoff_current=self._gauge("backoff_current_seconds"),
        )

    def _gauge(self, name: str) -> float:
        return self.registry.get_sample_value(f"{PREFIX}_{name}") or 0.0

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def by_label(counter: Counter, label: str) -> dict[str, float]:
    """A counter's `_total` samples by the value of its one label."""
    return {
        sample.labels[label]: sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
