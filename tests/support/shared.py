"""Several daemons on one simulated Marketo subscription, sharing one coordination
database (issue 21): started, watched and measured as tests and bench/daemons.py need.

- `member_settings`: fast_settings for one daemon of a fleet: its own data directory
  and client id, a status port, and the [coordination] table naming the database.
- `Member`: one daemon (a `marketo-orchestrator run` subprocess), its inbox, results,
  /readyz and the jobs it made at the simulator.
- `Fleet` / `start_fleet`: N members on one simulator and one fresh database of the
  private PostgreSQL server (tests/support/postgres.py), started and ready.
- Readers of what happened: `ours` (the simulator's jobs but other integrations'),
  `creates`, `refusals`, `most_at_once`, `most_in_window`, `claim_order`, and `query`
  (rows of the coordination database, whose clock orders the shared FIFO).

Each member has its own client id, so the simulator's call log and jobs tell whose a
call or a job was; Marketo's limits belong to the subscription, and the simulator
counts them over every client together, as Marketo does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from orchestrator.config import Route, Settings
from orchestrator.simulator import Simulator
from tests.support.data import result_path, write_csv
from tests.support.http import http_get
from tests.support.processes import CliProcess, MakeRunner
from tests.support.settings import CLIENT_ID, fast_settings, free_port, with_sections
from tests.support.waiting import stderr_tail, wait_until

if TYPE_CHECKING:  # psycopg only where a database is used: bench/daemons.py runs without
    from tests.support.postgres import PostgresDatabase

INSTANCES = "abcdefgh"  # members are named a, b, c, ... in the database and the logs
FOREIGN = "foreign"  # the simulator's owner of other integrations' jobs
SCHEMA = "marketo_orchestrator"  # the coordination database's schema


def member_settings(
    base_url: str,
    data_dir: Path,
    database_url: str,
    instance: str,
    routes: tuple[Route, ...],
    *,
    lease_seconds: float = 30.0,
    sections: dict[str, dict[str, Any]] | None = None,
    **limits: Any,
) -> Settings:
    """One member's settings: fast_settings with its own client id (CLIENT_ID-<instance>),
    a status port of its own, JSON logs and [coordination] naming `database_url`;
    `sections` changes further keys per section (`polling={"interval": 0.2}`)."""
    settings = fast_settings(base_url, data_dir, routes, **limits)
    settings = replace(
        settings, marketo=replace(settings.marketo, client_id=f"{CLIENT_ID}-{instance}")
    )
    return with_sections(
        settings,
        coordination={
            "url": database_url,
            "instance": instance,
            "lease_seconds": lease_seconds,
        },
        http={"listen": f"127.0.0.1:{free_port()}"},
        logging={"format": "json", "level": "info"},
        **(sections or {}),
    )


@dataclass(eq=False)  # a member is itself, whatever its fields: hashable by identity
class Member:
    """One daemon of a fleet; `proc` is its current process (None before `start`)."""

    instance: str
    settings: Settings
    make_runner: MakeRunner
    procs: list[CliProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runner = self.make_runner(self.settings)

    def __repr__(self) -> str:
        return f"<Member {self.instance} {self.data_dir}>"

    @property
    def proc(self) -> CliProcess:
        if not self.procs:
            raise AssertionError(f"daemon {self.instance} was never started")
        return self.procs[-1]

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def client_id(self) -> str:
        return self.settings.marketo.client_id

    @property
    def status_url(self) -> str:
        return f"http://{self.settings.http.listen}"

    async def start(self) -> CliProcess:
        """`run` (the daemon, until signalled) with this member's config."""
        self.procs.append(await self.runner.daemon())
        return self.procs[-1]

    async def readyz(self) -> tuple[int, str] | None:
        """(status, body) of GET /readyz, or None while nothing listens."""
        try:
            async with aiohttp.ClientSession() as session:
                return await http_get(session, f"{self.status_url}/readyz")
        except aiohttp.ClientConnectionError:
            return None

    async def wait_ready(self, within: float = 60.0) -> None:
        async def ready() -> bool:
            answer = await self.readyz()
            return answer is not None and answer[0] == 200

        await wait_until(
            ready, f"/readyz 200 of daemon {self.instance}", within=within, process=self.proc
        )

    async def stop(self, within: float = 30.0) -> int:
        """SIGTERM, and its exit code."""
        self.proc.terminate()
        return await self.proc.wait(within)

    def drop(
        self, name: str, header: Sequence[str], rows: Iterable[Sequence[str]], route: str = "leads"
    ) -> Path:
        """A source file renamed whole into this member's inbox/<route>/."""
        return write_csv(
            self.data_dir / "inbox" / route / name, list(header), [list(r) for r in rows]
        )

    def result(self, name: str, route: str = "leads") -> dict[str, Any] | None:
        """`name`'s result.json from done/ or failed/, or None while it has none."""
        for folder in ("done", "failed"):
            path = result_path(self.data_dir, folder, route, name)
            if path.exists():
                doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
                return doc
        return None

    def creates(self, sim: Simulator) -> list[dict[str, Any]]:
        """This member's creates that made a job, in the order they arrived."""
        return [c for c in creates(sim) if c["client_id"] == self.client_id]


