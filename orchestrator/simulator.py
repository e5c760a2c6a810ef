"""A stand-in Marketo subscription on aiohttp: identity, the Bulk Import API, a test API.

Paths and shapes follow shared/marketo-openapi: swagger-identity.json for the
token, swagger-mapi.json for the twelve /bulk/v1 import operations. Answers use
Marketo's envelope, HTTP 200 with `requestId`, `success`, `result`, `errors`
(string codes) and `warnings`. The queue, rows and records live in
`simulator_jobs` (records in `simulator_records`); tokens, call limits, faults
and the call log in `simulator_gate`. This module is the HTTP face.

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
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from types import TracebackType
from typing import Any

import structlog
from aiohttp import BodyPartReader, web

from orchestrator import constants
from orchestrator.errors import ConfigError
from orchestrator.models import ObjectType
from orchestrator.simulator_gate import (
    MESSAGES,
    CallInfo,
    CallLog,
    Faults,
    Limits,
    Tokens,
    bearer,
    credentials_ok,
)
from orchestrator.simulator_jobs import (
    Job,
    JobQueue,
    JobSpec,
    Refusal,
    SimulatorConfig,
    parse_upload,
)

__all__ = ["Simulator", "SimulatorConfig", "add_arguments", "config_from_args", "serve"]

log = structlog.get_logger(__name__)

TOKEN_PATH = "/identity/oauth/token"
SIM_PREFIX = "/_sim"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        self._faults = Faults(self.config.seed)
        self._queue = JobQueue(self.config)
        self._runner: web.AppRunner | None = None
        self._tokens = Tokens()
        self._limits = Limits()
        self._log = CallLog()

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
            return self._envelope([], [{"code": refusal.code, "message": refusal.message}])
        finally:
            self._limits.leave()

    async def _checked(
        self, handler: Operation, request: web.Request, info: CallInfo
    ) -> web.StreamResponse:
        cfg, faults = self.config, self._faults
        if "access_token" in request.query:
            info.client_id = self._tokens.owner(request.query["access_token"])
            self._log.violation("token_in_url", info)
        self._limits.admit(self._clock(), cfg)
        if faults.chance(cfg.slow_fraction):
            await asyncio.sleep(cfg.slow_seconds)
        upload = await self._read_upload(request, info) if request.method == "POST" else None
        if faults.chance(cfg.drop_fraction):
            return self._drop(request, info)
        fault = faults.http_fault(cfg)
        if fault is not None:
            return web.Response(status=fault[0], text=fault[1])
        if upload is not None and upload.size >= cfg.max_file_bytes:
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
        return response

    @staticmethod
    def _drop(request: web.Request, info: CallInfo) -> web.StreamResponse:
        """Close the connection: the client gets no answer at all."""
        info.dropped = True
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never reaches the client

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
            info.client_id = info.client_id or self._tokens.owner(bearer(request))
            self._log.violation("token_in_form", info)
        return Upload(data, size)

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
