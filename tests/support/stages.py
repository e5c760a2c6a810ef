"""Building blocks for the stage tests: a clock moved by hand, and files in a real
store as the spool and the splitter leave them."""

from __future__ import annotations

from orchestrator.models import FileRecord
from orchestrator.store import Store


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def claimed_file(
    store: Store,
    route: str,
    name: str,
    *,
    number: int,
    work_path: str | None = None,
    max_chunk_bytes: int = 2000,
) -> FileRecord:
    """The `number`-th claim (claim times grow with it), recorded and being split."""
    began = await store.begin_claim(
        route=route,
        name=name,
        source_path=f"/data/inbox/{route}/{name}",
        work_path=work_path or f"/data/work/incoming/{number}-{name}",
        max_chunk_bytes=max_chunk_bytes,
        claimed_at=f"2026-11-23T14:00:{number:02d}.000000Z",
    )
    await store.finish_claim(began.id)
    return await store.start_split(began.id)
