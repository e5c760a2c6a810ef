"""constraints.txt agrees with pyproject.toml and with what is installed.

1. Every runtime dependency pyproject.toml declares, and every dependency of the
   extras the image installs (EXTRAS), is pinned (name==version) in
   constraints.txt, and the pinned version is inside the declared range.
2. With --installed: the pins are exactly the runtime closure of the installed
   package with those extras (their dependencies, theirs, and so on, markers
   evaluated for this Python), at exactly the installed versions: nothing
   missing, nothing stale.

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
# Optional extras that are pinned like the runtime dependencies: the image installs
# them, and `[dev]` pulls them in, so CI's environment holds them too.
EXTRAS = ("postgres",)


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
    """The runtime dependencies and those of the pinned extras."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    texts = list(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    for extra in EXTRAS:
        texts += extras.get(extra, [])
    return [Requirement(text) for text in texts]


def check_declared(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    problems = []
    for req in requirements:
        name = canonical(req.name)
        if name == PACKAGE:
            continue  # an extra that names another extra of the package itself
        if name not in pins:
            problems.append(f"{req} (pyproject.toml) is not pinned in constraints.txt")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(
                f"constraints.txt pins {name}=={pins[name]}, outside {req} (pyproject.toml)"
            )
    return problems


def runtime_closure(package: str, extras: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Installed name -> version for the package's runtime dependencies and those of
    `extras`, transitively (a requirement's own extras followed too); and the
    names in that closure that are not installed at all."""
    found: dict[str, str] = {}
    missing: list[str] = []
    todo = [(r, extras) for r in (metadata.requires(package) or [])]
    while todo:
        text, wanted = todo.pop()
        req = Requirement(text)
        name = canonical(req.name)
        if not needed(req, wanted) or name in found or name == package:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found[name] = dist.version
        todo.extend((r, tuple(req.extras)) for r in (dist.requires or []))
    return found, missing


def needed(req: Requirement, extras: tuple[str, ...]) -> bool:
    """Whether a requirement applies here, without extras or with one of `extras`."""
    if req.marker is None:
        return True
    marker = Marker(str(req.marker))
    return any(marker.evaluate({"extra": extra}) for extra in ("", *extras))


def check_installed(pins: dict[str, str]) -> list[str]:
    installed, missing = runtime_closure(PACKAGE, EXTRAS)
    with_extras = f"{PACKAGE}[{','.join(EXTRAS)}]"
    problems = [f"{name} is not installed, but {with_extras} needs it" for name in sorted(missing)]
    for name in sorted(installed.keys() - pins.keys()):
        problems.append(f"{name}=={installed[name]} is installed but not pinned in constraints.txt")
    for name in sorted(pins.keys() - installed.keys() - set(missing)):
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
