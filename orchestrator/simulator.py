"""A stand-in Marketo subscription on aiohttp: identity, the Bulk Import API, a test API.

Paths and shapes follow shared/marketo-openapi: swagger-identity.json for the
token, swagger-mapi.json for the twelve /bulk/v1 import operations. Answers use
Marketo's envelope, HTTP 200 with `requestId`, `success`, `result`, `errors`
(string codes) and `warnings`. The queue, rows and records live in
`simulator_jobs`; this module is the HTTP face, auth, limits, faults and logs.

Choices where Marketo's documentation is silent:

- A missing or invalid parameter (`format` in the wrong case, no
  `programMemberStatus`, no `file` part, a `listId` that is not a number): 1003.
- A batch id that is unknown, belongs to another object type (or another custom
  object, or another integration): 1003 "Batch id N not found".
- failures/warnings of a finished job that has none: HTTP 404 with a text body;
  of a job not finished yet: a 1003 envelope.
- A file of `max_file_bytes` or more: HTTP 413 with a text body, as the proxy in
  front of Marketo answers, before auth.
- Every bulk call passes, in order: 615 (calls in flight, counted from arrival),
  606 (calls accepted in the sliding window), 607 (calls accepted since start or
  reset; the simulator's quota does not reset at midnight), the slow delay, a
  dropped connection, injected 500/503, 413, a token in the query string or a
  form field (601, recorded as a violation), the bearer token (601 missing or
  unknown, 602 expired), injected error codes, then the operation (whose answer
  `drop_reply_fraction` may lose). Refused calls are not counted in the window
  or the quota.
- Identity calls count toward no limit. A client_secret in the query string
  works but is recorded as violation "secret_in_url".

The test API lives under /_sim/ (JSON, no auth, not in the call log): GET
records, calls, stats, tokens, jobs, config; POST faults, foreign, reset. The
same is available in-process on `Simulator`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import structlog
from aiohttp import BodyPartReader, web

from orchestrator import constants
from orchestrator.errors import ConfigError
from orchestrator.models import ObjectType
from orchestrator.simulator_jobs import (
    FAULT_CODES,
    Job,
    JobQueue,
    JobSpec,
    Refusal,
    SimulatorConfig,
    parse_upload,
)

__all__ = ["Simulator", "SimulatorConfig", "add_arguments", "config_from_args", "serve"]

log = structlog.get_logger(__name__)

MESSAGES = {
    "601": "Access token invalid",
    "602": "Access token expired",
    "606": "Max rate limit '{limit}' exceeded with in '{window}' secs",
    "607": "Daily quota reached",
    "608": "API Temporarily Unavailable",
    "611": "System error",
    "615": "Concurrent access limit reached",
}
HTTP_FAULTS = ((500, "500 Internal Server Error"), (503, "503 Service Temporarily Unavailable"))
TOKEN_PATH = "/identity/oauth/token"
SIM_PREFIX = "/_sim"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class CallInfo:
    """One entry of the call log. Never holds a token or a secret, only key names."""

    t: float  # seconds since the simulator started, at arrival
    method: str
    path: str
    query_keys: list[str]
    operation: str = ""
    client_id: str | None = None
    status: int | None = None  # None: the connection was dropped
    code: str | None = None  # Marketo error code of the answer
    batch_id: int | None = None
    form_keys: list[str] = field(default_factory=list)
    dropped: bool = False
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    client_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes | None  # the `file` part; None when there was none
    size: int


@dataclass(frozen=True, slots=True)
class Call:
    """What an operation handler gets once a bulk call passed every check."""

    request: web.Request
    info: CallInfo
    client_id: str
    upload: Upload | None


Operation = Callable[[Call], Awaitable[web.StreamResponse]]


def status_result(job: Job) -> dict[str, Any]:
    """A job as the status endpoint of its object type describes it."""
    assert job.spec is not None  # foreign jobs are never shown
    out, final = job.outcome, job.status in constants.FINAL_STATUSES
    result: dict[str, Any] = {"batchId": job.batch_id}
    if job.spec.object_type is ObjectType.CUSTOM_OBJECT:
        result |= {"operation": "import", "status": job.status}
        result |= {"objectApiName": job.spec.api_name, "numOfObjectsProcessed": out.processed}
    else:  # leads and program members share the lead counter name
        result |= {"importId": str(job.batch_id), "status": job.status}
        result["numOfLeadsProcessed"] = out.processed
    result |= {"numOfRowsFailed": out.failed, "numOfRowsWithWarning": out.warned}
    if final and job.spec.object_type is ObjectType.CUSTOM_OBJECT:
        took = (job.finished_at or 0.0) - (job.started_at or 0.0)
        result["importTime"] = f"{round(took)} second(s)"
    if final:
        result["message"] = out.message
    return result


def bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class Simulator:
    """One simulated Marketo subscription, served over HTTP.

    async with Simulator(SimulatorConfig(job_overhead=0.05)) as sim:
        ...  # point a client at sim.base_url; read sim.records("leads"), sim.stats()
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.base_url = ""
        self.port = 0
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._rng = random.Random(self.config.seed)
        self._queue = JobQueue(self.config)
        self._runner: web.AppRunner | None = None
        self._tokens: dict[str, Token] = {}
        self._live: dict[str, Token] = {}  # client id -> its current token
        self._issued: list[str] = []
        self._in_flight = 0
        self._clear_log()

    def _clear_log(self) -> None:
        self._calls: list[CallInfo] = []
        self._window: deque[float] = deque()
        self._quota_used = 0
        self._op_counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._http_errors: Counter[str] = Counter()
        self._violations: list[dict[str, Any]] = []
        self._max_in_flight = 0
        self._max_window = 0
        self._dropped = 0

    # -- lifecycle -------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(TOKEN_PATH, self._logged("identity", self._identity))
        app.router.add_post(TOKEN_PATH, self._logged("identity", self._identity))
        for method, path, operation, handler in self._operations():
            app.router.add_route(
                method, path, self._logged(operation, partial(self._bulk, handler))
            )
        for name in ("records", "calls", "stats", "tokens", "jobs", "config"):
            app.router.add_get(f"{SIM_PREFIX}/{name}", self._sim_get)
        for name in ("faults", "foreign", "reset"):
            app.router.add_post(f"{SIM_PREFIX}/{name}", self._sim_post)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0: a free port); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
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
        return [asdict(info) for info in self._calls]

    def stats(self) -> dict[str, Any]:
        self._queue.advance(self._clock())
        return {
            "max_outstanding": dict(self._queue.max_outstanding),
            "max_importing": dict(self._queue.max_importing),
            "errors": dict(self._errors),
            "http_errors": dict(self._http_errors),
            "violations": [v["kind"] for v in self._violations],
            "violation_details": [dict(v) for v in self._violations],
            "calls": dict(self._op_counts),
            "jobs": dict(Counter(job.status for job in self._queue.jobs.values())),
            "tokens_issued": len(self._issued),
            "max_in_flight": self._max_in_flight,
            "max_calls_in_window": self._max_window,
            "dropped": self._dropped,
        }

    def tokens(self) -> list[str]:
        """Every access token issued, oldest first (for leak searches)."""
        return list(self._issued)

    def jobs(self) -> list[dict[str, Any]]:
        self._queue.advance(self._clock())
        return [job.as_dict(self._t0) for job in self._queue.jobs.values()]

    def set_knobs(self, **knobs: Any) -> None:
        """Change knobs at runtime; unknown names or wrong types raise ValueError."""
        config = self.config.with_knobs(**knobs)
        if "seed" in knobs:
            self._rng.seed(config.seed)
        self.config = config
        self._queue.reconfigure(config, self._clock())

    def add_foreign_jobs(self, count: int, seconds: float) -> list[int]:
        """Let another integration hold up to `count` queue slots for `seconds`."""
        jobs = self._queue.add_foreign(count, seconds, self._clock())
        return [job.batch_id for job in jobs]

    def reset(self) -> None:
        """Forget records, jobs, the call log and stats. Tokens stay valid."""
        self._queue.reset()
        self._clear_log()

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
                self._log_call(info, started)

        return handle

    def _log_call(self, info: CallInfo, started: float) -> None:
        info.duration = round(self._clock() - started, 6)
        self._calls.append(info)
        self._op_counts[info.operation] += 1
        if info.code:
            self._errors[info.code] += 1
        if info.dropped:
            self._dropped += 1
        elif info.status is not None and info.status >= 400:
            self._http_errors[str(info.status)] += 1

    async def _bulk(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return await self._checked(handler, request, info)
        except Refusal as refusal:
            info.code = refusal.code
            return self._envelope([], [{"code": refusal.code, "message": refusal.message}])
        finally:
            self._in_flight -= 1

    async def _checked(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        cfg = self.config
        if "access_token" in request.query:
            info.client_id = self._owner(request.query["access_token"])
            self._violation("token_in_url", info)
        self._admit(self._clock())
        if self._chance(cfg.slow_fraction):
            await asyncio.sleep(cfg.slow_seconds)
        upload = await self._read_upload(request, info) if request.method == "POST" else None
        if self._chance(cfg.drop_fraction):
            return self._drop(request, info)
        for (status, text), fraction in zip(
            HTTP_FAULTS, (cfg.fault_500, cfg.fault_503), strict=True
        ):
            if self._chance(fraction):
                return web.Response(status=status, text=text)
        if upload is not None and upload.size >= cfg.max_file_bytes:
            self._violation("oversized_file", info)
            return web.Response(status=413, text="413 Request Entity Too Large")
        if "access_token" in request.query or "access_token" in info.form_keys:
            raise Refusal("601", MESSAGES["601"])
        info.client_id = self._authenticate(request)
        for code in FAULT_CODES:
            if self._chance(getattr(cfg, f"fault_{code}")):
                raise Refusal(code, self._message(code))
        self._queue.advance(self._clock())
        response = await handler(Call(request, info, info.client_id, upload))
        if self._chance(self.config.drop_reply_fraction):
            return self._drop(request, info)
        return response

    @staticmethod
    def _drop(request: web.Request, info: CallInfo) -> web.StreamResponse:
        """Close the connection: the client gets no answer at all."""
        info.dropped = True
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never reaches the client

    def _admit(self, now: float) -> None:
        """Marketo's call limits, checked on arrival: 615, 606, 607."""
        cfg = self.config
        if self._in_flight > cfg.concurrency:
            raise Refusal("615", MESSAGES["615"])
        while self._window and self._window[0] <= now - cfg.rate_window:
            self._window.popleft()
        if len(self._window) >= cfg.rate_limit:
            raise Refusal("606", self._message("606"))
        if self._quota_used >= cfg.daily_quota:
            raise Refusal("607", MESSAGES["607"])
        self._window.append(now)
        self._quota_used += 1
        self._max_window = max(self._max_window, len(self._window))

    def _message(self, code: str) -> str:
        return MESSAGES[code].format(
            limit=self.config.rate_limit, window=f"{self.config.rate_window:g}"
        )

    def _chance(self, fraction: float) -> bool:
        return fraction > 0 and (fraction >= 1 or self._rng.random() < fraction)

    def _violation(self, kind: str, info: CallInfo) -> None:
        self._violations.append(
            {"kind": kind, "t": info.t, "path": info.path, "client_id": info.client_id}
        )

    async def _read_upload(self, request: web.Request, info: CallInfo) -> Upload:
        """Read the multipart body: the `file` part (counted past the size limit, kept
        below it) and the names of the other fields."""
        if request.content_type != "multipart/form-data":
            return Upload(None, 0)
        limit, data, size = self.config.max_file_bytes, None, 0
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                info.form_keys.append(part.name or "")
                if part.name != "file" or data is not None:
                    continue
                buffer = bytearray()
                while chunk := await part.read_chunk(1 << 16):
                    size += len(chunk)
                    if size < limit:
                        buffer += chunk
                data = bytes(buffer)
        except ValueError as exc:
            raise Refusal("1003", "Malformed multipart body") from exc
        if "access_token" in info.form_keys:
            info.client_id = info.client_id or self._owner(bearer(request))
            self._violation("token_in_form", info)
        return Upload(data, size)

    # -- identity ----------------------------------------------------------------

    async def _identity(self, request: web.Request, info: CallInfo) -> web.StreamResponse:
        params = dict(request.query)
        if "client_secret" in request.query:
            self._violation("secret_in_url", info)
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
        if not (client_id and secret and self._credentials_ok(client_id, secret)):
            return web.json_response(
                {"error": "unauthorized", "error_description": "Bad client credentials"}, status=401
            )
        now = self._clock()
        token = self._issue(client_id, now)
        return web.json_response(
            {
                "access_token": token.value,
                "token_type": "bearer",
                "expires_in": max(0, math.ceil(token.expires_at - now - 1e-3)),  # float noise
                "scope": f"{client_id}@simulator",
            }
        )

    def _credentials_ok(self, client_id: str, secret: str) -> bool:
        cfg = self.config
        id_ok = cfg.client_id is None or secrets.compare_digest(client_id, cfg.client_id)
        secret_ok = cfg.client_secret is None or secrets.compare_digest(secret, cfg.client_secret)
        return id_ok and secret_ok

    def _issue(self, client_id: str, now: float) -> Token:
        """The client's live token with its remaining life, or a new one once it expired."""
        live = self._live.get(client_id)
        if live is not None and live.expires_at > now:
            return live
        token = Token(f"{uuid.uuid4()}:sim", client_id, now + self.config.token_ttl)
        self._tokens[token.value] = self._live[client_id] = token
        self._issued.append(token.value)
        return token

    def _owner(self, value: str) -> str | None:
        token = self._tokens.get(value)
        return token.client_id if token else None

    def _authenticate(self, request: web.Request) -> str:
        token = self._tokens.get(bearer(request))
        if token is None:
            raise Refusal("601", MESSAGES["601"])
        if self._clock() >= token.expires_at:
            raise Refusal("602", MESSAGES["602"])
        return token.client_id

    # -- bulk import operations -----------------------------------------------------

    def _operations(self) -> list[tuple[str, str, str, Operation]]:
        leads, custom = ObjectType.LEADS, ObjectType.CUSTOM_OBJECT
        members = ObjectType.PROGRAM_MEMBERS
        batch = r"{batch_id:\d+}"
        co = "/bulk/v1/customobjects/{api_name}/import"
        pm = "/bulk/v1/program/members/import"
        routes: list[tuple[str, str, str, Operation]] = [
            ("POST", "/bulk/v1/leads.json", "importLeadUsingPOST", self._create_leads),
            ("POST", f"{co}.json", "importCustomObjectUsingPOST", self._create_custom),
            ("POST", "/bulk/v1/program/{program_id}/members/import.json",
             "importProgramMemberUsingPOST", self._create_members),
            ("GET", f"/bulk/v1/leads/batch/{batch}.json", "getImportLeadStatusUsingGET",
             partial(self._status, leads)),
            ("GET", f"{co}/{batch}/status.json", "getImportCustomObjectStatusUsingGET",
             partial(self._status, custom)),
            ("GET", f"{pm}/{batch}/status.json", "getImportProgramMemberStatusUsingGET",
             partial(self._status, members)),
        ]  # fmt: skip
        files = [
            (leads, f"/bulk/v1/leads/batch/{batch}", "ImportLead"),
            (custom, f"{co}/{batch}", "ImportCustomObject"),
            (members, f"{pm}/{batch}", "ImportProgramMember"),
        ]
        for object_type, base, name in files:
            for kind in ("failures", "warnings"):
                operation = f"get{name}{kind.capitalize()}UsingGET"
                routes.append(
                    (
                        "GET",
                        f"{base}/{kind}.json",
                        operation,
                        partial(self._file, object_type, kind),
                    )
                )
        return routes

    async def _create_leads(self, call: Call) -> web.StreamResponse:
        query = call.request.query
        list_id = query.get("listId")
        if list_id is not None and not list_id.isdigit():
            raise Refusal("1003", "Invalid value for parameter 'listId'")
        spec = JobSpec(
            ObjectType.LEADS,
            self._format(query, upper=False),
            lookup_field=query.get("lookupField") or "email",
            list_id=int(list_id) if list_id is not None else None,
            partition=query.get("partitionName", ""),
        )
        job = await self._submit(call, spec)
        return self._envelope(
            [{"batchId": job.batch_id, "importId": str(job.batch_id), "status": "Queued"}]
        )

    async def _create_custom(self, call: Call) -> web.StreamResponse:
        api_name = call.request.match_info["api_name"]
        fmt = self._format(call.request.query, upper=False)
        job = await self._submit(call, JobSpec(ObjectType.CUSTOM_OBJECT, fmt, api_name=api_name))
        return self._envelope(
            [
                {
                    "batchId": job.batch_id,
                    "operation": "import",
                    "objectApiName": api_name,
                    "status": "Queued",
                }
            ]
        )

    async def _create_members(self, call: Call) -> web.StreamResponse:
        query = call.request.query
        fmt = self._format(query, upper=True)
        status = query.get("programMemberStatus", "")
        if not status:
            raise Refusal("1003", "Required parameter 'programMemberStatus' is missing")
        program_id = call.request.match_info["program_id"]
        spec = JobSpec(ObjectType.PROGRAM_MEMBERS, fmt, program_id=program_id, member_status=status)
        job = await self._submit(call, spec)
        return self._envelope(
            [{"batchId": job.batch_id, "importId": str(job.batch_id), "status": "Queued"}]
        )

    @staticmethod
    def _format(query: Any, *, upper: bool) -> str:
        allowed = ("CSV", "TSV", "SSV") if upper else ("csv", "tsv", "ssv")
        fmt = query.get("format")
        if fmt is None:
            raise Refusal("1003", "Required parameter 'format' is missing")
        if fmt not in allowed:
            raise Refusal(
                "1003", f"Invalid value for parameter 'format', expected one of {'|'.join(allowed)}"
            )
        return str(fmt)

    async def _submit(self, call: Call, spec: JobSpec) -> Job:
        if call.upload is None or call.upload.data is None:
            raise Refusal("1003", "Required parameter 'file' is missing")
        self._queue.check_room(spec)  # refuse before parsing a large file for nothing
        delimiter = constants.DELIMITERS[spec.fmt.lower()]
        parsed = await asyncio.to_thread(parse_upload, call.upload.data, delimiter)
        job = self._queue.submit(spec, parsed, call.client_id, self._clock())
        call.info.batch_id = job.batch_id
        return job

    def _find(self, call: Call, object_type: ObjectType) -> Job:
        batch_id = int(call.request.match_info["batch_id"])
        call.info.batch_id = batch_id
        job = self._queue.jobs.get(batch_id)
        api_name = call.request.match_info.get("api_name")
        if (
            job is None
            or job.spec is None
            or job.spec.object_type is not object_type
            or (api_name is not None and job.spec.api_name != api_name)
        ):
            raise Refusal("1003", f"Batch id {batch_id} not found")
        return job

    async def _status(self, object_type: ObjectType, call: Call) -> web.StreamResponse:
        return self._envelope([status_result(self._find(call, object_type))])

    async def _file(self, object_type: ObjectType, kind: str, call: Call) -> web.StreamResponse:
        job = self._find(call, object_type)
        if job.status not in constants.FINAL_STATUSES:
            raise Refusal("1003", f"Batch id {job.batch_id} is {job.status}, no {kind} file yet")
        body = job.outcome.failures if kind == "failures" else job.outcome.warnings
        if body is None:
            return web.Response(status=404, text=f"No {kind} for batch id {job.batch_id}")
        return web.Response(body=body, content_type="text/csv", charset="utf-8")

    def _envelope(
        self, result: list[dict[str, Any]], errors: list[dict[str, str]] | None = None
    ) -> web.Response:
        body: dict[str, Any] = {
            "requestId": f"{secrets.randbits(16):04x}#{time.time_ns() // 1_000_000:x}",
            "success": not errors,
            "result": result,
            "errors": errors or [],
            "warnings": [],
        }
        if self.config.omit_empty:
            body = {key: value for key, value in body.items() if value != []}
        return web.json_response(body)

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
