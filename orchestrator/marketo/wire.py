"""Marketo's wire format: paths, operation ids, envelopes, token answers, file bodies.

The reading half of the Marketo client: it turns an aiohttp response into a
typed result or into one of our errors, classified by `errors[].code` (a
string) or the HTTP status, never by message text. Messages that come from the
other side pass through the client's `scrub` first, so a secret echoed back can
never reach an exception string. An `Exchange` is one request and the reading
of its answer; `marketo.retry` sends it, as often as is worth it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiofiles
import aiohttp

from orchestrator.errors import (
    CredentialsError,
    FatalError,
    MarketoError,
    TransientError,
    error_for_code,
    error_for_http_status,
)
from orchestrator.models import BatchStatus, ObjectType

T = TypeVar("T")

Scrub = Callable[[str], str]
# One request and the reading of its answer, given the session and the request's headers.
Exchange = Callable[[aiohttp.ClientSession, dict[str, str]], Awaitable[T]]

# Operation ids, as swagger-mapi.json names them (and "identity" for tokens).
IDENTITY: Final = "identity"
IMPORT_LEADS: Final = "importLeadUsingPOST"
LEAD_STATUS: Final = "getImportLeadStatusUsingGET"
LEAD_FAILURES: Final = "getImportLeadFailuresUsingGET"
LEAD_WARNINGS: Final = "getImportLeadWarningsUsingGET"
IMPORT_CUSTOM_OBJECTS: Final = "importCustomObjectUsingPOST"
CUSTOM_OBJECT_STATUS: Final = "getImportCustomObjectStatusUsingGET"
CUSTOM_OBJECT_FAILURES: Final = "getImportCustomObjectFailuresUsingGET"
CUSTOM_OBJECT_WARNINGS: Final = "getImportCustomObjectWarningsUsingGET"
IMPORT_PROGRAM_MEMBERS: Final = "importProgramMemberUsingPOST"
PROGRAM_MEMBER_STATUS: Final = "getImportProgramMemberStatusUsingGET"
PROGRAM_MEMBER_FAILURES: Final = "getImportProgramMemberFailuresUsingGET"
PROGRAM_MEMBER_WARNINGS: Final = "getImportProgramMemberWarningsUsingGET"
DAILY_USAGE: Final = "getDailyUsageUsingGET"  # GET /rest/v1/stats/usage.json

# The permission of the API role each bulk operation needs (swagger-mapi.json: "Required
# Permissions"); program members are leads to Marketo's roles.
READ_WRITE_LEAD: Final = "Read-Write Lead"
READ_WRITE_CUSTOM_OBJECT: Final = "Read-Write Custom Object"
PERMISSIONS: Final = {
    **dict.fromkeys((IMPORT_LEADS, LEAD_STATUS, LEAD_FAILURES, LEAD_WARNINGS), READ_WRITE_LEAD),
    **dict.fromkeys(
        (
            IMPORT_PROGRAM_MEMBERS,
            PROGRAM_MEMBER_STATUS,
            PROGRAM_MEMBER_FAILURES,
            PROGRAM_MEMBER_WARNINGS,
        ),
        READ_WRITE_LEAD,
    ),
    **dict.fromkeys(
        (
            IMPORT_CUSTOM_OBJECTS,
            CUSTOM_OBJECT_STATUS,
            CUSTOM_OBJECT_FAILURES,
            CUSTOM_OBJECT_WARNINGS,
        ),
        READ_WRITE_CUSTOM_OBJECT,
    ),
}


def permission_of(object_type: ObjectType) -> str:
    """The permission importing `object_type` needs."""
    if object_type is ObjectType.CUSTOM_OBJECT:
        return READ_WRITE_CUSTOM_OBJECT
    return READ_WRITE_LEAD


DESCRIBE_LEADS: Final = "describeUsingGET_6"  # Describe Lead2: /rest/v1/leads/describe2.json
DESCRIBE_CUSTOM_OBJECT: Final = "describeUsingGET_1"
DESCRIBE_PROGRAM_MEMBERS: Final = "describeProgramMemberUsingGET2"
# A 603 to a describe means the role may not even read the object, so it cannot import
# it either: the import permission is refused. A describe that succeeds proves only a
# read grant, so it ends no refusal (only a call of PERMISSIONS does).
DESCRIBE_REFUSES: Final = {
    DESCRIBE_LEADS: READ_WRITE_LEAD,
    DESCRIBE_PROGRAM_MEMBERS: READ_WRITE_LEAD,
    DESCRIBE_CUSTOM_OBJECT: READ_WRITE_CUSTOM_OBJECT,
}

# Content type of the multipart `file` part, by format (ssv has no type of its own).
CONTENT_TYPES: Final = {"csv": "text/csv", "tsv": "text/tab-separated-values", "ssv": "text/csv"}
# The "rows processed" counter: leads (and program members) count leads,
# custom objects count objects (swagger: ImportLeadResponse, ImportCustomObjectResponse).
PROCESSED_KEYS: Final = ("numOfLeadsProcessed", "numOfObjectsProcessed")
TOO_LARGE_MESSAGE: Final = "chunk too large: a bug in the splitter, please report"
DOWNLOAD_BLOCK_BYTES: Final = 64 * 1024
# A downloaded body at most this long that starts with "{" is read as a possible error
# envelope (a few hundred bytes); a longer one is a file whatever its first character.
ENVELOPE_MAX_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Grant:
    """What the identity service answered: a token and its remaining life."""

    access_token: str = field(repr=False)
    expires_in: float


@dataclass(frozen=True, slots=True)
class Description:
    """An object as Marketo's describe call presents it, as far as an import header cares.

    `fields` are the REST API names a header uses; `dedupe_fields` the fields that name
    a record (custom objects, program members); `searchable` the single fields the
    object can be looked up by (for leads: what describe offers as lookupField)."""

    name: str
    fields: tuple[str, ...]
    dedupe_fields: tuple[str, ...] = ()
    id_field: str = ""
    searchable: tuple[str, ...] = ()


def custom_object_root(api_name: str) -> str:
    """The custom-object import path prefix, the API name quoted as one segment."""
    return f"/bulk/v1/customobjects/{quote(api_name, safe='')}/import"


def custom_object_describe_path(api_name: str) -> str:
    """The custom object's describe path, the API name quoted as one segment."""
    return f"/rest/v1/customobjects/{quote(api_name, safe='')}/describe.json"


