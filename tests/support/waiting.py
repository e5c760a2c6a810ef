"""Waiting on a condition with a deadline: never a fixed sleep as synchronisation.

The deadlines are generous (the suite must pass with every core busy); a wait returns
as soon as its condition holds, so a generous deadline costs nothing when all is well.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, overload

T = TypeVar("T")

WITHIN = 60.0  # seconds a wait may take by default
POLL = 0.02  # how often a wait looks again by default
TAIL = 3000  # characters of a process's stderr shown when a wait fails


class Watched(Protocol):
    """A subprocess a wait keeps an eye on (processes.CliProcess)."""

    @property
    def returncode(self) -> int | None: ...

    def stderr(self) -> str: ...


@overload
async def wait_until(
    condition: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    within: float = ...,
    poll: float = ...,
    process: Watched | None = ...,
) -> T: ...


@overload
async def wait_until(
    condition: Callable[[], T | None],
    what: str,
    *,
    within: float = ...,
    poll: float = ...,
    process: Watched | None = ...,
) -> T: ...


async def wait_until(
    condition: Callable[[], Any],
    what: str,
    *,
    within: float = WITHIN,
    poll: float = POLL,
    process: Watched | None = None,
) -> Any:
    """Call `condition` every `poll` seconds until it returns something truthy; return that.

    `condition` is a plain function or a coroutine function (an HTTP request, say).
    Fails (AssertionError) after `within` seconds, saying it waited for `what`; with
    `process`, fails at once when that process exits meanwhile. Either failure shows
    the tail of the process's stderr.
    """
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if process is not None and process.returncode is not None:
            raise AssertionError(
                f"{what}: the process exited with {process.returncode}{stderr_tail(process)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {within:g} s waiting for {what}{stderr_tail(process)}"
            )
        await asyncio.sleep(poll)


def stderr_tail(process: Watched | None) -> str:
    if process is None:
        return ""
    return f"\nstderr (last {TAIL} characters):\n{process.stderr()[-TAIL:]}"
