"""A daemon in the test's own process, built as the CLI builds one.

A `Daemon` is handed data_dir's lock by whoever builds it (`run` and `submit --once`
take it with `orchestrator.cli.lock_data_dir`). `LockedDaemon` takes it the same way
when built and lets it go when its run ends, so a test runs daemons one after another
on one data_dir as `run --once` twice would, and a second one beside a running one is
refused as a second `run` is.
"""

from __future__ import annotations

import contextlib

from orchestrator.cli import lock_data_dir
from orchestrator.config import Settings
from orchestrator.daemon import Daemon


class LockedDaemon(Daemon):
    """`Daemon(settings, once=...)` holding data_dir's lock from here to the end of `run`."""

    def __init__(self, settings: Settings, *, once: bool) -> None:
        self._held = contextlib.ExitStack()
        lock = self._held.enter_context(lock_data_dir(settings))
        super().__init__(settings, once=once, lock=lock)

    async def run(self) -> int:
        try:
            return await super().run()
        finally:
            self._held.close()
