"""How a call reaches Marketo: one request (`Transport`) inside one retry loop (`RetryLoop`).

Every bulk call goes through the loop:

    607 pause -> token -> call place -> HTTP -> envelope -> count -> result
         ^                                                          |
         +-- 601/602: refresh once (under the token lock) ----------+
         +-- 606: hold every call for a full api_window_seconds, retry
         +-- 615/5xx/500/502/604/608/611/614/713/719/network/timeout: backoff, retry
         +-- 607: pause every call until the quota resets (see `marketo.quota`), retry
    1016, 1019 and fatal errors: raised at once (the scheduler owns 1016/1019)

The call place is `marketo.calls`: this process's limiter and, with several daemons,
the subscription's shared budget (where the 606 hold and the 607 pause are told to
every daemon; a place refused for another daemon's 607 sends the loop back to the
quota pause). Each attempt takes a place of its own: the budget counts Marketo calls.

Each call that went out counts once in the day's quota, answered or not, unless
Marketo answered with a code it does not count (601, 602, 604, 605, 608, 611,
`constants.UNCOUNTED_CODES`): then its place in the window is given back too, so
our window and day hold what Marketo's hold.

An `UnknownOutcomeError` (an upload that may have created a job, see
`marketo.upload`) is raised at once too: only the scheduler may resubmit.

Timeouts: `request_timeout` bounds connecting, and then the silence after the
request went out (no byte of the answer for that long); an upload is cut off
only when it makes no progress for `request_timeout`, never for taking long.

`Transport.send` is where aiohttp's exceptions become ours (`TransientError`
"network" or "timeout"); HTTP statuses and Marketo's `errors[].code` are
translated by `marketo.wire` as the answer is read. The token travels only in
the `Authorization` header.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import structlog

import orchestrator
from orchestrator import constants
from orchestrator.backoff import Backoff
from orchestrator.errors import (
    AuthError,
    MarketoError,
    QuotaExhaustedError,
    RateLimitError,
    TransientError,
)
from orchestrator.marketo.auth import TokenSource
from orchestrator.marketo.calls import CallBudget, Place
from orchestrator.marketo.quota import DailyQuota
from orchestrator.marketo.upload import on_chunk_sent
from orchestrator.marketo.wire import Exchange, Scrub, describe

log = structlog.get_logger(__name__)

T = TypeVar("T")

USER_AGENT: Final = f"marketo-orchestrator/{orchestrator.__version__}"
MAX_REFRESHES: Final = 2  # token refreshes per call after 601/602
MAX_QUOTA_PAUSES: Final = 3  # 607 pauses per call before giving up
RETRY_DEADLINE_SECONDS: Final = 600.0  # no call retries for longer than this


class ClientObserver(Protocol):
    """What the client reports, so the daemon can feed metrics without this package."""

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


class Transport:
    """Sends one request: the HTTP session, the User-Agent, the count per operation."""

    def __init__(
        self,
        request_timeout: float,
        *,
        observer: ClientObserver,
        scrub: Scrub,
        session: aiohttp.ClientSession | None = None,
        socket_factory: Callable[[Any], socket.socket] | None = None,
    ) -> None:
        # No total: a long upload that keeps going is never cut off (see marketo.upload).
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=request_timeout, sock_read=request_timeout
        )
        self._observer = observer
        self._scrub = scrub
        self._session = session
        self._owns_session = session is None
        self._socket_factory = socket_factory  # tests: sockets with small send buffers
        self.calls: Counter[str] = Counter()  # requests sent, by operation id

    async def close(self) -> None:
        """Close the HTTP session if the transport opened it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, operation: str, exchange: Exchange[T], headers: dict[str, str]) -> T:
        """One request; aiohttp's exceptions become ours here."""
        self.calls[operation] += 1
        self._observer.api_call(operation)
        started = time.monotonic()
        headers = {**headers, "User-Agent": USER_AGENT}
        try:
            result = await exchange(self._http(), headers)
        except TimeoutError:
            raise TransientError("timeout", "no answer in time", operation=operation) from None
        except aiohttp.ClientError as exc:
            message = self._scrub(describe(exc))
            raise TransientError("network", message, operation=operation) from None
        log.debug("Marketo call", operation=operation, seconds=round(time.monotonic() - started, 3))
        return result

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
                timeout=self.timeout,
                headers={"User-Agent": USER_AGENT},
                trace_configs=[trace],
            )
        return self._session


class RetryLoop:
    """Runs an exchange with a token and a call place, retrying what is worth it."""

    def __init__(
        self,
        transport: Transport,
        tokens: TokenSource,
        budget: CallBudget,
        quota: DailyQuota,
        backoff: Backoff,
        *,
        observer: ClientObserver,
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float],
        max_attempts: int,
        window: float,
    ) -> None:
        self._transport = transport
        self._tokens = tokens
        self._budget = budget
        self._quota = quota
        self._backoff = backoff
        self._observer = observer
        self._sleep = sleep
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._window = window

    async def call(
        self, operation: str, exchange: Exchange[T], *, min_life: float | None = None
    ) -> T:
        """`exchange`'s result once it succeeds; the error once retrying is not worth it.

        `min_life`: seconds the token must still live (uploads); None for the default."""
        started = self._clock()
        failures = refreshes = pauses = 0
        while True:
            generation = None
            try:
                await self._quota.wait(self._on_quota_pause)
                token = await self._tokens.get(min_life)
                generation = token.generation
                headers = {"Authorization": f"Bearer {token.value}"}
                async with self._budget.place(operation) as place:
                    if place is None:  # paused after another daemon's 607: wait it out
                        continue
                    try:
                        result = await self._transport.send(operation, exchange, headers)
                    except BaseException as exc:  # it may have gone out all the same
                        self._count(place, exc.code if isinstance(exc, MarketoError) else None)
                        raise
                    self._count(place, None)
                self._quota.succeeded()
                return result
            except MarketoError as exc:
                self._observer.marketo_error(exc.code)
                if isinstance(exc, AuthError):
                    if generation is None or refreshes >= MAX_REFRESHES:
                        raise
                    refreshes += 1
                    log.warning(
                        "access token refused, refreshing", operation=operation, code=exc.code
                    )
                    await self._tokens.refresh(generation)
                elif isinstance(exc, QuotaExhaustedError):
                    pauses += 1
                    if pauses > MAX_QUOTA_PAUSES:
                        raise
                    await self._budget.pause(self._quota.exhausted())
                elif isinstance(exc, RateLimitError | TransientError):
                    failures += 1
                    delay = await self._delay(exc, failures, started)
                    if delay is None:
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
                else:  # fatal, 1016/1019 (the scheduler's), an unknown outcome
                    raise

    def _count(self, place: Place, code: str | None) -> None:
        """Count a call that went out, unless Marketo does not count its answer."""
        if code in constants.UNCOUNTED_CODES:
            place.refund()
        else:
            self._quota.count()

    async def _delay(self, exc: MarketoError, failures: int, started: float) -> float | None:
        """The wait before the next attempt, None when attempts or time ran out."""
        delay = self._backoff.delay(failures)
        if exc.code == "606":
            # The window is the subscription's: nothing goes until it has slid.
            delay = max(delay, self._window)
            await self._budget.hold(delay)
        elapsed = self._clock() - started
        if failures >= self._max_attempts or elapsed + delay > RETRY_DEADLINE_SECONDS:
            return None
        return delay

    def _on_quota_pause(self, seconds: float) -> None:
        log.warning("daily API quota paused calls", seconds=round(seconds, 1))
        self._observer.backoff("quota", seconds)
