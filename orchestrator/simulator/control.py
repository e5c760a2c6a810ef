"""The simulator's test API: what a test reads and changes of the simulated subscription.

`Subscription` holds the subscription's parts (the import queue with its
records, the tokens, the call limits, the faults and the call log) and offers
the test API over them twice: as methods, for a test in the same process
(`sim.records("leads")`, `sim.set_knobs(...)`), and over HTTP under /_sim/
(JSON, no auth, not in the call log) for one in another: GET records, history,
calls, stats, tokens, jobs, config; POST faults, foreign, reset. `Simulator`
(`simulator.server`) is a `Subscription` served over HTTP.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from orchestrator.simulator.gate import CallLog, Faults, Limits, Tokens
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.queue import JobQueue

SIM_PREFIX = "/_sim"
VIEWS = ("records", "history", "calls", "stats", "tokens", "jobs", "config")  # GET /_sim/<view>
ACTIONS = ("faults", "foreign", "reset")  # POST /_sim/<action>


class Subscription:
    """One simulated subscription's parts, and the test API over them."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._faults = Faults(self.config.seed)
        self._queue = JobQueue(self.config)
        self._tokens = Tokens()
        self._limits = Limits()
        self._log = CallLog()

    # -- in process ---------------------------------------------------------------

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

    def history(
        self,
        object_type: str,
        key: str,
        *,
        lookup_field: str = "email",
        api_name: str | None = None,
        program_id: str | int | None = None,
    ) -> list[dict[str, Any]]:
        """Every row stored under one record key, in the order applied: `t` (seconds
        since the simulator started), the job's `batch_id` and the row's `values`. A lead
        by its lookup field's value, a custom object's record by its dedupe value
        (api_name), a program member by email (program_id)."""
        self._queue.advance(self._clock())
        applied = self._queue.store.history_of(
            object_type, key, lookup_field=lookup_field, api_name=api_name, program_id=program_id
        )
        return [
            {"t": round(t - self._t0, 6), "batch_id": batch_id, "values": values}
            for t, batch_id, values in applied
        ]

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
            "quota_used": limits.quota_used,  # our users' counted calls this quota day
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

    # -- over HTTP ----------------------------------------------------------------

    def add_control_routes(self, app: web.Application) -> None:
        """The same test API under /_sim/."""
        for name in VIEWS:
            app.router.add_get(f"{SIM_PREFIX}/{name}", self._sim_get)
        for name in ACTIONS:
            app.router.add_post(f"{SIM_PREFIX}/{name}", self._sim_post)

    async def _sim_get(self, request: web.Request) -> web.StreamResponse:
        name = request.path.removeprefix(f"{SIM_PREFIX}/")
        query = request.query
        if name == "records":
            try:
                list_id = int(query["list_id"]) if "list_id" in query else None
                body: Any = self.records(
                    query.get("object", ""),
                    api_name=query.get("api_name"),
                    program_id=query.get("program_id"),
                    list_id=list_id,
                )
            except ValueError as exc:
                return bad_request(exc)
        elif name == "history":
            try:
                body = self.history(
                    query.get("object", ""),
                    query.get("key", ""),
                    lookup_field=query.get("lookup_field", "email"),
                    api_name=query.get("api_name"),
                    program_id=query.get("program_id"),
                )
            except ValueError as exc:
                return bad_request(exc)
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
            return bad_request(exc)


def bad_request(exc: ValueError) -> web.Response:
    """HTTP 400 with the problem as JSON."""
    return web.json_response({"error": str(exc)}, status=400)
