"""The simulator's gate: what a bulk call must get past before its operation runs.

Access tokens (`Tokens`: one live token per client id, checked as a bearer
token), the API role's permissions (`check_permission`: 603), Marketo's call
limits (`Limits`: 615 calls in flight, 606 calls in the sliding window, 607 the
quota, and the day's usage that stats/usage.json reports), random fault injection (`Faults`, one seeded RNG) and the call log
(`CallLog`, with the counters `Simulator.stats` reports).

A call answered 601, 602, 604, 605, 608 or 611 is not counted in the window or
the quota: Marketo's error-code page says it does not count those.
This module holds their state and rules; the order of the checks is the
simulator's request plumbing (`Simulator._checked`). Tokens and secrets never
enter the call log, only the names of the fields that carried them.
"""

from __future__ import annotations

import datetime as dt
import random
import secrets
import uuid
from collections import Counter, deque
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from orchestrator.simulator.knobs import ENVELOPE_FAULT_CODES, FAULT_CODES, SimulatorConfig
from orchestrator.simulator.queue import Refusal

MESSAGES = {
    "601": "Access token invalid",
    "602": "Access token expired",
    "603": "Access denied",
    "604": "Request time-out",
    "605": "HTTP Method not supported",
    "606": "Max rate limit '{limit}' exceeded with in '{window}' secs",
    "607": "Daily quota reached",
    "608": "API Temporarily Unavailable",
    "611": "System error",
    "610": "Requested resource not found",
    "615": "Concurrent access limit reached",
    "500": "Internal server error",
    "502": "Bad gateway",
}
HTTP_FAULTS = ((500, "500 Internal Server Error"), (503, "503 Service Temporarily Unavailable"))
# stats/usage.json names the API user behind every count; other integrations' calls
# (`foreign_usage_today`) are this user's.
FOREIGN_USER = "other-integrations@simulator"


@dataclass(slots=True)
class CallInfo:
    """One entry of the call log. Never holds a token or a secret, only key names."""

    t: float  # seconds since the simulator started, at arrival
    method: str
    path: str
    query_keys: list[str]
    operation: str = ""
    client_id: str | None = None
    status: int | None = None  # None: the connection was dropped
    code: str | None = None  # Marketo error code of the answer
    batch_id: int | None = None
    form_keys: list[str] = field(default_factory=list)
    digest: str = ""  # a create's file part (sha256, hex): tells copies of one chunk apart
    dropped: bool = False
    duration: float = 0.0
    counted: bool = False  # in the window and the day's quota (Marketo counts it)


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    client_id: str
    expires_at: float


def bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def credentials_ok(config: SimulatorConfig, client_id: str, secret: str) -> bool:
    """Whether the knobs accept these credentials (a knob left None accepts any)."""
    id_ok = config.client_id is None or secrets.compare_digest(client_id, config.client_id)
    secret_ok = config.client_secret is None or secrets.compare_digest(secret, config.client_secret)
    return id_ok and secret_ok


def permitted(config: SimulatorConfig, operation: str, *, write: bool = True) -> bool:
    """Whether the API role may make this call: custom object operations need the
    Custom Object grant, the others (leads, program members) the Lead grant; a call
    that changes or imports needs Read-Write, a read-only one (describe) either."""
    family = "customobjects" if "CustomObject" in operation else "leads"
    grants = config.grants
    return family in grants or (not write and f"{family}:read" in grants)


def check_permission(config: SimulatorConfig, operation: str, *, write: bool = True) -> None:
    """Refusal 603 when the API role may not make this call (see `permitted`)."""
    if not permitted(config, operation, write=write):
        raise Refusal("603", MESSAGES["603"])


def message(code: str, config: SimulatorConfig) -> str:
    """The message of a Marketo error code, with the rate limit filled in."""
    return MESSAGES[code].format(limit=config.rate_limit, window=f"{config.rate_window:g}")


class Tokens:
    """Access tokens by value; a client's live token is handed out again until it expires."""

    def __init__(self) -> None:
        self._by_value: dict[str, Token] = {}
        self._live: dict[str, Token] = {}  # client id -> its current token
        self.issued: list[str] = []  # every value issued, oldest first

    def issue(self, client_id: str, now: float, ttl: float) -> Token:
        """The client's live token with its remaining life, or a new one once it expired."""
        live = self._live.get(client_id)
        if live is not None and live.expires_at > now:
            return live
        token = Token(f"{uuid.uuid4()}:sim", client_id, now + ttl)
        self._by_value[token.value] = self._live[client_id] = token
        self.issued.append(token.value)
        return token

    def owner(self, value: str) -> str | None:
        token = self._by_value.get(value)
        return token.client_id if token else None

    def authenticate(self, request: web.Request, now: float) -> str:
        """The client id of the request's bearer token; Refusal 601 (none, unknown), 602."""
        token = self._by_value.get(bearer(request))
        if token is None:
            raise Refusal("601", MESSAGES["601"])
        if now >= token.expires_at:
            raise Refusal("602", MESSAGES["602"])
        return token.client_id


