"""Benchmark: several daemons sharing one simulated Marketo subscription (issue 21).

Not a test. The same work, --jobs files of one job each (a leads CSV of 100 to 800
rows, sizes drawn with a fixed seed, every email its own key, packing off), is done
by 1, 2 and 4 daemons in turn (--daemons), each daemon a real `marketo-orchestrator
run` process with a data directory of its own, all of them on one simulator process
(a fresh one per round, so its logs hold one round). The files arrive as pipelines
hand them over: one every --arrival seconds (Marketo time), dealt to the daemons in
turn, so a backlog forms and claim order across daemons matters. A round ends when
every file has its result.json; then the daemons get SIGTERM.

With --coordination a private PostgreSQL server is started (tests/support/postgres.py;
it needs Debian's postgresql-15 or ORCHESTRATOR_TEST_PG_BIN) and every daemon of a
round gets a fresh database's URL in ORCHESTRATOR_COORDINATION_URL. Without it, each
daemon believes the subscription is its own: today's behaviour, the "before".

Per round, from the simulator's call log and jobs and from every result.json:
- makespan: the first file handed over to the last result.json's `finished_at`, and
  its ratio to one daemon's;
- import-slot utilisation: seconds jobs spent importing / (2 x makespan);
- 1016 answers (no foreign jobs here: every one is self-made), 606 answers;
- the most bulk calls in any sliding rate window (20 s Marketo time), all daemons
  together, against Marketo's 100 and the 50 one integration should keep to;
- the most jobs outstanding at once (created, not yet finished) against 10;
- job pairs created out of claim order: of every two jobs of different files, the
  share whose creates came in the other order than their files' claims (claim
  times from each daemon's state store; with --coordination also from the
  database, whose clock orders the shared FIFO).
Exit 1 when a row is lost or a result is wrong; with --coordination also when a
target of issue 21 is missed (0 x 1016, <= 10 outstanding, the window held, the
makespan of 2 daemons within 10 % of one's).

Time scale: one benchmark second stands for --scale seconds at Marketo (20 by
default). Marketo's costs (4 s per job plus 25 rows/s: jobs of 8 to 36 s) and every
duration of ours (polling 5 / 30 s, backoff 2 / 300 s, the 20 s rate window) are
divided by it; our own work per file is not.

    .venv/bin/python bench/daemons.py                    # 1, 2 and 4 daemons; ~2 minutes
    .venv/bin/python bench/daemons.py --coordination     # the same, sharing PostgreSQL
    .venv/bin/python bench/daemons.py --daemons 1,2 --jobs 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the helpers live in tests/support

import aiohttp  # noqa: E402  (after the path set-up above)

from orchestrator import constants  # noqa: E402
from orchestrator.config import Route, Settings  # noqa: E402
from orchestrator.models import ObjectType  # noqa: E402
from tests.support.data import result_path  # noqa: E402
from tests.support.http import http_get  # noqa: E402
from tests.support.processes import CliProcess, CliRunner  # noqa: E402
from tests.support.settings import fast_settings, free_port, with_sections  # noqa: E402
from tests.support.shared import claim_order, most_at_once, most_in_window  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

ROUTE = Route(dir="leads", object=ObjectType.LEADS, pack=False)  # one file, one job
HEADER = "email,firstName,lastName,company"
MIN_ROWS, MAX_ROWS = 100, 800
SEED = 21
# Marketo's side at scale 1: a fixed cost per job and an import speed that make
# these files' jobs last 8 to 36 s; one file handed over every ARRIVAL seconds.
JOB_OVERHEAD = 4.0
ROWS_PER_SECOND = 25.0
ARRIVAL = 2.0
# Ours at scale 1 (SPEC section 3's defaults).
POLL_INTERVAL, POLL_MAX = 5.0, 30.0
BACKOFF_INITIAL, BACKOFF_MAX = 2.0, 300.0
ONE_INTEGRATION = 50  # calls per window Adobe asks one integration to keep to
MAKESPAN_SLACK = 1.10  # target: 2 daemons' makespan within 10 % of one's
COORDINATION_ENV = "ORCHESTRATOR_COORDINATION_URL"


# -- the workload -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    number: int
    name: str
    rows: int
    text: str


def make_sources(count: int, seed: int) -> list[Source]:
    rng = random.Random(seed)
    sources = []
    for number in range(count):
        rows = rng.randint(MIN_ROWS, MAX_ROWS)
        lines = [HEADER]
        lines += [
            f"f{number}r{r}@example.com,First{r},Last{number},Co {number}" for r in range(rows)
        ]
        sources.append(Source(number, f"f{number:03d}.csv", rows, "\n".join(lines) + "\n"))
    return sources


def hand_over(source: Source, data_dir: Path) -> None:
    """Written aside, renamed into the inbox whole, as a pipeline does."""
    part = data_dir / "staging" / source.name
    part.write_text(source.text, encoding="utf-8")
    part.rename(data_dir / "inbox" / ROUTE.dir / source.name)


# -- processes --------------------------------------------------------------------------


def daemon_settings(base_url: str, data_dir: Path, scale: float, poll: float) -> Settings:
    """Marketo's limits, every duration of ours divided by `scale`, a status port."""
    return with_sections(
        fast_settings(base_url, data_dir, (ROUTE,)),
        marketo={"request_timeout": 60.0},
        limits={
            "max_chunk_bytes": constants.DEFAULT_MAX_CHUNK_BYTES,
            "api_window_seconds": constants.API_WINDOW_SECONDS / scale,
        },
        polling={"interval": poll / scale, "max_interval": max(poll, POLL_MAX) / scale},
        backoff={"initial": BACKOFF_INITIAL / scale, "max": BACKOFF_MAX / scale},
        http={"listen": f"127.0.0.1:{free_port()}"},
        logging={"format": "json", "level": "info"},
    )


