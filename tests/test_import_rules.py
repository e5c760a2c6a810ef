"""The package's dependency shape, read from the source with `ast` (nothing is imported).

Every import of our own package points down this picture, never up or sideways:

    __main__ ..................................... 8
     cli ......................................... 7 ───┐ (only cli/run.py)
      daemon ..................................... 6    │
        pipeline ................................. 5    ▼
     splitting scheduler packer poller results ... 4   simulator: a program of its
 upkeep client orphans membership ......... 4   own, it uses constants,
    spool status catalogue keyorder ........ 3   models, errors and
  splitter store marketo metrics coordination 2   nothing else of ours
  config logs tickets dirlock filecache keys quotagate queuemodel 1
                  constants errors models clock
                  backoff crashpoints layout orchestrator 0

A module's unit is its top-level name under orchestrator (orchestrator.marketo.bulk
is unit marketo, orchestrator.results.stage unit results). It imports only units of a
strictly lower rank, or its own unit; a module inside a package folder imports its
siblings, never the package's __init__. The stages (splitting, scheduler, packer,
poller, results) never import each other. Lazy imports, inside functions or
`if TYPE_CHECKING:`, count too: they still are dependencies.

Third parties have one home each, within orchestrator/: sqlite3 in store/; aiohttp's
client in marketo/, its server (`aiohttp.web`) in status/endpoints.py and simulator/. So does
Marketo's wire JSON: its keys appear as string constants only in marketo/ and
simulator/. bench/ may import tests.support, never a test module or a conftest.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# unit -> rank, one line per rank. "orchestrator" is the root __init__ (only __version__).
RANKS: dict[str, int] = {
    unit: rank
    for rank, units in enumerate(
        [
            "orchestrator constants errors models clock backoff crashpoints layout durable delimited",  # leaves
            "config logs tickets dirlock filecache keys quotagate queuemodel",
            "splitter store marketo metrics coordination",  # the splitter reads keys (keys.py)
            "spool status catalogue keyorder",
            "splitting scheduler packer poller results upkeep client orphans membership",  # stages, upkeep, hand-over
            "pipeline",
            "daemon",
            "cli",
            "__main__",  # python -m orchestrator: runs cli
        ]
    )
    for unit in units.split()
}
SIMULATOR = "simulator"  # outside the ranks: started by cli/run.py only
SIMULATOR_DIR = "orchestrator/simulator/"
SIMULATOR_USES = {"constants", "models", "errors", "durable", "delimited"}
STAGES = {"splitting", "scheduler", "packer", "poller", "results"}
# `from aiohttp import <these>` is the server (BodyPartReader reads uploads), anything else the client
AIOHTTP_SERVER = {"web", "BodyPartReader"}
WIRE_KEYS = [
    "batchId",
    "numOfRowsFailed",
    "numOfRowsWithWarning",
    "numOfLeadsProcessed",
    "numOfObjectsProcessed",
    "requestId",
    "access_token",
]

TABLE = "add it to the table"
CLI_ONLY = "only cli/run.py starts the simulator"
SIM_LEAVES = "the simulator imports only constants, models, errors, durable, delimited"
STAGES_APART = "the stages splitting, scheduler, packer, poller, results never import each other"
NOT_INIT = "a package's modules import their siblings, not the package's __init__"
SQLITE = "sqlite3 only in orchestrator/store/"
CLIENT = "aiohttp's client only in orchestrator/marketo/"
SERVER = "aiohttp.web only in orchestrator/status/endpoints.py and orchestrator/simulator/"
WIRE = "Marketo's wire JSON only in orchestrator/marketo/ and orchestrator/simulator/"
BENCH = "bench imports tests.support, never a test module or a conftest"


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(tree: ast.Module, module: str, is_init: bool) -> Iterator[tuple[int, str, str]]:
    """(line, absolute module, imported name or "") of every import, lazy ones too."""
    package = module.split(".") if is_init else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                yield node.lineno, base, alias.name


def wire_keys(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, key) of every string constant holding a wire key; docstrings do not count."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield from ((node.lineno, key) for key in WIRE_KEYS if key in node.value)


def own_rule(rel: str, module: str, target: str) -> str | None:
    """The rule an import of our own `target` by `module` (a file of orchestrator/) breaks."""
    unit, parts = unit_of(module), module.split(".")
    to = unit_of(target)
    if to == unit:
        ancestors = {".".join(parts[:i]) for i in range(2, len(parts))}
        return NOT_INIT if target in ancestors else None
    if unit == SIMULATOR:
        return None if to in SIMULATOR_USES else SIM_LEAVES
    if to == SIMULATOR:
        return None if rel == "orchestrator/cli/run.py" else CLI_ONLY
    if to not in RANKS:
        return TABLE
    if unit in STAGES and to in STAGES:
        return STAGES_APART
    return up(unit, to) if RANKS[to] >= RANKS[unit] else None


def up(unit: str, to: str) -> str:
    return f"{unit} (rank {RANKS[unit]}) imports only lower ranks; {to} is rank {RANKS[to]}"


def third_party_rule(rel: str, dotted: str, is_from: bool) -> str | None:
    """The rule an import of sqlite3 or aiohttp by `rel` (a file of orchestrator/) breaks."""
    parts = dotted.split(".")
    if parts[0] == "sqlite3" and not rel.startswith("orchestrator/store/"):
        return SQLITE
    if parts[0] != "aiohttp":
        return None
    if is_from and parts[1] in AIOHTTP_SERVER:  # `import aiohttp.web` still binds the client
        server = rel == "orchestrator/status/endpoints.py" or rel.startswith(SIMULATOR_DIR)
        return None if server else SERVER
    return None if rel.startswith("orchestrator/marketo/") else CLIENT


def violations(root: Path) -> list[str]:
    """Every break of the shape under root/orchestrator and root/bench, one line each."""
    files = sorted([*(root / "orchestrator").rglob("*.py"), *(root / "bench").rglob("*.py")])
    known = {module_name(path.relative_to(root)) for path in files}
    found: list[str] = []
    for path in files:
        rel, module = path.relative_to(root).as_posix(), module_name(path.relative_to(root))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if rel.startswith("bench/"):
            for line, base, name in imports(tree, module, False):
                dotted = f"{base}.{name}" if name else base
                parts = dotted.split(".")
                tests = parts[0] == "tests" and any(p.startswith("test_") for p in parts)
                if tests or "conftest" in parts:
                    found.append(f"{rel}:{line} imports {dotted} (rule: {BENCH})")
            continue
        if unit_of(module) not in RANKS and unit_of(module) != SIMULATOR:
            found.append(f"{rel}:1 is unit {unit_of(module)}, not in RANKS (rule: {TABLE})")
            continue
        for line, base, name in imports(tree, module, path.name == "__init__.py"):
            if base.split(".")[0] == "orchestrator":
                # `from x import y` imports x.y when y is a module of ours, else x itself.
                target = f"{base}.{name}" if f"{base}.{name}" in known else base
                rule = own_rule(rel, module, target)
            else:
                target = f"{base}.{name}" if name else base
                rule = third_party_rule(rel, target, bool(name))
            if rule:
                found.append(f"{rel}:{line} imports {target} (rule: {rule})")
        if unit_of(module) not in {"marketo", SIMULATOR}:
            found += [
                f'{rel}:{line} has the string "{key}" (rule: {WIRE})'
                for line, key in wire_keys(tree)
            ]
    return found


def test_the_package_keeps_its_shape() -> None:
    found = violations(ROOT)
    assert not found, "\n".join(found)


MAX_MODULE_LINES = 400  # STYLE.md: a module longer than this holds more than one concept


def test_no_product_module_is_over_400_lines_or_shares_its_name() -> None:
    """Issue 18: one module per concept, each under 400 lines; no two modules of one
    file name (`__init__.py` aside), so a name says which module is meant."""
    paths = sorted((ROOT / "orchestrator").rglob("*.py"))
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in paths
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    names: dict[str, list[str]] = {}
    for p in paths:
        if p.name != "__init__.py":
            names.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    twins = [" and ".join(where) for where in names.values() if len(where) > 1]
    assert not long, "over 400 lines: " + "; ".join(long)
    assert not twins, "one file name, two modules: " + "; ".join(twins)


# --- the check can fail: a small fake tree in the target layout, one break per case -----

PACKAGES = {
    "splitter": "cutter scan",
    "store": "store schema",
    "marketo": "client auth limits wire",
    "spool": "inbox fs",
    "config": "settings loading checks",
    "status": "snapshot table endpoints progress",
    "cli": "main flags run submit inspect",
    "results": "stage attribution matching finish merge",
    SIMULATOR: "server bulk gate queue records config",
}
FAKE_SOURCES = {
    "orchestrator/__init__.py": '__version__ = "0.1.0"\n',
    "orchestrator/config/checks.py": "from orchestrator import constants\nfrom ..errors import Bad\n"
    "from .settings import Route\n",
    "orchestrator/marketo/__init__.py": "from orchestrator.marketo.bulk import MarketoClient\n",
    "orchestrator/marketo/client.py": "import aiohttp\n\nfrom . import auth\nfrom .wire import KEY\n",
    "orchestrator/marketo/wire.py": 'KEY = "batchId"\n',
    "orchestrator/store/store.py": "import sqlite3\n\nfrom orchestrator.store.schema import SQL\n",
    "orchestrator/status/endpoints.py": "from aiohttp import web\n\nfrom .snapshot import Query\n",
    "orchestrator/status/snapshot.py": "from orchestrator.store import Store\n",
    "orchestrator/results/finish.py": '"""Reads "batchId" back."""\n\nfrom orchestrator.marketo import Client\n',
    "orchestrator/daemon.py": "from orchestrator import pipeline, upkeep\nfrom .store import Store\n",
    "orchestrator/__main__.py": "from orchestrator.cli import main\n",
    "orchestrator/cli/main.py": "from orchestrator.cli import inspect, run\n",
    "orchestrator/cli/run.py": "def main() -> None:\n    from orchestrator import __version__, simulator\n",
    "orchestrator/simulator/server.py": "from typing import TYPE_CHECKING\n\nfrom aiohttp import web\n\n"
    "from orchestrator.models import Kind\nfrom . import queue\n\n"
    "if TYPE_CHECKING:\n    from .records import Records\n",
    "bench/pipeline.py": "from orchestrator.simulator import Simulator\nfrom tests.support import run\n",
}


def write_fake_tree(root: Path) -> None:
    paths = ["orchestrator/__init__.py", "bench/pipeline.py"]
    for unit in [*RANKS, SIMULATOR]:
        if unit in PACKAGES:
            paths += [f"orchestrator/{unit}/{m}.py" for m in ["__init__", *PACKAGES[unit].split()]]
        elif unit != "orchestrator":
            paths.append(f"orchestrator/{unit}.py")
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(FAKE_SOURCES.get(rel, ""), encoding="utf-8")


def test_the_fake_tree_is_clean(tmp_path: Path) -> None:
    write_fake_tree(tmp_path)
    assert violations(tmp_path) == []


@pytest.mark.parametrize(
    ("rel", "added", "rule"),
    [
        ("orchestrator/daemon.py", "from orchestrator import simulator", CLI_ONLY),
        ("orchestrator/cli/inspect.py", "from orchestrator.simulator import Sim", CLI_ONLY),
        ("orchestrator/scheduler.py", "from orchestrator import poller", STAGES_APART),
        ("orchestrator/packer.py", "from orchestrator.scheduler import Scheduler", STAGES_APART),
        ("orchestrator/results/finish.py", "import sqlite3", SQLITE),
        ("orchestrator/results/stage.py", "from orchestrator import scheduler", STAGES_APART),
        ("orchestrator/splitting.py", "from orchestrator.packer import Packer", STAGES_APART),
        ("orchestrator/status/snapshot.py", "import aiohttp", CLIENT),
        ("orchestrator/metrics.py", "from aiohttp import web", SERVER),
        ("orchestrator/status/table.py", "from aiohttp import web", SERVER),
        (
            "orchestrator/store/store.py",
            "from orchestrator.pipeline import X",
            up("store", "pipeline"),
        ),
        ("orchestrator/marketo/client.py", "from orchestrator.marketo import Client", NOT_INIT),
        ("orchestrator/marketo/auth.py", "from . import MarketoClient", NOT_INIT),
        ("orchestrator/simulator/queue.py", "from orchestrator import config", SIM_LEAVES),
        ("orchestrator/constants.py", "from orchestrator import config", up("constants", "config")),
        (
            "orchestrator/pipeline.py",
            "def f() -> None:\n    from . import daemon",
            up("pipeline", "daemon"),
        ),
        ("bench/pipeline.py", "from tests import test_engine", BENCH),
        ("bench/split.py", "from tests.reliability.conftest import Life", BENCH),
        ("orchestrator/results/finish.py", 'KEY = "batchId"', WIRE),
        ("orchestrator/gadget.py", "X = 1", TABLE),
    ],
)
def test_each_break_is_reported(tmp_path: Path, rel: str, added: str, rule: str) -> None:
    write_fake_tree(tmp_path)
    path = tmp_path / rel
    text = (path.read_text(encoding="utf-8") if path.exists() else "") + added + "\n"
    path.write_text(text, encoding="utf-8")
    [found] = violations(tmp_path)
    assert found.startswith(f"{rel}:{len(text.splitlines())} ")
    assert found.endswith(f" (rule: {rule})")
