"""The knobs of one simulated subscription; the defaults are a fresh Marketo one.

`KNOB_HELP` says what each knob does, and what the simulator assumes where
Marketo's documentation is silent; the standalone command's --help shows it, one
flag per knob (`simulator.arguments`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields, replace
from typing import Any

from orchestrator import constants
from orchestrator.simulator.fields import (
    CAR,
    LEAD_FIELDS,
    PROGRAM_MEMBER_FIELDS,
    CustomObject,
    custom_objects_knob,
)

# Marketo error codes the fault knobs can answer with (`fault_<code>`).
FAULT_CODES = ("601", "602", "606", "608", "611", "615", "604", "605")
# Codes 500 and 502 inside an HTTP 200 envelope (`fault_envelope_<code>`); not HTTP statuses.
ENVELOPE_FAULT_CODES = ("500", "502")
# The API role's Read-Write grants (`permissions`), and every grant it may name.
PERMISSIONS = ("leads", "customobjects")
GRANTS = (*PERMISSIONS, "leads:read", "customobjects:read")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Knobs of one simulated subscription; the defaults are a fresh Marketo one.

    `client_id`/`client_secret` None accept any credentials. Fault knobs are
    fractions (0.0 to 1.0) of bulk calls: `fault_500`/`fault_503` answer with
    that HTTP status, `fault_6xx` with that Marketo error code, `slow_fraction`
    waits `slow_seconds` before answering, `drop_fraction` closes the
    connection without an answer, `drop_reply_fraction` lets the call take effect
    (a create queues its job) and then closes the connection instead of
    answering, so the client cannot know the outcome. `late_reply_fraction` lets the
    call take effect (a create queues its job) and then holds the answer
    `late_reply_seconds`, past a client's read timeout; `late_reply_copies` does so
    for the first N creates of every distinct file (the same chunk sent again).
    `fault_envelope_500` and
    `fault_envelope_502` answer HTTP 200 with error code 500 or 502 in `errors[]`.
    `omit_empty` leaves empty `errors`,
    `warnings` and `result` arrays out of envelopes, as the live service often
    does (the Swagger schema lists them as required, so they are in by default).

    Shared limits: `foreign_calls_per_window` calls of another integration sit in
    every sliding window and `foreign_in_flight` of its calls are always in flight,
    so 606 and 615 come sooner, as they do when a subscription has other users.
    `quota_reset_utc` ("HH:MM", "" never) resets the daily quota at that time of
    day in UTC on the simulator's wall clock (`Simulator.wall_clock`), e.g. "05:00"
    for Chicago midnight in summer, "06:00" for a fixed CST. `dedupe_field`, when
    set, is every custom object's one dedupe field instead of its declared ones; a
    file whose header does not name a dedupe field exactly fails every row
    (missing.dedupe.fields).
    `read_bytes_per_second` (0: no limit) reads upload bodies at that pace, as a
    slow uplink would deliver them. `keep_records` False checks every row as usual
    (failures and warnings files alike) but forgets the records once their job is
    done, so a benchmark can send gigabytes without the simulator holding them.

    Failures and warnings files: `omit_empty_values` leaves empty values, and their
    columns, out of the rows (the file's header lists only the columns that have a
    value in at least one of its rows, plus the reason). Adobe documents no per-row
    shape; this is our reading of a Marketo expert's public write-up, where a row that
    failed for an empty email came back without the email column. `files_content_type`
    is the Content-Type they are served with: text/csv, or application/json as Adobe's
    OpenAPI declares for these endpoints (the body is CSV either way).

    Creates and status calls as Marketo's documentation allows them to go:
    `fault_502_after_create` (a fraction of creates) makes the job, then answers an
    envelope with code 502 ("Bad gateway", which Adobe calls "likely a timeout"), so
    the client cannot know the job exists. `create_failed_fraction` answers a
    fraction of creates `"status": "Failed"` with a message, and makes no job (the
    batch id is spent; its status says Failed). `forget_batches_after` (seconds, 0
    never) forgets a batch id that long after its create, as Marketo does after
    seven days: its status, failures and warnings answer 610 "Requested resource not
    found" (Adobe documents no code for an unknown or expired batch id; 610 is its
    code for a resource that does not exist). `permissions` is the API role's grants,
    comma-separated: `leads` (Read-Write Lead) and `customobjects` (Read-Write Custom
    Object), or `leads:read` and `customobjects:read` (Read-Only). Every Bulk Import
    call (create, status, failures, warnings) needs the Read-Write grant of its object
    (program members: Read-Write Lead), as Adobe's OpenAPI says; a call without it is
    answered 603 "Access denied". Read-only calls (describe) take either grant. ""
    grants nothing, as an IP allow-list that refuses the caller would.

    The subscription's objects, as its describe calls answer (`simulator.fields`):
    `lead_fields` (a column of a lead file that names none of them is ignored, as
    Marketo ignores it; empty: every column is kept), `custom_objects` (each with its
    fields and dedupe fields; records dedupe on those; an object not declared is not
    found) and `program_member_fields`.

    Rows are applied one at a time while their job imports (`simulator.importing`).
    `reverse_rows` applies each job's rows last first (Marketo documents no order
    inside a job). `twin_window` (seconds, 0 never): a job that adds a record whose key
    another job added less than this long ago makes a twin record, as Marketo does
    when two imports add one new key at once (leads and custom objects); a later row
    by that key then fails with 1007 (`simulator.records`).
    """

    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    token_ttl: float = float(constants.TOKEN_TTL_SECONDS)
    rows_per_second: float = 1000.0
    job_overhead: float = 0.5
    rate_limit: int = constants.API_CALLS_PER_WINDOW
    rate_window: float = constants.API_WINDOW_SECONDS
    concurrency: int = constants.CONCURRENT_API_CALLS
    max_importing: int = constants.MAX_IMPORTING_JOBS
    max_queued: int = constants.MAX_QUEUED_JOBS
    max_file_bytes: int = constants.MAX_FILE_BYTES
    daily_quota: int = constants.DAILY_QUOTA
    warn_marker: str = "__WARN__"
    seed: int | None = None
    omit_empty: bool = False
    fault_500: float = 0.0
    fault_503: float = 0.0
    fault_601: float = 0.0
    fault_602: float = 0.0
    fault_606: float = 0.0
    fault_608: float = 0.0
    fault_611: float = 0.0
    fault_615: float = 0.0
    slow_fraction: float = 0.0
    slow_seconds: float = 0.0
    drop_fraction: float = 0.0
    drop_reply_fraction: float = 0.0
    late_reply_fraction: float = 0.0
    late_reply_seconds: float = 0.0
    late_reply_copies: int = 0
    fault_envelope_500: float = 0.0
    fault_envelope_502: float = 0.0
    foreign_calls_per_window: int = 0
    foreign_in_flight: int = 0
    quota_reset_utc: str = ""
    dedupe_field: str = ""
    read_bytes_per_second: float = 0.0
    keep_records: bool = True
    omit_empty_values: bool = False
    files_content_type: str = "text/csv"
    fault_502_after_create: float = 0.0
    create_failed_fraction: float = 0.0
    forget_batches_after: float = 0.0
    permissions: str = ",".join(PERMISSIONS)
    fault_604: float = 0.0
    fault_605: float = 0.0
    foreign_usage_today: int = 0
    partitions: str = ""
    lead_fields: tuple[str, ...] = LEAD_FIELDS
    custom_objects: tuple[CustomObject, ...] = (CAR,)
    program_member_fields: tuple[str, ...] = PROGRAM_MEMBER_FIELDS
    reverse_rows: bool = False
    twin_window: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("fault_") or f.name.endswith("_fraction"):
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"knob {f.name!r} is a fraction between 0 and 1")
            elif f.type in ("int", "float") and value < 0:
                raise ValueError(f"knob {f.name!r} cannot be negative")
        if self.rows_per_second <= 0:
            raise ValueError("knob 'rows_per_second' must be positive")
        if self.quota_reset_utc and time_of_day(self.quota_reset_utc) is None:
            raise ValueError("knob 'quota_reset_utc' must be HH:MM (UTC) or empty")
        unknown = set(self.grants) - set(GRANTS)
        if unknown:
            raise ValueError(
                f"knob 'permissions' grants {', '.join(sorted(unknown))}: "
                f"not among {', '.join(GRANTS)}"
            )

    @property
    def grants(self) -> frozenset[str]:
        """The API role's grants, as `permissions` names them."""
        return frozenset(g.strip() for g in self.permissions.split(",") if g.strip())

    @property
    def partition_names(self) -> tuple[str, ...]:
        """`partitions` as names; empty: the subscription has no lead partitions set up."""
        return tuple(name.strip() for name in self.partitions.split(",") if name.strip())

    @property
    def quota_reset(self) -> dt.timedelta | None:
        """`quota_reset_utc` as the time since midnight UTC; None: the quota never resets."""
        return time_of_day(self.quota_reset_utc) if self.quota_reset_utc else None

    def custom_object(self, api_name: str) -> CustomObject | None:
        """The declared custom object of that API name, if there is one."""
        return next((obj for obj in self.custom_objects if obj.name == api_name), None)

    def dedupe_fields(self, api_name: str) -> tuple[str, ...]:
        """What records of the custom object dedupe on: the `dedupe_field` knob when set,
        else its declared dedupe fields (none for an object not declared)."""
        if self.dedupe_field:
            return (self.dedupe_field,)
        obj = self.custom_object(api_name)
        return obj.dedupe_fields if obj is not None else ()

    def with_knobs(self, **changes: Any) -> SimulatorConfig:
        """A copy with `changes` applied; unknown names and wrong types raise ValueError."""
        types = {f.name: str(f.type) for f in fields(self)}
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in types:
                raise ValueError(f"unknown knob {name!r}")
            clean[name] = coerce_knob(name, value, types[name])
        return replace(self, **clean)

    def public(self) -> dict[str, Any]:
        """Every knob but the client secret, which shows only whether one is set."""
        knobs = {f.name: getattr(self, f.name) for f in fields(self)}
        knobs["client_secret"] = "***" if self.client_secret is not None else None
        knobs["custom_objects"] = {obj.name: obj.public() for obj in self.custom_objects}
        return knobs


