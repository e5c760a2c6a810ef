"""The standalone simulator: `marketo-orchestrator simulator`'s flags and its serving loop.

`cli.py` adds the flags to its subcommand, turns the parsed flags into knobs and
runs `serve` until a signal sets its stop event. Every flag left out keeps the
knob's default, a fresh subscription's; the defaults in the help are read from
`SimulatorConfig`, so they are written once.
"""

from __future__ import annotations

import argparse
import asyncio

import structlog

from orchestrator import constants
from orchestrator.errors import ConfigError
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.server import Simulator

log = structlog.get_logger(__name__)

# flag, knob, type, help (the knob's default is added)
CLI_KNOBS = (
    ("--client-id", "client_id", str, "accept only this client id"),
    ("--client-secret", "client_secret", str, "accept only this client secret"),
    ("--token-ttl", "token_ttl", float, "access token life in seconds"),
    ("--rows-per-second", "rows_per_second", float, "import speed"),
    ("--job-overhead", "job_overhead", float, "seconds every job takes on top"),
    ("--rate-limit", "rate_limit", int, f"calls per {constants.API_WINDOW_SECONDS:g} s window"),
    ("--concurrency", "concurrency", int, "calls in flight"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The standalone simulator's flags; every knob defaults to a fresh subscription."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8090, help="port to listen on (default 8090)")
    defaults = SimulatorConfig()
    for flag, dest, kind, text in CLI_KNOBS:
        default = getattr(defaults, dest)
        shown = "any" if default is None else f"{default:g}"
        help_text = f"{text} (default {shown})"
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Knobs from parsed flags; a bad value raises ConfigError naming the flag."""
    config = SimulatorConfig()
    for flag, dest, _kind, _text in CLI_KNOBS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            config = config.with_knobs(**{dest: value})
        except ValueError as exc:
            raise ConfigError(flag, str(exc)) from None
    return config


async def serve(
    config: SimulatorConfig, host: str, port: int, stop: asyncio.Event | None = None
) -> None:
    """Run a simulator until `stop` is set (or the task is cancelled)."""
    simulator = Simulator(config)
    url = await simulator.start(host, port)
    try:
        log.info("marketo simulator listening; nothing goes to a real Marketo", url=url)
        await (stop if stop is not None else asyncio.Event()).wait()
    finally:
        await simulator.stop()
