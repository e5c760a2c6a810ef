"""Every path under data_dir, in one place.

<data_dir>/
  inbox/<route>/          files dropped by pipelines
  work/incoming/          claimed files (<ns>-<name>)
  work/chunks/<file id>/  a file's chunks, Marketo's failures/warnings files for them,
                          and the file's part files: its share of each chunk's rows
  done/<route>/           sources and results of complete files
  failed/<route>/         sources and results of failed files
  state.db                the state store
  daemon.lock             held (flock) by the one daemon that owns data_dir
  simulator.json          `run --simulate`: the simulated subscription's state
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_DB = "state.db"
LOCK = "daemon.lock"
SIMULATOR_STATE = "simulator.json"


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def state_db(self) -> Path:
        return self.root / STATE_DB

    @property
    def lock(self) -> Path:
        """The data directory's owner lock, next to state.db (see orchestrator.dirlock)."""
        return self.root / LOCK

    @property
    def simulator_state(self) -> Path:
        """Where `run --simulate` keeps the simulated subscription between runs."""
        return self.root / SIMULATOR_STATE

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    def inbox_route(self, route: str) -> Path:
        return self.inbox / route

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def incoming(self) -> Path:
        """Where claimed entries land, renamed from the inbox."""
        return self.work / "incoming"

    @property
    def chunks(self) -> Path:
        return self.work / "chunks"

    def chunk_dir(self, file_id: int) -> Path:
        """A file's chunks and the failures/warnings files downloaded for them."""
        return self.chunks / str(file_id)

    def part_file(self, file_id: int, chunk_id: int, kind: str) -> Path:
        """The file's share of a chunk's failed or warned rows ("failures" or "warnings"),
        with their source lines: written once the chunk is final, merged when the file
        finishes."""
        return self.chunk_dir(file_id) / part_name(chunk_id, kind)

    def done(self, route: str) -> Path:
        return self.root / "done" / route

    def failed(self, route: str) -> Path:
        return self.root / "failed" / route

    def results(self, route: str, *, complete: bool) -> Path:
        """Where a finished file and its results go."""
        return self.done(route) if complete else self.failed(route)

    def route_dirs(self, route: str) -> tuple[Path, Path, Path]:
        """The directories a route needs: its inbox, done/ and failed/."""
        return self.inbox_route(route), self.done(route), self.failed(route)


def part_name(chunk_id: int, kind: str) -> str:
    """A part file's name in its file's chunk directory (see `Layout.part_file`)."""
    return f"part-{chunk_id}.{kind}.csv"
