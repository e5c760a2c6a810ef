"""A stand-in Marketo subscription on aiohttp: identity, the Bulk Import API, a test API.

Paths and shapes follow shared/marketo-openapi: swagger-identity.json for the
token, swagger-mapi.json for the twelve /bulk/v1 import operations. Answers use
Marketo's envelope, HTTP 200 with `requestId`, `success`, `result`, `errors`
(string codes) and `warnings`. The queue and rows live in `simulator.queue`
(records in `simulator.records`); tokens, call limits, faults and the call log
in `simulator.gate`; the operation handlers in `simulator.operations`. This module is
the HTTP face: the app, its start and stop, the state file, and the path every call
takes through the gate to its operation.

Choices where Marketo's documentation is silent (operations: see `simulator.operations`):

- A request body (Content-Length, the whole multipart request, not only its
  file part) of `max_file_bytes` or more: HTTP 413 with a text body, as the
  proxy in front of Marketo answers, before auth.
- Every bulk call passes, in order: 615 (calls in flight, counted from arrival),
  606 (calls accepted in the sliding window), 607 (calls accepted since start,
  reset or the last `quota_reset_utc`; without that knob the quota never
  resets), the slow delay, a dropped connection, injected 500/503, 413, a token
  in the query string or a form field (601, recorded as a violation), the
  bearer token (601 missing or unknown, 602 expired), the API role's
  permissions (603), injected error codes, then the operation (whose answer
  `fault_502_after_create` may replace by a 502 envelope, `drop_reply_fraction`
  lose and `late_reply_fraction` hold back past the client's read timeout).
  Refused calls are not counted in the window or the quota.
- Identity calls count toward no limit. A client_secret in the query string
  works but is recorded as violation "secret_in_url".

The test API, in process and under /_sim/, is `simulator.control`'s
`Subscription`, which `Simulator` extends; the standalone command's flags and
serving loop are `simulator.arguments`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import math
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from orchestrator.simulator.control import Subscription
from orchestrator.simulator.gate import (
    MESSAGES,
    CallInfo,
    bearer,
    check_permission,
    credentials_ok,
)
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.operations import BulkOperations, Call, Operation, Upload, read_upload
from orchestrator.simulator.queue import Refusal
from orchestrator.simulator.state import StateError, load_state, restore, save_state, snapshot

log = structlog.get_logger(__name__)

TOKEN_PATH = "/identity/oauth/token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wall_now() -> dt.datetime:
    """The real wall clock in UTC (tests replace `Simulator.wall_clock`)."""
    return dt.datetime.now(dt.UTC)


class Simulator(Subscription):
    """One simulated Marketo subscription, served over HTTP.

    async with Simulator(SimulatorConfig(job_overhead=0.05)) as sim:
        ...  # point a client at sim.base_url; read sim.records("leads"), sim.stats()
    """

    def __init__(
        self, config: SimulatorConfig | None = None, *, state_path: Path | None = None
    ) -> None:
        super().__init__(config)
        # With a state path, jobs and records survive a restart (see simulator.state).
        self.state_path = state_path
        self._save_lock = asyncio.Lock()
        self.base_url = ""
        self.port = 0
        self.wall_clock: Callable[[], dt.datetime] = wall_now  # the quota day's clock
        self._runner: web.AppRunner | None = None
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
        self.add_control_routes(app)
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
        check_permission(cfg, info.operation)
        faults.raise_injected(cfg)
        self._queue.advance(self._clock())
        if upload is not None and upload.data is not None:
            info.digest = hashlib.sha256(upload.data).hexdigest()
        fail = upload is not None and faults.chance(cfg.create_failed_fraction)
        response = await handler(Call(request, info, info.client_id, upload, fail_create=fail))
        made = upload is not None and not fail and info.batch_id is not None
        if made and faults.chance(cfg.fault_502_after_create):
            raise Refusal("502", MESSAGES["502"])  # the job exists: the client cannot know
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
