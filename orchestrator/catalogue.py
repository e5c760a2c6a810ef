"""The field catalogue: each route's object as Marketo describes it, and headers checked
against it before a job is spent on them.

A file whose key column is missing makes Marketo fail every row of a job, and a
misspelt column is dropped without a word; both are known before the first job from
Marketo's describe calls (leads: Describe Lead2; a custom object: its describe, with
its dedupe fields; program members: their describe plus the lead fields, since a
member file names both).

- Caching: one description per described object (leads are described once for lead
  and program-member routes alike), asked again once it is an hour old
  (`MAX_AGE_SECONDS`), so a route costs at most one describe call an hour however
  many files it gets. A refresh that fails keeps the description it had and is tried
  again after `RETRY_STALE_SECONDS`; a first description that fails raises
  Marketo's error, and the caller decides whether to wait (the split stage) or to
  say so (`check --file`).
- Key columns (`key_columns`): the route's `key_columns` when it sets them, else the
  object's own: leads the lookup field (default email), custom objects their dedupe
  fields as describe gives them, program members email. The key rule reads them here.
- The check (`check`): column names are compared trimmed (the splitter writes them
  trimmed) and case-folded (Marketo's docs do not say whether names are case-sensitive:
  a name that differs only in case is let through rather than failing a file Marketo
  may well import). A column Marketo needs (the object's key, and the route's
  `key_columns`) missing from the header fails the file; a column that matches no
  field is a warning, or fails the file when the route says `unknown_columns = "fail"`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Protocol

import structlog

from orchestrator import splitter
from orchestrator.config import Route
from orchestrator.errors import InputError, MarketoError
from orchestrator.marketo import Description
from orchestrator.models import ObjectType

log = structlog.get_logger(__name__)

MAX_AGE_SECONDS: Final = 3600.0  # a description is asked again once it is this old
RETRY_STALE_SECONDS: Final = 300.0  # after a failed refresh, the old one serves this long
DEFAULT_LOOKUP_FIELD: Final = "email"  # Marketo's lookupField default (bulk lead import)
MEMBER_KEY: Final = "email"  # a program member file names its lead by email
HEADER_READ_LIMIT: Final = 1 << 20  # a header longer than this is left to the splitter
_READ_BLOCK: Final = 1 << 16


class Describer(Protocol):
    """Marketo's describe calls (orchestrator.marketo.MarketoClient)."""

    async def describe_leads(self) -> Description: ...
    async def describe_custom_object(self, api_name: str) -> Description: ...
    async def describe_program_members(self) -> Description: ...


@dataclass(frozen=True, slots=True)
class HeaderCheck:
    """What a header lacks and what Marketo would not know in it, for one route."""

    object: str  # the object as messages name it: "leads", "custom object car_c"
    keys: tuple[str, ...]  # the key columns the header must have
    missing: tuple[str, ...]  # those it lacks
    unknown: tuple[str, ...]  # header columns (trimmed) that match no field
    unknown_fails: bool  # the route's unknown_columns = "fail"
    notes: tuple[str, ...] = ()  # further warnings (a lookup field describe does not offer)

    @property
    def ok(self) -> bool:
        """Whether the file may be imported (with warnings, perhaps)."""
        return not self.missing and not (self.unknown and self.unknown_fails)

    @property
    def error(self) -> str | None:
        """Why the file fails, in one sentence; None when it may be imported."""
        parts = []
        if self.missing:
            parts.append(self.missing_text)
        if self.unknown and self.unknown_fails:
            parts.append(f'{self.unknown_text} (unknown_columns = "fail")')
        return "; ".join(parts) or None

    @property
    def warnings(self) -> tuple[str, ...]:
        """What result.json and the log list when the file goes ahead."""
        unknown = () if self.unknown_fails else self.each_unknown()
        return (*unknown, *self.notes)

    @property
    def missing_text(self) -> str:
        s = "" if len(self.missing) == 1 else "s"
        return f"the header lacks the key column{s} {quoted(self.missing)} of {self.object}"

    @property
    def unknown_text(self) -> str:
        s = "" if len(self.unknown) == 1 else "s"
        verb = "matches" if len(self.unknown) == 1 else "match"
        return f"column{s} {quoted(self.unknown)} {verb} no field of {self.object}"

    def each_unknown(self) -> tuple[str, ...]:
        return tuple(f"column {name!r} matches no field of {self.object}" for name in self.unknown)

    def problems(self) -> list[str]:
        """Every missing key column and every unknown column, one line each (check --file)."""
        missing = [f"key column {name!r} of {self.object} is missing" for name in self.missing]
        return [*missing, *self.each_unknown()]


def quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def object_label(route: Route) -> str:
    """The route's object as messages name it."""
    match route.object:
        case ObjectType.LEADS:
            return "leads"
        case ObjectType.CUSTOM_OBJECT:
            return f"custom object {route.api_name}"
        case ObjectType.PROGRAM_MEMBERS:
            return "program members"


@dataclass(frozen=True, slots=True)
class _Entry:
    description: Description
    fresh_until: float  # on the catalogue's clock


