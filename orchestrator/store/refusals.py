"""What Marketo refuses the daemon, as the daemon last learnt it: one row per refusal.

`RefusalRecords` is one part of the `Store` (see `orchestrator.store.store`). A
refusal is a configuration problem (credentials the identity service refuses, an
API role without the permission a call needs: 603), never a file's. The daemon
writes the whole set each time it changes (`set_refusals`), empty once its calls
succeed again; `submit --wait` and the Python API read it (`refusals`), so a
pipeline waiting on a file learns why nothing moves instead of timing out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from orchestrator.models import Refusal
from orchestrator.store.connection import Runner


class RefusalRecords(Runner):
    """The `Store`'s record of Marketo's refusals."""

    async def set_refusals(self, refusals: Iterable[Refusal]) -> None:
        """Replace the recorded refusals by `refusals` (none: Marketo refuses nothing)."""
        rows = [(r.what, r.code, r.message, r.since, r.last) for r in refusals]

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM refusals")
            conn.executemany(
                "INSERT INTO refusals (what, code, message, since, last) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        await self._run("set_refusals", body)

    async def refusals(self) -> list[Refusal]:
        """The refusals recorded, oldest first."""

        def body(conn: sqlite3.Connection) -> list[Refusal]:
            rows = conn.execute(
                "SELECT what, code, message, since, last FROM refusals ORDER BY since, what"
            )
            return [Refusal(*row) for row in rows]

        return await self._run("refusals", body, write=False)
