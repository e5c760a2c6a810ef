"""Settings: one frozen, typed object built by one loader.

- `settings`: the types: `Settings` and its sections, `Route`, `Secret`.
- `loading`: defaults, then the TOML file, then the environment (`load_settings`).
- `checks`: what each key accepts (`RANGES`, `validate`), the chunk-size bound.

Order of precedence, lowest first: built-in defaults, the TOML file, the
environment. Every problem raises `ConfigError` naming the key (or variable).
"""

from orchestrator.config.checks import (
    MIN_CHUNK_BYTES,
    RANGES,
    Range,
    check_ranges,
    chunk_bytes_problem,
    validate,
)
from orchestrator.config.loading import (
    DEFAULT_CONFIG_PATH,
    env_warnings,
    known_variables,
    load_settings,
    resolve_config_path,
)
from orchestrator.config.settings import (
    SECTIONS,
    BackoffSettings,
    HttpSettings,
    LimitSettings,
    LoggingSettings,
    MarketoSettings,
    PollingSettings,
    RetentionSettings,
    Route,
    Secret,
    Settings,
    WatchSettings,
    identity_url,
    parse_listen,
    with_marketo,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MIN_CHUNK_BYTES",
    "RANGES",
    "SECTIONS",
    "BackoffSettings",
    "HttpSettings",
    "LimitSettings",
    "LoggingSettings",
    "MarketoSettings",
    "PollingSettings",
    "Range",
    "RetentionSettings",
    "Route",
    "Secret",
    "Settings",
    "WatchSettings",
    "check_ranges",
    "chunk_bytes_problem",
    "env_warnings",
    "identity_url",
    "known_variables",
    "load_settings",
    "parse_listen",
    "resolve_config_path",
    "validate",
    "with_marketo",
]
