"""The Marketo Bulk Import client: the only module that knows Marketo's JSON.

`MarketoClient` offers the twelve Bulk Import operations of
`shared/marketo-openapi/swagger-mapi.json` as explicit methods (import, status,
failures and warnings for leads, custom objects and program members), plus four
route-level dispatchers for the scheduler and the poller.

Every call goes through one retry loop:

    quota gate -> token -> limiter slot -> HTTP -> envelope -> result
         ^                                                    |
         +-- 601/602: refresh once (under the token lock) ----+
         +-- 606: hold every call for a full api_window_seconds, retry
         +-- 615/5xx/500/502/604/608/611/614/713/719/network/timeout: backoff, retry
         +-- 607: pause every call until the quota resets (see `marketo.limits`), retry
    1016, 1019 and fatal errors: raised at once (the scheduler owns 1016/1019)

Creating an import job is not idempotent, so a create is retried here only
when Marketo cannot have executed it: the connection was never established,
the body was not fully sent (a stalled upload), or Marketo answered with an
error envelope (6xx, 500/502 in `errors[]`: "not executed" on Marketo's
error-code page). Once the whole body went out, a timeout, a dropped
connection, an HTTP 5xx or an unreadable answer is an unknown outcome:
`UnknownOutcomeError`, raised at once for the scheduler to resubmit (capped).

Timeouts: `request_timeout` bounds connecting, and then the silence after the
request went out (no byte of the answer for that long); an upload is cut off
only when it makes no progress for `request_timeout`, never for taking long.

Foreign errors are translated here and only here: aiohttp exceptions become
`TransientError("network"/"timeout")`, HTTP statuses go through
`errors.error_for_http_status` and Marketo's `errors[].code` through
`errors.error_for_code`. The client secret travels only in the identity
request's form body and the token only in the `Authorization` header; neither
appears in a URL, a log line, a repr or an exception message.

Split by prefix: `marketo.auth` (the token cache), `marketo.limits` (the
limiter and the daily quota), `marketo.wire` (paths, operation ids, reading
envelopes and files).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar

import aiohttp
import structlog

import orchestrator
from orchestrator import config, constants, logs
from orchestrator.backoff import Backoff
from orchestrator.clock import utc_now
from orchestrator.errors import (
    AuthError,
    CredentialsError,
    FatalError,
    MarketoError,
    QuotaExhaustedError,
    RateLimitError,
    TransientError,
    UnknownOutcomeError,
)
from orchestrator.marketo.auth import Grant, TokenSource
from orchestrator.marketo.limits import DailyQuota, Limiter
from orchestrator.marketo.wire import (
    CONTENT_TYPES,
    CUSTOM_OBJECT_FAILURES,
    CUSTOM_OBJECT_STATUS,
    CUSTOM_OBJECT_WARNINGS,
    IDENTITY,
    IMPORT_CUSTOM_OBJECTS,
    IMPORT_LEADS,
    IMPORT_PROGRAM_MEMBERS,
    LEAD_FAILURES,
    LEAD_STATUS,
    LEAD_WARNINGS,
    PROGRAM_MEMBER_FAILURES,
    PROGRAM_MEMBER_STATUS,
    PROGRAM_MEMBER_WARNINGS,
    batch_status,
    custom_object_root,
    read_grant,
    read_result,
    stream_to_file,
)
from orchestrator.models import BatchStatus, ObjectType

log = structlog.get_logger(__name__)

T = TypeVar("T")

USER_AGENT: Final = f"marketo-orchestrator/{orchestrator.__version__}"
# An upload's expected time, for the token's minimum life: its size over this rate.
ASSUMED_UPLOAD_BYTES_PER_SECOND: Final = 250_000
MAX_REFRESHES: Final = 2  # token refreshes per call after 601/602
MAX_QUOTA_PAUSES: Final = 3  # 607 pauses per call before giving up
RETRY_DEADLINE_SECONDS: Final = 600.0  # no call retries for longer than this


class ClientObserver(Protocol):
    """What the client reports, so the daemon can feed metrics without this module."""

    def api_call(self, operation: str) -> None: ...
    def marketo_error(self, code: str) -> None: ...
    def backoff(self, reason: str, seconds: float) -> None: ...


class NullObserver:
    """The default observer: ignores everything."""

    def api_call(self, operation: str) -> None:
        pass

    def marketo_error(self, code: str) -> None:
        pass

    def backoff(self, reason: str, seconds: float) -> None:
        pass


class MarketoClient:
    """Bulk Import calls with tokens, limits, retries and error translation built in.

    One instance per process: it holds the token cache, the limiter and the
    daily call count. Use it as an async context manager (or call `close`).
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
        self._settings = settings
        self._base = m.base_url.rstrip("/")
        self._token_url = f"{config.identity_url(m)}/oauth/token"
        self._observer: ClientObserver = observer or NullObserver()
        self._sleep = sleep
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._backoff = Backoff(settings.backoff.initial, settings.backoff.max)
        self._request_timeout = m.request_timeout
        # No total: a long upload that keeps going is never cut off (see _upload).
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=m.request_timeout, sock_read=m.request_timeout
        )
        self._session = session
        self._owns_session = session is None
        self._secret = m.client_secret
        self._old_secrets: list[config.Secret] = []  # rotated out; still scrubbed
        self._socket_factory = socket_factory  # tests: sockets with small send buffers
        self._tokens = TokenSource(self._fetch_grant, clock=clock, sleep=sleep)
        self._window = lim.api_window_seconds
        self._limiter = Limiter(
            lim.api_calls_per_window,
            lim.api_window_seconds,
            lim.concurrent_api_calls,
            sleep=sleep,
            clock=clock,
        )
        self._quota = DailyQuota(
            lim.daily_api_calls,
            lim.quota_reset_tz,
            wall_clock=wall_clock,
            sleep=sleep,
            used=calls_today,
        )
        self._calls: Counter[str] = Counter()
        self._identity_ok: bool | None = None

    def __repr__(self) -> str:
        return f"<MarketoClient {self._base} client_id={self._settings.marketo.client_id!r}>"

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
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def has_token(self) -> bool:
        """True while the client holds an unexpired access token."""
        return self._tokens.has_token

    @property
    def identity_ok(self) -> bool | None:
        """Whether the last identity call succeeded; None before the first one.

        Readiness rests on this, not on `has_token`: a token that expired while the
        daemon was idle says nothing about whether Marketo can be reached."""
        return self._identity_ok

    async def ensure_token(self) -> None:
        """Fetch a token if there is none; raises `MarketoError` if that fails."""
        await self._tokens.get()

    @property
    def calls_today(self) -> int:
        """Bulk calls counted in the current quota day (identity calls are free)."""
        return self._quota.used

    @property
    def calls_by_operation(self) -> Mapping[str, int]:
        """Requests sent, by swagger operation id (and "identity")."""
        return dict(self._calls)

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
        """POST the file as the multipart part `file`, reopened for every attempt.

        An attempt that fails after the whole body went out is an unknown outcome
        (`UnknownOutcomeError`, not retried here); one that fails before is retried.
        """
        content_type = CONTENT_TYPES.get(fmt.lower(), "text/plain")
        size = (await asyncio.to_thread(file.stat)).st_size
        min_life = max(constants.TOKEN_MIN_LIFE_SECONDS, size / ASSUMED_UPLOAD_BYTES_PER_SECOND)

        async def exchange(session: aiohttp.ClientSession, headers: dict[str, str]) -> Any:
            fh = await asyncio.to_thread(file.open, "rb")
            progress: UploadProgress | None = None
            try:
                form = aiohttp.FormData()
                form.add_field("file", fh, filename=file.name, content_type=content_type)
                body = form()
                async with asyncio.timeout(self._request_timeout) as watchdog:
                    progress = UploadProgress(body.size, watchdog, self._request_timeout)
                    async with session.post(
                        self._base + url_path,
                        params=params,
                        data=body,
                        headers=headers,
                        timeout=self._timeout,
                        trace_request_ctx=progress,
                    ) as resp:
                        progress.settle()  # the answer is here: sock_read rules
                        return await read_result(resp, operation, self._scrub)
            except TransientError as exc:
                if exc.code.startswith("http-") or exc.code == "invalid-response":
                    # Not Marketo's envelope: whatever answered may have passed the body on.
                    raise self._unknown(operation, exc.code, exc.message) from None
                raise
            except (TimeoutError, aiohttp.ClientError) as exc:
                if progress is not None and progress.body_sent:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "network"
                    text = self._scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
                    raise self._unknown(operation, kind, text) from None
                raise  # _send: never connected or body not fully sent, safe to retry
            finally:
                fh.close()  # closing a file opened for reading does not block

        return batch_status(await self._call(operation, exchange, min_life=min_life), operation)

    def _unknown(self, operation: str, code: str, what: str) -> UnknownOutcomeError:
        return UnknownOutcomeError(
            code,
            f"the request was sent but its outcome is unknown ({what}); "
            "Marketo may or may not have created the import job",
            operation=operation,
        )

    async def _status(self, operation: str, url_path: str) -> BatchStatus:
        async def exchange(session: aiohttp.ClientSession, headers: dict[str, str]) -> Any:
            async with session.get(
                self._base + url_path, headers=headers, timeout=self._timeout
            ) as resp:
                return await read_result(resp, operation, self._scrub)

        return batch_status(await self._call(operation, exchange), operation)

    async def _download(self, operation: str, url_path: str, dest: Path) -> bool:
        """GET a failures/warnings file, streamed to `dest` via `dest.part`."""

        async def exchange(session: aiohttp.ClientSession, headers: dict[str, str]) -> bool:
            async with session.get(
                self._base + url_path, headers=headers, timeout=self._timeout
            ) as resp:
                if resp.status == 404:
                    return False
                if resp.status != 200 or resp.content_type == "application/json":
                    await read_result(resp, operation, self._scrub)  # raises the error it carries
                    raise FatalError(
                        "invalid-response",
                        "a JSON body where a file was expected",
                        operation=operation,
                    )
                await stream_to_file(resp, dest)
                return True

        return await self._call(operation, exchange)

    # -- The retry loop ----------------------------------------------------

    async def _call(
        self,
        operation: str,
        exchange: Callable[[aiohttp.ClientSession, dict[str, str]], Awaitable[T]],
        *,
        min_life: float | None = None,
    ) -> T:
        """Run `exchange` with a token and a limiter slot, retrying what is worth it.

        `min_life`: seconds the token must still live (uploads); None for the default."""
        started = self._clock()
        failures = refreshes = pauses = 0
        while True:
            generation = None
            try:
                await self._quota.reserve(self._on_quota_pause)
                token = await self._tokens.get(min_life)
                generation = token.generation
                headers = {"Authorization": f"Bearer {token.value}"}
                async with self._limiter.slot():
                    result = await self._send(operation, exchange, headers)
                self._quota.succeeded()
                return result
            except AuthError as exc:
                self._saw(exc)
                if generation is None or refreshes >= MAX_REFRESHES:
                    raise
                refreshes += 1
                log.warning("access token refused, refreshing", operation=operation, code=exc.code)
                await self._tokens.refresh(generation)
            except QuotaExhaustedError as exc:
                self._saw(exc)
                pauses += 1
                if pauses > MAX_QUOTA_PAUSES:
                    raise
                self._quota.exhausted()
            except UnknownOutcomeError as exc:
                self._saw(exc)
                raise
            except (RateLimitError, TransientError) as exc:
                self._saw(exc)
                failures += 1
                delay = self._backoff.delay(failures)
                if exc.code == "606":
                    # The window is the subscription's: nothing goes until it has slid.
                    delay = max(delay, self._window)
                    self._limiter.hold(delay)
                elapsed = self._clock() - started
                if failures >= self._max_attempts or elapsed + delay > RETRY_DEADLINE_SECONDS:
                    raise
                log.warning(
                    "Marketo call failed, retrying",
                    operation=operation,
                    code=exc.code,
                    request_id=exc.request_id or None,
                    attempt=failures,
                    delay=round(delay, 3),
                )
                self._observer.backoff(exc.code, delay)
                if exc.code != "606":  # after 606 the limiter holds every call, this one too
                    await self._sleep(delay)
            except MarketoError as exc:
                self._saw(exc)
                raise

    async def _send(
        self,
        operation: str,
        exchange: Callable[[aiohttp.ClientSession, dict[str, str]], Awaitable[T]],
        headers: dict[str, str],
    ) -> T:
        """One request; aiohttp's exceptions become ours here."""
        self._count(operation)
        started = time.monotonic()
        headers = {**headers, "User-Agent": USER_AGENT}
        try:
            result = await exchange(self._http(), headers)
        except TimeoutError:
            raise TransientError("timeout", "no answer in time", operation=operation) from None
        except aiohttp.ClientError as exc:
            message = self._scrub(f"{type(exc).__name__}: {exc}")
            raise TransientError("network", message, operation=operation) from None
        log.debug("Marketo call", operation=operation, seconds=round(time.monotonic() - started, 3))
        return result

    async def _fetch_grant(self) -> Grant:
        """A token from the identity service; refused credentials make the client read
        its secret file again (marketo.client_secret_file) and, if the secret there
        changed, ask once more with it: a rotated secret needs no restart."""
        try:
            return await self._ask_identity(self._secret)
        except CredentialsError:
            fresh = await asyncio.to_thread(self._reread_secret)
            if fresh is None:
                raise
            self._old_secrets.append(self._secret)
            self._secret = fresh
            log.warning("client_secret_reloaded", file=self._settings.marketo.client_secret_file)
            return await self._ask_identity(fresh)

    def _reread_secret(self) -> config.Secret | None:
        """The secret file's value if it differs from the one in use, else None."""
        path = self._settings.marketo.client_secret_file
        if not path:
            return None
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            log.warning("client_secret_unreadable", file=path, error=exc.strerror)
            return None
        if not text or text == self._secret.reveal():
            return None
        logs.register_secret(text)
        return config.Secret(text)

    async def _ask_identity(self, secret: config.Secret) -> Grant:
        """Ask the identity service for a token (the secret goes in the form body)."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self._settings.marketo.client_id,
            "client_secret": secret.reveal(),
        }

        async def exchange(session: aiohttp.ClientSession, _: dict[str, str]) -> Grant:
            async with session.post(self._token_url, data=form, timeout=self._timeout) as resp:
                return await read_grant(resp, self._scrub)

        try:
            async with self._limiter.slot(counted=False):
                grant = await self._send(IDENTITY, exchange, {})
        except MarketoError:
            self._identity_ok = False
            raise
        self._identity_ok = True
        return grant

    # -- Small helpers -----------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_chunk_sent.append(on_chunk_sent)
            connector = (
                aiohttp.TCPConnector(socket_factory=self._socket_factory)
                if self._socket_factory is not None
                else None
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": USER_AGENT},
                trace_configs=[trace],
            )
        return self._session

    def _count(self, operation: str) -> None:
        self._calls[operation] += 1
        self._observer.api_call(operation)

    def _saw(self, exc: MarketoError) -> None:
        self._observer.marketo_error(exc.code)

    def _on_quota_pause(self, seconds: float) -> None:
        log.warning("daily API quota paused calls", seconds=round(seconds, 1))
        self._observer.backoff("quota", seconds)

    def _scrub(self, text: str) -> str:
        """`text` with the secret and the current token blanked out."""
        secrets = [s.reveal() for s in (self._secret, *self._old_secrets)]
        for secret in (*secrets, self._tokens.current_value):
            if secret:
                text = text.replace(secret, "***")
        return text


class UploadProgress:
    """How much of an upload's body went out; keeps its stall watchdog from firing
    while bytes keep leaving (the request's `trace_request_ctx`)."""

    def __init__(self, total: int | None, watchdog: asyncio.Timeout, stall: float) -> None:
        self.total = total
        self.sent = 0
        self._watchdog = watchdog
        self._stall = stall

    @property
    def body_sent(self) -> bool:
        """The whole body went out: Marketo may have acted on it."""
        return self.total is None or self.sent >= self.total

    def advance(self, n: int) -> None:
        self.sent += n
        if self.body_sent:
            self.settle()
        elif not self._watchdog.expired():
            self._watchdog.reschedule(asyncio.get_running_loop().time() + self._stall)

    def settle(self) -> None:
        """No more stall watch: the body is out (the read timeout takes over)."""
        if not self._watchdog.expired():  # an expiring watchdog cannot be changed
            self._watchdog.reschedule(None)


async def on_chunk_sent(
    _session: aiohttp.ClientSession,
    context: Any,
    params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    """aiohttp's trace hook: a block of a request body was written."""
    progress = context.trace_request_ctx
    if isinstance(progress, UploadProgress):
        progress.advance(len(params.chunk))
