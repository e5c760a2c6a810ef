"""The hand-offs between the stages: what happens after each step, in one place.

    spool ──claimed──▶ split ──chunk──▶ scheduler ──submitted──▶ poller
                         │ small    ▲        │   ▲                 │  │
                         ▼          │ sealed │   └─────started─────┘  │
                       packer ──────┘        │ refused                │ final
                                             ▼                        │
                                          results ◀───────────────────┘
                                             │ finished
                                             ▼
                                   the file cache forgets it

- claimed: the spool recorded a claim; the split stage queues the file, split
  one at a time in claim order, its header first checked against the catalogue
  (the routes' objects as Marketo describes them).
- chunk: the split stage recorded a chunk (or a set-aside record) in the store;
  the scheduler wakes and may submit it before the split ends. Just before, the
  packer is told the chunk's keys (keys): it seals an open pack they meet first.
- small: a file whose split cut one chunk, on a route that packs: the packer puts
  its records into the open pack of its route, format and header (or opens one).
  The packer asks the split stage whether claimed files wait (its backlog), and is
  told when `run --once` has split all it claimed (drained) and whenever no claimed
  file waits (caught up); when to seal is its own decision. A sealed pack wakes
  the scheduler.
- refused (by the splitter): the file has its error; the file cache forgets it and
  the scheduler wakes, so its chunks not yet sent are refused.
- split: a file's split ended (or the packer took it): results finish it now if
  every chunk of it is final already (a bad file's, say).
- submitted: the scheduler recorded a batch id; the poller starts tracking it.
- started: a job of ours Marketo kept Queued started importing, so a job ahead
  of it (another integration's) left the queue: the scheduler may probe a slot.
- final: a chunk reached Complete or Failed (poller: a queue slot is free too),
  or was refused before it went (scheduler): results attribute it and finish each
  of its files that is split with every chunk final.
- finished: the file's result is written and counted; the file cache forgets it,
  and `run --once` looks whether everything is done.

With a shared subscription (`[coordination] url`) the scheduler takes the shared
queue (it registers, admits and reports there itself), and the orphan poller
(`orchestrator.orphans`) runs beside the poller for the jobs of daemons taken as dead.

The stages never import each other; they meet here and in the store. Recovery
after a crash gives each stage what it left: open packs to the packer, submits
of unknown outcome to the scheduler, files to split again to the split stage,
files to finish to results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

from orchestrator import splitter
from orchestrator.catalogue import Catalogue
from orchestrator.clock import wait_for_any
from orchestrator.config import Settings
from orchestrator.filecache import FileCache
from orchestrator.marketo import MarketoClient
from orchestrator.metrics import Metrics
from orchestrator.models import UNFINISHED_FILE_STATUSES, ChunkRecord, FileRecord
from orchestrator.orphans import OrphanPoller, OrphanSource
from orchestrator.packer import Packer
from orchestrator.poller import Poller
from orchestrator.results import Results
from orchestrator.scheduler import Scheduler, SharedQueue
from orchestrator.splitting import ConfiguredKeys, SplitStage
from orchestrator.spool import Spool
from orchestrator.store import Recovery, Store

Loop = Coroutine[Any, Any, None]


class SharedSubscription(SharedQueue, OrphanSource, Protocol):
    """A coordination backend as the stages use it (`PostgresCoordinator`)."""


class Pipeline:
    """The stages of one daemon, wired together; the daemon runs their loops."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: MarketoClient,
        metrics: Metrics,
        *,
        shared: SharedSubscription | None = None,
    ) -> None:
        self.store = store
        self.files = FileCache(store)
        self.spool = Spool(settings, store, self.claimed)
        # The routes' objects as Marketo describes them: headers are checked against it.
        self.catalogue = Catalogue(client)
        # A route's key columns: configured, else the object's own (custom objects: their
        # dedupe fields as the catalogue describes them).
        key_columns = ConfiguredKeys(self.catalogue)
        self.splitting = SplitStage(
            settings,
            store,
            on_chunk=self.chunk_added,
            on_small=self.small_file,
            on_split=self.split_ended,
            on_error=self.file_refused,
            on_drained=self.drained,
            on_caught_up=self.caught_up,
            observer=metrics,
            catalogue=self.catalogue,
            key_columns=key_columns,
            on_keys=self.keys_recorded,
        )
        self.packer = Packer(
            settings,
            store,
            on_sealed=self.pack_sealed,
            backlog=self.splitting.backlog,
            key_columns=key_columns,
        )
        self.scheduler = Scheduler(
            settings,
            store,
            client,
            on_submitted=self.submitted,
            on_chunk_final=self.chunk_refused,
            files=self.files,
            quota=client,
            shared=shared,
            observer=metrics,
        )
        self.poller = Poller(
            settings,
            store,
            client,
            on_chunk_final=self.chunk_done,
            on_started=self.job_started,
            files=self.files,
        )
        self.orphans = None
        if shared is not None:
            self.orphans = OrphanPoller(shared, client, interval=settings.polling.interval)
        self.results = Results(settings, store, observer=metrics, on_finished=self.finished)
        self._file_finished = asyncio.Event()

    # -- what the daemon runs and asks -------------------------------------------------

    async def recover(self, recovery: Recovery) -> None:
        """Give each stage what a crash (or a stop) left half done, before any loop runs."""
        self.spool.prepare()
        await self.spool.recover_claims()
        await self.packer.recover(recovery.open_packs)
        self.scheduler.recovered(recovery.resubmit)
        self.splitting.recover(recovery.resplit)
        await self.results.recover(recovery.finishing)

    def loops(self, stop: asyncio.Event, *, once: bool) -> list[tuple[str, Loop]]:
        """The long-lived loops, by task name; each returns once `stop` is set. With
        `once` the inbox is not watched: `drain` claims what it holds."""
        loops = [
            ("splitter", self.splitting.run(stop)),
            ("packer", self.packer.run(stop)),
            ("scheduler", self.scheduler.run(stop)),
            ("poller", self.poller.run(stop)),
        ]
        if self.orphans is not None:
            loops.append(("orphans", self.orphans.run(stop)))
        if not once:
            loops.append(("spool", self.spool.run(stop)))
        return loops

    async def drain(self, stop: asyncio.Event) -> None:
        """run --once: claim what the inbox holds, then return once every claimed file
        has its result (or when `stop` is set)."""
        await self.spool.drain()
        self.splitting.drained()
        await self.wait_idle(stop)

    def pending(self) -> int:
        """Files seen in the inbox, not claimed yet."""
        return self.spool.pending()

    @property
    def watching(self) -> bool:
        """Whether the inbox watcher runs."""
        return self.spool.running

    def backoff_remaining(self) -> float:
        """Seconds until the queue's backoff ends (0 when none runs)."""
        return self.scheduler.backoff_remaining()

    @property
    def finished_total(self) -> int:
        return self.results.finished_total

    @property
    def finished_failed(self) -> int:
        return self.results.finished_failed

    # -- the hand-offs -------------------------------------------------------------------

    async def claimed(self, file: FileRecord) -> None:
        self.splitting.claimed(file.id)

    def chunk_added(self) -> None:
        self.scheduler.wake()

    async def keys_recorded(self, keys_file: Path) -> None:
        await self.packer.meet(keys_file)

    async def small_file(
        self, file: FileRecord, chunk: splitter.Chunk, done: splitter.SplitDone, fmt: str
    ) -> None:
        await self.packer.add(file, chunk, done, fmt)

    def file_refused(self, file_id: int) -> None:
        self.files.forget(file_id)
        self.scheduler.wake()

    async def split_ended(self, file_id: int) -> None:
        await self.results.maybe_finish(file_id)

    async def drained(self) -> None:
        await self.packer.drained()
        self._file_finished.set()  # wait_idle looks again: nothing may wait any more

    async def caught_up(self) -> None:
        await self.packer.caught_up()

    def pack_sealed(self, pack: ChunkRecord) -> None:
        self.scheduler.wake()

    def submitted(self, chunk: ChunkRecord) -> None:
        self.poller.submitted(chunk)

    def job_started(self) -> None:
        self.scheduler.foreign_job_left()

    async def chunk_done(self, chunk: ChunkRecord) -> None:
        """A batch reached Complete or Failed at Marketo: a queue slot is free."""
        self.scheduler.job_finished(chunk.id)
        await self.results.chunk_final(chunk)

    async def chunk_refused(self, chunk: ChunkRecord) -> None:
        """A chunk failed before it went to Marketo: no slot was taken."""
        await self.results.chunk_final(chunk)

    def finished(self, file: FileRecord) -> None:
        self.files.forget(file.id)
        self._file_finished.set()

    # -- run --once ----------------------------------------------------------------------

    async def is_idle(self) -> bool:
        """Every claimed file has its result and nothing waits to be split.

        Asked after every finished file, so it reads the store's tallies (a few rows)
        rather than the unfinished files: with thousands of small files claimed at once,
        listing them each time kept the store's one thread busy for most of a run."""
        if self.splitting.backlog():
            return False
        tallies = await self.store.tallies()
        return not any(tallies.get(f"files:{s}", 0) for s in UNFINISHED_FILE_STATUSES)

    async def wait_idle(self, stop: asyncio.Event) -> None:
        """Return once idle (checked after every finished file), or when `stop` is set."""
        while not stop.is_set():
            self._file_finished.clear()
            if await self.is_idle():
                return
            await wait_for_any(self._file_finished, stop, within=None)