async def start_simulator(runner: CliRunner, scale: float) -> str:
    """`marketo-orchestrator simulator` in its own process, Marketo's limits, time scaled."""
    port = free_port()
    proc = await runner.start(
        "simulator",
        "--port",
        str(port),
        "--job-overhead",
        f"{JOB_OVERHEAD / scale:g}",
        "--rows-per-second",
        f"{ROWS_PER_SECOND * scale:g}",
        "--rate-limit",
        str(constants.API_CALLS_PER_WINDOW),
        "--rate-window",
        f"{constants.API_WINDOW_SECONDS / scale:g}",
    )
    url = f"http://127.0.0.1:{port}"
    await wait_until(lambda: answers(f"{url}/_sim/config"), "the simulator", process=proc)
    return url


async def answers(url: str) -> bool:
    """Whether GET `url` answers 200 now."""
    try:
        async with aiohttp.ClientSession() as session:
            status, _ = await http_get(session, url)
    except aiohttp.ClientError:
        return False
    return status == 200


async def sim_get(url: str, view: str) -> Any:
    async with aiohttp.ClientSession() as session:
        status, body = await http_get(session, f"{url}/_sim/{view}")
    assert status == 200, body
    return json.loads(body)


@contextlib.contextmanager
def databases(wanted: bool) -> Iterator[Any]:
    """A private PostgreSQL server when `wanted` (else None), removed at the end."""
    if not wanted:
        yield None
        return
    from tests.support.postgres import NoServer, PostgresServer, locate_server

    try:
        bin_dir = locate_server()
    except NoServer as exc:
        raise SystemExit(f"--coordination: {exc}") from None
    server = PostgresServer.initialise(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


# -- one round --------------------------------------------------------------------------


@dataclass
class Round:
    daemons: int
    coordinated: bool
    makespan: float = 0.0
    importing: float = 0.0  # seconds our jobs spent importing, summed
    jobs: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    max_window: int = 0
    max_outstanding: int = 0
    pairs: int = 0
    out_of_order: int = 0
    shared_pairs: int = 0  # the same, by the coordination database's claim times
    shared_out_of_order: int = 0
    exit_codes: list[int] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    @property
    def utilisation(self) -> float:
        return self.importing / (constants.MAX_IMPORTING_JOBS * self.makespan)


async def run_round(
    count: int, sources: list[Source], root: Path, server: Any, args: argparse.Namespace
) -> Round:
    workdir = root / f"{count}-daemons"
    sim_runner = CliRunner(workdir / "simulator")
    sim_runner.workdir.mkdir(parents=True)
    runners: list[CliRunner] = []
    outcome = Round(count, server is not None)
    try:
        url = await start_simulator(sim_runner, args.scale)
        database = server.create_database().url if server is not None else None
        env = {COORDINATION_ENV: database} if database is not None else {}
        homes: list[Path] = []
        procs: list[CliProcess] = []
        for number in range(count):
            home = workdir / f"daemon-{number}" / "data"
            settings = daemon_settings(url, home, args.scale, args.poll_interval)
            (settings.data_dir / "staging").mkdir(parents=True)
            (settings.data_dir / "inbox" / ROUTE.dir).mkdir(parents=True)
            runner = CliRunner.for_settings(workdir / f"daemon-{number}", settings)
            runners.append(runner)
            homes.append(settings.data_dir)
            procs.append(await runner.daemon(env=env))
        for proc in procs:
            port = await wait_until(proc.status_port, "the status server", process=proc)
            ready = f"http://127.0.0.1:{port}/readyz"
            await wait_until(lambda u=ready: answers(u), "/readyz", within=60, process=proc)
        wall, started = time.time(), time.monotonic()
        for source in sources:  # pacing the hand-overs, not waiting on anything
            await asyncio.sleep(
                max(0.0, started + source.number * args.arrival / args.scale - time.monotonic())
            )
            hand_over(source, homes[source.number % count])
        owners = {s.name: homes[s.number % count] for s in sources}
        await wait_until(
            lambda: all(finished(owners[s.name], s) for s in sources),
            "every file's result.json",
            within=args.timeout,
            poll=0.2,
        )
        for proc in procs:
            proc.terminate()
        outcome.exit_codes = [await proc.wait(within=30) for proc in procs]
        await measure(outcome, url, sources, owners, homes, database, wall, args.scale)
    finally:
        for runner in runners:
            await runner.close()
        await sim_runner.close()
    return outcome


def finished(data_dir: Path, source: Source) -> bool:
    return any(
        result_path(data_dir, f, ROUTE.dir, source.name).exists() for f in ("done", "failed")
    )


def timestamp(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def measure(
    outcome: Round,
    url: str,
    sources: list[Source],
    owners: dict[str, Path],
    homes: list[Path],
    database: str | None,
    wall: float,
    scale: float,
) -> None:
    ends = []
    for source in sources:
        path = result_path(owners[source.name], "done", ROUTE.dir, source.name)
        if not path.exists():
            outcome.wrong.append(f"{source.name}: no result in done/")
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        ends.append(timestamp(doc["finished_at"]))
        want = {"status": "complete", "rows": source.rows, "rows_processed": source.rows}
        if {k: doc.get(k) for k in want} != want:
            outcome.wrong.append(f"{source.name}: { ({k: doc.get(k) for k in want}) } != {want}")
    outcome.makespan = max(ends, default=time.time()) - wall
    calls = [c for c in await sim_get(url, "calls") if c["operation"] != "identity"]
    outcome.calls = len(calls)
    outcome.codes = Counter(str(c["code"]) for c in calls if c["code"])
    outcome.max_window = most_in_window(
        sorted(c["t"] for c in calls), constants.API_WINDOW_SECONDS / scale
    )
    jobs = [j for j in await sim_get(url, "jobs") if j["owner"] != "foreign"]
    outcome.jobs = len(jobs)
    outcome.importing = sum(
        j["finished_at"] - j["started_at"] for j in jobs if j["finished_at"] is not None
    )
    outcome.max_outstanding = most_at_once(
        [(j["queued_at"], j["finished_at"] or float("inf")) for j in jobs]
    )
    outcome.pairs, outcome.out_of_order = claim_order(calls, local_claims(homes))
    if database is not None:
        outcome.shared_pairs, outcome.shared_out_of_order = claim_order(
            calls, shared_claims(database)
        )


def local_claims(homes: list[Path]) -> dict[int, float]:
    """Batch id -> its file's `claimed_at` in its daemon's state store (the daemon's clock)."""
    claimed: dict[int, float] = {}
    for home in homes:
        uri = f"{(home / 'state.db').as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            rows = db.execute(
                "SELECT c.batch_id, f.claimed_at FROM chunks c JOIN files f ON f.id = c.file_id"
                " WHERE c.batch_id IS NOT NULL"
            )
            claimed.update((int(batch_id), timestamp(str(at))) for batch_id, at in rows)
    return claimed


def shared_claims(url: str) -> dict[int, float]:
    """Batch id -> claim time in the coordination database (its clock: the shared FIFO's order)."""
    import psycopg

    with psycopg.connect(url) as db:
        try:
            rows = db.execute(
                "SELECT batch_id, claimed_at FROM marketo_orchestrator.chunks"
                " WHERE batch_id IS NOT NULL"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}  # no daemon made the schema: this build does not coordinate
    return {int(batch_id): at.timestamp() for batch_id, at in rows}


# -- report -----------------------------------------------------------------------------


def report(rounds: list[Round], args: argparse.Namespace) -> int:
    one = next((r for r in rounds if r.daemons == 1), None)
    window = constants.API_WINDOW_SECONDS / args.scale
    mode = "sharing PostgreSQL (--coordination)" if args.coordination else "each on its own"
    print(
        f"\n{args.jobs} files of one job each, {mode}; scale {args.scale:g} "
        f"(jobs of {(JOB_OVERHEAD + MIN_ROWS / ROWS_PER_SECOND) / args.scale:.2f} to "
        f"{(JOB_OVERHEAD + MAX_ROWS / ROWS_PER_SECOND) / args.scale:.2f} s, rate window "
        f"{window:g} s, polling every {args.poll_interval / args.scale:g} s, "
        f"a file every {args.arrival / args.scale:g} s)"
    )
    print("\n| daemons | " + " | ".join(str(r.daemons) for r in rounds) + " |")
    print("|---|" + "---:|" * len(rounds))
    rows = [
        ("makespan", lambda r: f"{r.makespan:.2f} s"),
        ("makespan / one daemon's", lambda r: f"{r.makespan / one.makespan:.2f}" if one else "-"),
        ("import-slot utilisation", lambda r: f"{r.utilisation:.3f}"),
        ("jobs created", lambda r: str(r.jobs)),
        ("1016 answers", lambda r: str(r.codes["1016"])),
        ("606 answers", lambda r: str(r.codes["606"])),
        ("other error codes", lambda r: other_codes(r.codes)),
        ("bulk calls", lambda r: str(r.calls)),
        ("most calls in one 20 s window (all daemons)", lambda r: str(r.max_window)),
        ("most jobs outstanding at once", lambda r: str(r.max_outstanding)),
        (
            "job pairs created out of claim order",
            lambda r: f"{r.out_of_order / max(r.pairs, 1):.1%} ({r.out_of_order} of {r.pairs})",
        ),
    ]
    if args.coordination:
        rows.append(
            (
                "the same, by the database's claim times",
                lambda r: (
                    f"{r.shared_out_of_order / max(r.shared_pairs, 1):.1%} "
                    f"({r.shared_out_of_order} of {r.shared_pairs})"
                ),
            )
        )
    rows += [
        ("files with a wrong or no result", lambda r: str(len(r.wrong))),
        ("daemon exit codes", lambda r: " ".join(map(str, r.exit_codes))),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r) for r in rounds) + " |")
    failed = False
    for r in rounds:
        for line in r.wrong[:10]:
            print(f"  {r.daemons} daemons, wrong: {line}")
        failed |= bool(r.wrong) or any(code != 0 for code in r.exit_codes)
    print()
    for r in rounds:
        checks = [
            ("no 1016", r.codes["1016"] == 0),
            ("<= 10 outstanding", r.max_outstanding <= constants.MAX_QUEUED_JOBS),
            (f"<= {ONE_INTEGRATION} calls per window", r.max_window <= ONE_INTEGRATION),
        ]
        if one is not None and r.daemons == 2:
            ratio = r.makespan / one.makespan
            checks.append(
                (f"makespan / one's {ratio:.2f} <= {MAKESPAN_SLACK:g}", ratio <= MAKESPAN_SLACK)
            )
        verdict = ", ".join(f"{what} {'PASS' if ok else 'FAIL'}" for what, ok in checks)
        print(f"targets, {r.daemons} daemons: {verdict}")
        if args.coordination:
            failed |= not all(ok for _, ok in checks)
    return 1 if failed else 0


