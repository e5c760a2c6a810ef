"""The `marketo-orchestrator` command: run, submit, status, check, split, simulator;
the composition root.

It owns `asyncio.run`, derives the settings (for `run --simulate`: pointed at
the bundled simulator, which it starts beside the daemon and nothing else in
the product imports) and builds the daemon.

User mistakes (a bad flag, a bad config key, a missing file, a closed pipe) end
with one line on stderr, never a traceback. Exit codes (`ExitCode`) are those of
SPEC section 2: 0 complete, 1 a file failed, 2 configuration or usage, 3
credentials refused, 4 timed out or interrupted with work outstanding.
Logging is configured here, once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import structlog

from orchestrator import __version__, client, dirlock, logs
from orchestrator.config import (
    MIN_CHUNK_BYTES,
    Route,
    Secret,
    Settings,
    env_warnings,
    identity_url,
    load_settings,
    resolve_config_path,
    with_marketo,
)
from orchestrator.constants import DEFAULT_MAX_CHUNK_BYTES, MAX_FILE_BYTES
from orchestrator.crashpoints import hold
from orchestrator.delimited import FORMATS, format_of
from orchestrator.dirlock import DataDirLock
from orchestrator.errors import (
    ConfigError,
    DataDirInUse,
    InputError,
    OrchestratorError,
    UsageError,
)
from orchestrator.models import ExitCode, ObjectType

log = structlog.get_logger(__name__)

PROG = "marketo-orchestrator"
EXIT_USAGE = ExitCode.USAGE
EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE
# `run --simulate` without routes configured: one route per object type.
DEMO_ROUTES = (
    Route(dir="leads", object=ObjectType.LEADS),
    Route(dir="cars", object=ObjectType.CUSTOM_OBJECT, api_name="car_c"),
    Route(
        dir="webinar",
        object=ObjectType.PROGRAM_MEMBERS,
        program_id=1001,
        program_member_status="Registered",
    ),
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: usage error: {message} (see {self.prog} --help)\n")


def build_parser(argv: Sequence[str] = ()) -> Parser:
    parser = Parser(prog=PROG, description="Load delimited files into Marketo's Bulk Import API.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument(
        "--config",
        help="TOML file (default: $ORCHESTRATOR_CONFIG, then ./config/orchestrator.toml)",
    )
    run.add_argument(
        "--once", action="store_true", help="claim what is in the inbox, finish it, exit"
    )
    run.add_argument(
        "--simulate", action="store_true", help="use the bundled simulator; nothing goes to Marketo"
    )

    status = sub.add_parser("status", help="files and chunks from the state store")
    status.add_argument("--config", help="TOML file (as for run)")
    status.add_argument("--json", action="store_true", help="the same JSON as GET /jobs")
    status.add_argument("--id", help="only the file handed over with this id")
    status.add_argument("--file", help="only files of this name (a shell pattern: 'nightly-*')")
    status.add_argument("--active", action="store_true", help="only files without a result yet")
    status.add_argument("--limit", type=positive_int, help="at most this many files")
    status.add_argument("--wide", action="store_true", help="one line per file, nothing cut")

    submit = sub.add_parser("submit", help="hand a file over to the daemon; --wait for its result")
    submit.add_argument("file", type=Path)
    submit.add_argument("--route", required=True, help="the inbox sub-directory, e.g. leads")
    submit.add_argument("--config", help="TOML file (as for run): where data_dir is")
    submit.add_argument("--id", help="the id to give the file (default: a fresh one)")
    submit.add_argument("--wait", action="store_true", help="block until the result exists")
    submit.add_argument(
        "--timeout",
        type=duration,
        help="with --wait: give up after this long (90, 90s, 15m, 2h, 1d); exit 4",
    )
    submit.add_argument("--json", action="store_true", help="print the result JSON")
    submit.add_argument(
        "--max-failed-rows",
        type=natural_int,
        help="exit 1 when the file is complete but more rows than this failed",
    )
    submit.add_argument(
        "--once",
        action="store_true",
        help="no daemon runs: run one here (as run --once) until the file has its result",
    )
    submit.add_argument(
        "--simulate", action="store_true", help="with --once: against the bundled simulator"
    )
    submit.add_argument(
        "--poll", type=duration, default=client.POLL_SECONDS, help=argparse.SUPPRESS
    )

    check = sub.add_parser(
        "check", help="validate the configuration and the data directory; exit as run --once"
    )
    check.add_argument("--config", help="TOML file (as for run)")
    check.add_argument(
        "--credentials", action="store_true", help="also get a Marketo token with them"
    )

    split = sub.add_parser("split", help="run only the splitter")
    split.add_argument("file", type=Path)
    split.add_argument("--out", type=Path, required=True, help="directory for the chunk files")
    split.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help=f"every chunk is smaller than this (256 to {MAX_FILE_BYTES}, "
        f"default {DEFAULT_MAX_CHUNK_BYTES})",
    )
    split.add_argument("--format", choices=FORMATS, default=None, help="default: from extension")
    split.add_argument(
        "--force", action="store_true", help="clear the chunk files already in --out first"
    )

    sim = sub.add_parser("simulator", help="the bundled Marketo Bulk Import simulator")
    if "simulator" in argv:
        # Only this command needs the simulator (and aiohttp's server) imported.
        from orchestrator import simulator

        simulator.add_arguments(sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except DataDirInUse as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except InputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except OrchestratorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except BrokenPipeError:
        # The reader went away (`status --json | head`): no traceback, and none at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # A file or directory named on the command line that cannot be used.
        if not exc.filename:
            raise
        print(f"{PROG}: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return 130


def positive_int(text: str) -> int:
    value = natural_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def natural_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}")
    return int(text)


DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """90, 90s, 1.5m, 2h, 1d as seconds (greater than 0)."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in DURATION_UNITS and value[-1:] else ""
    try:
        seconds = float(value[: len(value) - len(unit)]) * DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (90, 90s, 15m, 2h, 1d)"
        ) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return seconds