def describe(exc: BaseException) -> str:
    """A foreign exception as "TypeName: message" ("TypeName" when it has no message);
    scrub it before it goes anywhere."""
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


async def read_result(resp: aiohttp.ClientResponse, operation: str, scrub: Scrub) -> Any:
    """The envelope's `result`, or the error the response carries."""
    if resp.status == 413:
        raise error_for_http_status(413, TOO_LARGE_MESSAGE, operation=operation)
    if resp.status != 200:
        message = f"HTTP {resp.status} {resp.reason or ''}".strip()
        raise error_for_http_status(resp.status, message, operation=operation)
    body = await read_json(resp, operation)
    if body.get("success") is True:
        return body.get("result")
    raise envelope_error(body, operation, scrub)


def envelope_error(body: Mapping[str, Any], operation: str, scrub: Scrub) -> MarketoError:
    """The error of the right class for a `success: false` envelope's first error."""
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, Mapping) or "code" not in first:
        return FatalError(
            "invalid-response",
            "success is false without an error code",
            operation=operation,
            request_id=scrub(str(body.get("requestId") or "")),
        )
    message = scrub(str(first.get("message", "")))
    request_id = scrub(str(body.get("requestId") or ""))
    return error_for_code(str(first["code"]), message, operation=operation, request_id=request_id)


async def read_json(resp: aiohttp.ClientResponse, operation: str) -> dict[str, Any]:
    """The response body as a JSON object; anything else is a transient oddity."""
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise TransientError(
            "invalid-response", "the answer is not a JSON object", operation=operation
        )
    return body


async def read_grant(resp: aiohttp.ClientResponse, scrub: Scrub) -> Grant:
    """The identity service's answer as a `Grant`; refused credentials are fatal."""
    if resp.status in (400, 401, 403):
        raise CredentialsError(
            f"http-{resp.status}",
            "the identity service refused the client credentials "
            "(check marketo.client_id and marketo.client_secret)",
            operation=IDENTITY,
        )
    if resp.status != 200:
        message = f"identity service answered HTTP {resp.status}"
        raise error_for_http_status(resp.status, message, operation=IDENTITY)
    body = await read_json(resp, IDENTITY)
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        problem = scrub(str(body.get("error_description") or body.get("error") or ""))
        raise FatalError(
            "identity", f"no access token in the answer {problem}".strip(), operation=IDENTITY
        )
    try:
        expires_in = float(body.get("expires_in", 0))
    except (TypeError, ValueError):
        expires_in = 0.0
    return Grant(token, expires_in)


