"""Shared fixtures: simulated Marketo subscriptions and the daemon in subprocesses on
loopback, a private PostgreSQL server, clean global state. The helpers behind them live
in tests/support."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import structlog

from orchestrator.config import Settings
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.postgres import PostgresDatabase, PostgresServer, private_server
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server, started once per session (per xdist worker).

    Skipped without the server's programs, failed instead under
    ORCHESTRATOR_REQUIRE_POSTGRES=1 (tests/support/postgres.py). Tests that use it
    carry the `postgres` marker (added below where missing).
    """
    with private_server() as server:
        yield server


@pytest.fixture
def make_postgres_database(
    postgres_server: PostgresServer,
) -> Iterator[Callable[[], PostgresDatabase]]:
    """Factory: `make_postgres_database()` creates an empty database on the private server.

    Each is dropped at teardown, sessions still in it ended; a server the test left
    stopped is started again first, so the next test finds it running.
    """
    made: list[PostgresDatabase] = []

    def make() -> PostgresDatabase:
        made.append(postgres_server.create_database())
        return made[-1]

    yield make
    if not postgres_server.running:
        postgres_server.start()
    for database in made:
        postgres_server.drop_database(database.name)


@pytest.fixture
def postgres_database(
    make_postgres_database: Callable[[], PostgresDatabase],
) -> PostgresDatabase:
    """A fresh database for this test: its `url` (a libpq URL on the server's socket)."""
    return make_postgres_database()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the PostgreSQL server is marked `postgres`, so that
    `-m "not postgres"` leaves them all out."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "postgres_server" in fixtures and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Whatever a test configured in structlog does not leak into the next one."""
    yield
    structlog.reset_defaults()