def load(args: argparse.Namespace, *, require_credentials: bool) -> Settings:
    """The settings for a command; a warning line on stderr for a misspelt variable."""
    path = resolve_config_path(args.config, os.environ)
    settings = load_settings(path, os.environ, require_credentials=require_credentials)
    for warning in env_warnings(os.environ):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    settings = load(args, require_credentials=not args.simulate)
    logs.configure(settings.logging.level, settings.logging.format)
    return run_to_end(settings, once=args.once, simulate=args.simulate)


def run_to_end(
    settings: Settings, *, once: bool, simulate: bool, lock: DataDirLock | None = None
) -> int:
    """The daemon in this process until it stops; its exit code. `lock`: data_dir's
    lock when the caller took it already (submit --once), else it is taken here."""
    try:
        return asyncio.run(run_daemon(settings, once=once, simulate=simulate, lock=lock))
    except (ConfigError, DataDirInUse):
        raise  # one line naming the key or the data directory, exit 2 (main)
    except (OrchestratorError, OSError, BaseExceptionGroup) as exc:
        from orchestrator.daemon import first_cause

        cause = first_cause(exc)
        if cause is None:
            raise
        log.error("daemon_failed", error=str(cause))
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return ExitCode.FAILED


async def run_daemon(
    settings: Settings, *, once: bool, simulate: bool, lock: DataDirLock | None = None
) -> int:
    """The daemon to its end; with `simulate`, beside a simulator it is pointed at.

    data_dir's lock is taken first (unless the caller holds it), before the simulator
    loads its state from there."""
    from orchestrator.daemon import Daemon

    async with contextlib.AsyncExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(lock_data_dir(settings))
        if simulate:
            settings = await start_simulator(stack, settings)
        return await Daemon(settings, once=once, lock=lock).run()


@contextlib.contextmanager
def lock_data_dir(settings: Settings) -> Iterator[DataDirLock]:
    """data_dir (created if need be) locked for a daemon in this process; DataDirInUse if
    another one runs there. Only commands that run a daemon take it (run, submit --once)."""
    from orchestrator.spool import make_dir

    make_dir(settings.data_dir)
    with dirlock.held(settings.layout) as lock:
        yield lock