def time_of_day(text: str) -> dt.timedelta | None:
    """The time since midnight that `text` ("HH:MM") names; None if it names none."""
    hour, _, minute = text.partition(":")
    if not (hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
        return None
    return dt.timedelta(hours=int(hour), minutes=int(minute))


def coerce_knob(name: str, value: Any, annotation: str) -> Any:
    """Check (and widen int to float) one knob value against its annotation."""
    if value is None and annotation.endswith("| None"):
        return None
    if annotation == "tuple[CustomObject, ...]":
        return custom_objects_knob(value)
    if annotation == "tuple[str, ...]":
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"knob {name!r} must be a list of field names")
    base = annotation.split(" |")[0]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if base == "float" and is_number:
        return float(value)
    if base == "int" and is_number and float(value).is_integer():
        return int(value)
    if (base == "str" and isinstance(value, str)) or (base == "bool" and isinstance(value, bool)):
        return value
    raise ValueError(f"knob {name!r} must be {annotation}")


# What each knob does (the standalone command's --help); a fraction knob is the share of
# bulk calls (0.0 to 1.0) it applies to. Where Marketo's documentation is silent the
# text says what the simulator assumes.
KNOB_HELP: dict[str, str] = {
    "client_id": "accept only this client id (default: any)",
    "client_secret": "accept only this client secret (default: any)",
    "token_ttl": "access token life in seconds",
    "rows_per_second": "import speed",
    "job_overhead": "seconds every job takes on top of its rows",
    "rate_limit": "calls per rate_window (606 beyond)",
    "rate_window": "the rate limit's sliding window, in seconds",
    "concurrency": "calls in flight (615 beyond)",
    "max_importing": "jobs importing at once",
    "max_queued": "jobs queued, importing ones included (1016 beyond)",
    "max_file_bytes": "largest request body accepted (HTTP 413 from it on)",
    "daily_quota": "calls a quota day, every integration's together (607 beyond)",
    "warn_marker": "a value that makes its row warn (the field is ignored)",
    "seed": "seed of the fault knobs' random draws (default: unseeded)",
    "omit_empty": "leave empty errors, warnings and result arrays out of envelopes",
    "fault_500": "answer HTTP 500",
    "fault_503": "answer HTTP 503",
    "fault_601": "answer 601 Access token invalid (not counted, as Marketo does not)",
    "fault_602": "answer 602 Access token expired (not counted)",
    "fault_606": "answer 606 Max rate limit exceeded",
    "fault_608": "answer 608 API Temporarily Unavailable (not counted)",
    "fault_611": "answer 611 System error (not counted)",
    "fault_615": "answer 615 Concurrent access limit reached",
    "fault_604": "answer 604 Request time-out (not counted)",
    "fault_605": "answer 605 HTTP Method not supported (not counted)",
    "slow_fraction": "wait slow_seconds before answering",
    "slow_seconds": "how long a slow call waits",
    "drop_fraction": "close the connection without an answer (nothing done)",
    "drop_reply_fraction": "do the call (a create queues its job), then close the connection",
    "late_reply_fraction": "do the call, then hold the answer late_reply_seconds",
    "late_reply_seconds": "how long a late answer is held",
    "late_reply_copies": "hold the answer of the first N creates of every distinct file",
    "fault_envelope_500": "answer HTTP 200 with error 500 in errors[]",
    "fault_envelope_502": "answer HTTP 200 with error 502 in errors[]",
    "foreign_calls_per_window": "another integration's calls in every rate window",
    "foreign_in_flight": "another integration's calls always in flight",
    "quota_reset_utc": "HH:MM UTC at which the daily quota resets on the simulator's wall "
    'clock ("05:00" Chicago midnight in summer, "06:00" a fixed CST; default: never)',
    "dedupe_field": "a custom object's dedupe field (default: the first column, trimmed); a "
    "header that does not name it exactly fails every row (missing.dedupe.fields)",
    "read_bytes_per_second": "read uploads at this pace, a slow uplink (0: no limit)",
    "keep_records": "keep imported records (off: rows are checked, then forgotten)",
    "foreign_usage_today": "calls other integrations spent today: stats/usage.json counts them "
    "(as their user's count) and the quota refuses with 607 once they and ours reach "
    "daily_quota; a new quota day starts them at 0",
    "partitions": "the lead partitions the API user may import to, comma-separated (default: "
    "none set up, partitionName is not checked). Assumed, per row: no partitionName fails it "
    "with 1009, another name with 1008, a lead that lives in another partition with 1010",
}
