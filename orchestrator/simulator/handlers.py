"""The simulator's twelve Bulk Import operations (create, status, failures and
warnings) and the three describe calls an import header is checked against.

Each handler gets a `Call` that already passed every check of the HTTP face
(`simulator`: limits, faults, auth) and answers in Marketo's envelope, or raises
`Refusal` for the face to wrap. Jobs themselves live in `simulator.queue`.

Parameters are read from the query string, then from the multipart form (Adobe's
curl examples send `format` and `programMemberStatus` as form fields). `format`
is CSV when it is missing and is taken in either case ("Accepts one of: CSV,
SSV, TSV. The format defaults to CSV", Bulk Import page; the lead page writes
`csv`, the program-member example `format=csv` where its list says `CSV`).

Choices where Marketo's documentation is silent:

- An invalid parameter (a `format` that is none of the three, no
  `programMemberStatus`, no `file` part, a `listId` that is not a number): 1003.
- A batch id that is unknown, belongs to another object type (or another custom
  object, or another integration): 1003 "Batch id N not found".
- failures/warnings of a finished job that has none: HTTP 404 with a text body;
  of a job not finished yet: a 1003 envelope.
- failures/warnings rows: every column as sent, by default; with the knob
  `omit_empty_values`, empty values and their columns are left out (the header lists
  only columns with a value in some row). Adobe documents no per-row shape: the
  knob is our reading of a Marketo expert's public write-up, where a row that failed
  for an empty email came back as `firstName,lastName,phone,Import Failure Reason`.
  They are served as text/csv, or with the knob `files_content_type` as
  application/json, the type Adobe's OpenAPI declares (the body stays CSV).
- A batch id forgotten (`forget_batches_after`, Marketo's seven days): 610
  "Requested resource not found" for its status, failures and warnings.
- A create answered `Failed` (`create_failed_fraction`) carries a message for
  leads and custom objects (their create responses have one in Adobe's OpenAPI),
  none for program members (theirs has none).
- A custom object that is not declared (knob `custom_objects`): 1013 "Object not
  found", for its describe and its import alike (see `simulator.fields`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import BodyPartReader, web

from orchestrator import constants, delimited
from orchestrator.models import ObjectType
from orchestrator.simulator.fields import (
    NOT_FOUND,
    custom_object_description,
    lead_description,
    member_description,
)
from orchestrator.simulator.gate import MESSAGES, CallInfo
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.queue import Job, JobQueue, Refusal, parse_upload
from orchestrator.simulator.records import JobSpec


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes | None  # the `file` part; None when there was none
    size: int
    fields: dict[str, str] = field(default_factory=dict)  # the other (text) form fields


@dataclass(frozen=True, slots=True)
class Call:
    """What an operation handler gets once a bulk call passed every check."""

    request: web.Request
    info: CallInfo
    client_id: str
    upload: Upload | None
    fail_create: bool = False  # a create to answer `Failed`, making no job


# The message of a create answered Failed (`create_failed_fraction`): Marketo's own
# wording is not documented.
CREATE_FAILED = "Import failed: the import job could not be created"

Operation = Callable[[Call], Awaitable[web.StreamResponse]]
FIELD_BYTES = 4096  # a form field other than the file is a parameter: kept up to this
# method, path, operationId (swagger-mapi.json), handler
Route = tuple[str, str, str, Operation]


def envelope(
    result: list[dict[str, Any]],
    errors: list[dict[str, str]] | None = None,
    *,
    omit_empty: bool = False,
) -> web.Response:
    """Marketo's answer: HTTP 200 with requestId, success, result, errors, warnings."""
    body: dict[str, Any] = {
        "requestId": f"{secrets.randbits(16):04x}#{time.time_ns() // 1_000_000:x}",
        "success": not errors,
        "result": result,
        "errors": errors or [],
        "warnings": [],
    }
    if omit_empty:
        body = {key: value for key, value in body.items() if value != []}
    return web.json_response(body)


async def read_upload(
    request: web.Request, form_keys: list[str], limit: int, pace: float = 0.0
) -> Upload:
    """Read a create call's multipart body: the `file` part (counted past `limit`, kept
    below it); the names of all fields are appended to `form_keys`. `pace` > 0 reads
    at most that many bytes per second (a slow uplink)."""
    if request.content_type != "multipart/form-data":
        return Upload(None, 0)
    data: bytes | None = None
    size = 0
    fields: dict[str, str] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            form_keys.append(part.name or "")
            if part.name != "file" and part.filename is None:
                text = await part.read(decode=True)  # a parameter: a few bytes
                fields.setdefault(part.name or "", text[:FIELD_BYTES].decode("utf-8", "replace"))
                continue
            if part.name != "file" or data is not None:
                continue
            buffer = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                if pace > 0:
                    await asyncio.sleep(len(chunk) / pace)
                size += len(chunk)
                if size < limit:
                    buffer += chunk
            data = bytes(buffer)
    except ValueError as exc:
        raise Refusal("1003", "Malformed multipart body") from exc
    return Upload(data, size, fields)


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


def created(job: Job) -> dict[str, Any]:
    """A create's answer for `job`: Queued (Marketo says so even when it starts at once),
    or Failed with its message."""
    assert job.spec is not None
    failed = job.status == constants.STATUS_FAILED
    status = constants.STATUS_FAILED if failed else constants.STATUS_QUEUED
    result: dict[str, Any] = {"batchId": job.batch_id}
    if job.spec.object_type is ObjectType.CUSTOM_OBJECT:
        # As Adobe's example shows it (the status answer adds "operation").
        result |= {"status": status, "objectApiName": job.spec.api_name}
    else:
        result |= {"importId": str(job.batch_id), "status": status}
    if failed and job.spec.object_type is not ObjectType.PROGRAM_MEMBERS:
        result["message"] = job.outcome.message
    return result


