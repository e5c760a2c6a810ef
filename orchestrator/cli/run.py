"""`run` and `simulator`: a daemon, or the bundled simulator alone, in this process.

The composition root proper. A command that runs a daemon (`run`, `submit --once`)
takes data_dir's lock here (`lock_data_dir`, the only place it is taken) and hands
it to the `Daemon` it builds; `asyncio.run` is called here. For `--simulate` the
bundled simulator is started beside the daemon and the settings point at it: this
is the only product module that imports `orchestrator.simulator` (its server and
aiohttp's with it are imported only when a command needs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from orchestrator import dirlock, logs
from orchestrator.cli import usage
from orchestrator.cli.flags import PROG, Parser, load
from orchestrator.config import Route, Secret, Settings, with_marketo
from orchestrator.dirlock import DataDirLock
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.models import ExitCode, ObjectType

if TYPE_CHECKING:
    from orchestrator.cli.flags import Subcommands

log = structlog.get_logger(__name__)

# What logging.format takes (config.checks): --log-format offers the same.
LOG_FORMATS = ("auto", "json", "console")

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


def add_run(sub: Subcommands) -> Parser:
    run = sub.add_parser(
        "run",
        help="run the daemon until SIGTERM/SIGINT",
        description="Run the daemon: claim each file dropped into inbox/<route>/, import it, "
        "write its result; until SIGTERM/SIGINT, or with --once until the inbox is done.",
        epilog=usage.RUN,
    )
    run.add_argument(
        "--once", action="store_true", help="claim what is in the inbox, finish it, exit"
    )
    run.add_argument(
        "--simulate", action="store_true", help="use the bundled simulator; nothing goes to Marketo"
    )
    run.add_argument(
        "--log-level",
        choices=tuple(logs.LEVELS),
        help="over logging.level and $ORCHESTRATOR_LOGGING_LEVEL (default info)",
    )
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="over logging.format and $ORCHESTRATOR_LOGGING_FORMAT "
        "(default auto: console on a terminal, JSON lines otherwise)",
    )
    return run


def add_simulator(sub: Subcommands, argv: Sequence[str]) -> Parser:
    sim = sub.add_parser(
        "simulator",
        help="the bundled Marketo Bulk Import simulator",
        description="A stand-in for a Marketo subscription's Bulk Import API, on HOST:PORT. "
        "It keeps its state in memory and reads no configuration and no data directory "
        "(run --simulate starts one of its own that keeps its state in data_dir).",
        epilog=usage.SIMULATOR,
    )
    if "simulator" in argv:
        # Only this command needs the simulator (and aiohttp's server) imported.
        from orchestrator import simulator

        simulator.add_arguments(sim)
    return sim


def cmd_run(args: argparse.Namespace) -> int:
    settings = load(args, require_credentials=not args.simulate)
    logs.configure(settings.logging.level, settings.logging.format)
    with lock_data_dir(settings) as lock:
        return run_to_end(settings, once=args.once, simulate=args.simulate, lock=lock)


@contextlib.contextmanager
def lock_data_dir(settings: Settings) -> Iterator[DataDirLock]:
    """data_dir (created if need be) locked for a daemon in this process; DataDirInUse if
    another one runs there. Taken before the daemon, or anything it runs beside (the
    simulator loads its state from data_dir), touches data_dir; only commands that run
    a daemon take it (run, submit --once)."""
    from orchestrator.spool import make_dir

    make_dir(settings.data_dir)
    with dirlock.held(settings.layout) as lock:
        yield lock


def run_to_end(settings: Settings, *, once: bool, simulate: bool, lock: DataDirLock) -> int:
    """The daemon in this process, holding data_dir's `lock`, until it stops; its exit code."""
    try:
        return asyncio.run(run_daemon(settings, once=once, simulate=simulate, lock=lock))
    except ConfigError:
        raise  # one line naming the key, exit 2 (main)
    except (OrchestratorError, OSError, BaseExceptionGroup) as exc:
        from orchestrator.daemon import first_cause

        cause = first_cause(exc)
        if cause is None:
            raise
        log.error("daemon_failed", error=str(cause))
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return ExitCode.FAILED


async def run_daemon(settings: Settings, *, once: bool, simulate: bool, lock: DataDirLock) -> int:
    """The daemon to its end; with `simulate`, beside a simulator it is pointed at."""
    from orchestrator.daemon import Daemon

    async with contextlib.AsyncExitStack() as stack:
        if simulate:
            settings = await start_simulator(stack, settings)
        return await Daemon(settings, once=once, lock=lock).run()


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

    try:
        asyncio.run(serve())
    except OSError as exc:  # the address is taken or not ours: one line, as run says it
        print(f"{PROG}: error: {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.COMPLETE
