"""`StatusServer`: a small read-only aiohttp server for people and for monitoring.

`/healthz`, `/readyz`, `/metrics`, `/jobs` (`?status=` and `?limit=`, default 100,
at most 1000) and `/jobs/<id>` (one file by its hand-over id, 404 if unknown).
Only GET and HEAD exist; every other method is 405. The job list is the snapshot
(`status.snapshot`) the CLI's `status --json` prints too. For people: the status
page at `/` (`status.page`, its files under `/static/`) and the data it draws,
`/api/overview` (`status.overview`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import structlog
from aiohttp import web

from orchestrator.errors import StoreError
from orchestrator.metrics import Metrics, StoreReader
from orchestrator.models import FileStatus
from orchestrator.status.overview import PageSources, overview
from orchestrator.status.page import CONTENT_SECURITY_POLICY, INDEX, Asset, load_assets
from orchestrator.status.snapshot import JOBS_LIMIT, Query, load_snapshot

log = structlog.get_logger(__name__)

Readiness = Callable[[], str | None]


class StatusServer:
    """Read-only HTTP server for health, readiness, metrics, the job list and the page."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        store: StoreReader,
        metrics: Metrics,
        readiness: Readiness,
        page: PageSources | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._store = store
        self._metrics = metrics
        self._readiness = readiness
        self._page = page if page is not None else PageSources()
        self._assets: dict[str, Asset] = {}
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port_or_none()}"
        return f"<StatusServer {where} {'running' if self._runner else 'stopped'}>"

    @property
    def port(self) -> int:
        """The port the server is bound to (useful when it was asked for port 0)."""
        port = self._port_or_none()
        if port is None:
            raise RuntimeError("StatusServer is not running")
        return port

    def _port_or_none(self) -> int | None:
        if self._runner is None:
            return None
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return None

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        if self._runner is not None:
            raise RuntimeError("StatusServer is already running")
        self._assets = await asyncio.to_thread(load_assets)
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/overview", self._overview)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/jobs", self._jobs)
        app.router.add_get("/jobs/{id}", self._job)
        app.on_response_prepare.append(_no_store_headers)
        # access_log=None: a scraper every few seconds must not flood the info log.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("status_server_listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Close the listener and any open connections. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _index(self, request: web.Request) -> web.Response:
        return self._asset_response(self._assets[INDEX])

    async def _asset(self, request: web.Request) -> web.Response:
        asset = self._assets.get(request.match_info["name"])
        if asset is None or asset.name == INDEX:
            raise web.HTTPNotFound()
        return self._asset_response(asset)

    def _asset_response(self, asset: Asset) -> web.Response:
        return web.Response(
            body=asset.body,
            content_type=asset.content_type,
            charset="utf-8",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )

    async def _overview(self, request: web.Request) -> web.Response:
        try:
            data = await overview(self._store, self._metrics, self._readiness, self._page)
        except StoreError as exc:
            log.warning("overview_store_unreadable", error=exc.problem)
            return web.json_response({"error": "state store unreadable"}, status=503)
        return web.json_response(data)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self._readiness()
        if reason is None:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": reason}, status=503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        try:
            await self._metrics.refresh_from_store(self._store)
        except StoreError as exc:
            log.warning("metrics_store_unreadable", error=exc.problem)
            return web.Response(status=503, text="state store unreadable\n")
        # CONTENT_TYPE_LATEST carries parameters (version, charset): pass it as a raw header.
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": self._metrics.content_type}
        )

    async def _jobs(self, request: web.Request) -> web.Response:
        try:
            query = jobs_query(request.query.getall("status", []), request.query.get("limit"))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        snapshot = await self._snapshot(query)
        if snapshot is None:
            return web.json_response({"error": "state store unreadable"}, status=503)
        return web.json_response(snapshot)

    async def _job(self, request: web.Request) -> web.Response:
        ticket = request.match_info["id"]
        snapshot = await self._snapshot(Query(ticket=ticket, limit=1))
        if snapshot is None:
            return web.json_response({"error": "state store unreadable"}, status=503)
        if not snapshot["files"]:
            return web.json_response({"error": f"no file with id {ticket!r}"}, status=404)
        return web.json_response(snapshot["files"][0])

    async def _snapshot(self, query: Query) -> dict[str, Any] | None:
        try:
            return await load_snapshot(self._store, query)
        except StoreError as exc:
            log.warning("jobs_store_unreadable", error=exc.problem)
            return None


JOBS_LIMIT_MAX: Final = 1000
STATES: Final = frozenset(
    {str(s) for s in FileStatus} | {"packing", "waiting", "held", "queued", "importing"}
)


def jobs_query(statuses: list[str], limit: str | None) -> Query:
    """`?status=a,b&status=c&limit=N` as a Query; ValueError saying what is wrong."""
    wanted = {s.strip() for value in statuses for s in value.split(",") if s.strip()}
    unknown = wanted - STATES
    if unknown:
        raise ValueError(
            f"unknown status {sorted(unknown)[0]!r}; one of: {', '.join(sorted(STATES))}"
        )
    count = JOBS_LIMIT
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= JOBS_LIMIT_MAX:
            raise ValueError(f"limit must be a whole number from 1 to {JOBS_LIMIT_MAX}")
        count = int(limit)
    return Query(statuses=frozenset(wanted) if wanted else None, limit=count)


async def _no_store_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
