"""HTTP helpers: a recording proxy in front of the simulator, a GET, Prometheus text parsed.

`RecordingProxy` is a loopback HTTP proxy that keeps every request whole (query values,
body bytes), for assertions the simulator's call log cannot make (parameter values,
upload contents).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it went over the wire to Marketo (kept in memory only)."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes
    bearer: bool  # an `Authorization: Bearer ...` header was sent


class RecordingProxy:
    """Forwards every request to `upstream` and keeps it: `base_url` stands in for Marketo's."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[Seen] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def requests(self, path_contains: str = "", method: str = "") -> list[Seen]:
        return [
            s for s in self.seen if path_contains in s.path and (not method or s.method == method)
        ]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        bearer = request.headers.get("Authorization", "").startswith("Bearer ")
        self.seen.append(Seen(request.method, request.path, dict(request.query), body, bearer))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=upstream.status, body=payload, headers=kept)


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """(status, body text) of a GET."""
    async with session.get(url) as response:
        return response.status, await response.text()


def contains_any(data: bytes, needles: Iterable[str]) -> list[str]:
    """Which of `needles` occur in `data` (as UTF-8 bytes)."""
    return [n for n in needles if n.encode() in data]


def metric_samples(text: str) -> Samples:
    """Every sample of a Prometheus text page by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