async def start_simulator(stack: contextlib.AsyncExitStack, settings: Settings) -> Settings:
    """Start the bundled simulator on a free loopback port; the settings that point at it.

    Its state (jobs, batch ids, records) lives in data_dir/simulator.json, so a restart
    of `run --simulate` resumes against the same simulated subscription."""
    from orchestrator.simulator import Simulator

    sim = Simulator(state_path=settings.layout.simulator_state)
    base_url = await sim.start("127.0.0.1", 0)
    stack.push_async_callback(sim.stop)
    simulated = replace(
        with_marketo(
            settings,
            base_url=base_url,
            identity_url="",
            client_id="simulate",
            client_secret=Secret("simulate-secret"),
        ),
        routes=settings.routes or DEMO_ROUTES,
    )
    log.warning(
        "SIMULATION MODE: nothing goes to a real Marketo; rows land in the bundled simulator",
        simulator=base_url,
        routes=[r.dir for r in simulated.routes],
    )
    return simulated


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import status

    settings = load(args, require_credentials=False)
    query = status.Query(ticket=args.id, name=args.file, active=args.active, limit=args.limit)
    db = settings.layout.state_db
    if not db.is_file():
        raise UsageError(
            "data_dir",
            f"no state store at {db}: no daemon has run with data_dir {settings.data_dir} "
            "(is it the right one? --config, ORCHESTRATOR_DATA_DIR)",
        )
    snapshot = asyncio.run(status.read_snapshot(db, query))
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(status.format_status_table(snapshot, wide=args.wide))
    filtered = args.id is not None or args.file is not None or args.active
    if filtered and not snapshot["files"]:
        print(f"{PROG}: no file matches", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.COMPLETE


def cmd_split(args: argparse.Namespace) -> int:
    from orchestrator import splitter

    source, out = args.file, args.out
    client.check_source(source)
    fmt = format_of(source.name, args.format or "")
    max_bytes = DEFAULT_MAX_CHUNK_BYTES if args.max_bytes is None else args.max_bytes
    if not MIN_CHUNK_BYTES <= max_bytes <= MAX_FILE_BYTES:
        raise UsageError(
            "--max-bytes",
            f"must be between {MIN_CHUNK_BYTES} and {MAX_FILE_BYTES} (Marketo refuses import "
            f"files of 10 MB or more), not {max_bytes}",
        )
    prepare_out_dir(out, force=args.force)
    for event in splitter.split_file(source, out, max_bytes=max_bytes, fmt=fmt):
        if isinstance(event, splitter.Chunk):
            print(f"{event.path.name}\trows={event.rows}\tbytes={event.bytes}")
        elif isinstance(event, splitter.Rejected):
            print(f"rejected\tline={event.line}\tbytes={event.size}\t{event.reason}")
        else:
            print(f"total\trows={event.rows}\tchunks={event.chunks}\trejected={event.rejected}")
    return ExitCode.COMPLETE


CHUNK_NAME = re.compile(r"chunk-\d{5}\.(csv|tsv|ssv)(\.tmp)?")


def prepare_out_dir(out: Path, *, force: bool) -> None:
    """An empty directory for `split`: created, or emptied of old chunks with --force.

    Old chunks beside new ones would be uploaded twice by `chunks/*`; anything that
    is not a chunk file is never deleted."""
    if out.exists() and not out.is_dir():
        raise UsageError("--out", f"{out} exists and is not a directory")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        others = [name for name in present if not CHUNK_NAME.fullmatch(name)]
        if others:
            raise UsageError(
                "--out",
                f"{out} holds files that are not chunks ({others[0]}, ...): choose "
                "an empty directory",
            )
        if present and not force:
            raise UsageError(
                "--out",
                f"{out} already holds {len(present)} chunk file(s): choose an empty "
                "directory, or --force to delete them first",
            )
        for name in present:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.simulate and not args.once:
        raise UsageError("--simulate", "applies to submit --once only")
    settings = load(args, require_credentials=args.once and not args.simulate)
    routes = settings.routes or (DEMO_ROUTES if args.simulate else ())
    known = [r.dir for r in routes]
    if known and args.route not in known:
        raise UsageError(
            "--route", f"{args.route!r} is not a configured route ({', '.join(known)})"
        )
    if not args.once:
        return hand_over(args, settings, None)
    # A daemon of its own: data_dir's lock first, so that beside a running daemon
    # nothing is handed over before the refusal (exit 2 naming the holder).
    with lock_data_dir(settings) as lock:
        make_route_inbox(settings, args.route)
        return hand_over(args, settings, lock)


def hand_over(args: argparse.Namespace, settings: Settings, lock: DataDirLock | None) -> int:
    """submit's hand-over and, with --wait or --once (holding `lock`), its answer."""
    # From the hand-over on, SIGTERM or SIGINT must end in "interrupted" (exit 4), not in
    # death by signal before the wait's own handlers are in place: note it until then.
    signals = deferred_signals()
    handle = client.submit(args.file, args.route, data_dir=settings.data_dir, id=args.id)
    hold("handed_over")
    if not (args.wait or args.once):
        print(handle.id)
        return ExitCode.COMPLETE
    if signals:
        print(f"{PROG}: interrupted: {handle.where(None, None)}", file=sys.stderr)
        return ExitCode.OUTSTANDING
    if sys.stderr.isatty():
        where = handle.layout.inbox_route(handle.route) / handle.inbox_name
        print(f"{PROG}: handed over {handle.name} as id {handle.id} ({where})", file=sys.stderr)
    if args.once:
        # Log lines go to stderr: stdout is for the result.
        logs.configure(settings.logging.level, settings.logging.format, stream=sys.stderr)
        code = run_to_end(settings, once=True, simulate=args.simulate, lock=lock)
        if code in (ExitCode.CREDENTIALS, ExitCode.OUTSTANDING):
            return code
        outcome = asyncio.run(wait_for_result(handle, 0.0, args.poll))
    else:
        outcome = asyncio.run(wait_for_result(handle, args.timeout, args.poll, signals))
    if isinstance(outcome, int):
        return outcome
    print(json.dumps(outcome.document, indent=2) if args.json else outcome.summary())
    return outcome.exit_code(args.max_failed_rows)


def make_route_inbox(settings: Settings, route: str) -> None:
    path = settings.layout.inbox_route(route)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError("data_dir", f"cannot create {path}: {exc.strerror or exc}") from None


def deferred_signals() -> list[int]:
    """SIGINT and SIGTERM from now on are noted in the returned list instead of ending the
    process, until an event loop's handlers replace these."""
    noted: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: noted.append(number))
    return noted


