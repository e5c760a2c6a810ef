"""The settings object: one frozen, typed tree of dataclasses, one per TOML section.

`Settings` is what every part of the daemon is given; `config.loading` builds it
(defaults, the TOML file, the environment) and `config.checks` says what values
each key accepts. A `Secret` never shows its value in a repr, str or f-string.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.delimited import format_of
from orchestrator.errors import ConfigError
from orchestrator.layout import Layout
from orchestrator.models import ObjectType


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
    # The subscription's daily quota belongs to every integration: no new job is created
    # once its usage (Marketo's count plus ours since) reaches daily_quota - daily_reserve.
    daily_quota: int = constants.DAILY_QUOTA
    daily_reserve: int = constants.DEFAULT_DAILY_RESERVE
    quota_reset_tz: str = constants.QUOTA_RESET_TZ
    # Small files of one route, format and header share a chunk (a pack); an open pack
    # is sealed once this long passes without a new file joining it (0: as soon as no
    # claimed file waits to be split).
    pack_wait_seconds: float = 5.0
    # The key rule (SPEC section 5): a chunk waits while an earlier chunk that shares a
    # record key with it is not done. False sends in plain FIFO order (benchmarks, or an
    # emergency: rows of one key may then import at once, and the older value may win).
    key_order: bool = True


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
class CoordinationSettings:
    """Several daemons on one subscription (SPEC section 3, [coordination])."""

    # "" = this daemon alone; postgresql://user@host:5432/db = share the subscription
    # with every daemon naming that database. The URL may hold a password: never shown.
    url: str = field(default="", repr=False)
    instance: str = ""  # this daemon's name among them; default: host name and data_dir
    lease_seconds: float = 30.0  # a daemon silent this long is taken as dead


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
    # The columns that name a record at Marketo; () = the object's own: leads the lookup
    # field, custom objects their dedupe fields (as describe gives them), program members email.
    key_columns: tuple[str, ...] = ()
    unknown_columns: str = "warn"  # a header column that matches no Marketo field: warn | fail

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
    coordination: CoordinationSettings = field(default_factory=CoordinationSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    routes: tuple[Route, ...] = ()

    def route(self, dir_name: str) -> Route | None:
        return next((r for r in self.routes if r.dir == dir_name), None)

    @property
    def layout(self) -> Layout:
        """Every path under data_dir."""
        return Layout(self.data_dir)


# The TOML sections and the dataclass each is read into.
SECTIONS: dict[str, type[Any]] = {
    "marketo": MarketoSettings,
    "limits": LimitSettings,
    "polling": PollingSettings,
    "backoff": BackoffSettings,
    "watch": WatchSettings,
    "retention": RetentionSettings,
    "coordination": CoordinationSettings,
    "http": HttpSettings,
    "logging": LoggingSettings,
}


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
