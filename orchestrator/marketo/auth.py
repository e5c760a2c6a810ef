"""Who the client is to Marketo, and the token that proves it.

`Identity` holds the client id and secret and asks the identity service for a
token (the secret goes only in the request's form body). When the service
refuses the credentials, it reads its secret file (marketo.client_secret_file)
again and, if the secret there changed, asks once more with it: a rotated
secret needs no restart. Secrets it has used stay known, for scrubbing.

`TokenSource` holds the client's current token (one per `MarketoClient`: a
process normally runs one client, so a per-instance cache is the per-client-id
cache SPEC.md asks for, without global state that tests would have to reset).

Marketo's identity service answers an early request with the *same* token and
its remaining life. So when little life is left the source waits out the
expiry (with the injected sleep) and asks again, rather than carrying a token
into a request it will not survive. "Little" is under `min_life`: a minute by
default, longer for an upload expected to take longer (the client says). The
threshold does not depend on what earlier answers said, with one exception: a
token fetched right after the previous one was waited out is freshly minted,
so its life is all a token of this service ever gets; when that is shorter
than the threshold (a simulator with short-lived tokens), half of it is used
instead, since waiting for a longer-lived token would never end.

Every token carries a generation number. A call that meets 601/602 asks for a
refresh naming the generation it used; once the lock is held, a newer
generation means another task already refreshed, and that token is reused.
Ten calls that meet 601 together therefore cause one identity request, even
when the identity service hands back the same token string.

Neither the secret nor the token appears in a repr, a log line or an exception
message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from orchestrator import config, constants, logs
from orchestrator.errors import CredentialsError, MarketoError
from orchestrator.marketo.calls import CallBudget
from orchestrator.marketo.wire import IDENTITY, Exchange, Grant, Scrub, read_grant

log = structlog.get_logger(__name__)

# A token with less than this life left is waited out rather than used.
LOW_LIFE_SECONDS = constants.TOKEN_MIN_LIFE_SECONDS
# Asking again at most this many times when the answer is still the old token.
MAX_EARLY_ANSWERS = 3


@dataclass(frozen=True, slots=True)
class Token:
    """A cached token: its value, when it expires on our clock, its generation."""

    value: str = field(repr=False)
    expires_at: float
    generation: int


Fetch = Callable[[], Awaitable[Grant]]
# How the identity request is sent: `Transport.send`, for a grant.
SendGrant = Callable[[str, Exchange[Grant], dict[str, str]], Awaitable[Grant]]


class Identity:
    """The client's credentials and the identity request that turns them into a token."""

    def __init__(
        self,
        settings: config.MarketoSettings,
        *,
        send: SendGrant,
        budget: CallBudget,
        timeout: aiohttp.ClientTimeout,
        scrub: Scrub,
    ) -> None:
        self._client_id = settings.client_id
        self._secret_file = settings.client_secret_file
        self._url = f"{config.identity_url(settings)}/oauth/token"
        self._secret = settings.client_secret
        self._old_secrets: list[config.Secret] = []  # rotated out; still scrubbed
        self._send = send
        self._budget = budget
        self._timeout = timeout
        self._scrub = scrub
        self._ok: bool | None = None

    def __repr__(self) -> str:
        return f"<Identity client_id={self._client_id!r}>"

    @property
    def ok(self) -> bool | None:
        """Whether the last identity request succeeded; None before the first one."""
        return self._ok

    @property
    def secrets(self) -> list[str]:
        """Every secret used so far, the current one first (to scrub; never log them)."""
        return [s.reveal() for s in (self._secret, *self._old_secrets)]

    async def fetch(self) -> Grant:
        """A token from the identity service; refused credentials make it read the secret
        file again and, if the secret there changed, ask once more with it."""
        try:
            return await self._ask(self._secret)
        except CredentialsError:
            fresh = await asyncio.to_thread(self._reread_secret)
            if fresh is None:
                raise
            self._old_secrets.append(self._secret)
            self._secret = fresh
            log.warning("client_secret_reloaded", file=self._secret_file)
            return await self._ask(fresh)

    def _reread_secret(self) -> config.Secret | None:
        """The secret file's value if it differs from the one in use, else None."""
        if not self._secret_file:
            return None
        try:
            text = Path(self._secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            log.warning("client_secret_unreadable", file=self._secret_file, error=exc.strerror)
            return None
        if not text or text == self._secret.reveal():
            return None
        logs.register_secret(text)
        return config.Secret(text)

    async def _ask(self, secret: config.Secret) -> Grant:
        """Ask the identity service for a token (the secret goes in the form body)."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": secret.reveal(),
        }

        async def exchange(session: aiohttp.ClientSession, _: dict[str, str]) -> Grant:
            async with session.post(self._url, data=form, timeout=self._timeout) as resp:
                return await read_grant(resp, self._scrub)

        try:
            # Free of Marketo's limits, but a request in flight all the same.
            async with self._budget.place(IDENTITY, counted=False):
                grant = await self._send(IDENTITY, exchange, {})
        except MarketoError:
            self._ok = False
            raise
        self._ok = True
        return grant


class TokenSource:
    """The client's access token: fetched on demand, refreshed once per expiry."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._token: Token | None = None
        self._generation = 0
        self._fresh_life: float | None = None  # life of a token known to be freshly minted

    def __repr__(self) -> str:
        state = "none" if self._token is None else f"generation {self._token.generation}"
        return f"<TokenSource {state}>"

    @property
    def has_token(self) -> bool:
        return self._token is not None and self._remaining(self._token) > 0

    @property
    def current_value(self) -> str | None:
        """The token string, for scrubbing it out of messages (never log it)."""
        return self._token.value if self._token is not None else None

    async def get(self, min_life: float | None = None) -> Token:
        """A token with at least `min_life` seconds left (default a minute), fetched if needed."""
        threshold = self._threshold(min_life)
        token = self._token
        if token is not None and self._remaining(token) >= threshold:
            return token
        async with self._lock:
            token = self._token
            if token is not None and self._remaining(token) >= self._threshold(min_life):
                return token
            return await self._obtain(min_life)

    async def refresh(self, stale_generation: int) -> Token:
        """A new token after Marketo refused generation `stale_generation` (601/602)."""
        async with self._lock:
            token = self._token
            if token is not None and token.generation != stale_generation:
                return token
            self._token = None
            return await self._obtain()

    def _remaining(self, token: Token) -> float:
        return token.expires_at - self._clock()

    def _threshold(self, min_life: float | None) -> float:
        wanted = max(LOW_LIFE_SECONDS, min_life or 0.0)
        if self._fresh_life is not None and self._fresh_life < wanted:
            return self._fresh_life / 2
        return wanted

    async def _obtain(self, min_life: float | None = None) -> Token:
        """Ask the identity service, waiting out a token that is about to expire."""
        grant = await self._fetch()
        for _ in range(MAX_EARLY_ANSWERS):
            threshold = self._threshold(min_life)
            if grant.expires_in >= threshold:
                break
            wait = grant.expires_in + min(1.0, threshold)
            log.debug("token nearly expired, waiting it out", seconds=round(wait, 3))
            await self._sleep(wait)
            grant = await self._fetch()
            self._fresh_life = grant.expires_in  # the old one expired: this one is new
        self._generation += 1
        self._token = Token(grant.access_token, self._clock() + grant.expires_in, self._generation)
        log.debug("access token obtained", generation=self._generation, expires_in=grant.expires_in)
        return self._token
