"""What values the settings accept: each numeric key's range (`RANGES`, one table),
each route's keys for its object, and the relations between keys (`validate`).

Every problem is a `ConfigError` naming the key. The chunk-size bound is checked
here for the config (`limits.max_chunk_bytes`) and for `split --max-bytes` alike
(`chunk_bytes_problem`): one range, one maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from orchestrator import constants
from orchestrator.config.settings import Route, Settings, parse_listen
from orchestrator.delimited import FORMATS
from orchestrator.errors import ConfigError
from orchestrator.models import ObjectType

MIN_CHUNK_BYTES = 256  # smallest chunk limit accepted (a header and a few records)


@dataclass(frozen=True, slots=True)
class Range:
    """The values a numeric key accepts: from `low` (itself allowed if `low_ok`) to `high`."""

    low: float
    high: float = math.inf
    low_ok: bool = False
    unit: str = ""  # said after each bound: "seconds", "bytes"
    why: str = ""  # said after the upper bound: where it comes from
    note: str = ""  # said after the lower bound

    def problem(self, value: float) -> str | None:
        """What is wrong with `value`, or None."""
        if not math.isfinite(value):
            return f"must be a finite number, not {value}"
        if value < self.low or (value == self.low and not self.low_ok):
            bound = "at least" if self.low_ok else "greater than"
            return said(f"must be {bound} {self.amount(self.low)}, not {number(value)}", self.note)
        if value > self.high:
            return said(f"must be at most {self.amount(self.high)}, not {number(value)}", self.why)
        return None

    def amount(self, bound: float) -> str:
        return f"{number(bound)} {self.unit}" if self.unit else number(bound)


def said(message: str, aside: str) -> str:
    return f"{message} ({aside})" if aside else message


def number(value: float) -> str:
    """A bound or value as written in a config file: 9995904, 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Every numeric key of every section. [limits] keys that Marketo itself bounds are capped
# at Marketo's limit (saying where it comes from); the other bounds catch unit mistakes
# (milliseconds for seconds, say). Relations between keys are checked in `validate`.
SECONDS, DAY = "seconds", 86400.0
RANGES: dict[str, Range] = {
    "marketo.request_timeout": Range(0.0, 600.0, unit=SECONDS),  # per HTTP request
    "limits.concurrent_jobs": Range(
        0, constants.MAX_IMPORTING_JOBS, why="Marketo imports 2 jobs at once"
    ),
    "limits.queued_jobs": Range(
        0, constants.MAX_QUEUED_JOBS, why="Marketo queues at most 10 import jobs"
    ),
    "limits.max_chunk_bytes": Range(
        MIN_CHUNK_BYTES,
        constants.MAX_CHUNK_BYTES_CAP,
        low_ok=True,
        unit="bytes",
        why="Marketo refuses a request body of 10,000,000 bytes or more, "
        "multipart envelope included",
    ),
    "limits.api_calls_per_window": Range(
        0,
        constants.API_CALLS_PER_WINDOW,
        why="Marketo allows 100 calls per 20 s for the whole subscription",
    ),
    "limits.api_window_seconds": Range(0.0, 3600.0, unit=SECONDS),
    "limits.concurrent_api_calls": Range(
        0,
        constants.CONCURRENT_API_CALLS,
        why="Marketo allows 10 calls in flight for the whole subscription",
    ),
    "limits.max_resubmits": Range(
        0, low_ok=True, note="0 fails a file at its first unknown outcome"
    ),
    "limits.daily_quota": Range(0),  # a subscription may buy more than 50,000
    "limits.daily_reserve": Range(
        0, low_ok=True, note="0 leaves nothing of the quota to other integrations"
    ),
    "limits.pack_wait_seconds": Range(
        0.0,
        3600.0,
        low_ok=True,
        unit=SECONDS,
        note="0 seals a pack as soon as no claimed file waits to be split",
    ),
    "polling.interval": Range(0.0, 3600.0, unit=SECONDS),
    "polling.max_interval": Range(0.0, 3600.0, unit=SECONDS),
    "backoff.initial": Range(0.0, 3600.0, unit=SECONDS),
    "backoff.max": Range(0.0, DAY, unit=SECONDS),
    "watch.settle_seconds": Range(0.0, 3600.0, low_ok=True, unit=SECONDS),
    "retention.keep_days": Range(0.0, low_ok=True, unit="days", note="0 keeps every file"),
    "retention.interval": Range(0.0, DAY, unit=SECONDS),
    "coordination.lease_seconds": Range(1.0, 3600.0, low_ok=True, unit=SECONDS),
}
ROUTE_IDS = ("list_id", "program_id")
MAX_MARKETO_ID = 2**31 - 1  # Marketo's ids are 32-bit integers


