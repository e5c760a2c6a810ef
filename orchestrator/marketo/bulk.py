"""The Marketo Bulk Import client: `MarketoClient`, the package's one public face.

`MarketoClient` offers the twelve Bulk Import operations of
`shared/marketo-openapi/swagger-mapi.json`, the three describe calls an import
header is checked against and four route-level dispatchers (all named in
`marketo.operations`). It builds its parts and runs each operation's exchange
(upload, status, JSON, file download); the parts do the rest:

- `marketo.retry`: the one retry loop every call goes through, and the
  transport that sends a request and translates aiohttp's exceptions;
- `marketo.auth`: the credentials, the identity request and the token cache;
- `marketo.limits`: calls per window and in flight;
- `marketo.calls`: where each call takes its place: the limiter and, with several
  daemons (`shared`, `marketo.sharing`), their one call budget;
- `marketo.quota`: the subscription's daily quota (Marketo's count of it, read
  by `refresh_usage`, plus ours since, or every daemon's with `shared`) and the
  pause after a 607;
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
from orchestrator.marketo.calls import CallBudget
from orchestrator.marketo.limits import Limiter
from orchestrator.marketo.operations import Operations
from orchestrator.marketo.quota import DailyQuota
from orchestrator.marketo.retry import ClientObserver, NullObserver, RetryLoop, Transport
from orchestrator.marketo.sharing import SharedCalls
from orchestrator.marketo.upload import expected_seconds, upload_exchange
from orchestrator.marketo.wire import (
    DAILY_USAGE,
    DESCRIBE_REFUSES,
    PERMISSIONS,
    Exchange,
    batch_status,
    read_file,
    read_result,
    usage_total,
)
from orchestrator.models import BatchStatus, QuotaState

__all__ = ["ClientObserver", "MarketoClient"]

T = TypeVar("T")


class MarketoClient(Operations):
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
        shared: SharedCalls | None = None,
    ) -> None:
        m, lim = settings.marketo, settings.limits
        self.shared = shared  # several daemons: their one call budget and daily quota
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
        self._quota = DailyQuota(
            lim.daily_quota,
            lim.daily_reserve,
            lim.quota_reset_tz,
            wall_clock=wall_clock,
            sleep=sleep,
            used=calls_today,
        )
        backoff = Backoff(settings.backoff.initial, settings.backoff.max)
        budget = CallBudget(limiter, self._quota, shared, sleep=sleep, backoff=backoff)
        self._identity = Identity(
            m, send=self._transport.send, budget=budget, timeout=self._timeout, scrub=self._scrub
        )
        self._tokens = TokenSource(self._identity.fetch, clock=clock, sleep=sleep)
        self._retry = RetryLoop(
            self._transport,
            self._tokens,
            budget,
            self._quota,
            backoff,
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
        """This process's counted calls sent within the last `api_window_seconds`."""
        return self._limiter.in_window

    @property
    def quota_day_began(self) -> dt.datetime:
        """When the current quota day began (Marketo's last reset), in UTC."""
        return self._quota.day_began()

    # -- The subscription's daily quota -------------------------------------

    @property
    def quota(self) -> QuotaState:
        """The daily quota as reckoned now, without asking Marketo."""
        return self._quota.state()

    async def refresh_usage(self) -> QuotaState:
        """Read Marketo's count of the subscription's calls today if a reading is due
        (`marketo.quota`); the quota as reckoned now. With `shared`, the figure is the
        subscription's over every daemon, and the reading is due when the last one any
        daemon took is old."""
        if self.shared is not None:
            return await self._quota.refresh_shared(self.shared, self.daily_usage)
        return await self._quota.refresh(self.daily_usage)

    async def daily_usage(self) -> int:
        """The subscription's calls today, every API user's, as Marketo counts them."""
        result = await self._get(DAILY_USAGE, "/rest/v1/stats/usage.json")
        return usage_total(result, DAILY_USAGE)

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
