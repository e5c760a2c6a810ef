"""Driving the real daemon through its CLI in subprocesses: config files, processes, waits.

- `daemon_config` / `write_config`: a TOML file for `marketo-orchestrator run`, with
  Marketo's limits but every interval scaled down (the simulator's `rate_window`
  must match `limits.api_window_seconds`, as in engine_support.SIM_KNOBS).
- `Cli`: starts `marketo-orchestrator ...` with stdout/stderr in files, a clean
  environment (no MARKETO_*/ORCHESTRATOR_* from the caller) and kills whatever
  is still running at teardown. `CliProcess` reads the JSON log lines back.
- `wait_for`: poll a condition until a deadline; never a fixed sleep.
- `RecordingProxy`: a loopback HTTP proxy in front of the simulator that keeps
  every request whole (query values, body bytes), for assertions the
  simulator's call log cannot make (parameter values, upload contents).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from orchestrator.config import Route
from tests.engine_support import CLIENT_ID

T = TypeVar("T")

CONSOLE_SCRIPT = Path(sys.executable).with_name("marketo-orchestrator")
COMMAND = (
    [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "orchestrator"]
)
FOREIGN_ENV = ("MARKETO_", "ORCHESTRATOR_", "WATCHFILES_")
POLL = 0.05  # how often wait_for looks again


# -- configuration ---------------------------------------------------------------


def route_table(route: Route) -> dict[str, Any]:
    """A route as its [[routes]] table: every field that is set."""
    table: dict[str, Any] = {}
    for f in fields(route):
        value = getattr(route, f.name)
        if value:
            table[f.name] = str(value) if f.name == "object" else value
    return table


def daemon_config(
    data_dir: Path, base_url: str, routes: Iterable[Route], **sections: Mapping[str, Any]
) -> dict[str, Any]:
    """Settings for a daemon in a subprocess: fast polling and backoff, JSON logs, no HTTP.

    `sections` override keys per section, e.g. `limits={"queued_jobs": 3}`.
    """
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "marketo": {"base_url": base_url, "client_id": CLIENT_ID, "request_timeout": 10.0},
        "limits": {"max_chunk_bytes": 2_000, "api_window_seconds": 2.0},
        "polling": {"interval": 0.05, "max_interval": 0.2},
        "backoff": {"initial": 0.05, "max": 0.4},
        "watch": {"settle_seconds": 0.0},
        "http": {"listen": ""},
        "logging": {"format": "json", "level": "info"},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    config["routes"] = [route_table(r) for r in routes]
    return config


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything we write
    raise TypeError(f"no TOML for {value!r}")


def toml_text(config: Mapping[str, Any]) -> str:
    """Top-level keys, then [section] tables, then [[routes]] arrays of tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict | list)]
    for name, table in config.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    for name, tables in config.items():
        if isinstance(tables, list):
            for table in tables:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(toml_text(config), encoding="utf-8")
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now (bind port 0, read it, let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- waiting ----------------------------------------------------------------------


async def wait_for(
    condition: Callable[[], T | None],
    what: str,
    *,
    within: float = 20.0,
    process: CliProcess | None = None,
) -> T:
    """Poll `condition` until it returns something truthy; fail after `within` seconds.

    With `process`, fail at once (showing its stderr) if it exits meanwhile.
    """

    async def check() -> T | None:
        return condition()

    return await wait_until(check, what, within=within, process=process)


async def wait_until(
    condition: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    within: float = 20.0,
    process: CliProcess | None = None,
) -> T:
    """`wait_for` with a coroutine as the condition (an HTTP request, say)."""
    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value:
            return value
        if process is not None and process.returncode is not None:
            raise AssertionError(
                f"{what}: the daemon exited with {process.returncode}\n{process.stderr_text()}"
            )
        if time.monotonic() > deadline:
            tail = f"\nstderr:\n{process.stderr_text()}" if process is not None else ""
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}{tail}")
        await asyncio.sleep(POLL)


# -- processes ----------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without our own variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


@dataclass
class CliProcess:
    """One `marketo-orchestrator` subprocess with its output in files."""

    args: list[str]
    process: asyncio.subprocess.Process
    stdout_path: Path
    stderr_path: Path

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines on stdout so far (a line still being written is skipped)."""
        found = []
        for line in self.stdout_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    async def wait_for_event(
        self, name: str, *, count: int = 1, within: float = 20.0
    ) -> list[dict[str, Any]]:
        """Wait until `name` was logged at least `count` times."""
        return await wait_for(
            lambda: found if len(found := self.events(name)) >= count else None,
            f"{count} x {name!r} in the log",
            within=within,
            process=self,
        )

    async def wait(self, within: float = 30.0) -> int:
        """The exit code; fails the test if the process is still running after `within` seconds."""
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            raise AssertionError(
                f"{self.args} still running after {within} s\n{self.stderr_text()}"
            ) from None

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@dataclass
class Cli:
    """Factory of `marketo-orchestrator` subprocesses, all killed at `close()`."""

    workdir: Path
    started: list[CliProcess] = field(default_factory=list)

    async def start(self, *args: str, env: Mapping[str, str] | None = None) -> CliProcess:
        n = len(self.started) + 1
        out, err = self.workdir / f"cli{n}.stdout", self.workdir / f"cli{n}.stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *COMMAND,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=dict(env) if env is not None else clean_env(),
                cwd=self.workdir,
            )
        proc = CliProcess(list(args), process, out, err)
        self.started.append(proc)
        return proc

    async def run(
        self, *args: str, env: Mapping[str, str] | None = None, within: float = 30.0
    ) -> CliProcess:
        """Start and wait for the exit (its code is `returncode`)."""
        proc = await self.start(*args, env=env)
        await proc.wait(within)
        return proc

    async def close(self) -> None:
        for proc in reversed(self.started):
            await proc.kill()


# -- a proxy that sees everything -----------------------------------------------------

HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it went over the wire to Marketo (kept in memory only)."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes
    bearer: bool  # an `Authorization: Bearer ...` header was sent


class RecordingProxy:
    """Forwards every request to `upstream` and keeps it: `base_url` stands in for Marketo's."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[Seen] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def requests(self, path_contains: str = "", method: str = "") -> list[Seen]:
        return [
            s for s in self.seen if path_contains in s.path and (not method or s.method == method)
        ]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        bearer = request.headers.get("Authorization", "").startswith("Bearer ")
        self.seen.append(Seen(request.method, request.path, dict(request.query), body, bearer))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=upstream.status, body=payload, headers=kept)


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


def contains_any(data: bytes, needles: Iterable[str]) -> list[str]:
    """Which of `needles` occur in `data` (as UTF-8 bytes)."""
    return [n for n in needles if n.encode() in data]