class Catalogue:
    """Descriptions of the routes' objects, cached, refreshed hourly (clock injected)."""

    def __init__(
        self,
        describer: Describer,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_age: float = MAX_AGE_SECONDS,
    ) -> None:
        self._describer = describer
        self._clock = clock
        self._max_age = max_age
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def key_columns(self, route: Route) -> tuple[str, ...]:
        """The columns that name a record of `route` at Marketo (SPEC: `key_columns`)."""
        return route.key_columns or await self._object_keys(route)

    async def descriptions(self, route: Route) -> tuple[Description, ...]:
        """What Marketo says of the route's object (program members: and of leads)."""
        match route.object:
            case ObjectType.LEADS:
                return (await self._leads(),)
            case ObjectType.CUSTOM_OBJECT:
                return (await self._custom_object(route.api_name),)
            case ObjectType.PROGRAM_MEMBERS:
                members = await self._cached(
                    "programmembers", self._describer.describe_program_members
                )
                return (members, await self._leads())

    async def check(self, route: Route, columns: Sequence[str]) -> HeaderCheck:
        """The header `columns` checked against the route's object."""
        described = await self.descriptions(route)
        known = {name.casefold() for d in described for name in d.fields}
        names = [c.strip() for c in columns]
        present = {name.casefold() for name in names}
        needed: dict[str, str] = {}  # the keys, once each however they are spelt
        for key in (*await self._object_keys(route), *route.key_columns):
            needed.setdefault(key.casefold(), key)
        notes: tuple[str, ...] = ()
        if route.object is ObjectType.LEADS:
            lookup = route.lookup_field or DEFAULT_LOOKUP_FIELD
            offered = {name.casefold() for name in described[0].searchable}
            if offered and lookup.casefold() not in offered:
                notes = (
                    f"lookup field {lookup!r} is not among the fields leads can be looked up by",
                )
        return HeaderCheck(
            object=object_label(route),
            keys=tuple(needed.values()),
            missing=tuple(k for folded, k in needed.items() if folded not in present),
            unknown=tuple(name for name in names if name.casefold() not in known),
            unknown_fails=route.unknown_columns == "fail",
            notes=notes,
        )

    async def check_file(self, route: Route, path: Path, fmt: str) -> HeaderCheck | None:
        """`check` of the file's header; None when the header cannot be read (the
        splitter then says why, as it would have without this check)."""
        try:
            columns = await asyncio.to_thread(read_header, path, fmt)
        except (OSError, InputError):
            return None
        return await self.check(route, columns)

    # -- the cache -------------------------------------------------------------------

    async def _object_keys(self, route: Route) -> tuple[str, ...]:
        """The columns Marketo itself matches records of the route's object by."""
        match route.object:
            case ObjectType.LEADS:
                return (route.lookup_field or DEFAULT_LOOKUP_FIELD,)
            case ObjectType.CUSTOM_OBJECT:
                return (await self._custom_object(route.api_name)).dedupe_fields
            case ObjectType.PROGRAM_MEMBERS:
                return (MEMBER_KEY,)

    async def _leads(self) -> Description:
        return await self._cached("leads", self._describer.describe_leads)

    async def _custom_object(self, api_name: str) -> Description:
        fetch = partial(self._describer.describe_custom_object, api_name)
        return await self._cached(f"customobject:{api_name}", fetch)

    async def _cached(self, key: str, fetch: Callable[[], Awaitable[Description]]) -> Description:
        """The description under `key`, asked of Marketo when there is none or it is old.
        One ask at a time per key: callers that arrive meanwhile get its answer."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            entry, now = self._entries.get(key), self._clock()
            if entry is not None and now < entry.fresh_until:
                return entry.description
            try:
                description = await fetch()
            except MarketoError as exc:
                if entry is None:
                    raise
                # Marketo's fields rarely change: the last answer serves a while longer.
                self._entries[key] = _Entry(entry.description, now + RETRY_STALE_SECONDS)
                log.warning(
                    "describe_refresh_failed",
                    object=key,
                    error=str(exc),
                    retry_in=RETRY_STALE_SECONDS,
                )
                return entry.description
            self._entries[key] = _Entry(description, now + self._max_age)
            log.info("object_described", object=key, fields=len(description.fields))
            return description


def read_header(path: Path, fmt: str) -> tuple[str, ...]:
    """The column names of the file's header, trimmed as the splitter writes them.
    InputError for a header the splitter would refuse, OSError for a file that cannot
    be read. Blocking: run it in a thread."""
    buffer = b""
    with path.open("rb") as fh:
        while len(buffer) < HEADER_READ_LIMIT:
            block = fh.read(_READ_BLOCK)
            end = header_end(buffer + block, len(buffer))
            buffer += block
            if end is not None or not block:
                line = buffer if end is None else buffer[:end]
                return tuple(name.strip() for name in splitter.parse_header(line, fmt, path))
    raise InputError(path, f"header line is longer than {HEADER_READ_LIMIT} bytes", line=1)


def header_end(data: bytes, start: int) -> int | None:
    """The end of the first record in `data` (after its LF), looking at LFs from `start`
    on: an LF ends it when the quotes before it are even (RFC 4180, as the splitter
    reads it)."""
    at = data.find(b"\n", start)
    while at >= 0:
        if data.count(b'"', 0, at) % 2 == 0:
            return at + 1
        at = data.find(b"\n", at + 1)
    return None
