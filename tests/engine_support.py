"""Builders shared by the engine, daemon and crash tests: settings, source files, results."""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from orchestrator.config import Settings
from tests.support.settings import (  # noqa: F401  (re-exported while tests move over)
    CARS,
    CLIENT_ID,
    CLIENT_SECRET,
    LEADS,
    MEMBERS,
    SIM_KNOBS,
    fast_settings,
)


def settings_toml(settings: Settings) -> str:
    """The same settings as a TOML file, for the daemon in a subprocess."""
    lim, pol, back = settings.limits, settings.polling, settings.backoff
    lines = [
        f'data_dir = "{settings.data_dir}"',
        "[marketo]",
        f'base_url = "{settings.marketo.base_url}"',
        f'client_id = "{settings.marketo.client_id}"',
        f"request_timeout = {settings.marketo.request_timeout}",
        "[limits]",
        f"max_chunk_bytes = {lim.max_chunk_bytes}",
        f"queued_jobs = {lim.queued_jobs}",
        f"api_window_seconds = {lim.api_window_seconds}",
        "[polling]",
        f"interval = {pol.interval}",
        f"max_interval = {pol.max_interval}",
        "[backoff]",
        f"initial = {back.initial}",
        f"max = {back.max}",
        "[watch]",
        f"settle_seconds = {settings.watch.settle_seconds}",
        "[http]",
        f'listen = "{settings.http.listen}"',
        "[logging]",
        'format = "json"',
    ]
    for route in settings.routes:
        lines.append("[[routes]]")
        for key in ("dir", "object", "api_name", "program_member_status", "lookup_field"):
            value = str(getattr(route, key))
            if value:
                lines.append(f'{key} = "{value}"')
        for key in ("program_id", "list_id"):
            if getattr(route, key):
                lines.append(f"{key} = {getattr(route, key)}")
    return "\n".join(lines) + "\n"


def lead_rows(
    n: int, *, prefix: str = "p", bad: Collection[int] = (), warn: Collection[int] = ()
) -> list[list[str]]:
    """Rows of a leads file: a multi-line quoted note every 7th row, bad emails and warn markers where asked."""
    rows = []
    for i in range(n):
        email = f"{prefix}{i}.example.com" if i in bad else f"{prefix}{i}@example.com"
        note = (
            "__WARN__" if i in warn else ('line one\nline "two", three' if i % 7 == 0 else f"n{i}")
        )
        rows.append([email, f"First{i}", note])
    return rows


def write_csv(
    path: Path,
    header: list[str],
    rows: list[list[str]],
    *,
    delimiter: str = ",",
    mtime: float | None = None,
) -> Path:
    """A source file as a pipeline would write it (quoting only where needed)."""
    import csv
    import io

    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerows([header, *rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    tmp.rename(path)
    return path


def drop_leads(
    data_dir: Path,
    name: str,
    n: int,
    *,
    route: str = "leads",
    mtime: float | None = None,
    **kw: Any,
) -> Path:
    return write_csv(
        data_dir / "inbox" / route / name,
        ["email", "firstName", "note"],
        lead_rows(n, **kw),
        mtime=mtime,
    )


def result(data_dir: Path, folder: str, route: str, name: str) -> dict[str, Any]:
    path = data_dir / folder / route / f"{name}.result.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def all_results(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*/*/*.result.json"))
