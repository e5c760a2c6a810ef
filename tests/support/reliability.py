"""What the reliability suite's fixtures (its conftest) hand to its tests.

- `Volume`: a data directory that fills up or turns read-only, for the storage faults:
  a small tmpfs or a bind mount (needs root and mount(8)); where mounting is not
  allowed, permissions stand in. The `volume` fixture makes them (`MakeVolume`) and
  undoes them at teardown.
- `Record`: the `figures` fixture, `figures(name=value, ...)`, numbers for the
  reliability table in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def run_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


class Volume:
    """`path` is a bind mount of `backing`, optionally on its own tmpfs of `size`.

    `read_only()` makes a read-only bind mount of the same files at a staging path
    and moves it on top of `path`: a daemon that holds the database open keeps its
    descriptors on the writable mount below, but every new open, create or rename
    under `path` fails with EROFS. (Remounting a mount in use read-only refuses with
    EBUSY while files are open for writing; and `path` is never empty meanwhile.)
    `writable()` remounts the top mount read-write.

    Where mounting is not allowed (`privileged=False`: CI runs unprivileged) `path`
    is a plain directory and read-only means chmod a-w on everything under it, which
    stops an unprivileged daemon the same way (EACCES instead of EROFS). A size, and
    so `fill()`, needs a tmpfs: those tests skip.
    """

    def __init__(self, root: Path, size: str | None, *, privileged: bool) -> None:
        self.backing = root / "backing"
        self.path = root / "data"
        self._staging = root / "staging"
        self._privileged = privileged
        for path in (self.backing, self.path, self._staging):
            path.mkdir(parents=True)
        self._mounted: list[Path] = []
        if not privileged:
            self.backing = self.path
            return
        if size is not None:
            self._mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.backing))
            self._mounted.append(self.backing)
        self._mount("--bind", str(self.backing), str(self.path))

    def read_only(self) -> None:
        if not self._privileged:
            self._chmod(dirs=0o555, files=0o444)
            return
        self._mount("--bind", str(self.backing), str(self._staging))
        self._mount("-o", "remount,bind,ro", str(self._staging))
        self._mount("--move", str(self._staging), str(self.path))

    def writable(self) -> None:
        if not self._privileged:
            self._chmod(dirs=0o755, files=0o644)
            return
        self._mount("-o", "remount,bind,rw", str(self.path))

    def fill(self, leave_bytes: int) -> Path:
        """Write a ballast file until `leave_bytes` (or less) are free; returns its path."""
        if not self._mounted:
            pytest.skip("filling a disk needs a tmpfs of its own, so root and mount(8)")
        ballast = self.backing / "ballast"
        free = os.statvfs(self.backing).f_bavail * os.statvfs(self.backing).f_frsize
        with ballast.open("ab") as fh:
            fh.write(b"\0" * max(0, free - leave_bytes))
        return ballast

    def close(self) -> None:
        if not self._privileged:
            self.writable()
        for path in (self.path, *reversed(self._mounted)):
            self._detach(path)

    def _chmod(self, *, dirs: int, files: int) -> None:
        for folder, subdirs, names in os.walk(self.path):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(Path(folder) / name, files, follow_symlinks=False)
            for name in subdirs:
                os.chmod(Path(folder) / name, dirs)
        os.chmod(self.path, dirs)

    @staticmethod
    def _mount(*args: str) -> None:
        done = run_mount(*args)
        if done.returncode != 0:
            pytest.fail(f"mount {' '.join(args)}: {done.stderr.strip()}")

    @staticmethod
    def _detach(path: Path) -> None:
        while is_mountpoint(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=True)


def can_mount(probe: Path) -> bool:
    """True when this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    probe.mkdir(exist_ok=True)
    if run_mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)).returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], capture_output=True, check=False)
    return True


def chmod_stops_us(probe: Path) -> bool:
    """True when a directory without write permission stops this process (not root)."""
    probe.mkdir(exist_ok=True)
    probe.chmod(0o555)
    try:
        (probe / "attempt").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


MakeVolume = Callable[..., Volume]
Record = Callable[..., None]
