"""The private PostgreSQL server of tests/support/postgres.py does what later tests rely
on: a fresh database per test, isolated from the others, a restart mid-test that breaks
open connections while new ones succeed, and a clear skip (or failure in CI) where no
server can run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import (
    BIN_ENV,
    REQUIRE_ENV,
    NoServer,
    PostgresDatabase,
    PostgresServer,
    locate_server,
    unavailable,
)


def rows(database: PostgresDatabase, query: str) -> list[tuple[object, ...]]:
    with database.connect() as conn:
        return conn.execute(query).fetchall()


@pytest.mark.postgres
def test_a_fresh_database_takes_a_table(postgres_database: PostgresDatabase) -> None:
    assert postgres_database.name.startswith("test_")
    assert rows(postgres_database, "SELECT current_database()") == [(postgres_database.name,)]
    assert (
        rows(postgres_database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    )
    with postgres_database.connect() as conn:
        conn.execute("CREATE TABLE chunk (id integer PRIMARY KEY, status text NOT NULL)")
        conn.execute("INSERT INTO chunk VALUES (1, 'queued'), (2, 'importing')")
    # The block committed; another connection sees the rows.
    assert rows(postgres_database, "SELECT id, status FROM chunk ORDER BY id") == [
        (1, "queued"),
        (2, "importing"),
    ]


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restart_breaks_open_connections_and_new_ones_succeed(
    postgres_server: PostgresServer, postgres_database: PostgresDatabase, mode: str
) -> None:
    """ "immediate" is a crash as far as the data directory knows: committed rows survive
    through recovery all the same."""
    conn = postgres_database.connect(autocommit=True)
    conn.execute("CREATE TABLE lease (daemon text PRIMARY KEY)")
    conn.execute("INSERT INTO lease VALUES ('a')")
    [(started,)] = conn.execute("SELECT pg_postmaster_start_time()").fetchall()

    postgres_server.restart(mode)

    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert conn.broken
    conn.close()
    with postgres_database.connect() as fresh:
        [(restarted,)] = fresh.execute("SELECT pg_postmaster_start_time()").fetchall()
        assert restarted > started
        assert fresh.execute("SELECT daemon FROM lease").fetchall() == [("a",)]


@pytest.mark.postgres
def test_two_databases_are_isolated(
    make_postgres_database: Callable[[], PostgresDatabase],
) -> None:
    first, second = make_postgres_database(), make_postgres_database()
    assert first.name != second.name
    for database, daemon in ((first, "a"), (second, "b")):
        with database.connect() as conn:
            conn.execute("CREATE TABLE lease (daemon text PRIMARY KEY)")
            conn.execute("INSERT INTO lease VALUES (%s)", (daemon,))
    assert rows(first, "SELECT daemon FROM lease") == [("a",)]
    assert rows(second, "SELECT daemon FROM lease") == [("b",)]


@pytest.mark.postgres
def test_a_dropped_database_ends_its_sessions(postgres_server: PostgresServer) -> None:
    """What the fixture's teardown does when a daemon under test is still connected."""
    database = postgres_server.create_database()
    conn = database.connect(autocommit=True)
    postgres_server.drop_database(database.name)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with postgres_server.connect() as admin:
        names = admin.execute("SELECT datname FROM pg_database").fetchall()
    assert (database.name,) not in names


def test_without_the_programs_the_reason_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(NoServer) as caught:
        locate_server({BIN_ENV: str(tmp_path)})
    reason = str(caught.value)
    assert f"{BIN_ENV}={tmp_path} has no initdb" in reason
    assert "apt-get install postgresql-15" in reason
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        unavailable(reason, {})
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        unavailable(reason, {REQUIRE_ENV: "1"})