def check_ranges(settings: Settings) -> None:
    """Every numeric key within its range; ConfigError naming the key."""
    for key, allowed in RANGES.items():
        section, _, name = key.partition(".")
        problem = allowed.problem(getattr(getattr(settings, section), name))
        if problem is not None:
            raise ConfigError(key, problem)
    for i, route in enumerate(settings.routes):
        for name in ROUTE_IDS:
            if getattr(route, name) > MAX_MARKETO_ID:
                raise ConfigError(f"routes[{i}].{name}", f"must be at most {MAX_MARKETO_ID}")


def chunk_bytes_problem(max_bytes: int) -> str | None:
    """What is wrong with `max_bytes` as a chunk's size limit, or None: the range of
    limits.max_chunk_bytes, for the config and for `split --max-bytes` alike."""
    return RANGES["limits.max_chunk_bytes"].problem(max_bytes)


LEAD_ONLY = ("lookup_field", "list_id", "partition_name")
UNKNOWN_COLUMNS = ("warn", "fail")  # what a header column that matches no field does


def validate_route(where: str, route: Route) -> None:
    if (
        "/" in route.dir
        or "\\" in route.dir
        or route.dir in (".", "..")
        or route.dir.startswith(".")
    ):
        raise ConfigError(f"{where}.dir", "must be a plain directory name")
    if route.format and route.format not in FORMATS:
        raise ConfigError(f"{where}.format", "must be csv, tsv, ssv or empty")
    if route.unknown_columns not in UNKNOWN_COLUMNS:
        raise ConfigError(f"{where}.unknown_columns", 'must be "warn" or "fail"')
    names = [name.strip() for name in route.key_columns]
    if not all(names) or len({n.casefold() for n in names}) != len(names):
        raise ConfigError(f"{where}.key_columns", "must name distinct, non-empty columns")
    if route.list_id < 0 or route.program_id < 0:
        key = "list_id" if route.list_id < 0 else "program_id"
        raise ConfigError(f"{where}.{key}", "must not be negative")
    if route.object is not ObjectType.LEADS:
        for key in LEAD_ONLY:
            if getattr(route, key):
                raise ConfigError(f"{where}.{key}", 'applies to object = "leads" only')
    if route.object is not ObjectType.CUSTOM_OBJECT and route.api_name:
        raise ConfigError(f"{where}.api_name", 'applies to object = "customobject" only')
    if route.object is not ObjectType.PROGRAM_MEMBERS:
        for key in ("program_id", "program_member_status"):
            if getattr(route, key):
                raise ConfigError(f"{where}.{key}", 'applies to object = "programmembers" only')
    if route.object is ObjectType.CUSTOM_OBJECT and not route.api_name:
        raise ConfigError(f"{where}.api_name", 'is required for object = "customobject"')
    if route.object is ObjectType.PROGRAM_MEMBERS:
        if not route.program_id:
            raise ConfigError(f"{where}.program_id", 'is required for object = "programmembers"')
        if not route.program_member_status:
            raise ConfigError(
                f"{where}.program_member_status", 'is required for object = "programmembers"'
            )


def validate(settings: Settings, *, require_credentials: bool) -> None:
    """Checks beyond one number's range (`check_ranges`, run first): URLs, credentials,
    relations between keys, names from a fixed set."""
    m, lim = settings.marketo, settings.limits
    for key in ("base_url", "identity_url"):
        url = getattr(m, key)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ConfigError(f"marketo.{key}", "must be an http(s) URL")
    if require_credentials:
        for key in ("base_url", "client_id", "client_secret"):
            if not getattr(m, key):
                env = "MARKETO_" + key.upper()
                raise ConfigError(f"marketo.{key}", f"is required (set it or {env})")
    if lim.queued_jobs < lim.concurrent_jobs:
        raise ConfigError("limits.queued_jobs", "must be at least limits.concurrent_jobs")
    if lim.daily_reserve >= lim.daily_quota:
        raise ConfigError(
            "limits.daily_reserve",
            f"must be less than limits.daily_quota ({lim.daily_quota}): "
            "no job could ever be created",
        )
    url = settings.coordination.url
    if url and (urlsplit(url).scheme not in ("postgresql", "postgres")):
        # Never echo the URL: it may hold a password.
        raise ConfigError(
            "coordination.url", "must be a postgresql:// URL (or empty: this daemon alone)"
        )
    try:
        ZoneInfo(lim.quota_reset_tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("limits.quota_reset_tz", "is not a known time zone") from None
    if settings.polling.max_interval < settings.polling.interval:
        raise ConfigError("polling.max_interval", "must be at least polling.interval")
    if settings.backoff.max < settings.backoff.initial:
        raise ConfigError("backoff.max", "must be at least backoff.initial")
    if settings.logging.format not in ("json", "console", "auto"):
        raise ConfigError("logging.format", "must be json, console or auto")
    if settings.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("logging.level", "must be debug, info, warning or error")
    if settings.http.listen:
        parse_listen(settings.http.listen, "http.listen")
