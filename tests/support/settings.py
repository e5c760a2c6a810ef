"""Settings for tests and benchmarks: Marketo's limits with every interval scaled down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import (
    BackoffSettings,
    HttpSettings,
    LimitSettings,
    MarketoSettings,
    PollingSettings,
    Route,
    Secret,
    Settings,
    WatchSettings,
)
from orchestrator.models import ObjectType

CLIENT_ID = "engine-test-client"
CLIENT_SECRET = "engine-test-secret-5f1c"
LEADS = Route(dir="leads", object=ObjectType.LEADS)
CARS = Route(dir="cars", object=ObjectType.CUSTOM_OBJECT, api_name="car_c")
MEMBERS = Route(
    dir="members",
    object=ObjectType.PROGRAM_MEMBERS,
    program_id=1001,
    program_member_status="Registered",
)


# Simulator knobs matching fast_settings: fast jobs, Marketo's 100 calls per window scaled to 2 s.
SIM_KNOBS: dict[str, Any] = {"job_overhead": 0.02, "rows_per_second": 50_000.0, "rate_window": 2.0}


def fast_settings(
    base_url: str, data_dir: Path, routes: tuple[Route, ...], **limits: Any
) -> Settings:
    """Marketo's limits, but polling and backoff scaled down to tens of milliseconds."""
    return Settings(
        data_dir=data_dir,
        marketo=MarketoSettings(
            base_url=base_url,
            client_id=CLIENT_ID,
            client_secret=Secret(CLIENT_SECRET),
            request_timeout=10.0,
        ),
        limits=LimitSettings(**{"max_chunk_bytes": 2_000, "api_window_seconds": 2.0, **limits}),
        polling=PollingSettings(interval=0.05, max_interval=0.2),
        backoff=BackoffSettings(initial=0.05, max=0.4),
        watch=WatchSettings(settle_seconds=0.0),
        http=HttpSettings(listen=""),
        routes=routes,
    )
