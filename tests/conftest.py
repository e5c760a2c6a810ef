"""Shared fixtures: a simulated Marketo subscription on a loopback port, clean global state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import structlog

from orchestrator.simulator import Simulator, SimulatorConfig

# Jobs finish in tens of milliseconds: tests scale time through knobs, not waits.
FAST_KNOBS: dict[str, Any] = {"job_overhead": 0.05, "rows_per_second": 100_000.0}

MakeSimulator = Callable[..., Awaitable[Simulator]]


@pytest.fixture
async def make_simulator() -> AsyncIterator[MakeSimulator]:
    """Factory: `await make_simulator(**knobs)` starts a simulator on 127.0.0.1, port 0.

    Knobs not given keep the defaults of a fresh Marketo subscription. Every
    simulator made is stopped at teardown.
    """
    started: list[Simulator] = []

    async def make(**knobs: Any) -> Simulator:
        simulator = Simulator(SimulatorConfig().with_knobs(**knobs))
        await simulator.start()
        started.append(simulator)
        return simulator

    yield make
    for simulator in reversed(started):
        await simulator.stop()


@pytest.fixture
async def simulator(make_simulator: MakeSimulator) -> Simulator:
    """A simulator with Marketo's limits and fast jobs (FAST_KNOBS)."""
    return await make_simulator(**FAST_KNOBS)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Whatever a test configured in structlog does not leak into the next one."""
    yield
    structlog.reset_defaults()
