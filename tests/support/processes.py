"""`marketo-orchestrator` in subprocesses: a clean environment, output in files, JSON log
lines read back, waits with deadlines, signals by pid, everything killed at the end.

- `clean_env`: the caller's environment without MARKETO_*, ORCHESTRATOR_* and
  WATCHFILES_* (they would change what the process under test does), plus extras.
- `CliRunner`: starts `marketo-orchestrator ...` in its `workdir` (also the cwd, so no
  ./config/orchestrator.toml is picked up by accident) with stdout and stderr in files
  there, kept: the security tests search every byte a process wrote. Built with
  `for_settings`, it owns a config file and passes the client secret in the
  environment only; `daemon()` and `once()` then run `run --config` with it.
  `close()` SIGKILLs (by pid) and reaps every process still running.
- `CliProcess`: one process; its JSON log lines (`events`), exit code with a deadline
  (`wait`), SIGTERM / SIGKILL by pid, memory readings from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Settings
from tests.support.settings import write_settings
from tests.support.waiting import WITHIN, stderr_tail, wait_until

CONSOLE_SCRIPT = Path(sys.executable).with_name("marketo-orchestrator")
COMMAND = (
    [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "orchestrator"]
)
# Variables of the caller's shell that would change what the process under test does.
FOREIGN_ENV = ("MARKETO_", "ORCHESTRATOR_", "WATCHFILES_")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without our own variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


@dataclass
class CliProcess:
    """One `marketo-orchestrator` subprocess with its stdout and stderr in files."""

    number: int
    args: tuple[str, ...]
    process: asyncio.subprocess.Process
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines on stdout so far (a line still being written is skipped);
        with `name`, only those whose event is `name`."""
        found = []
        for line in self.stdout().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    async def wait_for_event(
        self, name: str, *, count: int = 1, within: float = WITHIN
    ) -> list[dict[str, Any]]:
        """Wait until `name` was logged at least `count` times (fails if the process exits)."""
        return await wait_until(
            lambda: found if len(found := self.events(name)) >= count else None,
            f"{count} x {name!r} in the log",
            within=within,
            process=self,
        )

    def status_port(self) -> int | None:
        """The port of the status server, once its start was logged."""
        for event in self.events("status_server"):
            return int(str(event["listen"]).rpartition(":")[2])
        return None

    async def wait(self, within: float = WITHIN) -> int:
        """The exit code; SIGKILLs the process and fails if it runs `within` s longer."""
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()
            raise AssertionError(
                f"{' '.join(self.args)} still running after {within:g} s{stderr_tail(self)}"
            ) from None

    def send_signal(self, sig: signal.Signals) -> None:
        """Send `sig` to this process (by its pid), if it still runs."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM: the daemon drains and exits 0."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (reap it with `wait`)."""
        self.send_signal(signal.SIGKILL)

    def memory_kib(self, key: str = "VmRSS") -> int | None:
        """VmRSS (or VmHWM, the peak) of the running process in KiB, from /proc."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
        return None


class CliRunner:
    """Factory of `marketo-orchestrator` subprocesses in `workdir`, all killed at `close()`.

    `env` holds variables every process gets on top of `clean_env()`; `config`, when
    set, is the file `daemon()`, `once()` and `command()` pass as --config.
    """

    def __init__(
        self, workdir: Path, *, config: Path | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.env = dict(env or {})
        self.started: list[CliProcess] = []

    @classmethod
    def for_settings(cls, workdir: Path, settings: Settings) -> CliRunner:
        """A runner with `settings` as workdir/orchestrator.toml, the secret in its env."""
        workdir.mkdir(parents=True, exist_ok=True)
        config = write_settings(workdir / "orchestrator.toml", settings)
        secret = settings.marketo.client_secret.reveal()
        return cls(workdir, config=config, env={"MARKETO_CLIENT_SECRET": secret} if secret else {})

    async def start(self, *args: str, env: Mapping[str, str] | None = None) -> CliProcess:
        """`marketo-orchestrator *args` with `env` added to the runner's environment."""
        number = len(self.started) + 1
        stem = f"{number:02d}-{args[0] if args else 'cli'}"
        out, err = self.workdir / f"{stem}.stdout", self.workdir / f"{stem}.stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *COMMAND,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=clean_env(**{**self.env, **(env or {})}),
                cwd=self.workdir,
            )
        proc = CliProcess(number, args, process, out, err)
        self.started.append(proc)
        return proc

    async def run(
        self, *args: str, env: Mapping[str, str] | None = None, within: float = WITHIN
    ) -> CliProcess:
        """Start and wait for the exit (its code is `returncode`)."""
        proc = await self.start(*args, env=env)
        await proc.wait(within)
        return proc

    # -- with the runner's config file ---------------------------------------------------

    async def daemon(self, *flags: str, env: Mapping[str, str] | None = None) -> CliProcess:
        """`run --config <config> *flags`: the daemon, running until it is signalled."""
        return await self.start("run", "--config", str(self._config()), *flags, env=env)

    async def once(
        self, *, within: float = WITHIN, env: Mapping[str, str] | None = None
    ) -> CliProcess:
        """`run --once` to its end (fails if that takes longer than `within` s)."""
        proc = await self.daemon("--once", env=env)
        await proc.wait(within)
        return proc

    async def command(self, *args: str, within: float = WITHIN) -> CliProcess:
        """Another subcommand with the same config (`status --json`, say), to its end."""
        return await self.run(args[0], "--config", str(self._config()), *args[1:], within=within)

    def written(self) -> Iterator[Path]:
        """Every stdout and stderr file of every process."""
        for proc in self.started:
            yield proc.stdout_path
            yield proc.stderr_path

    async def close(self) -> None:
        """SIGKILL (by pid) every process still running, and reap it."""
        for proc in reversed(self.started):
            proc.kill()
            await proc.process.wait()

    def _config(self) -> Path:
        if self.config is None:
            raise TypeError("this runner has no config file: build it with for_settings")
        return self.config


# The `daemons` fixture (tests/conftest.py): `daemons(settings)` is a runner for them.
MakeRunner = Callable[[Settings], CliRunner]


async def on_terminal(
    argv: Sequence[str], env: Mapping[str, str], *, stdout: Path | None = None
) -> str:
    """Run `argv` with stderr (and stdout, unless a file is given) on one pseudo-terminal,
    as a person runs it; everything it drew there. Fails unless it exits 0."""
    master, slave = pty.openpty()
    try:
        with contextlib.ExitStack() as files:
            out = files.enter_context(stdout.open("wb")) if stdout is not None else slave
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=slave, env=dict(env)
            )
        os.close(slave)
        slave = -1
        reader = asyncio.create_task(asyncio.to_thread(read_terminal, master))
        try:
            assert await asyncio.wait_for(process.wait(), WITHIN) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return await asyncio.wait_for(reader, WITHIN)
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)


def read_terminal(fd: int) -> str:
    """Everything written to a pty until the last writer closed it (blocking)."""
    out = bytearray()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed its side
            break
        if not data:
            break
        out += data
    return out.decode("utf-8", "replace")