@dataclass
class Fleet:
    """Daemons sharing one simulator and one coordination database."""

    sim: Simulator
    database: PostgresDatabase
    members: list[Member]

    def __getitem__(self, index: int) -> Member:
        return self.members[index]

    def __iter__(self) -> Any:
        return iter(self.members)

    async def start(self) -> None:
        """Start every member, then wait until each says it is ready."""
        for member in self.members:
            await member.start()
        for member in self.members:
            await member.wait_ready()

    async def stop(self) -> list[int]:
        """SIGTERM to every member still running; their exit codes."""
        running = [m for m in self.members if m.procs and m.proc.returncode is None]
        for member in running:
            member.proc.terminate()
        return [await m.proc.wait(30.0) for m in running]

    async def wait_results(self, names: dict[Member, list[str]], within: float = 60.0) -> None:
        """Until every named file of every member has its result.json."""

        def all_there() -> bool:
            return all(m.result(n) is not None for m, ns in names.items() for n in ns)

        try:
            await wait_until(all_there, "every file's result.json", within=within, poll=0.05)
        except AssertionError as exc:
            missing = [
                f"{m.instance}:{n}" for m, ns in names.items() for n in ns if not m.result(n)
            ]
            tails = "".join(
                f"\n--- {m.instance}: the last of its log ---\n{m.proc.stdout()[-4000:]}"
                f"{stderr_tail(m.proc)}"
                for m in self.members
                if m.procs
            )
            raise AssertionError(
                f"{exc}; missing {missing}{tails}{await self.unfinished()}"
            ) from None

    async def unfinished(self) -> str:
        """The coordination database's daemons and unfinished chunks, for a failure
        message: what the shared model believes when files stop moving."""
        try:
            daemons = await self.query(
                f"SELECT instance, epoch, alive, lease_until > clock_timestamp(), paused_reason"
                f" FROM {SCHEMA}.daemons ORDER BY instance"
            )
            chunks = await self.query(
                f"SELECT id, instance, chunk_ref, file_ref, state, slot, epoch, batch_id,"
                f" unknown_outcomes, claimed_at FROM {SCHEMA}.chunks"
                " WHERE state IN ('pending', 'creating', 'submitted') ORDER BY id"
            )
            model = await self.query(
                f"SELECT foreign_slots, orphans, finished_jobs, backoff_until, hold_until,"
                f" paused_until FROM {SCHEMA}.subscriptions"
            )
        except Exception as exc:  # a diagnostic must not hide the failure it describes
            return f"\n--- coordination database unreadable: {exc!r}"
        lines = [
            "--- coordination database ---",
            "daemons (instance, epoch, alive, lease valid, paused):",
            *map(repr, daemons),
            "subscription (foreign, orphans, finished_jobs, backoff, hold, paused):",
            *map(repr, model),
            "unfinished chunks (id, instance, chunk_ref, file_ref, state, slot, epoch,"
            " batch_id, unknown_outcomes, claimed_at):",
            *map(repr, chunks),
        ]
        return "\n" + "\n".join(lines)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await query(self.database, sql, params)


