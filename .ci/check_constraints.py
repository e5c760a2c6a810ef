"""constraints.txt agrees with pyproject.toml and with what is installed.

1. Every runtime dependency pyproject.toml declares is pinned (name==version)
   in constraints.txt, and the pinned version is inside the declared range.
2. With --installed: the pins are exactly the runtime closure of the installed
   package (its dependencies, theirs, and so on, markers evaluated for this
   Python), at exactly the installed versions: nothing missing, nothing stale.

Usage: python .ci/check_constraints.py [--installed] [--pyproject P] [--constraints C]
Exit 0 when they agree; 1 with one line per problem otherwise. Needs `packaging`
(pytest brings it into the dev environment).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "marketo-orchestrator"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> tuple[dict[str, str], list[str]]:
    pins: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if match is None:
            problems.append(f"{path.name}:{number}: not a name==version pin: {line!r}")
            continue
        name = canonical(match[1])
        if name in pins:
            problems.append(f"{path.name}:{number}: {name} is pinned twice")
        pins[name] = match[2]
    return pins, problems


def declared(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [Requirement(text) for text in project.get("dependencies", [])]


def check_declared(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    problems = []
    for req in requirements:
        name = canonical(req.name)
        if name not in pins:
            problems.append(f"{req} (pyproject.toml) is not pinned in constraints.txt")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(
                f"constraints.txt pins {name}=={pins[name]}, outside {req} (pyproject.toml)"
            )
    return problems


def runtime_closure(package: str) -> dict[str, str]:
    """Installed name -> version for the package's runtime dependencies, transitively."""
    found: dict[str, str] = {}
    todo = [r for r in (metadata.requires(package) or []) if needed(Requirement(r))]
    while todo:
        req = Requirement(todo.pop())
        name = canonical(req.name)
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        found[name] = dist.version
        todo.extend(r for r in (dist.requires or []) if needed(Requirement(r)))
    return found


def needed(req: Requirement) -> bool:
    """Whether a requirement applies here without extras."""
    return req.marker is None or Marker(str(req.marker)).evaluate({"extra": ""})


def check_installed(pins: dict[str, str]) -> list[str]:
    installed = runtime_closure(PACKAGE)
    problems = []
    for name in sorted(installed.keys() - pins.keys()):
        problems.append(f"{name}=={installed[name]} is installed but not pinned in constraints.txt")
    for name in sorted(pins.keys() - installed.keys()):
        problems.append(f"constraints.txt pins {name}, which the package no longer needs")
    for name in sorted(pins.keys() & installed.keys()):
        if pins[name] != installed[name]:
            problems.append(
                f"constraints.txt pins {name}=={pins[name]}, but {installed[name]} is installed"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--installed", action="store_true", help="also check the installed closure")
    args = parser.parse_args(argv)
    pins, problems = read_pins(args.constraints)
    problems += check_declared(declared(args.pyproject), pins)
    if args.installed:
        problems += check_installed(pins)
    for problem in problems:
        print(f"check_constraints: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_constraints: ok ({len(pins)} pins)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
