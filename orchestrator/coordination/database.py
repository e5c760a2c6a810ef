"""One connection to the coordination database, used from one worker thread.

Like the state store, every statement runs in a worker thread of its own, so the
event loop never waits on the network; each operation is one short transaction,
committed before it returns. The HTTP calls to Marketo never happen inside one.

The connection is made lazily and made again after it broke: a PostgreSQL restart
or an outage costs the operations that meet it a `CoordinationUnavailable`, and the
next operation tries to connect again. Statements time out after
`STATEMENT_TIMEOUT_MS`, so a stalled server is an outage too, not a hang. A
transaction left open by a daemon that stopped between two of its statements
(SIGSTOP, a long pause) would hold its locks, and every other daemon with them: the
server ends such a session after `idle_in_transaction_seconds`, well inside a lease,
and the stopped daemon finds its connection broken when it wakes.

The URL may carry a password (libpq also reads PGPASSWORD and PGPASSFILE); it never
reaches a log line or an error message: `redact` blanks it, and errors are described
by their class and the server's message, never the connection string.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import structlog

from orchestrator.coordination.migrations import LATEST_VERSION, LOCK_KEY, MIGRATIONS, SCHEMA
from orchestrator.errors import CoordinationUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")
Conn = psycopg.Connection[Any]

CONNECT_TIMEOUT_SECONDS: Final = 5
STATEMENT_TIMEOUT_MS: Final = 10_000
IDLE_IN_TRANSACTION_SECONDS: Final = 2.0  # an open transaction nobody talks to ends then
LOST: Final = (psycopg.OperationalError, psycopg.InterfaceError)  # the connection is gone
# Refusals that roll the transaction back and pass: the operation is simply tried again.
TRANSIENT: Final = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.UniqueViolation,
)


def redact(url: str) -> str:
    """`url` without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def describe(exc: BaseException, url: str) -> str:
    """An error of the driver in one line, with nothing of the password in it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = urlsplit(url).password
    if password:
        text = text.replace(password, "***")
    return text


class Database:
    """The coordination database: `await run(operation, body)` runs `body(conn)` in one
    transaction in the worker thread."""

    def __init__(
        self, url: str, *, idle_in_transaction_seconds: float = IDLE_IN_TRANSACTION_SECONDS
    ) -> None:
        self.url = url
        self.idle_ms = max(1, round(idle_in_transaction_seconds * 1000))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordination")
        self._conn: Conn | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Database {redact(self.url)}>"

    async def run(self, operation: str, body: Callable[[Conn], T]) -> T:
        """`body` in one transaction; CoordinationUnavailable if the database is away."""
        if self._closed:
            raise CoordinationUnavailable(f"{operation}: the coordination database is closed")
        loop = asyncio.get_running_loop()
        call = functools.partial(self._transact, operation, body)
        return await loop.run_in_executor(self._executor, call)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)

    # -- in the worker thread ---------------------------------------------------------

    def _transact(self, operation: str, body: Callable[[Conn], T]) -> T:
        try:
            conn = self._connection()
            with conn.transaction():
                return body(conn)
        except (*LOST, psycopg.errors.IdleInTransactionSessionTimeout) as exc:
            self._disconnect()
            raise CoordinationUnavailable(
                f"{operation}: the coordination database is unreachable ({describe(exc, self.url)})"
            ) from None
        except TRANSIENT as exc:
            # The transaction was rolled back (a deadlock, a serialisation failure, the
            # slot index refusing an 11th job): nothing happened; ask again shortly.
            raise CoordinationUnavailable(
                f"{operation}: the coordination database refused it for now "
                f"({describe(exc, self.url)})"
            ) from None
        except psycopg.errors.QueryCanceled as exc:
            raise CoordinationUnavailable(
                f"{operation}: the coordination database did not answer in time "
                f"({describe(exc, self.url)})"
            ) from None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._disconnect()
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name="marketo-orchestrator",
            )
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {self.idle_ms}")
            migrate(conn)
            self._conn = conn
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


def migrate(conn: Conn) -> None:
    """Create or migrate the schema, one migration per transaction, under an advisory
    lock: whichever daemons start first, each migration is applied once."""
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            version = current_version(conn)
            if version >= LATEST_VERSION:
                if version > LATEST_VERSION:
                    raise CoordinationUnavailable(
                        f"the coordination schema is version {version}, newer than this "
                        f"program knows ({LATEST_VERSION}): run a newer marketo-orchestrator"
                    )
                return
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("UPDATE marketo_orchestrator.meta SET version = %s", (version + 1,))
            log.info("coordination_schema_migrated", version=version + 1)


def current_version(conn: Conn) -> int:
    exists = conn.execute(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = 'meta'",
        (SCHEMA,),
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT version FROM marketo_orchestrator.meta").fetchone()
    return int(row[0]) if row else 0