def batch_status(result: Any, operation: str) -> BatchStatus:
    """The first item of an import or status `result` as a `BatchStatus`."""
    item = result[0] if isinstance(result, list) and result else None
    if not isinstance(item, Mapping) or "batchId" not in item:
        raise FatalError("invalid-response", "no batchId in the result", operation=operation)
    processed = next((item[k] for k in PROCESSED_KEYS if k in item), 0)
    try:
        return BatchStatus(
            batch_id=int(item["batchId"]),
            status=str(item.get("status", "")),
            rows_processed=int(processed or 0),
            rows_failed=int(item.get("numOfRowsFailed") or 0),
            rows_with_warning=int(item.get("numOfRowsWithWarning") or 0),
            message=str(item.get("message") or ""),
        )
    except (TypeError, ValueError):
        raise FatalError("invalid-response", "malformed counters", operation=operation) from None


async def read_file(resp: aiohttp.ClientResponse, dest: Path, operation: str, scrub: Scrub) -> None:
    """A failures or warnings file streamed to `dest`, judged by its content: a body that
    is a JSON envelope is the error it carries, anything else is the file, whatever the
    Content-Type (Adobe's OpenAPI declares application/json for these CSV endpoints)."""
    if resp.status != 200:
        await read_result(resp, operation, scrub)  # raises the error the answer carries
    await stream_to_file(
        resp, dest, check=partial(refuse_envelope, operation=operation, scrub=scrub)
    )


def refuse_envelope(path: Path, *, operation: str, scrub: Scrub) -> None:
    """Raise the error of a downloaded body that is a JSON envelope (starts with "{" and
    parses as an object with `success` or `errors`); a file passes. Blocking."""
    if path.stat().st_size > ENVELOPE_MAX_BYTES:
        return
    data = path.read_bytes()
    if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return
    try:
        body = json.loads(data)
    except ValueError:
        return  # a file whose first column name starts with "{"
    if not isinstance(body, dict) or not ("success" in body or "errors" in body):
        return
    if body.get("success") is True:
        raise FatalError(
            "invalid-response", "a JSON body where a file was expected", operation=operation
        )
    raise envelope_error(body, operation, scrub)


def usage_total(result: Any, operation: str) -> int:
    """The subscription's calls today from a usage `result` (swagger: UsageData items of
    `date`, `total` and per-user `count`s): the latest day's total, or the sum of its
    users' counts when Marketo leaves the total out; 0 when it lists no day."""
    if not isinstance(result, list):
        raise FatalError("invalid-response", "no usage list in the result", operation=operation)
    days = [item for item in result if isinstance(item, Mapping)]
    if not days:
        return 0
    today = max(days, key=lambda item: str(item.get("date") or ""))
    try:
        if today.get("total") is not None:
            return int(today["total"])
        users = today.get("users")
        return (
            sum(int(u.get("count") or 0) for u in users if isinstance(u, Mapping))
            if isinstance(users, list)
            else 0
        )
    except (TypeError, ValueError):
        raise FatalError(
            "invalid-response", "malformed usage counts", operation=operation
        ) from None


async def stream_to_file(
    resp: aiohttp.ClientResponse, dest: Path, check: Callable[[Path], None] | None = None
) -> None:
    """Write the body to `dest.part` block by block, then rename it to `dest`; `check`
    (blocking) may refuse the part first by raising."""
    part = dest.with_name(dest.name + ".part")
    try:
        async with aiofiles.open(part, "wb") as fh:
            async for block in resp.content.iter_chunked(DOWNLOAD_BLOCK_BYTES):
                await fh.write(block)
        if check is not None:
            await asyncio.to_thread(check, part)
        await asyncio.to_thread(os.replace, part, dest)
    except BaseException:
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise


def description(result: Any, operation: str) -> Description:
    """The first item of a describe `result` as a `Description` (swagger: LeadAttribute2,
    ObjectMetaData, ProgramMemberAttribute2 share the parts read here)."""
    item = result[0] if isinstance(result, list) and result else None
    if not isinstance(item, Mapping) or not isinstance(item.get("fields"), list):
        raise FatalError(
            "invalid-response", "no fields in the describe result", operation=operation
        )
    fields = tuple(
        str(f["name"]) for f in item["fields"] if isinstance(f, Mapping) and f.get("name")
    )
    searchable = item.get("searchableFields")
    single = [k for k in searchable if isinstance(k, list) and len(k) == 1] if searchable else []
    return Description(
        name=str(item.get("name") or item.get("apiName") or ""),
        fields=fields,
        dedupe_fields=tuple(flat_names(item.get("dedupeFields"))),
        id_field=str(item.get("idField") or ""),
        searchable=tuple(str(k[0]) for k in single),
    )


def flat_names(value: Any) -> list[str]:
    """Field names from a list that may nest them (a compound key is a list of names)."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [name for item in value for name in flat_names(item)]
    return []
