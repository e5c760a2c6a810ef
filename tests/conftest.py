"""Shared fixtures: simulated Marketo subscriptions and the daemon in subprocesses on
loopback, clean global state. The helpers behind them live in tests/support."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from orchestrator.config import Settings
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.processes import CliRunner, MakeRunner
from tests.support.simulators import FAST_KNOBS, MakeSimulator, Simulators


@pytest.fixture
async def make_simulator() -> AsyncIterator[MakeSimulator]:
    """Factory: `await make_simulator(**knobs)` starts a simulator on 127.0.0.1, port 0.

    Knobs not given keep the defaults of a fresh Marketo subscription. Every
    simulator made is stopped at teardown.
    """
    simulators = Simulators()
    yield simulators.start
    await simulators.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "state.db")
    yield opened
    await opened.close()


@pytest.fixture
async def simulator(make_simulator: MakeSimulator) -> Simulator:
    """A simulator with Marketo's limits and fast jobs (FAST_KNOBS)."""
    return await make_simulator(**FAST_KNOBS)


@pytest.fixture
async def daemons(tmp_path: Path, make_simulator: MakeSimulator) -> AsyncIterator[MakeRunner]:
    """Factory: `daemons(settings)` writes the config and returns a CliRunner for it.

    Every process still running at teardown is SIGKILLed (by pid) and reaped, before
    the simulators stop (hence the dependency on make_simulator).
    """
    made: list[CliRunner] = []

    def make(settings: Settings) -> CliRunner:
        made.append(CliRunner.for_settings(tmp_path / f"daemon-{len(made) + 1}", settings))
        return made[-1]

    yield make
    for runner in made:
        await runner.close()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Whatever a test configured in structlog does not leak into the next one."""
    yield
    structlog.reset_defaults()
