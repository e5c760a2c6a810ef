"""A stand-in Marketo subscription on aiohttp: identity, the Bulk Import API, a test API.

Paths and shapes follow shared/marketo-openapi: swagger-identity.json for the
token, swagger-mapi.json for the twelve /bulk/v1 import operations. Answers use
Marketo's envelope, HTTP 200 with `requestId`, `success`, `result`, `errors`
(string codes) and `warnings`. The queue and rows live in `simulator.queue`
(records in `simulator.records`); tokens, call limits, faults and the call log
in `simulator.gate`; the operation handlers in `simulator.operations`. This module is
the HTTP face.

Choices where Marketo's documentation is silent (operations: see `simulator.operations`):

- A request body (Content-Length, the whole multipart request, not only its
  file part) of `max_file_bytes` or more: HTTP 413 with a text body, as the
  proxy in front of Marketo answers, before auth.
- Every bulk call passes, in order: 615 (calls in flight, counted from arrival),
  606 (calls accepted in the sliding window), 607 (calls accepted since start or
  reset; the simulator's quota does not reset at midnight), the slow delay, a
  dropped connection, injected 500/503, 413, a token in the query string or a
  form field (601, recorded as a violation), the bearer token (601 missing or
  unknown, 602 expired), injected error codes, then the operation (whose answer
  `drop_reply_fraction` may lose and `late_reply_fraction` may hold back past
  the client's read timeout). Refused calls are not counted in the window or
  the quota.
- Identity calls count toward no limit. A client_secret in the query string
  works but is recorded as violation "secret_in_url".

The test API lives under /_sim/ (JSON, no auth, not in the call log): GET
records, calls, stats, tokens, jobs, config; POST faults, foreign, reset. The
same is available in-process on `Simulator`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import math
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from orchestrator.errors import ConfigError
from orchestrator.simulator.gate import (
    MESSAGES,
    CallInfo,
    CallLog,
    Faults,
    Limits,
    Tokens,
    bearer,
    credentials_ok,
)
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.operations import BulkOperations, Call, Operation, Upload, read_upload
from orchestrator.simulator.queue import JobQueue, Refusal
from orchestrator.simulator.state import StateError, load_state, restore, save_state, snapshot

__all__ = ["Simulator", "SimulatorConfig", "add_arguments", "config_from_args", "serve"]

log = structlog.get_logger(__name__)

TOKEN_PATH = "/identity/oauth/token"
SIM_PREFIX = "/_sim"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wall_now() -> dt.datetime:
    """The real wall clock in UTC (tests replace `Simulator.wall_clock`)."""
    return dt.datetime.now(dt.UTC)


class Simulator:
    """One simulated Marketo subscription, served over HTTP.

    async with Simulator(SimulatorConfig(job_overhead=0.05)) as sim:
        ...  # point a client at sim.base_url; read sim.records("leads"), sim.stats()
    """

    def __init__(
        self, config: SimulatorConfig | None = None, *, state_path: Path | None = None
    ) -> None:
        self.config = config if config is not None else SimulatorConfig()
        # With a state path, jobs and records survive a restart (see simulator.state).
        self.state_path = state_path
        self._save_lock = asyncio.Lock()
        self.base_url = ""
        self.port = 0
        self._clock = time.monotonic
        self.wall_clock: Callable[[], dt.datetime] = wall_now  # the quota day's clock
        self._t0 = self._clock()
        self._faults = Faults(self.config.seed)
        self._queue = JobQueue(self.config)
        self._runner: web.AppRunner | None = None
        self._tokens = Tokens()
        self._limits = Limits()
        self._log = CallLog()
        self._copies: Counter[str] = Counter()  # creates per distinct file (late_reply_copies)
        self._operations = BulkOperations(
            self._queue, self._clock, lambda: self.config, on_change=self.save
        )

    # -- lifecycle -------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(TOKEN_PATH, self._logged("identity", self._identity))
        app.router.add_post(TOKEN_PATH, self._logged("identity", self._identity))
        for method, path, operation, handler in self._operations.routes():
            app.router.add_route(
                method, path, self._logged(operation, partial(self._bulk, handler))
            )
        for name in ("records", "calls", "stats", "tokens", "jobs", "config"):
            app.router.add_get(f"{SIM_PREFIX}/{name}", self._sim_get)
        for name in ("faults", "foreign", "reset"):
            app.router.add_post(f"{SIM_PREFIX}/{name}", self._sim_post)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, receive_buffer: int | None = None
    ) -> str:
        """Serve on host:port (0: a free port); returns the base URL.

        `receive_buffer` sets SO_RCVBUF on the listening socket (inherited by every
        connection): a small one makes a slow reader felt by the sender at once,
        as a slow uplink is, instead of hidden in megabytes of loopback buffers."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        if self.state_path is not None:
            await asyncio.to_thread(self._load)
        runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            if receive_buffer is None:
                await web.TCPSite(runner, host, port).start()
            else:
                listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
                listener.bind((host, port))
                listener.listen()
                await web.SockSite(runner, listener).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.base_url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            await self.save()

    async def save(self) -> None:
        """Write the subscription's state to `state_path` (if given): after every job
        created, so a batch id a client was given survives even a kill, and at stop."""
        if self.state_path is None:
            return
        async with self._save_lock:
            data = snapshot(self._queue, self._clock())
            await asyncio.to_thread(save_state, self.state_path, data)

    def _load(self) -> None:
        """Restore the state saved by an earlier run; a bad file is moved aside."""
        assert self.state_path is not None
        try:
            data = load_state(self.state_path)
            if data is not None:
                restore(self._queue, data, self._clock())
                log.info("simulator_state_restored", path=str(self.state_path))
        except StateError as exc:
            aside = self.state_path.with_name(self.state_path.name + ".bad")
            self.state_path.replace(aside)
            log.warning("simulator_state_unusable", error=str(exc), moved_to=str(aside))

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- in-process test API -----------------------------------------------------

    def records(
        self,
        object_type: str,
        *,
        api_name: str | None = None,
        program_id: str | int | None = None,
        list_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Stored records of `object_type`: leads, customobject (api_name),
        programmembers (program_id) or lists (list_id: the leads in that list)."""
        self._queue.advance(self._clock())
        return self._queue.store.records(
            object_type, api_name=api_name, program_id=program_id, list_id=list_id
        )

    def calls(self) -> list[dict[str, Any]]:
        return [asdict(info) for info in self._log.calls]

    def stats(self) -> dict[str, Any]:
        self._queue.advance(self._clock())
        call_log, limits = self._log, self._limits
        return {
            "max_outstanding": dict(self._queue.max_outstanding),
            "max_importing": dict(self._queue.max_importing),
            "errors": dict(call_log.errors),
            "http_errors": dict(call_log.http_errors),
            "violations": [v["kind"] for v in call_log.violations],
            "violation_details": [dict(v) for v in call_log.violations],
            "calls": dict(call_log.op_counts),
            "jobs": dict(Counter(job.status for job in self._queue.jobs.values())),
            "tokens_issued": len(self._tokens.issued),
            "max_in_flight": limits.max_in_flight,
            "max_calls_in_window": limits.max_window,
            "dropped": call_log.dropped,
        }

    def tokens(self) -> list[str]:
        """Every access token issued, oldest first (for leak searches)."""
        return list(self._tokens.issued)

    def jobs(self) -> list[dict[str, Any]]:
        self._queue.advance(self._clock())
        return [job.as_dict(self._t0) for job in self._queue.jobs.values()]

    def set_knobs(self, **knobs: Any) -> None:
        """Change knobs at runtime; unknown names or wrong types raise ValueError."""
        config = self.config.with_knobs(**knobs)
        if "seed" in knobs:
            self._faults.reseed(config.seed)
        self.config = config
        self._queue.reconfigure(config, self._clock())

    def add_foreign_jobs(self, count: int, seconds: float) -> list[int]:
        """Let another integration hold up to `count` queue slots for `seconds`."""
        jobs = self._queue.add_foreign(count, seconds, self._clock())
        return [job.batch_id for job in jobs]

    def reset(self) -> None:
        """Forget records, jobs, the call log and stats. Tokens stay valid."""
        self._queue.reset()
        self._log.reset()
        self._limits.reset()

    # -- request plumbing --------------------------------------------------------

    def _logged(
        self, operation: str, run: Callable[[web.Request, CallInfo], Awaitable[web.StreamResponse]]
    ) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            started = self._clock()
            info = CallInfo(
                t=round(started - self._t0, 6),
                method=request.method,
                path=request.path,
                query_keys=sorted(set(request.query.keys())),
                operation=operation,
            )
            try:
                response = await run(request, info)
                info.status = None if info.dropped else response.status
                return response
            finally:
                self._log.record(info, self._clock() - started)

        return handle

    async def _bulk(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        self._limits.enter()
        try:
            return await self._checked(handler, request, info)
        except Refusal as refusal:
            info.code = refusal.code
            return self._operations.envelope(
                [], [{"code": refusal.code, "message": refusal.message}]
            )
        finally:
            self._limits.leave()

    async def _checked(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        cfg, faults = self.config, self._faults
        if "access_token" in request.query:
            info.client_id = self._tokens.owner(request.query["access_token"])
            self._log.violation("token_in_url", info)
        self._limits.roll_quota(self.wall_clock(), cfg)
        self._limits.admit(self._clock(), cfg)
        if faults.chance(cfg.slow_fraction):
            await asyncio.sleep(cfg.slow_seconds)
        upload = await self._read_upload(request, info) if request.method == "POST" else None
        if faults.chance(cfg.drop_fraction):
            return self._drop(request, info)
        fault = faults.http_fault(cfg)
        if fault is not None:
            return web.Response(status=fault[0], text=fault[1])
        body_bytes = max(request.content_length or 0, upload.size if upload else 0)
        if upload is not None and body_bytes >= cfg.max_file_bytes:
            self._log.violation("oversized_file", info)
            return web.Response(status=413, text="413 Request Entity Too Large")
        if "access_token" in request.query or "access_token" in info.form_keys:
            raise Refusal("601", MESSAGES["601"])
        info.client_id = self._tokens.authenticate(request, self._clock())
        faults.raise_injected(cfg)
        self._queue.advance(self._clock())
        response = await handler(Call(request, info, info.client_id, upload))
        if faults.chance(self.config.drop_reply_fraction):
            return self._drop(request, info)
        if faults.chance(self.config.late_reply_fraction) or self._late_copy(upload, info):
            await asyncio.sleep(self.config.late_reply_seconds)  # the job exists already
        return response

    def _late_copy(self, upload: Upload | None, info: CallInfo) -> bool:
        """Whether this create is among the first `late_reply_copies` of its file."""
        if not self.config.late_reply_copies or upload is None or upload.data is None:
            return False
        if info.batch_id is None:
            return False
        key = hashlib.sha256(upload.data).hexdigest()
        self._copies[key] += 1
        return self._copies[key] <= self.config.late_reply_copies

    @staticmethod
    def _drop(request: web.Request, info: CallInfo) -> web.StreamResponse:
        """Close the connection: the client gets no answer at all."""
        info.dropped = True
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never reaches the client

    async def _read_upload(self, request: web.Request, info: CallInfo) -> Upload:
        """The upload of a create call; a token among the form fields is a violation."""
        cfg = self.config
        upload = await read_upload(
            request, info.form_keys, cfg.max_file_bytes, cfg.read_bytes_per_second
        )
        if "access_token" in info.form_keys:
            info.client_id = info.client_id or self._tokens.owner(bearer(request))
            self._log.violation("token_in_form", info)
        return upload

    # -- identity ----------------------------------------------------------------

    async def _identity(self, request: web.Request, info: CallInfo) -> web.StreamResponse:
        params = dict(request.query)
        if "client_secret" in request.query:
            self._log.violation("secret_in_url", info)
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            form = await request.post()
            info.form_keys = sorted(form.keys())
            params |= {k: v for k, v in form.items() if isinstance(v, str)}
        client_id, secret = params.get("client_id", ""), params.get("client_secret", "")
        info.client_id = client_id or None
        grant = params.get("grant_type")
        if grant != "client_credentials":
            error = "invalid_request" if grant is None else "unsupported_grant_type"
            return web.json_response(
                {"error": error, "error_description": "grant_type must be client_credentials"},
                status=400,
            )
        if not (client_id and secret and credentials_ok(self.config, client_id, secret)):
            return web.json_response(
                {"error": "unauthorized", "error_description": "Bad client credentials"}, status=401
            )
        now = self._clock()
        token = self._tokens.issue(client_id, now, self.config.token_ttl)
        return web.json_response(
            {
                "access_token": token.value,
                "token_type": "bearer",
                "expires_in": max(0, math.ceil(token.expires_at - now - 1e-3)),  # float noise
                "scope": f"{client_id}@simulator",
            }
        )

    # -- test API over HTTP --------------------------------------------------------

    async def _sim_get(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix(f"{SIM_PREFIX}/")
        if name == "records":
            query = request.query
            try:
                list_id = int(query["list_id"]) if "list_id" in query else None
                body: Any = self.records(
                    query.get("object", ""),
                    api_name=query.get("api_name"),
                    program_id=query.get("program_id"),
                    list_id=list_id,
                )
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
        else:
            views: dict[str, Callable[[], Any]] = {
                "calls": self.calls,
                "stats": self.stats,
                "tokens": self.tokens,
                "jobs": self.jobs,
                "config": self.config.public,
            }
            body = views[name]()
        return web.json_response(body)

    async def _sim_post(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix(f"{SIM_PREFIX}/")
        try:
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            if name == "faults":
                self.set_knobs(**body)
                return web.json_response(self.config.public())
            if name == "foreign":
                count, seconds = body.get("count"), body.get("seconds")
                if not isinstance(count, int) or not isinstance(seconds, int | float):
                    raise ValueError("count (int) and seconds (number) are required")
                return web.json_response(
                    {"batch_ids": self.add_foreign_jobs(count, float(seconds))}
                )
            self.reset()
            return web.json_response({"reset": True})
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)


# -- standalone server ----------------------------------------------------------

CLI_KNOBS = (
    ("--client-id", "client_id", str, "accept only this client id (default: any)"),
    ("--client-secret", "client_secret", str, "accept only this client secret (default: any)"),
    ("--token-ttl", "token_ttl", float, "access token life in seconds (default 3600)"),
    ("--rows-per-second", "rows_per_second", float, "import speed (default 1000)"),
    ("--job-overhead", "job_overhead", float, "seconds every job takes on top (default 0.5)"),
    ("--rate-limit", "rate_limit", int, "calls per 20 s window (default 100)"),
    ("--concurrency", "concurrency", int, "calls in flight (default 10)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The standalone simulator's flags; every knob defaults to a fresh subscription."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8090, help="port to listen on (default 8090)")
    for flag, dest, kind, text in CLI_KNOBS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Knobs from parsed flags; a bad value raises ConfigError naming the flag."""
    config = SimulatorConfig()
    for flag, dest, _kind, _text in CLI_KNOBS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            config = config.with_knobs(**{dest: value})
        except ValueError as exc:
            raise ConfigError(flag, str(exc)) from None
    return config


async def serve(
    config: SimulatorConfig, host: str, port: int, stop: asyncio.Event | None = None
) -> None:
    """Run a simulator until `stop` is set (or the task is cancelled)."""
    simulator = Simulator(config)
    url = await simulator.start(host, port)
    try:
        log.info("marketo simulator listening; nothing goes to a real Marketo", url=url)
        await (stop if stop is not None else asyncio.Event()).wait()
    finally:
        await simulator.stop()
