"""Settings: one frozen, typed object built by one loader.

Order of precedence, lowest first: built-in defaults, the TOML file, the
environment. Every problem raises `ConfigError` naming the key (or variable).

Environment: the variables SPEC.md names (ORCHESTRATOR_DATA_DIR,
MARKETO_BASE_URL, MARKETO_IDENTITY_URL, MARKETO_CLIENT_ID,
MARKETO_CLIENT_SECRET, MARKETO_CLIENT_SECRET_FILE), plus
ORCHESTRATOR_<SECTION>_<KEY> for any scalar key of a section, e.g.
ORCHESTRATOR_HTTP_LISTEN or ORCHESTRATOR_LIMITS_QUEUED_JOBS. Other ORCHESTRATOR_*
variables are ignored (Kubernetes injects ORCHESTRATOR_PORT for a Service of that
name, which must not stop the daemon); `env_warnings` names those that look like
a misspelling of a known one. An error in a value that came from the environment
names the variable.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from orchestrator import constants
from orchestrator.delimited import FORMATS, format_of
from orchestrator.errors import ConfigError
from orchestrator.layout import Layout
from orchestrator.models import ObjectType

DEFAULT_CONFIG_PATH = Path("config/orchestrator.toml")
MIN_CHUNK_BYTES = 256  # smallest chunk limit accepted (a header and a few records)


class Secret:
    """A string that never shows itself in a repr, str or f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class MarketoSettings:
    base_url: str = ""
    identity_url: str = ""
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    # Where the secret was read from (MARKETO_CLIENT_SECRET_FILE): read again when
    # Marketo refuses the credentials, so a rotated secret needs no restart.
    client_secret_file: str = ""
    request_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    concurrent_jobs: int = constants.MAX_IMPORTING_JOBS
    queued_jobs: int = constants.MAX_QUEUED_JOBS
    max_chunk_bytes: int = constants.DEFAULT_MAX_CHUNK_BYTES
    api_calls_per_window: int = constants.DEFAULT_API_CALLS_PER_WINDOW
    api_window_seconds: float = constants.API_WINDOW_SECONDS
    concurrent_api_calls: int = constants.DEFAULT_CONCURRENT_API_CALLS
    max_resubmits: int = constants.DEFAULT_MAX_RESUBMITS
    daily_api_calls: int = constants.DAILY_API_CALLS
    quota_reset_tz: str = constants.QUOTA_RESET_TZ
    # Small files of one route, format and header share a chunk (a pack); an open pack
    # is sealed once this long passes without a new file joining it (0: as soon as no
    # claimed file waits to be split).
    pack_wait_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class PollingSettings:
    interval: float = 5.0
    max_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    initial: float = 2.0
    max: float = 300.0


@dataclass(frozen=True, slots=True)
class WatchSettings:
    settle_seconds: float = 2.0
    force_polling: bool = False


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    keep_days: float = 30.0  # finished files leave the state store after this; 0 keeps them
    interval: float = 600.0  # seconds between sweeps


