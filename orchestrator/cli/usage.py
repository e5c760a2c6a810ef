"""What `--help` says below the flags: examples, and the exit codes (SPEC section 2).

The meaning of each exit code is written once (`EXIT_CODES`); a command lists the
codes it can end with, and says in its own words only where a code means something
narrower for it (`status` exits 1 when a filter matches no file, not because a file
failed). Every example is a command line the real parser accepts: the tests parse
each one.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from typing import Final

from orchestrator.cli.flags import PROG
from orchestrator.models import ExitCode

EXIT_CODES: Final[Mapping[ExitCode, str]] = {
    ExitCode.COMPLETE: "every file complete (rows Marketo refused are in its result, not fatal)",
    ExitCode.FAILED: "a file failed, or an error stopped the command (one line says which)",
    ExitCode.USAGE: "configuration or usage error: one line names the key, variable or flag",
    ExitCode.CREDENTIALS: "Marketo refused the credentials (nothing was claimed after that)",
    ExitCode.OUTSTANDING: "timed out or interrupted with work outstanding: nothing lost, "
    "the next run finishes it",
}


def epilog(
    examples: Iterable[tuple[str, str]],
    codes: Iterable[ExitCode] = tuple(ExitCode),
    meanings: Mapping[ExitCode, str] | None = None,
) -> str:
    """The text below a command's flags: `examples` as (arguments, what it does), then
    the exit `codes` it can end with, in `meanings`' words where given. Kept as written
    (`flags.HelpFormatter`): an example is one line, to copy whole."""
    lines = ["examples:"]
    for arguments, what in examples:
        lines += [f"  # {what}", f"  {PROG} {arguments}"]
    lines += ["", "exit codes:"]
    own = meanings or {}
    for code in codes:
        meaning = own.get(code, EXIT_CODES[code])
        lines += textwrap.wrap(
            meaning, WIDTH, initial_indent=f"  {int(code)}  ", subsequent_indent="     "
        )
    return "\n".join(lines)


WIDTH: Final = 79  # the exit codes' lines, as wide as an 80-column terminal allows


MAIN: Final = epilog(
    [
        ("run --simulate --once --data-dir /tmp/try", "try it: the bundled simulator, no Marketo"),
        ("check --credentials --config orchestrator.toml", "before the first real run"),
        ("submit leads.csv --route leads --wait", "hand a file to the running daemon, wait"),
    ]
)

RUN: Final = epilog(
    [
        ("run --config /etc/orchestrator/orchestrator.toml", "the daemon, until SIGTERM"),
        (
            "run --once --data-dir /srv/batch --log-level debug",
            "what the inbox holds, to its end; every Marketo call in the log",
        ),
    ],
    meanings={ExitCode.COMPLETE: "--once: every file complete; without: stopped by a signal"},
)

STATUS: Final = epilog(
    [
        ("status --active", "files without a result yet"),
        ("status --json --data-dir /srv/orchestrator-data", "the same JSON as GET /jobs"),
    ],
    codes=(ExitCode.COMPLETE, ExitCode.FAILED, ExitCode.USAGE),
    meanings={
        ExitCode.COMPLETE: "the files were listed",
        ExitCode.FAILED: "--id, --file or --active matched no file",
        ExitCode.USAGE: "configuration or usage error, or no state store in the data directory",
    },
)

SUBMIT: Final = epilog(
    [
        (
            "submit leads.csv --route leads --wait --timeout 2h --data-dir /data",
            "hand over to the daemon watching /data; wait for the result, 2 hours at most",
        ),
        (
            "submit leads.csv --route leads --once --simulate",
            "no daemon runs: one here, against the bundled simulator",
        ),
    ],
    meanings={
        ExitCode.COMPLETE: "handed over; with --wait or --once: the file is complete",
        ExitCode.FAILED: "the file failed, or more rows than --max-failed-rows failed",
        ExitCode.CREDENTIALS: "with --once: Marketo refused the credentials",
    },
)

CHECK: Final = epilog(
    [
        ("check", "the configuration and the data directory"),
        ("check --credentials --config orchestrator.toml", "also a token from Marketo"),
    ],
    codes=(ExitCode.COMPLETE, ExitCode.FAILED, ExitCode.USAGE, ExitCode.CREDENTIALS),
    meanings={
        ExitCode.COMPLETE: "everything checked is usable",
        ExitCode.FAILED: "Marketo could not be reached",
        ExitCode.USAGE: "a configuration error, or a data directory a daemon could not use",
    },
)

SPLIT: Final = epilog(
    [("split big.csv --out /tmp/chunks --max-bytes 5000000", "chunks of under 5 MB")],
    codes=(ExitCode.COMPLETE, ExitCode.FAILED, ExitCode.USAGE),
    meanings={
        ExitCode.COMPLETE: "split (lines that cannot be imported are listed as rejected)",
        ExitCode.FAILED: "the file cannot be split (its header, a quote never closed)",
    },
)

SIMULATOR: Final = epilog(
    [("simulator --port 8090 --rows-per-second 500", "a slow subscription on :8090")],
    codes=(ExitCode.COMPLETE, ExitCode.FAILED, ExitCode.USAGE),
    meanings={
        ExitCode.COMPLETE: "stopped by SIGTERM or SIGINT",
        ExitCode.FAILED: "HOST:PORT cannot be listened on (taken, or not this host's)",
        ExitCode.USAGE: "a knob's value is out of range",
    },
)
