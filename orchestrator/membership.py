"""Membership: this daemon among the daemons that share its Marketo subscription.

With `[coordination] url` set, `join` builds the PostgreSQL coordinator
(`orchestrator.coordination.postgres`, imported only then: psycopg is an optional
extra) and registers: the subscription is named by Marketo's REST host, the daemon
by `[coordination] instance` or else its host name and data directory, and it
brings its own `[limits]` (the strictest of all live daemons' apply). If the
database is away at startup the daemon stays up and the lease loop keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from orchestrator import constants
from orchestrator.clock import wait_for_any
from orchestrator.config import Settings
from orchestrator.coordination.shapes import Limits
from orchestrator.errors import ConfigError, CoordinationUnavailable
from orchestrator.status import DaemonSlots

if TYPE_CHECKING:
    from orchestrator.coordination.postgres import PostgresCoordinator


async def join(settings: Settings, stack: contextlib.AsyncExitStack) -> PostgresCoordinator | None:
    """Register among the daemons sharing the subscription (left again when `stack`
    closes); None for a daemon alone."""
    if not settings.coordination.url:
        return None
    try:
        from orchestrator.coordination.postgres import PostgresCoordinator
    except ImportError:  # psycopg is an optional extra
        raise ConfigError(
            "coordination.url",
            "is set, but the PostgreSQL driver is not installed: "
            "pip install 'marketo-orchestrator[postgres]'",
        ) from None
    coordinator = PostgresCoordinator(
        settings.coordination.url,
        subscription=subscription_of(settings),
        instance=instance_of(settings),
        limits=limits_of(settings),
        lease_seconds=settings.coordination.lease_seconds,
    )
    stack.push_async_callback(coordinator.close)
    await coordinator.start()  # the database away: stay up, `run` keeps trying
    return coordinator


def subscription_of(settings: Settings) -> str:
    """The Marketo subscription, named by its REST host (port included: simulators)."""
    return urlsplit(settings.marketo.base_url).netloc.lower()


def instance_of(settings: Settings) -> str:
    """This daemon's name among those sharing the subscription: configured, else its
    host name and data directory."""
    configured = settings.coordination.instance
    return configured or f"{socket.gethostname()}:{settings.data_dir.resolve()}"


def limits_of(settings: Settings) -> Limits:
    """This daemon's [limits] as the shared model takes them."""
    lim = settings.limits
    return Limits(
        queued_jobs=min(lim.queued_jobs, constants.MAX_QUEUED_JOBS),
        calls_per_window=lim.api_calls_per_window,
        window_seconds=lim.api_window_seconds,
        calls_in_flight=lim.concurrent_api_calls,
        daily_quota=lim.daily_quota,
        daily_reserve=lim.daily_reserve,
    )


async def watch_others(
    coordinator: PostgresCoordinator,
    show: Callable[[tuple[DaemonSlots, ...]], None],
    stop: asyncio.Event,
    every: float,
) -> None:
    """Every `every` seconds, hand the other daemons' outstanding jobs to `show` (the
    status page's queue); the database away: the last reading stays."""
    while not stop.is_set():
        with contextlib.suppress(CoordinationUnavailable):
            found = await coordinator.daemons()
            show(
                tuple(
                    DaemonSlots(str(d["instance"]), importing=0, queued=int(d["outstanding"]))
                    for d in found
                    if d["instance"] != coordinator.instance and d["outstanding"]
                )
            )
        await wait_for_any(stop, within=every)