@dataclass(frozen=True, slots=True)
class HttpSettings:
    listen: str = "127.0.0.1:9400"

    @property
    def host_port(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when the server is disabled."""
        return parse_listen(self.listen, "http.listen") if self.listen else None


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Route:
    """One inbox sub-directory and where its rows go."""

    dir: str
    object: ObjectType
    format: str = ""
    lookup_field: str = ""
    list_id: int = 0
    partition_name: str = ""
    api_name: str = ""
    program_id: int = 0
    program_member_status: str = ""
    pack: bool = True  # small files share chunks (jobs); false: every file its own chunks

    def format_for(self, filename: str) -> str:
        """The route's format, else the one the file's extension names (csv by default)."""
        return format_of(filename, self.format)


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./orchestrator-data")
    marketo: MarketoSettings = field(default_factory=MarketoSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    polling: PollingSettings = field(default_factory=PollingSettings)
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    routes: tuple[Route, ...] = ()

    def route(self, dir_name: str) -> Route | None:
        return next((r for r in self.routes if r.dir == dir_name), None)

    @property
    def layout(self) -> Layout:
        """Every path under data_dir."""
        return Layout(self.data_dir)


SECTIONS: dict[str, type[Any]] = {
    "marketo": MarketoSettings,
    "limits": LimitSettings,
    "polling": PollingSettings,
    "backoff": BackoffSettings,
    "watch": WatchSettings,
    "retention": RetentionSettings,
    "http": HttpSettings,
    "logging": LoggingSettings,
}
ENV_NAMED = {
    "MARKETO_BASE_URL": ("marketo", "base_url"),
    "MARKETO_IDENTITY_URL": ("marketo", "identity_url"),
    "MARKETO_CLIENT_ID": ("marketo", "client_id"),
    "MARKETO_CLIENT_SECRET": ("marketo", "client_secret"),
}


def resolve_config_path(flag: str | None, env: Mapping[str, str]) -> Path | None:
    """--config, else $ORCHESTRATOR_CONFIG, else ./config/orchestrator.toml if present."""
    if flag:
        return Path(flag)
    if env.get("ORCHESTRATOR_CONFIG"):
        return Path(env["ORCHESTRATOR_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_credentials: bool = True,
) -> Settings:
    """Defaults, then the TOML file at `path`, then `env`; validated."""
    env = os.environ if env is None else env
    raw = read_toml(path) if path is not None else {}
    raw = apply_env(raw, env)
    settings = build_settings(raw)
    m = settings.marketo
    if m.client_secret_file and not m.client_secret:  # given as a key, not by the variable
        secret = read_secret(m.client_secret_file, "marketo.client_secret_file")
        settings = with_marketo(settings, client_secret=Secret(secret))
    try:
        check_ranges(settings)
        validate(settings, require_credentials=require_credentials)
    except ConfigError as exc:
        var = env_source(raw, exc.key)
        if var is None:
            raise
        raise ConfigError(f"{var} (sets {exc.key})", exc.problem) from None
    return settings


def env_source(raw: dict[str, Any], key: str) -> str | None:
    """The environment variable that set `key` ("section.key" or "data_dir"), if one did."""
    section, _, name = key.partition(".")
    value = raw.get(section)
    if name and isinstance(value, dict):
        value = value.get(name)
    return value.var if isinstance(value, EnvValue) else None


def known_variables() -> list[str]:
    """Every ORCHESTRATOR_* variable the loader reads."""
    names = ["ORCHESTRATOR_CONFIG", "ORCHESTRATOR_DATA_DIR"]
    for section, cls in SECTIONS.items():
        names += [f"ORCHESTRATOR_{section}_{f.name}".upper() for f in fields(cls)]
    return names


def env_warnings(env: Mapping[str, str]) -> list[str]:
    """A warning for each ORCHESTRATOR_* variable that is unknown but close to a known one.

    Unknown ones that resemble nothing (Kubernetes injects ORCHESTRATOR_PORT for a
    Service named orchestrator) stay silent; all unknown ones are ignored."""
    known = known_variables()
    warnings = []
    for var in sorted(env):
        if not var.startswith("ORCHESTRATOR_") or var in known:
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.85)
        if close:
            warnings.append(
                f"{var} is not a known variable and is ignored: did you mean {close[0]}?"
            )
    return warnings


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay environment variables onto the raw TOML tables (as strings, typed later)."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if env.get("ORCHESTRATOR_DATA_DIR"):
        merged["data_dir"] = EnvValue("ORCHESTRATOR_DATA_DIR", env["ORCHESTRATOR_DATA_DIR"])
    for var, (section, key) in ENV_NAMED.items():
        if env.get(var):
            table_of(merged, section)[key] = EnvValue(var, env[var])
    secret_file = env.get("MARKETO_CLIENT_SECRET_FILE")
    if secret_file and not env.get("MARKETO_CLIENT_SECRET"):
        table_of(merged, "marketo")["client_secret"] = read_secret_file(secret_file)
        table_of(merged, "marketo")["client_secret_file"] = secret_file
    for var, value in env.items():
        if not var.startswith("ORCHESTRATOR_"):
            continue
        rest = var.removeprefix("ORCHESTRATOR_").lower()
        section, _, key = rest.partition("_")
        if section in SECTIONS and key in {f.name for f in fields(SECTIONS[section])}:
            table_of(merged, section)[key] = EnvValue(var, value)
    return merged


def table_of(raw: dict[str, Any], section: str) -> dict[str, Any]:
    """The section's table in `raw`, created if absent."""
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(section, "must be a table")
    return table


def read_secret_file(path: str) -> EnvValue:
    return EnvValue("MARKETO_CLIENT_SECRET_FILE", read_secret(path, "MARKETO_CLIENT_SECRET_FILE"))


def read_secret(path: str, key: str) -> str:
    """The client secret in the file at `path` (surrounding whitespace dropped)."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class EnvValue:
    """A value from the environment: always a string, named by its variable in errors."""

    var: str
    text: str


def build_settings(raw: dict[str, Any]) -> Settings:
    allowed = {"data_dir", "routes", *SECTIONS}
    for key in raw:
        if key not in allowed:
            raise ConfigError(key, "unknown key")
    built: dict[str, Any] = {}
    if "data_dir" in raw:
        built["data_dir"] = Path(coerce("data_dir", raw["data_dir"], str))
    for name, cls in SECTIONS.items():
        if name in raw:
            built[name] = build_section(name, cls, raw[name])
    if "routes" in raw:
        built["routes"] = build_routes(raw["routes"])
    return Settings(**built)


def build_section(name: str, cls: type[Any], table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(name, "must be a table")
    types = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in types:
            raise ConfigError(f"{name}.{key}", "unknown key")
        typ = {"int": int, "float": float, "bool": bool}.get(str(types[key]), str)
        coerced = coerce(f"{name}.{key}", value, typ)
        values[key] = Secret(coerced) if key == "client_secret" else coerced
    return cls(**values)


def coerce(key: str, value: Any, typ: type) -> Any:
    """Check a TOML value's type, or parse an environment string into it."""
    if isinstance(value, EnvValue):
        return parse_env(value, typ)
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(key, f"must be {TYPE_NAMES[typ]}, got {type(value).__name__}")
    return value


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def parse_env(value: EnvValue, typ: type) -> Any:
    text = value.text.strip()
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
    except ValueError:
        raise ConfigError(value.var, f"must be {TYPE_NAMES[typ]}") from None
    return value.text


def build_routes(raw: Any) -> tuple[Route, ...]:
    if not isinstance(raw, list):
        raise ConfigError("routes", "must be an array of tables ([[routes]])")
    types = {f.name: f.type for f in fields(Route)}
    routes = []
    for i, table in enumerate(raw):
        where = f"routes[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in types:
                raise ConfigError(f"{where}.{key}", "unknown key")
            typ = {"int": int, "bool": bool}.get(str(types[key]), str)
            values[key] = coerce(f"{where}.{key}", value, typ)
        for required in ("dir", "object"):
            if not values.get(required):
                raise ConfigError(f"{where}.{required}", "is required")
        try:
            values["object"] = ObjectType(values["object"])
        except ValueError:
            allowed = " | ".join(o.value for o in ObjectType)
            raise ConfigError(f"{where}.object", f"must be one of {allowed}") from None
        route = Route(**values)
        validate_route(where, route)
        routes.append(route)
    dirs = [r.dir for r in routes]
    for i, d in enumerate(dirs):
        if d in dirs[:i]:
            raise ConfigError(f"routes[{i}].dir", f"duplicate route directory {d!r}")
    return tuple(routes)


LEAD_ONLY = ("lookup_field", "list_id", "partition_name")


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
    "limits.daily_api_calls": Range(0),  # a subscription may buy more than 50,000
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


def parse_listen(listen: str, key: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' into (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, "must be host:port, e.g. 127.0.0.1:9400")
    return host.strip("[]"), int(port)


def identity_url(m: MarketoSettings) -> str:
    """marketo.identity_url, else {base_url}/identity."""
    return (m.identity_url or f"{m.base_url}/identity").rstrip("/")


def with_marketo(settings: Settings, **changes: Any) -> Settings:
    """A copy with some [marketo] keys changed (used by --simulate)."""
    return replace(settings, marketo=replace(settings.marketo, **changes))
