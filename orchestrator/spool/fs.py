"""The spool's blocking filesystem helpers: classify, list and move inbox entries.

Everything here runs in a worker thread (the spool and its claimer call it
through `asyncio.to_thread`) and works from lstat alone: entries are classified
by their mode, never opened or read. Moves into work/ are plain renames on one
filesystem, checked afterwards against the inode and kind that were seen.
Also here: work path names, the hand-over tickets of a batch, and the data
directory tree.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from orchestrator.errors import ConfigError
from orchestrator.models import FileRecord
from orchestrator.tickets import drop_ticket, read_ticket

IGNORED_SUFFIXES = (".part", ".tmp")
NAME_MAX = 255  # bytes in one path component on Linux filesystems


class EntryKind(StrEnum):
    """What lstat says an inbox entry is."""

    FILE = "regular file"
    SYMLINK = "symbolic link"
    DIRECTORY = "directory"
    FIFO = "named pipe (FIFO)"
    SOCKET = "socket"
    CHAR_DEVICE = "character device"
    BLOCK_DEVICE = "block device"
    OTHER = "special file"

    @classmethod
    def of(cls, mode: int) -> EntryKind:
        for test, kind in KIND_TESTS:
            if test(mode):
                return kind
        return cls.OTHER

    @property
    def refusal(self) -> str | None:
        """The claim's error for this kind; None for a regular file."""
        if self is EntryKind.FILE:
            return None
        return f"{self.value}: refused, never read or uploaded"


KIND_TESTS: tuple[tuple[Callable[[int], bool], EntryKind], ...] = (
    (stat.S_ISREG, EntryKind.FILE),
    (stat.S_ISLNK, EntryKind.SYMLINK),
    (stat.S_ISDIR, EntryKind.DIRECTORY),
    (stat.S_ISFIFO, EntryKind.FIFO),
    (stat.S_ISSOCK, EntryKind.SOCKET),
    (stat.S_ISCHR, EntryKind.CHAR_DEVICE),
    (stat.S_ISBLK, EntryKind.BLOCK_DEVICE),
)


class Signature(NamedTuple):
    """What must hold still for an entry to settle."""

    ino: int
    kind: EntryKind
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One inbox entry as lstat saw it."""

    route: str
    name: str
    path: Path
    signature: Signature


class Move(StrEnum):
    """How moving an entry into work/ ended."""

    MOVED = "moved"
    VANISHED = "vanished"  # the source was gone before the rename
    CHANGED = "changed"  # something else had taken the name; put back for a fresh look


def is_ignored(name: str) -> bool:
    """Names writers use while a file is incomplete."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def signature_of(st: os.stat_result) -> Signature:
    return Signature(st.st_ino, EntryKind.of(st.st_mode), st.st_size, st.st_mtime_ns)


def list_route(directory: Path, route: str) -> list[Entry]:
    """Every entry of a route directory that is not ignored, by lstat (blocking)."""
    entries = []
    with os.scandir(directory) as found:
        for item in found:
            if is_ignored(item.name):
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:  # gone since the listing, or not ours to look at
                continue
            entries.append(Entry(route, item.name, Path(item.path), signature_of(st)))
    return entries


def list_routes(
    inbox: Path, routes: Iterable[str]
) -> tuple[dict[str, list[Entry]], dict[str, str]]:
    """Entries per route directory, and the problem for each that could not be listed."""
    listing: dict[str, list[Entry]] = {}
    problems: dict[str, str] = {}
    for route in routes:
        directory = inbox / route
        try:
            listing[route] = list_route(directory, route)
        except FileNotFoundError:
            problems[route] = "missing: recreated"
            with contextlib.suppress(OSError):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems[route] = f"cannot be listed: {exc.strerror or exc}"
    return listing, problems


def list_top(inbox: Path, routes: Collection[str]) -> list[tuple[str, bool]]:
    """Names directly in inbox/ that are not route directories, with is-directory."""
    try:
        with os.scandir(inbox) as found:
            return [
                (item.name, item.is_dir(follow_symlinks=False))
                for item in found
                if item.name not in routes and not is_ignored(item.name)
            ]
    except FileNotFoundError:
        return []


def move_entry(entry: Entry, work: Path) -> Move:
    """Rename `entry` to `work` without opening it, then check it is what was seen (blocking)."""
    work.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(work):
        raise FileExistsError(17, "work path already taken", str(work))
    try:
        os.rename(entry.path, work)
    except FileNotFoundError:
        if not os.path.lexists(entry.path):
            return Move.VANISHED
        raise
    moved = os.lstat(work)
    if (moved.st_ino, EntryKind.of(moved.st_mode)) == (entry.signature.ino, entry.signature.kind):
        return Move.MOVED
    put_back(work, entry.path)
    return Move.CHANGED


def move_entries(moves: list[tuple[Entry, Path]]) -> list[Move | OSError]:
    """`move_entry` for each (entry, work path) in turn: how each ended, or the OSError
    that kept it in place (blocking; one trip to a worker thread for a batch of claims)."""
    outcomes: list[Move | OSError] = []
    for entry, work in moves:
        try:
            outcomes.append(move_entry(entry, work))
        except OSError as exc:
            outcomes.append(exc)
    return outcomes


def read_tickets(entries: list[Path]) -> list[tuple[str, str] | None]:
    """The hand-over ticket beside each entry, or None (blocking)."""
    return [read_ticket(entry) for entry in entries]


def drop_tickets(entries: list[Path]) -> None:
    """Delete the tickets beside these entries, their claims done (blocking)."""
    for entry in entries:
        drop_ticket(entry)


def put_back(work: Path, source: Path) -> None:
    """Return an entry to the inbox after a claim that must not stand (blocking)."""
    if not os.path.lexists(source):
        with contextlib.suppress(OSError):
            os.rename(work, source)


def resume_move(record: FileRecord) -> bool:
    """Finish the move of a claim a crash interrupted; True if it now sits at its work path."""
    source, work = Path(record.source_path), Path(record.work_path)
    want_file = record.error is None
    if os.path.lexists(work):
        if (EntryKind.of(os.lstat(work).st_mode) is EntryKind.FILE) == want_file:
            return True
        put_back(work, source)
        return False
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        return False
    if (EntryKind.of(st.st_mode) is EntryKind.FILE) != want_file:
        return False  # another kind of entry took the name: a fresh scan will judge it
    entry = Entry(record.route, record.name, source, signature_of(st))
    try:
        return move_entry(entry, work) is Move.MOVED
    except OSError:
        return False


def work_name(ns: int, name: str) -> str:
    """`<ns>-<name>`, shortened from the front of the name to fit NAME_MAX bytes."""
    prefix = f"{ns}-"
    while len(os.fsencode(prefix + name)) > NAME_MAX:
        name = name[1:]
    return prefix + name


def make_dir(path: Path) -> None:
    """Create a directory under data_dir; one that cannot be made is a configuration error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError("data_dir", f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot create {path}: {exc.strerror or exc}") from None
