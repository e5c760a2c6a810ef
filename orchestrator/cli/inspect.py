"""`status`, `check` and `split`: the commands that look at things and change nothing
a daemon owns. None takes data_dir's lock: each works beside a running daemon.

- `status`: the snapshot of the state store, as a table or as JSON (`GET /jobs`).
- `check`: the configuration (Marketo's base_url and client_id are required), the
  data directory (`data_dir_problems`: what would stop a daemon there, found without
  creating anything), with --credentials a token from Marketo and the API role's
  permission to import each route's object, and with --file a file's header checked
  against the route's object as Marketo describes it (the daemon's own check before
  a file's first job, `orchestrator.catalogue`).
- `split`: the splitter alone, into a directory of chunk files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import client, logs
from orchestrator.cli import usage
from orchestrator.cli.flags import PROG, Parser, load, positive_int
from orchestrator.config import (
    MIN_CHUNK_BYTES,
    Route,
    Settings,
    chunk_bytes_problem,
    identity_url,
    resolve_config_path,
)
from orchestrator.constants import DEFAULT_MAX_CHUNK_BYTES, MAX_CHUNK_BYTES_CAP
from orchestrator.delimited import FORMATS, format_of
from orchestrator.errors import ConfigError, UsageError
from orchestrator.models import ExitCode

if TYPE_CHECKING:
    from orchestrator.cli.flags import Subcommands
    from orchestrator.marketo import MarketoClient


def add_status(sub: Subcommands) -> Parser:
    status = sub.add_parser(
        "status",
        help="files and chunks from the state store",
        description="Files and their chunks from the state store in the data directory: "
        "state, chunks done, rows, batch ids. Works while the daemon runs.",
        epilog=usage.STATUS,
    )
    status.add_argument("--json", action="store_true", help="the same JSON as GET /jobs")
    status.add_argument("--id", help="only the file handed over with this id")
    status.add_argument(
        "--file",
        metavar="PATTERN",
        help="only files of this name (a shell pattern: 'nightly-*')",
    )
    status.add_argument("--active", action="store_true", help="only files without a result yet")
    status.add_argument("--limit", type=positive_int, metavar="N", help="at most this many files")
    status.add_argument("--wide", action="store_true", help="one line per file, nothing cut")
    return status


def add_check(sub: Subcommands) -> Parser:
    check = sub.add_parser(
        "check",
        help="validate the configuration and the data directory; --credentials: a token too",
        description="Validate the configuration and the data directory (creating nothing); "
        "with --credentials, also get a token from Marketo with them.",
        epilog=usage.CHECK,
    )
    check.add_argument(
        "--credentials",
        action="store_true",
        help="also get a Marketo token with them, and confirm the API role may import each "
        "route's object (inferred: Marketo has no call that lists a role's permissions, so "
        "one status call per object type, of a batch id that cannot exist, tells: 603 means "
        "no permission, any other answer that the role may import); exit 3 naming the route",
    )
    check.add_argument(
        "--file",
        type=Path,
        help="also check this file's header against --route's object as Marketo describes "
        "it: exit 1 naming each missing key column and each column Marketo does not know",
    )
    check.add_argument("--route", help="the route (inbox sub-directory) --file is meant for")
    return check


def add_split(sub: Subcommands) -> Parser:
    split = sub.add_parser(
        "split",
        help="run only the splitter",
        description="Cut FILE into chunk files in --out, each under --max-bytes with the "
        "header repeated, and print one line per chunk. It reads no configuration and no "
        "data directory: it writes only into --out.",
        epilog=usage.SPLIT,
    )
    split.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="the delimited file to cut (csv, tsv or ssv); read, never changed",
    )
    split.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory for the chunk files"
    )
    split.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        metavar="N",
        help=f"every chunk is smaller than this ({MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES_CAP}, "
        f"default {DEFAULT_MAX_CHUNK_BYTES})",
    )
    split.add_argument("--format", choices=FORMATS, default=None, help="default: from extension")
    split.add_argument(
        "--force", action="store_true", help="clear the chunk files already in --out first"
    )
    return split


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import status

    settings = load(args, require_credentials=False)
    query = status.Query(ticket=args.id, name=args.file, active=args.active, limit=args.limit)
    db = settings.layout.state_db
    if not db.is_file():
        raise UsageError(
            "data_dir",
            f"no state store at {db}: no daemon has run with data_dir {settings.data_dir} "
            "(is it the right one? --data-dir, --config, ORCHESTRATOR_DATA_DIR)",
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


def cmd_check(args: argparse.Namespace) -> int:
    """Configuration, data directory, with --credentials a token, with --file a header:
    each an `ok` line."""
    if (args.file is None) != (args.route is None):
        raise UsageError(
            "--file" if args.file is None else "--route", "--file and --route go together"
        )
    settings = load(args, require_credentials=args.credentials or args.file is not None)
    for key in ("base_url", "client_id"):  # a daemon could not start without them
        if not getattr(settings.marketo, key):
            env = "MARKETO_" + key.upper()
            raise ConfigError(f"marketo.{key}", f"is required (set it or {env})")
    route = None if args.route is None else checked_route(settings, args.route, args.file)
    config = resolve_config_path(args.config, os.environ)
    print(f"configuration: ok ({config or 'built-in defaults'})")
    problems = data_dir_problems(settings)
    if problems:
        for problem in problems:
            print(f"{PROG}: data_dir: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    routes = ", ".join(r.dir for r in settings.routes) or "none configured"
    print(f"data_dir: ok ({settings.data_dir}; routes: {routes})")
    if not args.credentials and route is None:
        return ExitCode.COMPLETE
    logs.configure("warning", settings.logging.format, stream=sys.stderr)  # the client's chatter
    code = asyncio.run(check_credentials(settings)) if args.credentials else ExitCode.COMPLETE
    if code != ExitCode.COMPLETE or route is None:
        return code
    return asyncio.run(check_header(settings, route, args.file))


def checked_route(settings: Settings, name: str, file: Path) -> Route:
    """The route --route names, for the readable file --file names."""
    route = settings.route(name)
    if route is None:
        known = ", ".join(r.dir for r in settings.routes) or "none configured"
        raise UsageError("--route", f"no route {name!r} in the configuration (routes: {known})")
    if not file.is_file():
        raise UsageError(
            str(file), "no such file" if not file.exists() else "is not a regular file"
        )
    return route


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


# The batch id whose status `check --credentials` asks for: no job has it. A status
# call needs the same permission as an import (Adobe's OpenAPI) and creates nothing.
PROBE_BATCH_ID = 0


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
        return await check_permissions(marketo, settings)


async def check_permissions(marketo: MarketoClient, settings: Settings) -> int:
    """Whether the API role may import each route's object, one status call per object type.

    An inference: Marketo lists no role's permissions, but answers 603 to a call the
    role may not make before it looks for the batch; so 603 means no permission, and
    any other answer ("not found", most likely) that the role may import."""
    from orchestrator.errors import AccessDeniedError, FatalError, MarketoError
    from orchestrator.marketo import permission_of

    first: dict[str, Route] = {}
    for route in settings.routes:
        first.setdefault(route.object, route)
    granted, missing = [], []
    for object_type, route in first.items():
        permission = permission_of(route.object)
        names = ", ".join(r.dir for r in settings.routes if r.object == object_type)
        try:
            await marketo.status(route, PROBE_BATCH_ID)
        except AccessDeniedError as exc:
            missing.append(
                f"route {names} ({object_type}): the API role lacks {permission} "
                f"(Marketo answered {exc.code} {exc.message!r}; or an IP allow-list "
                "refuses this address)"
            )
            continue
        except FatalError:
            pass  # past the permission check: the batch is not found, as it cannot be
        except MarketoError as exc:
            print(f"{PROG}: permissions: Marketo could not be reached: {exc}", file=sys.stderr)
            return ExitCode.FAILED
        granted.append(f"{names}: {permission}")
    for problem in missing:
        print(f"{PROG}: permissions: {problem}", file=sys.stderr)
    if missing:
        return ExitCode.CREDENTIALS
    shown = "; ".join(granted) or "no routes configured"
    print(f"permissions: ok ({shown}; inferred from one status call per object type)")
    return ExitCode.COMPLETE


async def check_header(settings: Settings, route: Route, file: Path) -> int:
    """The file's header against the route's object: 0 when it can be imported (columns
    Marketo does not know are warned of), 1 naming each problem, 3 refused credentials."""
    from orchestrator.catalogue import Catalogue, object_label, read_header
    from orchestrator.errors import CredentialsError, MarketoError
    from orchestrator.marketo import MarketoClient

    columns = await asyncio.to_thread(read_header, file, route.format_for(file.name))
    async with MarketoClient(settings, max_attempts=2) as marketo:
        try:
            verdict = await Catalogue(marketo).check(route, columns)
        except CredentialsError as exc:
            print(f"{PROG}: credentials: {exc}", file=sys.stderr)
            return ExitCode.CREDENTIALS
        except MarketoError as exc:
            print(
                f"{PROG}: header: Marketo could not describe {object_label(route)}: {exc}",
                file=sys.stderr,
            )
            return ExitCode.FAILED
    if not verdict.ok:
        for problem in verdict.problems():
            print(f"{PROG}: header: {problem}", file=sys.stderr)
        return ExitCode.FAILED
    for warning in verdict.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    keys = ", ".join(repr(key) for key in verdict.keys)
    print(f"header: ok ({file.name}: {len(columns)} columns of {verdict.object}; keys {keys})")
    return ExitCode.COMPLETE


def cmd_split(args: argparse.Namespace) -> int:
    from orchestrator import splitter

    source, out = args.file, args.out
    client.check_source(source)
    fmt = format_of(source.name, args.format or "")
    max_bytes = DEFAULT_MAX_CHUNK_BYTES if args.max_bytes is None else args.max_bytes
    problem = chunk_bytes_problem(max_bytes)
    if problem is not None:
        raise UsageError("--max-bytes", problem)
    prepare_out_dir(out, force=args.force)
    for event in splitter.split_file(source, out, max_bytes=max_bytes, fmt=fmt):
        if isinstance(event, splitter.Chunk):
            print(f"{event.path.name}\trows={event.rows}\tbytes={event.bytes}")
        elif isinstance(event, splitter.Rejected):
            print(f"rejected\tline={event.line}\tbytes={event.size}\t{event.reason}")
        else:
            print(f"total\trows={event.rows}\tchunks={event.chunks}\trejected={event.rejected}")
    return ExitCode.COMPLETE


# The splitter's chunk files (`chunk-NNNNN.<format>`, `.tmp` while written).
CHUNK_NAME = re.compile(rf"chunk-\d{{5}}\.({'|'.join(FORMATS)})(\.tmp)?")


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
