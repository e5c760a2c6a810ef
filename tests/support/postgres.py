"""A private PostgreSQL server for tests: one per test session (per pytest-xdist worker).

- `private_server()`: finds the server's programs, makes a cluster in a fresh
  directory under /tmp, starts it, and at the end stops it and removes the directory.
  Without the programs the caller's test is skipped with a reason that says how to get
  them, or fails under ORCHESTRATOR_REQUIRE_POSTGRES=1 (CI).
- `PostgresServer`: that cluster. The server listens on a Unix socket only (no TCP
  port to clash with anything) and trusts it; `stop`, `start` and `restart` act on the
  same data directory, for the tests of a database that goes away mid-run.
- `PostgresDatabase`: one test's database (`test_<n>`) and its libpq URL.

initdb and postgres refuse to run as root: as root (CI), they run as the `postgres`
account through runuser, and the cluster's directory belongs to that account; as
anyone else, they run as that user. fsync and full-page writes are off: they only
matter when the machine itself crashes, and the data dies with the session anyway.
Commits still reach the kernel before they return, so a committed row survives
`stop("immediate")` as it would on a real server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg import sql

BIN_ENV = "ORCHESTRATOR_TEST_PG_BIN"  # a directory with initdb, pg_ctl and postgres
REQUIRE_ENV = "ORCHESTRATOR_REQUIRE_POSTGRES"  # "1": a missing server fails, never skips
DEBIAN_BINS = Path("/usr/lib/postgresql")  # Debian's layout: <major>/bin
PROGRAMS = ("initdb", "pg_ctl", "postgres")
HOW_TO_GET = (
    "install the server (`apt-get install postgresql-15` on Debian) "
    f"or set {BIN_ENV} to a directory holding {', '.join(PROGRAMS)}"
)
SERVER_ACCOUNT = "postgres"  # who runs the server when the tests run as root
SUPERUSER = "postgres"  # the role initdb makes; the socket trusts it, no password
TIMEOUT = 120  # seconds for initdb or pg_ctl: generous, the machine may be busy
# /tmp itself, not $TMPDIR: a Unix socket's path must stay under about 100 bytes.
PARENT = Path("/tmp")
SETTINGS = """
# tests/support/postgres.py: a private test server
listen_addresses = ''
unix_socket_directories = '{socket_dir}'
fsync = off
full_page_writes = off
"""


class NoServer(Exception):
    """No PostgreSQL server can be run here; the message says why and what to do."""


def unavailable(reason: str, env: Mapping[str, str] = os.environ) -> NoReturn:
    """Skip the test for want of a server, or fail it where one is required (CI)."""
    if env.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set, but {reason}", pytrace=False)
    pytest.skip(reason)


def locate_server(env: Mapping[str, str] = os.environ) -> Path:
    """The directory of the server's programs: the one `BIN_ENV` names, else the newest
    of Debian's, else that of `initdb` on PATH. Raises NoServer."""
    named = env.get(BIN_ENV, "")
    if named:
        candidates = [Path(named).absolute()]  # the programs run with another cwd
    else:
        debian = sorted(DEBIAN_BINS.glob("*/bin"), key=_major, reverse=True)
        on_path = shutil.which("initdb")
        candidates = [*debian, *([Path(on_path).resolve().parent] if on_path else [])]
    for directory in candidates:
        if all((directory / name).is_file() for name in PROGRAMS):
            break
    else:
        where = f"{BIN_ENV}={named} has no {' or '.join(PROGRAMS)}" if named else None
        raise NoServer(f"{where or 'no PostgreSQL server programs found'}: {HOW_TO_GET}")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_ACCOUNT)
        except KeyError:
            raise NoServer(
                f"running as root, the server needs a {SERVER_ACCOUNT!r} account to run as "
                "(initdb and postgres refuse root; Debian's package makes the account)"
            ) from None
    return directory


def _major(bin_dir: Path) -> int:
    name = bin_dir.parent.name
    return int(name) if name.isdigit() else -1


@dataclass(frozen=True)
class PostgresDatabase:
    """One test's database on the private server."""

    name: str
    url: str  # postgresql://postgres@/<name>?host=<socket dir>

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, **kwargs)


class PostgresServer:
    """A cluster in `root` (data/, socket/, server.log), run by `bin_dir`'s programs."""

    def __init__(self, bin_dir: Path, root: Path, worker: str = "") -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.worker = worker  # pytest-xdist's worker id, in database names
        self.databases_made = 0

    def __repr__(self) -> str:
        return f"<PostgresServer {self.root} ({self.bin_dir})>"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}"

    @classmethod
    def initialise(cls, bin_dir: Path, worker: str = "") -> PostgresServer:
        """initdb into a fresh directory under /tmp, owned by whoever runs the server."""
        prefix = f"orchestrator-pg-{worker}-" if worker else "orchestrator-pg-"
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=PARENT))
        root.chmod(0o755)  # the socket is reachable by other users (it trusts only its own)
        server = cls(bin_dir, root, worker)
        try:
            server.socket_dir.mkdir()
            if os.geteuid() == 0:
                account = pwd.getpwnam(SERVER_ACCOUNT)
                for path in (root, server.socket_dir):
                    os.chown(path, account.pw_uid, account.pw_gid)
            server._run(
                "initdb",
                f"--pgdata={server.data_dir}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            with (server.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write(SETTINGS.format(socket_dir=server.socket_dir))
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "status", *self._ctl_options, check=False) == 0

    @property
    def _ctl_options(self) -> tuple[str, ...]:
        return (f"--pgdata={self.data_dir}", f"--timeout={TIMEOUT}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "start", "--wait", *self._ctl_options, f"--log={self.log_path}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" ends every session and checkpoints; "immediate" is
        a crash as far as the data directory knows (recovery at the next start)."""
        self._run("pg_ctl", "stop", "--wait", *self._ctl_options, f"--mode={mode}")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same data directory and socket: every
        connection open before is broken, new ones succeed. Blocks: from a coroutine,
        `await asyncio.to_thread(server.restart)`."""
        self.stop(mode)
        self.start()

    def remove(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        """A superuser connection outside transactions (CREATE DATABASE needs that)."""
        return psycopg.connect(self.url(dbname), autocommit=True)

    def create_database(self) -> PostgresDatabase:
        self.databases_made += 1
        infix = f"{self.worker}_" if self.worker else ""
        name = f"test_{infix}{self.databases_made}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return PostgresDatabase(name, self.url(name))

    def drop_database(self, name: str) -> None:
        """Drop it, ending whatever sessions still use it (a daemon left running)."""
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _run(self, program: str, *args: str, check: bool = True) -> int:
        command = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_ACCOUNT, "--", *command]
        # cwd: the server's account may not be allowed into the caller's directory.
        proc = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} exited with {proc.returncode}\n"
                f"{proc.stdout}{proc.stderr}{self._log_tail()}"
            )
        return proc.returncode

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return f"\nserver log (last {chars} characters):\n{text[-chars:]}"


@contextmanager
def private_server(env: Mapping[str, str] = os.environ) -> Iterator[PostgresServer]:
    """A started private server, removed on exit; skips (or fails, see REQUIRE_ENV)
    the calling test when none can be run here."""
    try:
        bin_dir = locate_server(env)
    except NoServer as exc:
        unavailable(str(exc), env)
    server = PostgresServer.initialise(bin_dir, env.get("PYTEST_XDIST_WORKER", ""))
    try:
        server.start()
        yield server
    finally:
        server.remove()