class Limits:
    """Marketo's call limits, checked on arrival (615, 606, 607), their peaks, and the
    day's usage by user."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Forget the window, the quota used and the peaks; calls in flight stay counted."""
        self.window: deque[float] = deque()
        self.quota_used = 0  # our users' counted calls this quota day
        self.users: Counter[str] = Counter()  # of those, answered, by client id
        self.quota_day: dt.date | None = None  # the quota day (by quota_reset_utc) counted
        self.max_in_flight = 0
        self.max_window = 0

    def roll_quota(self, wall: dt.datetime, config: SimulatorConfig) -> bool:
        """Whether a new quota day began at `quota_reset_utc`: the count starts again."""
        reset = config.quota_reset
        if reset is None:
            return False
        day = (wall.astimezone(dt.UTC) - reset).date()
        rolled = self.quota_day is not None and day > self.quota_day
        if rolled:
            self.quota_used = 0
            self.users.clear()
        self.quota_day = day
        return rolled

    def enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def admit(self, now: float, config: SimulatorConfig) -> float:
        """Count a call in the window and the quota (its stamp, for `refund`), or raise
        Refusal 615, 606 or 607.

        Other integrations' calls (`foreign_in_flight`, `foreign_calls_per_window`,
        `foreign_usage_today`) take their share of the limits first."""
        if self.in_flight + config.foreign_in_flight > config.concurrency:
            raise Refusal("615", MESSAGES["615"])
        while self.window and self.window[0] <= now - config.rate_window:
            self.window.popleft()
        if len(self.window) + config.foreign_calls_per_window >= config.rate_limit:
            raise Refusal("606", message("606", config))
        if self.quota_used + config.foreign_usage_today >= config.daily_quota:
            raise Refusal("607", MESSAGES["607"])
        self.window.append(now)
        self.quota_used += 1
        self.max_window = max(self.max_window, len(self.window))
        return now

    def refund(self, stamp: float) -> None:
        """A call Marketo does not count after all (601, 602, 604, 605, 608, 611)."""
        with suppress(ValueError):
            self.window.remove(stamp)
        self.quota_used = max(0, self.quota_used - 1)

    def usage(self, wall: dt.datetime, config: SimulatorConfig) -> dict[str, Any]:
        """Today's calls as stats/usage.json lists them (swagger: UsageData): the quota
        day's date, every counted call of every user, and the count of each user."""
        reset = config.quota_reset or dt.timedelta(0)
        day = (wall.astimezone(dt.UTC) - reset).date()
        users = [{"userId": f"{user}@simulator", "count": n} for user, n in self.users.items()]
        if config.foreign_usage_today:
            users.append({"userId": FOREIGN_USER, "count": config.foreign_usage_today})
        return {
            "date": f"{day.isoformat()}T00:00:00Z",
            "total": self.quota_used + config.foreign_usage_today,
            "users": users,
        }


class Faults:
    """Injected faults, drawn from one RNG seeded by the `seed` knob (None: unseeded)."""

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)

    def reseed(self, seed: int | None) -> None:
        self._rng.seed(seed)

    def chance(self, fraction: float) -> bool:
        return fraction > 0 and (fraction >= 1 or self._rng.random() < fraction)

    def http_fault(self, config: SimulatorConfig) -> tuple[int, str] | None:
        """An injected HTTP error (status, text) per `fault_500`/`fault_503`, or None."""
        for fault, fraction in zip(HTTP_FAULTS, (config.fault_500, config.fault_503), strict=True):
            if self.chance(fraction):
                return fault
        return None

    def raise_injected(self, config: SimulatorConfig) -> None:
        """Raise Refusal with an injected Marketo error code (`fault_601` ... `fault_615`)."""
        for code in FAULT_CODES:
            if self.chance(getattr(config, f"fault_{code}")):
                raise Refusal(code, message(code, config))
        for code in ENVELOPE_FAULT_CODES:
            if self.chance(getattr(config, f"fault_envelope_{code}")):
                raise Refusal(code, MESSAGES[code])


class CallLog:
    """Every call answered, for the test API's `calls`, and the counts `stats` reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[CallInfo] = []
        self.op_counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.http_errors: Counter[str] = Counter()
        self.violations: list[dict[str, Any]] = []
        self.dropped = 0

    def record(self, info: CallInfo, duration: float) -> None:
        info.duration = round(duration, 6)
        self.calls.append(info)
        self.op_counts[info.operation] += 1
        if info.code:
            self.errors[info.code] += 1
        if info.dropped:
            self.dropped += 1
        elif info.status is not None and info.status >= 400:
            self.http_errors[str(info.status)] += 1

    def violation(self, kind: str, info: CallInfo) -> None:
        """Note a client habit Marketo would frown on (a token in the URL, say)."""
        self.violations.append(
            {"kind": kind, "t": info.t, "path": info.path, "client_id": info.client_id}
        )
