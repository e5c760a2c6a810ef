"""Hand-over ids and tickets: how a file handed over by `submit` keeps its id.

Every claimed file has an id, stored with it in the state store and shown in
its result.json (`"id"`), in `/jobs` and in `status`. `submit` (or
`orchestrator.client.submit`) chooses it, or takes the caller's; a file
dropped into the inbox by hand gets one at its claim. Generated ids are the
UTC second and four random hex digits: `20261123T140311Z-8f3a`.

The id travels with the file as a ticket: before the file appears under its
inbox name, `submit` writes `inbox/<route>/.<inbox name>.ticket`, a small JSON
object `{"id": ..., "file": <the name the caller gave>}`. Names starting with
"." are never claimed, so the ticket waits beside its file; the spool reads it
when it claims the file, records the id and the caller's name, and deletes it
once the claim is done. A ticket without its file (a crash between the two
renames) is harmless and ignored.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from orchestrator.errors import UsageError

TICKET_SUFFIX: Final = ".ticket"
MAX_ID_LENGTH: Final = 64
# Safe in a URL path segment, a file name and a shell word.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def new_id(moment: datetime | None = None) -> str:
    """A fresh id: `YYYYMMDDTHHMMSSZ-xxxx` (UTC second, four random hex digits)."""
    moment = moment or datetime.now(UTC)
    return f"{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def check_id(value: str, *, flag: str = "--id") -> str:
    """A caller's id, or UsageError naming `flag` when it cannot be one."""
    if not value or len(value) > MAX_ID_LENGTH or not ID_PATTERN.fullmatch(value):
        raise UsageError(
            flag,
            f"{value!r} is not a usable id: 1 to {MAX_ID_LENGTH} letters, digits, '.', '_' or "
            "'-', starting with a letter or digit",
        )
    return value


def ticket_path(entry: Path) -> Path:
    """Where the ticket of the inbox entry `entry` lives."""
    return entry.with_name(f".{entry.name}{TICKET_SUFFIX}")


def ticket_text(file_id: str, name: str) -> str:
    return json.dumps({"id": file_id, "file": name}) + "\n"


def read_ticket(entry: Path) -> tuple[str, str] | None:
    """(id, caller's name) from the ticket beside `entry`; None if there is none or it is bad."""
    try:
        data = json.loads(ticket_path(entry).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    file_id, name = data.get("id"), data.get("file")
    if not isinstance(file_id, str) or not isinstance(name, str) or not name:
        return None
    if "/" in name or not ID_PATTERN.fullmatch(file_id) or len(file_id) > MAX_ID_LENGTH:
        return None
    return file_id, name


def drop_ticket(entry: Path) -> None:
    """Delete the ticket beside `entry` (its claim is done); gone already is fine."""
    ticket_path(entry).unlink(missing_ok=True)