def other_codes(codes: Counter[str]) -> str:
    rest = {k: v for k, v in sorted(codes.items()) if k not in ("1016", "606")}
    return ", ".join(f"{k}: {v}" for k, v in rest.items()) or "0"


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", default="1,2,4", help="daemon counts, one round each (1,2,4)")
    parser.add_argument("--jobs", type=int, default=40, help="files of one job each (40)")
    parser.add_argument(
        "--scale", type=float, default=20.0, help="one bench second stands for this many (20)"
    )
    parser.add_argument(
        "--arrival", type=float, default=ARRIVAL, help="Marketo seconds between hand-overs (2)"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=POLL_INTERVAL,
        help="polling.interval in Marketo seconds (5); shorter makes the call budget bind",
    )
    parser.add_argument("--coordination", action="store_true", help="share a private PostgreSQL")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a round may take")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.counts = [int(n) for n in args.daemons.split(",")]
    if args.jobs < 1 or args.scale <= 0 or min(args.counts) < 1:
        parser.error("--jobs, --scale and --daemons must be positive")
    return args


async def bench(args: argparse.Namespace, root: Path) -> int:
    sources = make_sources(args.jobs, args.seed)
    rounds = []
    with databases(args.coordination) as server:
        for count in args.counts:
            print(f"{count} daemon(s): {args.jobs} files ...", flush=True)
            rounds.append(await run_round(count, sources, root, server, args))
            print(f"{count} daemon(s): makespan {rounds[-1].makespan:.2f} s", flush=True)
    return report(rounds, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="daemons-"))
    try:
        return asyncio.run(bench(args, root))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