async def wait_for_result(
    handle: client.Handle,
    timeout: float | None,  # noqa: ASYNC109 (TimedOut says where the file waits)
    poll: float,
    noted: list[int] | None = None,
) -> client.Result | int:
    """The file's result, or exit code 4 (timed out or interrupted, with where it waits).

    On a terminal, a live line on stderr shows what the file is doing meanwhile."""
    live = logs.LiveLine(sys.stderr) if sys.stderr.isatty() and timeout != 0 else None
    meter = RateMeter()
    last: list[dict[str, Any] | None] = [None]

    def show(entry: dict[str, Any] | None) -> None:
        last[0] = entry
        if live is not None:
            live.show(submit_progress(handle, entry, meter))

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None  # asyncio.run runs us as a task
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    if noted:  # a signal came before these handlers: as if it came now
        task.cancel()
    try:
        return await handle.result(timeout, poll=poll, on_progress=show)
    except client.TimedOut as exc:
        message = str(exc)
    except asyncio.CancelledError:
        message = "interrupted: " + handle.where(last[0], None)
    finally:
        if live is not None:
            live.close()
    print(f"{PROG}: {message}", file=sys.stderr)
    return ExitCode.OUTSTANDING


class RateMeter:
    """Rows per second since the first rows were seen."""

    def __init__(self) -> None:
        self.start: tuple[float, int] | None = None

    def rate(self, rows: int) -> float | None:
        now = time.monotonic()
        if self.start is None or rows < self.start[1]:
            self.start = (now, rows)
            return None
        began, first = self.start
        return (rows - first) / (now - began) if now > began and rows > first else None


