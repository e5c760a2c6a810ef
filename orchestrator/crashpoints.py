"""Crash points for the kill -9 tests, and hold points, armed only by environment variables.

ORCHESTRATOR_CRASH_AT="<point>[:<n>]" makes the process SIGKILL itself the
n-th time (default 1st) it reaches `crashpoint("<point>")`. Unset, a crash
point costs one dictionary lookup. The points sit between an external effect
and the state change that records it, where a real crash hurts most.

ORCHESTRATOR_HOLD_AT="<point>:<fifo>" makes `await holdpoint("<point>")` wait,
without blocking the event loop, until a test writes to (and closes) the named
pipe <fifo>: the test holds a phase open for as long as it needs to look at the
process from outside, and lets it go on when it has seen what it wanted.
"""

from __future__ import annotations

import asyncio
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


_holds: dict[str, str] = {}
_hold_spec = os.environ.get("ORCHESTRATOR_HOLD_AT", "")
if _hold_spec:
    _hold_point, _, _fifo = _hold_spec.partition(":")
    _holds[_hold_point] = _fifo


async def holdpoint(name: str) -> None:
    """Wait here until the test releases the pipe, if it armed `name` (once per process)."""
    fifo = _holds.pop(name, None)
    if fifo is not None:
        await asyncio.to_thread(_read_until_closed, fifo)


def hold(name: str) -> None:
    """`holdpoint` for code outside the event loop: block here until released."""
    fifo = _holds.pop(name, None)
    if fifo is not None:
        _read_until_closed(fifo)


def _read_until_closed(fifo: str) -> None:
    # Opening a FIFO for reading blocks until a writer opens it; reading ends when it closes.
    with open(fifo, "rb") as pipe:
        pipe.read()
