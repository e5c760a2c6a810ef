"""`submit`: hand a file over to the daemon (`orchestrator.client.submit`), and with
`--wait` follow it to its result; with `--once`, run a daemon here until it has one.

Waiting on a terminal shows the file's progress line (`status.file_line`) on stderr.
From the hand-over on, SIGINT or SIGTERM ends in "interrupted" with where the file
waits (exit 4), never in death by signal: the file is not lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import client, logs
from orchestrator.cli import usage
from orchestrator.cli.flags import PROG, Parser, duration, load, natural_int
from orchestrator.cli.run import DEMO_ROUTES, lock_data_dir, run_to_end
from orchestrator.config import Settings
from orchestrator.crashpoints import hold
from orchestrator.dirlock import DataDirLock
from orchestrator.errors import UsageError
from orchestrator.models import ExitCode
from orchestrator.status import RateMeter, file_line

if TYPE_CHECKING:
    from orchestrator.cli.flags import Subcommands


def add_submit(sub: Subcommands) -> Parser:
    submit = sub.add_parser(
        "submit",
        help="hand a file over to the daemon; --wait for its result",
        description="Hand FILE to the daemon that watches the data directory (linked, or "
        "copied, into inbox/<route>/ whole) and print its id; with --wait, its result.",
        epilog=usage.SUBMIT,
    )
    submit.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="the delimited file to import (csv, tsv or ssv); left where it is, unchanged",
    )
    submit.add_argument(
        "--route", required=True, metavar="R", help="the route: its inbox sub-directory, e.g. leads"
    )
    submit.add_argument("--id", help="the id to give the file (default: a fresh one)")
    submit.add_argument("--wait", action="store_true", help="block until the result exists")
    submit.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="with --wait: give up after this long (90, 90s, 15m, 2h, 1d); exit 4",
    )
    submit.add_argument("--json", action="store_true", help="print the result JSON")
    submit.add_argument(
        "--max-failed-rows",
        type=natural_int,
        metavar="N",
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
    return submit


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
    if lock is not None:  # --once: a daemon of our own, in this process
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
    """The file's result, or exit code 4 (timed out or interrupted, with where it waits),
    or 3 once the daemon records that Marketo refuses it (credentials, 603).

    On a terminal, a live line on stderr shows what the file is doing meanwhile."""
    live = logs.LiveLine(sys.stderr) if sys.stderr.isatty() and timeout != 0 else None
    meter = RateMeter()
    last: list[dict[str, Any] | None] = [None]

    def show(entry: dict[str, Any] | None) -> None:
        last[0] = entry
        if live is not None:
            live.show(file_line(entry, meter))

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None  # asyncio.run runs us as a task
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    if noted:  # a signal came before these handlers: as if it came now
        task.cancel()
    code = ExitCode.OUTSTANDING
    try:
        return await handle.result(timeout, poll=poll, on_progress=show)
    except client.Refused as exc:
        message, code = f"error: {exc}", ExitCode.CREDENTIALS
    except client.TimedOut as exc:
        message = str(exc)
    except asyncio.CancelledError:
        message = "interrupted: " + handle.where(last[0], None)
    finally:
        if live is not None:
            live.close()
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
