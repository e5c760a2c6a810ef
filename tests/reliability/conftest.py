"""Fixtures of the reliability suite: filesystems that fill up or turn read-only, and the
figures the suite reports. (The daemon as a subprocess is the `daemons` fixture of
tests/conftest.py; the helpers behind all of them live in tests/support.)

- `volume` makes a `Volume` (tests/support/reliability.py) for the storage faults: it
  needs root and mount(8), or permissions that stop this user; else the test skips.
- `figures` records numbers per test; they are printed at the end of the run and
  written as JSON to $RELIABILITY_FIGURES when it is set (the table in docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.reliability import MakeVolume, Record, Volume, can_mount, chmod_stops_us


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[MakeVolume]:
    """Factory: `volume(size="4m")` (or size=None: no size limit) gives a Volume.

    Mounts when this process may (chmod does not stop root); else permissions when
    they stop it; else the test skips, since nothing would stop the daemon writing.
    """
    privileged = can_mount(tmp_path / "mount-probe")
    if not privileged and not chmod_stops_us(tmp_path / "chmod-probe"):
        pytest.skip("cannot mount, and permissions do not stop this user: no read-only fault")
    made: list[Volume] = []

    def make(size: str | None = None) -> Volume:
        made.append(Volume(tmp_path / f"volume-{len(made) + 1}", size, privileged=privileged))
        return made[-1]

    yield make
    for vol in made:
        vol.close()


# -- figures ------------------------------------------------------------------------

FIGURES = pytest.StashKey[dict[str, dict[str, Any]]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Record:
    """`figures(name=value, ...)`: numbers for the reliability table, kept per test."""
    table = request.config.stash.setdefault(FIGURES, {})

    def record(**values: Any) -> None:
        table.setdefault(request.node.name, {}).update(values)

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    table = config.stash.get(FIGURES, {})
    if not table:
        return
    terminalreporter.section("reliability figures")
    for test, values in table.items():
        terminalreporter.write_line(f"{test}: {json.dumps(values, sort_keys=True)}")
    target = os.environ.get("RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
