"""Writes that survive a crash: a directory's entries made durable, a file written whole.

A rename is durable only once the directory holding it is fsynced; a file written in
place can be read half written after a crash. Every module that must not lose a write
goes through these two.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync the directory `path`: the renames and creations in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held: a temp file in the same directory
    (`.<name>.tmp`, which the spool ignores), fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
