"""The Marketo Bulk Import client: `MarketoClient`, the package's one public face.

`MarketoClient` offers the twelve Bulk Import operations of
`shared/marketo-openapi/swagger-mapi.json` as explicit methods (import, status,
failures and warnings for leads, custom objects and program members), the three
describe calls an import header is checked against, plus four route-level
dispatchers for the scheduler and the poller. It builds its parts
and shapes each operation's exchange; the parts do the rest:

- `marketo.retry`: the one retry loop every call goes through, and the
  transport that sends a request and translates aiohttp's exceptions;
- `marketo.auth`: the credentials, the identity request and the token cache;
- `marketo.limits`: calls per window and in flight;
- `marketo.quota`: the subscription's daily quota (Marketo's count of it, read
  by `refresh_usage`, plus ours since) and the pause after a 607;
- `marketo.upload`: the multipart upload, its stall watchdog, unknown outcomes;
- `marketo.wire`: paths, operation ids, reading envelopes and files;
- `marketo.access`: what Marketo refuses for a reason of configuration (refused
  credentials, 603), learnt from every call and cleared by the next success.

The client secret travels only in the identity request's form body and the
token only in the `Authorization` header; neither appears in a URL, a log line,
a repr or an exception message (`_scrub` blanks both out of foreign text).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp

from orchestrator import config
from orchestrator.backoff import Backoff
from orchestrator.clock import utc_now
from orchestrator.errors import AccessDeniedError, CredentialsError
from orchestrator.marketo.access import CREDENTIALS, Access
from orchestrator.marketo.auth import Identity, TokenSource
from orchestrator.marketo.limits import Limiter
from orchestrator.marketo.quota import DailyQuota
from orchestrator.marketo.retry import ClientObserver, NullObserver, RetryLoop, Transport
from orchestrator.marketo.upload import expected_seconds, upload_exchange
from orchestrator.marketo.wire import (
    CUSTOM_OBJECT_FAILURES,
    CUSTOM_OBJECT_STATUS,
    CUSTOM_OBJECT_WARNINGS,
    DAILY_USAGE,
    DESCRIBE_CUSTOM_OBJECT,
    DESCRIBE_LEADS,
    DESCRIBE_PROGRAM_MEMBERS,
    DESCRIBE_REFUSES,
    IMPORT_CUSTOM_OBJECTS,
    IMPORT_LEADS,
    IMPORT_PROGRAM_MEMBERS,
    LEAD_FAILURES,
    LEAD_STATUS,
    LEAD_WARNINGS,
    PERMISSIONS,
    PROGRAM_MEMBER_FAILURES,
    PROGRAM_MEMBER_STATUS,
    PROGRAM_MEMBER_WARNINGS,
    Description,
    Exchange,
    batch_status,
    custom_object_describe_path,
    custom_object_root,
    description,
    read_file,
    read_result,
    usage_total,
)
from orchestrator.models import BatchStatus, ObjectType, QuotaState

__all__ = ["ClientObserver", "MarketoClient"]

T = TypeVar("T")


class MarketoClient:
    """Bulk Import calls with tokens, limits, retries and error translation built in.

    One instance per process: it holds the token cache, the limiter and the
    daily quota. Use it as an async context manager (or call `close`).
    """

    def __init__(
        self,
        settings: config.Settings,
        *,
        observer: ClientObserver | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = utc_now,
        max_attempts: int = 6,
        calls_today: int = 0,
        session: aiohttp.ClientSession | None = None,
        socket_factory: Callable[[Any], socket.socket] | None = None,
    ) -> None:
        m, lim = settings.marketo, settings.limits
        self._client_id = m.client_id
        self._base = m.base_url.rstrip("/")
        self._request_timeout = m.request_timeout
        observer = observer or NullObserver()
        self._transport = Transport(
            m.request_timeout,
            observer=observer,
            scrub=self._scrub,
            session=session,
            socket_factory=socket_factory,
        )
        self._timeout = self._transport.timeout
        self._limiter = limiter = Limiter(
            lim.api_calls_per_window,
            lim.api_window_seconds,
            lim.concurrent_api_calls,
            sleep=sleep,
            clock=clock,
        )
        self._identity = Identity(
            m, send=self._transport.send, limiter=limiter, timeout=self._timeout, scrub=self._scrub
        )
        self._tokens = TokenSource(self._identity.fetch, clock=clock, sleep=sleep)
        self._quota = DailyQuota(
            lim.daily_quota,
            lim.daily_reserve,
            lim.quota_reset_tz,
            wall_clock=wall_clock,
            sleep=sleep,
            used=calls_today,
        )
        self._retry = RetryLoop(
            self._transport,
            self._tokens,
            limiter,
            self._quota,
            Backoff(settings.backoff.initial, settings.backoff.max),
            observer=observer,
            sleep=sleep,
            clock=clock,
            max_attempts=max_attempts,
            window=lim.api_window_seconds,
        )
        self._access = Access()

    def __repr__(self) -> str:
        return f"<MarketoClient {self._base} client_id={self._client_id!r}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if the client opened it."""
        await self._transport.close()

    @property
    def has_token(self) -> bool:
        """True while the client holds an unexpired access token."""
        return self._tokens.has_token

    @property
    def identity_ok(self) -> bool | None:
        """Whether the last identity call succeeded; None before the first one.

        Readiness rests on this, not on `has_token`: a token that expired while the
        daemon was idle says nothing about whether Marketo can be reached."""
        return self._identity.ok

    async def ensure_token(self) -> None:
        """Fetch a token if there is none; raises `MarketoError` if that fails."""
        try:
            await self._tokens.get()
        except CredentialsError as exc:
            self._access.refused(CREDENTIALS, exc)
            raise
        self._access.allowed(CREDENTIALS)

    @property
    def access(self) -> Access:
        """What Marketo refuses now for a reason of configuration (credentials, 603)."""
        return self._access

    @property
    def calls_today(self) -> int:
        """Bulk calls counted in the current quota day (identity calls are free)."""
        return self._quota.used

    @property
    def calls_by_operation(self) -> Mapping[str, int]:
        """Requests sent, by swagger operation id (and "identity")."""
        return dict(self._transport.calls)

    @property
    def calls_in_window(self) -> int:
        """Counted calls sent within the last `api_window_seconds`."""
        return self._limiter.in_window

    # -- The subscription's daily quota -------------------------------------

    @property
    def quota(self) -> QuotaState:
        """The daily quota as reckoned now, without asking Marketo."""
        return self._quota.state()

    async def refresh_usage(self) -> QuotaState:
        """Read Marketo's count of the subscription's calls today if a reading is due
        (`marketo.quota`); the quota as reckoned now."""
        return await self._quota.refresh(self.daily_usage)

    async def daily_usage(self) -> int:
        """The subscription's calls today, every API user's, as Marketo counts them."""
        result = await self._get(DAILY_USAGE, "/rest/v1/stats/usage.json")
        return usage_total(result, DAILY_USAGE)

    # -- Leads -------------------------------------------------------------

    async def import_leads(
        self,
        path: Path,
        fmt: str,
        *,
        lookup_field: str = "",
        partition_name: str = "",
        list_id: int = 0,
    ) -> BatchStatus:
        params = {"format": fmt.lower()}
        if lookup_field:
            params["lookupField"] = lookup_field
        if partition_name:
            params["partitionName"] = partition_name
        if list_id:
            params["listId"] = str(list_id)
        return await self._upload(IMPORT_LEADS, "/bulk/v1/leads.json", params, path, fmt)

    async def lead_import_status(self, batch_id: int) -> BatchStatus:
        return await self._status(LEAD_STATUS, f"/bulk/v1/leads/batch/{int(batch_id)}.json")

    async def lead_import_failures(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/leads/batch/{int(batch_id)}/failures.json"
        return await self._download(LEAD_FAILURES, path, dest)

    async def lead_import_warnings(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/leads/batch/{int(batch_id)}/warnings.json"
        return await self._download(LEAD_WARNINGS, path, dest)

    # -- Custom objects ----------------------------------------------------

    async def import_custom_objects(self, api_name: str, path: Path, fmt: str) -> BatchStatus:
        url_path = f"{custom_object_root(api_name)}.json"
        params = {"format": fmt.lower()}
        return await self._upload(IMPORT_CUSTOM_OBJECTS, url_path, params, path, fmt)

    async def custom_object_import_status(self, api_name: str, batch_id: int) -> BatchStatus:
        path = f"{custom_object_root(api_name)}/{int(batch_id)}/status.json"
        return await self._status(CUSTOM_OBJECT_STATUS, path)

    async def custom_object_import_failures(self, api_name: str, batch_id: int, dest: Path) -> bool:
        path = f"{custom_object_root(api_name)}/{int(batch_id)}/failures.json"
        return await self._download(CUSTOM_OBJECT_FAILURES, path, dest)

    async def custom_object_import_warnings(self, api_name: str, batch_id: int, dest: Path) -> bool:
        path = f"{custom_object_root(api_name)}/{int(batch_id)}/warnings.json"
        return await self._download(CUSTOM_OBJECT_WARNINGS, path, dest)

    # -- Program members ---------------------------------------------------

    async def import_program_members(
        self, program_id: int, status: str, path: Path, fmt: str
    ) -> BatchStatus:
        url_path = f"/bulk/v1/program/{int(program_id)}/members/import.json"
        params = {"programMemberStatus": status, "format": fmt.upper()}
        return await self._upload(IMPORT_PROGRAM_MEMBERS, url_path, params, path, fmt)

    async def program_member_import_status(self, batch_id: int) -> BatchStatus:
        path = f"/bulk/v1/program/members/import/{int(batch_id)}/status.json"
        return await self._status(PROGRAM_MEMBER_STATUS, path)

    async def program_member_import_failures(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/program/members/import/{int(batch_id)}/failures.json"
        return await self._download(PROGRAM_MEMBER_FAILURES, path, dest)

    async def program_member_import_warnings(self, batch_id: int, dest: Path) -> bool:
        path = f"/bulk/v1/program/members/import/{int(batch_id)}/warnings.json"
        return await self._download(PROGRAM_MEMBER_WARNINGS, path, dest)

    # -- Describe: the fields an import header may name ----------------------

    async def describe_leads(self) -> Description:
        """Lead fields (Describe Lead2), with the fields leads can be looked up by."""
        return description(
            await self._get(DESCRIBE_LEADS, "/rest/v1/leads/describe2.json"), DESCRIBE_LEADS
        )

    async def describe_custom_object(self, api_name: str) -> Description:
        """A custom object's fields, its dedupe fields and its id field."""
        path = custom_object_describe_path(api_name)
        return description(await self._get(DESCRIBE_CUSTOM_OBJECT, path), DESCRIBE_CUSTOM_OBJECT)

    async def describe_program_members(self) -> Description:
        """Program member fields (a file may also name lead fields: see `describe_leads`)."""
        path = "/rest/v1/programs/members/describe.json"
        return description(
            await self._get(DESCRIBE_PROGRAM_MEMBERS, path), DESCRIBE_PROGRAM_MEMBERS
        )

    # -- Route-level dispatchers -------------------------------------------

    async def submit(self, route: config.Route, path: Path, fmt: str) -> BatchStatus:
        """Create the import job for one chunk file of `route`."""
        match route.object:
            case ObjectType.LEADS:
                return await self.import_leads(
                    path,
                    fmt,
                    lookup_field=route.lookup_field,
                    partition_name=route.partition_name,
                    list_id=route.list_id,
                )
            case ObjectType.CUSTOM_OBJECT:
                return await self.import_custom_objects(route.api_name, path, fmt)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.import_program_members(
                    route.program_id, route.program_member_status, path, fmt
                )

    async def status(self, route: config.Route, batch_id: int) -> BatchStatus:
        """The job's current status."""
        match route.object:
            case ObjectType.LEADS:
                return await self.lead_import_status(batch_id)
            case ObjectType.CUSTOM_OBJECT:
                return await self.custom_object_import_status(route.api_name, batch_id)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.program_member_import_status(batch_id)

    async def download_failures(self, route: config.Route, batch_id: int, dest: Path) -> bool:
        """Stream the job's failures file to `dest`; False when Marketo has none (404)."""
        match route.object:
            case ObjectType.LEADS:
                return await self.lead_import_failures(batch_id, dest)
            case ObjectType.CUSTOM_OBJECT:
                return await self.custom_object_import_failures(route.api_name, batch_id, dest)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.program_member_import_failures(batch_id, dest)

    async def download_warnings(self, route: config.Route, batch_id: int, dest: Path) -> bool:
        """Stream the job's warnings file to `dest`; False when Marketo has none (404)."""
        match route.object:
            case ObjectType.LEADS:
                return await self.lead_import_warnings(batch_id, dest)
            case ObjectType.CUSTOM_OBJECT:
                return await self.custom_object_import_warnings(route.api_name, batch_id, dest)
            case ObjectType.PROGRAM_MEMBERS:
                return await self.program_member_import_warnings(batch_id, dest)

    # -- One exchange per operation kind -----------------------------------

    async def _upload(
        self, operation: str, url_path: str, params: dict[str, str], file: Path, fmt: str
    ) -> BatchStatus:
        """POST the file; an attempt that fails after the whole body went out is an
        unknown outcome (`UnknownOutcomeError`, not retried), see `marketo.upload`."""
        size = (await asyncio.to_thread(file.stat)).st_size
        exchange = upload_exchange(
            self._base + url_path,
            params,
            file,
            fmt,
            operation=operation,
            stall=self._request_timeout,
            timeout=self._timeout,
            scrub=self._scrub,
        )
        result = await self._call(operation, exchange, min_life=expected_seconds(size))
        return batch_status(result, operation)

    async def _status(self, operation: str, url_path: str) -> BatchStatus:
        return batch_status(await self._get(operation, url_path), operation)

    async def _get(self, operation: str, url_path: str) -> Any:
        """GET a JSON envelope; its `result`."""

        async def exchange(session: aiohttp.ClientSession, headers: dict[str, str]) -> Any:
            async with session.get(
                self._base + url_path, headers=headers, timeout=self._timeout
            ) as resp:
                return await read_result(resp, operation, self._scrub)

        return await self._call(operation, exchange)

    async def _download(self, operation: str, url_path: str, dest: Path) -> bool:
        """GET a failures/warnings file, streamed to `dest` via `dest.part`."""

        async def exchange(session: aiohttp.ClientSession, headers: dict[str, str]) -> bool:
            async with session.get(
                self._base + url_path, headers=headers, timeout=self._timeout
            ) as resp:
                if resp.status == 404:
                    return False
                await read_file(resp, dest, operation, self._scrub)
                return True

        return await self._call(operation, exchange)

    async def _call(
        self, operation: str, exchange: Exchange[T], *, min_life: float | None = None
    ) -> T:
        """One call through the retry loop, learning from it what Marketo refuses: a
        refusal is kept until a call needing the same thing succeeds (`marketo.access`).
        A call outside the Bulk Import (the usage reading) needs no import permission:
        a 603 to it is that call's error only, not a refusal of the daemon's work. A 603
        to a describe refuses the import permission too (`DESCRIBE_REFUSES`)."""
        permission = PERMISSIONS.get(operation)
        try:
            result = await self._retry.call(operation, exchange, min_life=min_life)
        except AccessDeniedError as exc:
            self._access.allowed(CREDENTIALS)  # 603: "authentication is successful but ..."
            refused = permission or DESCRIBE_REFUSES.get(operation)
            if refused is not None:
                self._access.refused(refused, exc)
            raise
        except CredentialsError as exc:
            self._access.refused(CREDENTIALS, exc)
            raise
        self._access.allowed(CREDENTIALS, *([permission] if permission else []))
        return result

    def _scrub(self, text: str) -> str:
        """`text` with every secret used and the current token blanked out."""
        for secret in (*self._identity.secrets, self._tokens.current_value):
            if secret:
                text = text.replace(secret, "***")
        return text
