"""Loading the settings: built-in defaults, then the TOML file, then the environment.

Every problem raises `ConfigError` naming the key (or variable); the values are
checked (`config.checks`) once all three are applied.

Environment: the variables SPEC.md names (ORCHESTRATOR_DATA_DIR,
MARKETO_BASE_URL, MARKETO_IDENTITY_URL, MARKETO_CLIENT_ID,
MARKETO_CLIENT_SECRET, MARKETO_CLIENT_SECRET_FILE), plus
ORCHESTRATOR_<SECTION>_<KEY> for any scalar key of a section, e.g.
ORCHESTRATOR_HTTP_LISTEN or ORCHESTRATOR_LIMITS_QUEUED_JOBS. Other ORCHESTRATOR_*
variables are ignored (Kubernetes injects ORCHESTRATOR_PORT for a Service of that
name, which must not stop the daemon); `env_warnings` names those that look like
a misspelling of a known one. An error in a value that came from the environment
names the variable.

Command-line flags that name a setting (`--data-dir`, `run --log-level`) come last,
over the environment (`apply_flags`); an error in their value names the flag.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from orchestrator.config.checks import check_ranges, validate, validate_route
from orchestrator.config.settings import SECTIONS, Route, Secret, Settings, with_marketo
from orchestrator.errors import ConfigError
from orchestrator.models import ObjectType

DEFAULT_CONFIG_PATH = Path("config/orchestrator.toml")
# Keys taken away, with what replaced them: a config (file or variable) still naming one
# is an error that says what to write instead, never an "unknown key" to guess at.
RETIRED = {
    "limits.daily_api_calls": (
        "is no longer a key: the daily quota belongs to the whole subscription; set "
        "limits.daily_quota (its daily allocation, Admin > Web Services; default 50000) "
        "and limits.daily_reserve (the calls left for other integrations; default 5000)"
    ),
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
    flags: Mapping[str, tuple[str, str]] | None = None,
) -> Settings:
    """Defaults, then the TOML file at `path`, then `env`, then the command line's
    `flags` ("data_dir" or "section.key" -> (the flag, its value)); validated."""
    env = os.environ if env is None else env
    raw = read_toml(path) if path is not None else {}
    raw = apply_env(raw, env)
    raw = apply_flags(raw, flags or {})
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
    """The environment variable (or flag) that set `key` ("section.key" or "data_dir"),
    if one did."""
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
        if f"{section}.{key}" in RETIRED:
            raise ConfigError(f"{var} (sets {section}.{key})", RETIRED[f"{section}.{key}"])
        if section in SECTIONS and key in {f.name for f in fields(SECTIONS[section])}:
            table_of(merged, section)[key] = EnvValue(var, value)
    return merged


def apply_flags(raw: dict[str, Any], flags: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Overlay command-line flags onto the raw tables, over the environment.

    A flag's value is a string like a variable's, typed and checked the same way, and
    named by its flag in errors."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, (flag, value) in flags.items():
        section, _, name = key.rpartition(".")
        table = table_of(merged, section) if section else merged
        table[name] = EnvValue(flag, value)
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
    """A value from the environment (or a command-line flag): always a string, named by
    its variable (or flag) in errors."""

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
        if f"{name}.{key}" in RETIRED:
            raise ConfigError(f"{name}.{key}", RETIRED[f"{name}.{key}"])
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


def names(key: str, value: Any) -> tuple[str, ...]:
    """A TOML array of non-empty strings (column names), trimmed as the splitter trims a
    header."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, 'must be an array of strings, e.g. ["email"]')
    if not all(v.strip() for v in value):
        raise ConfigError(key, "must not hold an empty column name")
    return tuple(v.strip() for v in value)


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
            if str(types[key]) == "tuple[str, ...]":
                values[key] = names(f"{where}.{key}", value)
                continue
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