async def start_fleet(
    make_runner: MakeRunner,
    sim: Simulator,
    database: PostgresDatabase,
    root: Path,
    count: int,
    routes: tuple[Route, ...],
    *,
    start: bool = True,
    lease_seconds: float = 30.0,
    sections: dict[str, dict[str, Any]] | None = None,
    **limits: Any,
) -> Fleet:
    """`count` members (a, b, ...) on `sim` and `database`, data under root/<instance>/,
    started and ready unless `start` is False."""
    members = [
        Member(
            instance,
            member_settings(
                sim.base_url,
                root / instance / "data",
                database.url,
                instance,
                routes,
                lease_seconds=lease_seconds,
                sections=sections,
                **limits,
            ),
            make_runner,
        )
        for instance in INSTANCES[:count]
    ]
    fleet = Fleet(sim, database, members)
    if start:
        await fleet.start()
    return fleet


# -- what happened ---------------------------------------------------------------------


async def query(
    database: PostgresDatabase, sql: str, params: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Rows of one statement on the coordination database (in a thread: the simulator
    serving the daemons shares the test's event loop)."""

    import psycopg

    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(database.url, autocommit=True) as conn:
            return conn.execute(sql.encode(), params).fetchall()

    return await asyncio.to_thread(run)


def ours(sim: Simulator) -> list[dict[str, Any]]:
    """The simulator's jobs but other integrations'."""
    return [j for j in sim.jobs() if j["owner"] != FOREIGN]


def creates(sim: Simulator) -> list[dict[str, Any]]:
    """Creates that made a job, in the order they arrived."""
    made = [c for c in sim.calls() if str(c["operation"]).startswith("import") and c["batch_id"]]
    return sorted(made, key=lambda c: float(c["t"]))  # the log keeps them in answer order


def refusals(sim: Simulator, code: str) -> list[dict[str, Any]]:
    """Bulk calls answered with Marketo error `code` ("1016", "606", ...)."""
    return [c for c in sim.calls() if c["code"] == code]


def outstanding_peak(sim: Simulator) -> int:
    """The most of our jobs outstanding (queued or importing) at one moment."""
    return most_at_once(
        [
            (j["queued_at"], j["finished_at"] if j["finished_at"] is not None else float("inf"))
            for j in ours(sim)
        ]
    )


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of the (start, end) intervals open at one moment."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    best = now = 0
    for _, step in edges:  # an end sorts before a start at the same moment
        now += step
        best = max(best, now)
    return best


def most_in_window(times: list[float], window: float) -> int:
    """The most of `times` (sorted) inside any half-open interval of `window` seconds."""
    best, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window:
            first += 1
        best = max(best, last - first + 1)
    return best


def claim_order(calls: list[dict[str, Any]], claimed: dict[int, float]) -> tuple[int, int]:
    """(pairs of jobs of different files, pairs created in the other order than claimed).

    `claimed` maps a batch id to its file's claim time; a job's create time is the
    simulator's arrival time of the create that returned its batch id."""
    jobs = [
        (claimed[int(c["batch_id"])], float(c["t"]))
        for c in calls
        if str(c["operation"]).startswith("import") and c["batch_id"] in claimed
    ]
    pairs = wrong = 0
    for i, (claim_a, made_a) in enumerate(jobs):
        for claim_b, made_b in jobs[i + 1 :]:
            if claim_a == claim_b:
                continue
            pairs += 1
            wrong += (claim_a < claim_b) != (made_a < made_b)
    return pairs, wrong
