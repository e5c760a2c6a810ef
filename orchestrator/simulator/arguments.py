"""The standalone simulator: `marketo-orchestrator simulator`'s flags and its serving loop.

`cli.py` adds the flags to its subcommand, turns the parsed flags into knobs and
runs `serve` until a signal sets its stop event. Every knob of `SimulatorConfig`
has a flag of its own, named after it (`fault_500` is `--fault-500`), with its
meaning from `KNOB_HELP` and its default read from `SimulatorConfig`, so each is
written once; the help ends with the behaviours the simulator assumes where
Marketo's documentation is silent (the list in `simulator.server`). Every flag
left out keeps the knob's default, a fresh subscription's.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
from dataclasses import fields
from typing import Any

import structlog

from orchestrator.errors import ConfigError
from orchestrator.simulator import handlers, records, server
from orchestrator.simulator.knobs import KNOB_HELP, SimulatorConfig
from orchestrator.simulator.server import Simulator

log = structlog.get_logger(__name__)

# The modules whose docstrings list what the simulator assumes where Marketo's documentation
# is silent: a paragraph ending in ":" that says "silent" or "assumption", then its bullets.
CHOICE_SOURCES = (server, handlers, records)


def flag_of(knob: str) -> str:
    return "--" + knob.replace("_", "-")


def knob_type(annotation: str) -> type[Any]:
    """The type a knob's flag parses ("float", "int | None" ...)."""
    base = annotation.split(" |")[0]
    return {"float": float, "int": int, "bool": bool}.get(base, str)


def choices_text() -> str:
    """What the simulator assumes, as its modules' docstrings list it (the help's epilog)."""
    kept: list[str] = []
    for module in CHOICE_SOURCES:
        listing = False
        for paragraph in inspect.cleandoc(module.__doc__ or "").split("\n\n"):
            if paragraph.rstrip().endswith(":") and (
                "silent" in paragraph or "assumption" in paragraph
            ):
                listing = True
                kept.append(paragraph)
            elif listing and paragraph.startswith("- "):
                kept.append(paragraph)
            else:
                listing = False
    return "\n\n".join(kept)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The standalone simulator's flags, one per knob; every knob defaults to a fresh
    subscription."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the lists' lines
    parser.usage = "%(prog)s [--host HOST] [--port PORT] [--KNOB VALUE ...]"
    # After whatever epilog the command has (examples, exit codes): the choices.
    parser.epilog = "\n\n".join(text for text in (parser.epilog, choices_text()) if text)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8090, help="port to listen on (default 8090)")
    defaults = SimulatorConfig()
    for f in fields(SimulatorConfig):
        kind = knob_type(str(f.type))
        default = getattr(defaults, f.name)
        text = KNOB_HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            parser.add_argument(
                flag_of(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default {'on' if default else 'off'})".replace("%", "%%"),
            )
            continue
        if default is None or default == "":
            shown = ""
        elif kind is str:
            shown = f" (default {default!r})"
        else:
            shown = f" (default {default:g})" if kind is float else f" (default {default})"
        help_text = f"{text}{shown}".replace("%", "%%")  # argparse %-formats help
        parser.add_argument(flag_of(f.name), dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Knobs from parsed flags; a bad value raises ConfigError naming the flag."""
    config = SimulatorConfig()
    for f in fields(SimulatorConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        try:
            config = config.with_knobs(**{f.name: value})
        except ValueError as exc:
            raise ConfigError(flag_of(f.name), str(exc)) from None
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