def param(call: Call, name: str) -> str | None:
    """A parameter from the query string, else from the multipart form."""
    value = call.request.query.get(name)
    if value is None and call.upload is not None:
        value = call.upload.fields.get(name)
    return value


def parse_format(call: Call) -> str:
    """The `format` parameter, in either case; CSV when it is missing."""
    fmt = param(call, "format") or "csv"
    if fmt.lower() not in delimited.DELIMITERS:
        raise Refusal("1003", "Invalid value for parameter 'format', expected one of CSV|TSV|SSV")
    return fmt


class BulkOperations:
    """The operation handlers over one job queue.

    `config` is read on every answer, so knobs changed at runtime apply at once.
    """

    def __init__(
        self,
        queue: JobQueue,
        clock: Callable[[], float],
        config: Callable[[], SimulatorConfig],
        *,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._queue = queue
        self._clock = clock
        self._config = config
        self._on_change = on_change

    def routes(self) -> list[Route]:
        leads, custom = ObjectType.LEADS, ObjectType.CUSTOM_OBJECT
        members = ObjectType.PROGRAM_MEMBERS
        batch = r"{batch_id:\d+}"
        co = "/bulk/v1/customobjects/{api_name}/import"
        pm = "/bulk/v1/program/members/import"
        routes: list[Route] = [
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
            ("GET", "/rest/v1/leads/describe2.json", "describeUsingGET_6",
             self._describe_leads),
            ("GET", "/rest/v1/customobjects/{api_name}/describe.json", "describeUsingGET_1",
             self._describe_custom),
            ("GET", "/rest/v1/programs/members/describe.json", "describeProgramMemberUsingGET2",
             self._describe_members),
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

    def envelope(
        self, result: list[dict[str, Any]], errors: list[dict[str, str]] | None = None
    ) -> web.Response:
        return envelope(result, errors, omit_empty=self._config().omit_empty)

    async def _create_leads(self, call: Call) -> web.StreamResponse:
        list_id = param(call, "listId")
        if list_id is not None and not list_id.isdigit():
            raise Refusal("1003", "Invalid value for parameter 'listId'")
        spec = JobSpec(
            ObjectType.LEADS,
            parse_format(call),
            lookup_field=param(call, "lookupField") or "email",
            list_id=int(list_id) if list_id is not None else None,
            partition=param(call, "partitionName") or "",
        )
        return self.envelope([created(await self._submit(call, spec))])

    async def _create_custom(self, call: Call) -> web.StreamResponse:
        api_name = call.request.match_info["api_name"]
        if self._config().custom_object(api_name) is None:
            raise Refusal(*NOT_FOUND)
        fmt = parse_format(call)
        spec = JobSpec(ObjectType.CUSTOM_OBJECT, fmt, api_name=api_name)
        return self.envelope([created(await self._submit(call, spec))])

    async def _create_members(self, call: Call) -> web.StreamResponse:
        fmt = parse_format(call)
        status = param(call, "programMemberStatus") or ""
        if not status:
            raise Refusal("1003", "Required parameter 'programMemberStatus' is missing")
        program_id = call.request.match_info["program_id"]
        spec = JobSpec(ObjectType.PROGRAM_MEMBERS, fmt, program_id=program_id, member_status=status)
        return self.envelope([created(await self._submit(call, spec))])

    async def _submit(self, call: Call, spec: JobSpec) -> Job:
        if call.upload is None or call.upload.data is None:
            raise Refusal("1003", "Required parameter 'file' is missing")
        self._queue.check_room(spec)  # refuse before parsing a large file for nothing
        delimiter = delimited.DELIMITERS[spec.fmt.lower()]
        parsed = await asyncio.to_thread(parse_upload, call.upload.data, delimiter)
        if call.fail_create:
            job = self._queue.failed_create(spec, call.client_id, self._clock(), CREATE_FAILED)
        else:
            job = self._queue.submit(spec, parsed, call.client_id, self._clock())
        call.info.batch_id = job.batch_id
        if self._on_change is not None:
            await self._on_change()  # the batch id is kept before the client learns it
        return job

    async def _describe_leads(self, call: Call) -> web.StreamResponse:
        return self.envelope([lead_description(self._config().lead_fields)])

    async def _describe_custom(self, call: Call) -> web.StreamResponse:
        obj = self._config().custom_object(call.request.match_info["api_name"])
        if obj is None:
            raise Refusal(*NOT_FOUND)
        return self.envelope([custom_object_description(obj)])

    async def _describe_members(self, call: Call) -> web.StreamResponse:
        return self.envelope([member_description(self._config().program_member_fields)])

    def _find(self, call: Call, object_type: ObjectType) -> Job:
        batch_id = int(call.request.match_info["batch_id"])
        call.info.batch_id = batch_id
        job = self._queue.jobs.get(batch_id)
        forget = self._config().forget_batches_after
        if job is not None and forget > 0 and self._clock() - job.queued_at >= forget:
            raise Refusal("610", MESSAGES["610"])
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
        return self.envelope([status_result(self._find(call, object_type))])

    async def _file(self, object_type: ObjectType, kind: str, call: Call) -> web.StreamResponse:
        job = self._find(call, object_type)
        if job.status not in constants.FINAL_STATUSES:
            raise Refusal("1003", f"Batch id {job.batch_id} is {job.status}, no {kind} file yet")
        body = job.outcome.failures if kind == "failures" else job.outcome.warnings
        if body is None:
            return web.Response(status=404, text=f"No {kind} for batch id {job.batch_id}")
        content_type = self._config().files_content_type
        return web.Response(body=body, content_type=content_type, charset="utf-8")
