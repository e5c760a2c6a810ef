"""The `marketo-orchestrator` command: run, status, split, simulator; the composition root.

It owns `asyncio.run`, derives the settings (for `run --simulate`: pointed at
the bundled simulator, which it starts beside the daemon and nothing else in
the product imports) and builds the daemon.

User mistakes (a bad flag, a bad config key) end with one line on stderr and
exit code 2, never a traceback. Logging is configured here, once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import structlog

from orchestrator import __version__, logs
from orchestrator.config import (
    FORMATS,
    Route,
    Secret,
    Settings,
    load_settings,
    resolve_config_path,
    with_marketo,
)
from orchestrator.errors import ConfigError, InputError, OrchestratorError
from orchestrator.models import ObjectType

log = structlog.get_logger(__name__)

PROG = "marketo-orchestrator"
EXIT_USAGE = 2
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

    split = sub.add_parser("split", help="run only the splitter")
    split.add_argument("file", type=Path)
    split.add_argument("--out", type=Path, required=True, help="directory for the chunk files")
    split.add_argument("--max-bytes", type=int, default=None, help="chunk size limit (bytes)")
    split.add_argument("--format", choices=FORMATS, default=None, help="default: from extension")

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
        if args.command == "run":
            return cmd_run(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "split":
            return cmd_split(args)
        return cmd_simulator(args)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OrchestratorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def load(args: argparse.Namespace, *, require_credentials: bool) -> Settings:
    path = resolve_config_path(args.config, os.environ)
    return load_settings(path, os.environ, require_credentials=require_credentials)


def cmd_run(args: argparse.Namespace) -> int:
    settings = load(args, require_credentials=not args.simulate)
    logs.configure(settings.logging.level, settings.logging.format)
    try:
        return asyncio.run(run_daemon(settings, once=args.once, simulate=args.simulate))
    except ConfigError:
        raise  # one line naming the key, exit 2 (main)
    except (OrchestratorError, OSError, BaseExceptionGroup) as exc:
        from orchestrator.daemon import first_cause

        cause = first_cause(exc)
        if cause is None:
            raise
        log.error("daemon_failed", error=str(cause))
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return 1


async def run_daemon(settings: Settings, *, once: bool, simulate: bool) -> int:
    """The daemon to its end; with `simulate`, beside a simulator it is pointed at."""
    from orchestrator.daemon import Daemon

    async with contextlib.AsyncExitStack() as stack:
        if simulate:
            settings = await start_simulator(stack, settings)
        return await Daemon(settings, once=once).run()


async def start_simulator(stack: contextlib.AsyncExitStack, settings: Settings) -> Settings:
    """Start the bundled simulator on a free loopback port; the settings that point at it."""
    from orchestrator.simulator import Simulator

    sim = Simulator()
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
    snapshot = asyncio.run(status.read_snapshot(settings.layout.state_db))
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(status.format_status_table(snapshot))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from orchestrator import splitter
    from orchestrator.constants import DEFAULT_MAX_CHUNK_BYTES

    fmt = args.format or Route(dir="-", object=ObjectType.LEADS).format_for(args.file.name)
    max_bytes = args.max_bytes or DEFAULT_MAX_CHUNK_BYTES
    if max_bytes < 2:
        raise ConfigError("--max-bytes", "must be a positive number of bytes")
    args.out.mkdir(parents=True, exist_ok=True)
    for event in splitter.split_file(args.file, args.out, max_bytes=max_bytes, fmt=fmt):
        if isinstance(event, splitter.Chunk):
            print(f"{event.path.name}\trows={event.rows}\tbytes={event.bytes}")
        elif isinstance(event, splitter.Rejected):
            print(f"rejected\tline={event.line}\tbytes={event.size}\t{event.reason}")
        else:
            print(f"total\trows={event.rows}\tchunks={event.chunks}\trejected={event.rejected}")
    return 0


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
