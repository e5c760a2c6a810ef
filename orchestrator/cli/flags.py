"""What every command shares: the program's name, its argument parser, the flags
common to the commands that read the settings, the flag types, and the settings
those flags (and the environment) give.

A usage error is one line naming the flag, exit 2 (`Parser`); `--help` keeps the
line breaks of its examples and exit codes (`cli.usage`). The common flags are
added in one place (`add_common_flags`), so a flag every command takes is added there.
A flag that names a setting (`--data-dir`, `run --log-level`) wins over the file
and the environment (`SETTING_FLAGS`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Final, NoReturn

from orchestrator.config import Settings, env_warnings, load_settings, resolve_config_path
from orchestrator.models import ExitCode

PROG = "marketo-orchestrator"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples and exit codes keep their lines as written; a description of one
    paragraph is wrapped to the terminal like the flags' help."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, exit 2, and the text
    below the flags (examples, exit codes) is printed as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{PROG}: usage error: {message} (see {self.prog} --help)\n")


if TYPE_CHECKING:
    # What `add_subparsers` returns: each command family adds its commands to it.
    Subcommands = argparse._SubParsersAction[Parser]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that reads the settings (run, status, submit, check)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML file (default: $ORCHESTRATOR_CONFIG, then ./config/orchestrator.toml)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="PATH",
        type=non_empty,
        help="the data directory, over data_dir in the file and $ORCHESTRATOR_DATA_DIR",
    )


# A flag's dest -> the setting it gives ("data_dir" or "section.key") and how errors name it.
SETTING_FLAGS: Final = {
    "data_dir": ("data_dir", "--data-dir"),
    "log_level": ("logging.level", "--log-level"),
    "log_format": ("logging.format", "--log-format"),
}


def load(args: argparse.Namespace, *, require_credentials: bool) -> Settings:
    """The settings for a command; a warning line on stderr for a misspelt variable."""
    path = resolve_config_path(args.config, os.environ)
    flags = {
        key: (flag, value)
        for dest, (key, flag) in SETTING_FLAGS.items()
        if (value := getattr(args, dest, None)) is not None
    }
    settings = load_settings(path, os.environ, require_credentials=require_credentials, flags=flags)
    for warning in env_warnings(os.environ):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return settings


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


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
