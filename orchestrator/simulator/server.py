"""A stand-in Marketo subscription on aiohttp: identity, the Bulk Import API, a test API.

Paths and shapes follow shared/marketo-openapi: swagger-identity.json for the
token, swagger-mapi.json for the twelve /bulk/v1 import operations, the three
/rest/v1 describe calls of the imported objects and the subscription's daily
usage (GET /rest/v1/stats/usage.json). Answers use
Marketo's envelope, HTTP 200 with `requestId`, `success`, `result`, `errors`
(string codes) and `warnings`. The queue and rows live in `simulator.queue`
(records in `simulator.records`); tokens, call limits, faults and the call log
in `simulator.gate`; the operation handlers in `simulator.handlers`. This module is
the HTTP face: the app, its start and stop, the state file, and the path every call
takes through the gate to its operation.

Choices where Marketo's documentation is silent, about calls (about operations and
rows: `simulator.handlers`, `simulator.records`; --help shows all three):

- A request body (Content-Length, the whole multipart request, not only its
  file part) of `max_file_bytes` or more: HTTP 413 with a text body, as the
  proxy in front of Marketo answers, before auth.
- Every bulk call passes, in order: 615 (calls in flight, counted from arrival),
  606 (calls accepted in the sliding window), 607 (calls accepted since start,
  reset or the last `quota_reset_utc`, plus `foreign_usage_today`; without
  `quota_reset_utc` the quota never resets), the slow delay, a dropped
  connection, injected 500/503, 413, a token in the query string or a form
  field (601, recorded as a violation), the bearer token (601 missing or
  unknown, 602 expired), the API role's permissions (603), injected error
  codes, then the operation (whose answer `fault_502_after_create` may replace
  by a 502 envelope, `drop_reply_fraction` may lose and `late_reply_fraction`
  may hold back past the client's read timeout). Calls refused with 615, 606 or 607 are not
  counted in the window or the quota, nor, as Marketo's error-code page says,
  calls answered 601, 602, 604, 605, 608 or 611; every other call counts,
  answered or not.
- stats/usage.json passes the same limits and token checks, never the fault
  knobs (they stand for trouble of the Bulk Import calls). It lists one day,
  the quota day (by `quota_reset_utc`, else the UTC date) dated at its
  midnight, with every call counted so far (itself included) and each user's
  count: a client id as "<id>@simulator", other integrations' calls as one
  user of their own. Its per-user counts are of answered calls; the total also
  holds calls still in flight.
- Identity calls count toward no limit. A client_secret in the query string
  works but is recorded as violation "secret_in_url".
- Adobe's curl examples send `format` and `programMemberStatus` (and
  `access_token`) as form fields of the multipart body: parameters are read
  from the query string, then from the form. The token is accepted only in the
  Authorization header (Adobe removed the access_token parameter on June 30,
  2025), so the examples run with that header in place of `-F access_token`.
- Status messages follow Adobe's examples: "Import succeeded, 3 records
  imported (3 members)", "... 1 failed", "..., 1 warning."; for more than one
  warning the simulator writes "N warnings." (assumed).

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
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from orchestrator import constants
from orchestrator.simulator.control import Subscription
from orchestrator.simulator.gate import (
    MESSAGES,
    CallInfo,
    bearer,
    check_permission,
    credentials_ok,
)
from orchestrator.simulator.handlers import BulkOperations, Call, Operation, Upload, read_upload
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.queue import Refusal
from orchestrator.simulator.state import StateError, load_state, restore, save_state, snapshot

log = structlog.get_logger(__name__)

TOKEN_PATH = "/identity/oauth/token"
USAGE_PATH = "/rest/v1/stats/usage.json"

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
        usage = partial(self._bulk, self._usage, rest=True)
        app.router.add_get(USAGE_PATH, self._logged("getDailyUsageUsingGET", usage))
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
        self, handler: Operation, request: web.Request, info: CallInfo, *, rest: bool = False
    ) -> web.StreamResponse:
        """A call through the limits (`rest`: a REST call, free of the fault knobs), counted
        unless Marketo would not count its answer."""
        self._limits.enter()
        stamp: float | None = None
        try:
            if "access_token" in request.query:
                info.client_id = self._tokens.owner(request.query["access_token"])
                self._log.violation("token_in_url", info)
            if self._limits.roll_quota(self.wall_clock(), self.config):
                self.config = replace(self.config, foreign_usage_today=0)  # yesterday's
            stamp = self._limits.admit(self._clock(), self.config)
            return await (self._rest if rest else self._checked)(handler, request, info)
        except Refusal as refusal:
            info.code = refusal.code
            if stamp is not None and refusal.code in constants.UNCOUNTED_CODES:
                self._limits.refund(stamp)
                stamp = None
            return self._operations.envelope(
                [], [{"code": refusal.code, "message": refusal.message}]
            )
        finally:
            if stamp is not None:
                info.counted = True
                self._limits.users[info.client_id or "unknown"] += 1
            self._limits.leave()

    async def _rest(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        if "access_token" in request.query:
            raise Refusal("601", MESSAGES["601"])
        info.client_id = self._tokens.authenticate(request, self._clock())
        return await handler(Call(request, info, info.client_id, None))

    async def _usage(self, call: Call) -> web.StreamResponse:
        """GET /rest/v1/stats/usage.json: the subscription's calls today."""
        return self._operations.envelope([self._limits.usage(self.wall_clock(), self.config)])

    async def _checked(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        cfg, faults = self.config, self._faults
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
