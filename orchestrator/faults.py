"""Crash points for the kill -9 tests, armed only by an environment variable.

ORCHESTRATOR_CRASH_AT="<point>[:<n>]" makes the process SIGKILL itself the
n-th time (default 1st) it reaches `crashpoint("<point>")`. Unset, a crash
point costs one dictionary lookup. The points sit between an external effect
and the state change that records it, where a real crash hurts most.
"""

from __future__ import annotations

import os
import signal

_armed: dict[str, int] = {}
_spec = os.environ.get("ORCHESTRATOR_CRASH_AT", "")
if _spec:
    point, _, count = _spec.partition(":")
    _armed[point] = int(count or 1)


def crashpoint(name: str) -> None:
    """SIGKILL this process here if the test armed `name` and its count ran out."""
    if name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