def submit_progress(handle: client.Handle, entry: dict[str, Any] | None, meter: RateMeter) -> str:
    """One line (the name is on the line above): state, chunks, rows, rate, what it waits for."""
    from orchestrator.status import WAITING_FOR

    if entry is None:
        return f"unclaimed  waiting for: {WAITING_FOR['inbox']}"
    total = entry["chunks_total"]
    rows_total = "?" if entry["rows"] is None else entry["rows"]
    rate = meter.rate(entry["rows_processed"])
    line = (
        f"{entry['state']}  chunks {entry['chunks_done']}/{'?' if total is None else total}"
        f"  rows {entry['rows_processed']}/{rows_total}"
    )
    if rate:
        line += f"  {rate:,.0f}/s"
    waiting = WAITING_FOR.get(entry["state"])
    return line + (f"  waiting for: {waiting}" if waiting else "")


def cmd_check(args: argparse.Namespace) -> int:
    """Configuration, data directory and, with --credentials, a token: each an `ok` line."""
    settings = load(args, require_credentials=args.credentials)
    config = resolve_config_path(args.config, os.environ)
    print(f"configuration: ok ({config or 'built-in defaults'})")
    problems = data_dir_problems(settings)
    if problems:
        for problem in problems:
            print(f"{PROG}: data_dir: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    routes = ", ".join(r.dir for r in settings.routes) or "none configured"
    print(f"data_dir: ok ({settings.data_dir}; routes: {routes})")
    if not args.credentials:
        return ExitCode.COMPLETE
    logs.configure("warning", settings.logging.format, stream=sys.stderr)  # the client's chatter
    return asyncio.run(check_credentials(settings))


def data_dir_problems(settings: Settings) -> list[str]:
    """What would stop a daemon from using data_dir (without creating or changing anything)."""
    layout = settings.layout
    root = settings.data_dir
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{existing} exists and is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{existing} is not writable by this user (uid {os.getuid()})"]
    problems = []
    dirs = [layout.inbox, layout.work, layout.incoming, layout.chunks]
    for route in settings.routes:
        dirs += layout.route_dirs(route.dir)
    for path in dirs:
        if path.exists() and not path.is_dir():
            problems.append(f"{path} exists and is not a directory")
        elif path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{path} is not writable by this user (uid {os.getuid()})")
    db = layout.state_db
    if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
        problems.append(f"{db} is not a readable and writable file")
    both = layout.inbox.is_dir() and layout.work.is_dir()
    if both and os.stat(layout.inbox).st_dev != os.stat(layout.work).st_dev:
        problems.append(
            f"{layout.inbox} and {layout.work} are on different filesystems (claims are renames)"
        )
    return problems


async def check_credentials(settings: Settings) -> int:
    from orchestrator.errors import CredentialsError, MarketoError
    from orchestrator.marketo import MarketoClient

    async with MarketoClient(settings, max_attempts=2) as marketo:
        try:
            await marketo.ensure_token()
        except CredentialsError as exc:
            print(f"{PROG}: credentials: {exc}", file=sys.stderr)
            return ExitCode.CREDENTIALS
        except MarketoError as exc:
            print(f"{PROG}: credentials: Marketo could not be reached: {exc}", file=sys.stderr)
            return ExitCode.FAILED
    print(f"credentials: ok (a token from {identity_url(settings.marketo)})")
    return ExitCode.COMPLETE


def cmd_simulator(args: argparse.Namespace) -> int:
    from orchestrator import simulator

    logs.configure("info", "auto")
    config = simulator.config_from_args(args)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await simulator.serve(config, args.host, args.port, stop)

    asyncio.run(serve())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "status": cmd_status,
    "submit": cmd_submit,
    "check": cmd_check,
    "split": cmd_split,
    "simulator": cmd_simulator,
}
