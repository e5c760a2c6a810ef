"""Settings for tests and benchmarks: Marketo's limits with every interval scaled down,
the same settings as a TOML file for the daemon in a subprocess, and a free port.

- `fast_settings`: Marketo's limits, polling and backoff in tens of milliseconds (the
  simulator's `rate_window` must match `limits.api_window_seconds`: see SIM_KNOBS), and
  packs sealed as soon as nothing waits to be split (`limits.pack_wait_seconds` 0).
- `with_sections`: a copy with keys changed per section, `limits={"queued_jobs": 3}`,
  `coordination={"url": database.url, "instance": "a"}`.
- `settings_toml` / `write_settings`: every key of a Settings as TOML for
  `marketo-orchestrator run --config`, but the client secret: that travels only in
  MARKETO_CLIENT_SECRET (processes.CliRunner.for_settings puts it there). The
  [coordination] table is written only when it differs from the default (a daemon
  alone), so the config of every test without a coordination URL stays as it was.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from orchestrator.config import (
    BackoffSettings,
    HttpSettings,
    LimitSettings,
    MarketoSettings,
    PollingSettings,
    Route,
    Secret,
    Settings,
    WatchSettings,
)
from orchestrator.models import ObjectType

CLIENT_ID = "engine-test-client"
CLIENT_SECRET = "engine-test-secret-5f1c"
LEADS = Route(dir="leads", object=ObjectType.LEADS)
CARS = Route(dir="cars", object=ObjectType.CUSTOM_OBJECT, api_name="car_c")
MEMBERS = Route(
    dir="members",
    object=ObjectType.PROGRAM_MEMBERS,
    program_id=1001,
    program_member_status="Registered",
)
# The [section] tables of a config file, in the order they are written.
SECTIONS = (
    "marketo",
    "limits",
    "polling",
    "backoff",
    "watch",
    "retention",
    "coordination",
    "http",
    "logging",
)


# Simulator knobs matching fast_settings: fast jobs, Marketo's 100 calls per window scaled to 2 s.
SIM_KNOBS: dict[str, Any] = {"job_overhead": 0.02, "rows_per_second": 50_000.0, "rate_window": 2.0}


def fast_settings(
    base_url: str, data_dir: Path, routes: tuple[Route, ...], **limits: Any
) -> Settings:
    """Marketo's limits, but polling and backoff scaled down to tens of milliseconds."""
    return Settings(
        data_dir=data_dir,
        marketo=MarketoSettings(
            base_url=base_url,
            client_id=CLIENT_ID,
            client_secret=Secret(CLIENT_SECRET),
            request_timeout=10.0,
        ),
        # pack_wait_seconds 0: a pack goes as soon as no claimed file waits to be split,
        # so no test waits out a pack's idle time unless it asks for one.
        limits=LimitSettings(
            **{
                "max_chunk_bytes": 2_000,
                "api_window_seconds": 2.0,
                "pack_wait_seconds": 0.0,
                **limits,
            }
        ),
        polling=PollingSettings(interval=0.05, max_interval=0.2),
        backoff=BackoffSettings(initial=0.05, max=0.4),
        watch=WatchSettings(settle_seconds=0.0),
        http=HttpSettings(listen=""),
        routes=routes,
    )


def with_sections(settings: Settings, **sections: Mapping[str, Any]) -> Settings:
    """A copy with keys changed per section, e.g. `http={"listen": "127.0.0.1:0"}`."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise TypeError(f"not a section of Settings: {', '.join(sorted(unknown))}")
    changed = {
        name: replace(getattr(settings, name), **values) for name, values in sections.items()
    }
    return replace(settings, **changed)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):  # ObjectType is a StrEnum: its value
        return json.dumps(str(value))  # a TOML basic string
    if isinstance(value, tuple):  # a route's key_columns
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def settings_toml(settings: Settings, **sections: Mapping[str, Any]) -> str:
    """Every key of `settings` (changed per section by `sections`) as TOML, but the
    client secret: the daemon reads that from MARKETO_CLIENT_SECRET only."""
    settings = with_sections(settings, **sections)
    lines = [f"data_dir = {toml_value(settings.data_dir)}"]
    for section in SECTIONS:
        table = getattr(settings, section)
        if section == "coordination" and table == type(table)():
            continue  # a daemon alone: no table, as a config written by hand has none
        lines.append(f"[{section}]")
        lines.extend(
            f"{f.name} = {toml_value(getattr(table, f.name))}"
            for f in fields(table)
            if f.name != "client_secret"
        )
    for route in settings.routes:
        lines.append("[[routes]]")
        lines.extend(
            f"{f.name} = {toml_value(getattr(route, f.name))}"
            for f in fields(route)
            if getattr(route, f.name) != f.default  # dir and object have none: always written
        )
    return "\n".join(lines) + "\n"


def write_settings(path: Path, settings: Settings, **sections: Mapping[str, Any]) -> Path:
    """`settings_toml` written to `path`; returns `path`."""
    path.write_text(settings_toml(settings, **sections), encoding="utf-8")
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now (bind port 0, read it, let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
