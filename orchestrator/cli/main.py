"""The `marketo-orchestrator` command: the parser, and from a command's name to its
function and from its errors to an exit code.

The commands live by family: `run` (run, simulator), `submit`, `inspect` (status,
check, split). User mistakes (a bad flag, a bad config key, a missing file, a
closed pipe) end with one line on stderr, never a traceback. Exit codes
(`ExitCode`) are those of SPEC section 2: 0 complete, 1 a file failed, 2
configuration or usage, 3 credentials refused, 4 timed out or interrupted with
work outstanding. Logging is configured by the command, once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from orchestrator import __version__
from orchestrator.cli import inspect, run, submit, usage
from orchestrator.cli.flags import PROG, Parser, add_common_flags
from orchestrator.errors import (
    ConfigError,
    DataDirInUse,
    InputError,
    OrchestratorError,
    UsageError,
)
from orchestrator.models import ExitCode

EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run.cmd_run,
    "status": inspect.cmd_status,
    "submit": submit.cmd_submit,
    "check": inspect.cmd_check,
    "split": inspect.cmd_split,
    "simulator": run.cmd_simulator,
}


def build_parser(argv: Sequence[str] = ()) -> Parser:
    parser = Parser(
        prog=PROG,
        description="Load delimited files into Marketo's Bulk Import API.",
        epilog=usage.MAIN,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=Parser,
        title="commands",
        metavar="COMMAND",
        help=f"one of these; {PROG} COMMAND --help for its flags",
    )
    # Each command's parser (in the order --help lists them), and whether the command
    # reads the settings: those take the common flags.
    for command, reads_settings in (
        (run.add_run(sub), True),
        (inspect.add_status(sub), True),
        (submit.add_submit(sub), True),
        (inspect.add_check(sub), True),
        (inspect.add_split(sub), False),
        (run.add_simulator(sub, argv), False),
    ):
        if reads_settings:
            add_common_flags(command)
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
