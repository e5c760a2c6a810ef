"""Machinery of the reliability suite: the daemon as a real subprocess, filesystems that
fill up or turn read-only, waiting on conditions, and the figures the suite reports.

- `daemon_toml` writes every setting as TOML for `marketo-orchestrator run --config`;
  the client secret travels only in MARKETO_CLIENT_SECRET.
- `DaemonRunner` starts `run` / `run --once` with stdout and stderr in files (kept:
  the security tests search every byte the daemon wrote), and SIGKILLs by pid.
- `Volume` mounts a small tmpfs or a bind mount for the storage faults (needs root
  and mount(8); tests that need one skip with the reason when that is missing).
- `figures` records numbers per test; they are printed at the end of the run and
  written as JSON to $RELIABILITY_FIGURES when it is set (the README table).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchestrator.config import Settings
from tests.engine_support import CLIENT_SECRET

T = TypeVar("T")

CONSOLE = Path(sys.executable).with_name("marketo-orchestrator")
COMMAND = [str(CONSOLE)] if CONSOLE.exists() else [sys.executable, "-m", "orchestrator"]
# Variables of the caller's shell that would change what the daemon under test does.
FOREIGN_ENV = ("MARKETO_", "ORCHESTRATOR_", "WATCHFILES_")
SECTIONS = ("marketo", "limits", "polling", "backoff", "watch", "http", "logging")
POLL_SECONDS = 0.02  # how often wait_for looks again


# -- configuration ------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def daemon_toml(settings: Settings) -> str:
    """Every key of `settings` as TOML, but the client secret (env only)."""
    lines = [f"data_dir = {toml_value(settings.data_dir)}"]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        table = getattr(settings, section)
        for f in fields(table):
            if f.name != "client_secret":
                lines.append(f"{f.name} = {toml_value(getattr(table, f.name))}")
    for route in settings.routes:
        lines.append("[[routes]]")
        lines.extend(
            f"{f.name} = {toml_value(getattr(route, f.name))}"
            for f in fields(route)
            if getattr(route, f.name)
        )
    return "\n".join(lines) + "\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env["MARKETO_CLIENT_SECRET"] = CLIENT_SECRET
    return {**env, **extra}


# -- waiting ------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], T | None],
    what: str,
    *,
    within: float = 20.0,
    poll: float = POLL_SECONDS,
) -> T:
    """Look at `condition` every `poll` seconds until it is truthy; fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(poll)


# -- the daemon in a subprocess -----------------------------------------------------


@dataclass
class Life:
    """One run of the daemon process, its output kept in files."""

    number: int
    args: tuple[str, ...]
    process: asyncio.subprocess.Process
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self, within: float) -> int:
        """The exit code; kills the process and fails the test if it runs `within` s longer."""
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()
            pytest.fail(f"daemon {' '.join(self.args)} still running after {within:g} s")

    def kill(self) -> None:
        """SIGKILL this process (by its pid), if it still runs."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        found = []
        for line in self.stdout().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def memory_kib(self, key: str = "VmRSS") -> int | None:
        """VmRSS (or VmHWM, the peak) of the running process, in KiB."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
        return None


class DaemonRunner:
    """Starts `marketo-orchestrator run` with one config; every life's output stays on disk."""

    def __init__(self, config: Path, out_dir: Path) -> None:
        self.config = config
        self.out_dir = out_dir
        self.lives: list[Life] = []

    async def start(self, *flags: str, env: Mapping[str, str] | None = None) -> Life:
        number = len(self.lives) + 1
        out, err = self.out_dir / f"life-{number}.out", self.out_dir / f"life-{number}.err"
        args = ("run", "--config", str(self.config), *flags)
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *COMMAND,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=clean_env(**(env or {})),
            )
        life = Life(number, args, process, out, err)
        self.lives.append(life)
        return life

    async def once(self, *, within: float = 60.0, env: Mapping[str, str] | None = None) -> Life:
        """`run --once` to its end (fails the test if that takes longer than `within` s)."""
        life = await self.start("--once", env=env)
        await life.wait(within)
        return life

    async def cli(self, *args: str, within: float = 30.0) -> tuple[int, str, str]:
        """Another subcommand with the same config (`status --json`, say)."""
        process = await asyncio.create_subprocess_exec(
            *COMMAND,
            *args,
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )
        async with asyncio.timeout(within):
            out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    def written(self) -> Iterator[Path]:
        """Every stdout and stderr file of every life."""
        for life in self.lives:
            yield life.out
            yield life.err

    async def close(self) -> None:
        for life in self.lives:
            life.kill()
            await life.process.wait()


MakeRunner = Callable[[Settings], DaemonRunner]


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[MakeRunner]:
    """Factory: `daemons(settings)` writes the config and returns a DaemonRunner.

    Every process still running at teardown is SIGKILLed (by pid) and reaped.
    """
    made: list[DaemonRunner] = []

    def make(settings: Settings) -> DaemonRunner:
        folder = tmp_path / f"daemon-{len(made) + 1}"
        folder.mkdir()
        config = folder / "orchestrator.toml"
        config.write_text(daemon_toml(settings), encoding="utf-8")
        runner = DaemonRunner(config, folder)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        await runner.close()


# -- filesystems that fill up or turn read-only ----------------------------------------


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


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[MakeVolume]:
    """Factory: `volume(size="4m")` (or size=None: no size limit) gives a Volume.

    Mounts when this process may (chmod does not stop root); else permissions when
    they stop it; else the test skips, since nothing would stop the daemon writing.
    """
    privileged = can_mount(tmp_path / "mount-probe")
    if not privileged and not chmod_stops_us(tmp_path / "chmod-probe"):
        pytest.skip("cannot mount, and permissions do not stop this user: no read-only fault")
    made: list[Volume] = []

    def make(size: str | None = None) -> Volume:
        made.append(Volume(tmp_path / f"volume-{len(made) + 1}", size, privileged=privileged))
        return made[-1]

    yield make
    for vol in made:
        vol.close()


# -- figures ------------------------------------------------------------------------

FIGURES = pytest.StashKey[dict[str, dict[str, Any]]]()
Record = Callable[..., None]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Record:
    """`figures(name=value, ...)`: numbers for the reliability table, kept per test."""
    table = request.config.stash.setdefault(FIGURES, {})

    def record(**values: Any) -> None:
        table.setdefault(request.node.name, {}).update(values)

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    table = config.stash.get(FIGURES, {})
    if not table:
        return
    terminalreporter.section("reliability figures")
    for test, values in table.items():
        terminalreporter.write_line(f"{test}: {json.dumps(values, sort_keys=True)}")
    target = os.environ.get("RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
