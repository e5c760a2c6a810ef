"""The key rule in the stages (issue 20, items 1-3): the split stage and the packer wired
as the pipeline wires them, over a real store and real files, and the failures file of
a file whose repeated keys moved rows to tail chunks.

What the submission rule (the scheduler's) relies on is checked here: every chunk the
store records has its key set beside it before it is recorded, a job never holds two
rows of one key, and chunks that share keys are recorded (a pack: sealed) in the order
their rows were claimed.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from orchestrator import splitter
from orchestrator.config import Settings
from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord, ObjectType
from orchestrator.packer import Packer
from orchestrator.results import finish_file
from orchestrator.splitting import ConfiguredKeys, SplitStage
from orchestrator.store import Store
from tests.support.settings import CARS, LEADS, MEMBERS, fast_settings
from tests.support.stages import FakeClock, claimed_file

HEADER = ["email", "firstName"]
LIMIT = 400  # max_chunk_bytes
T_END = "2026-11-23T14:05:00.000000Z"
SOLO = replace(LEADS, dir="solo", pack=False)


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def emails(*names: str) -> list[list[str]]:
    return [[f"{name}@example.com", name.upper()] for name in names]


def hashes(*names: str) -> list[int]:
    found = [key_hash(LEAD_NAMESPACE, [f"{name}@example.com"]) for name in names]
    return sorted({h for h in found if h is not None})


class Crash(Exception):
    """The split stopped where a kill -9 would have stopped it."""


@dataclass
class Wired:
    """A split stage and a packer wired as the pipeline wires them; `events` is the order
    in which the store was told of chunks: ("chunk", file id) once a chunk of a file's
    own is recorded, ("pack", chunk id) once a pack is sealed."""

    store: Store
    settings: Settings
    src: Path
    stage: SplitStage = field(init=False)
    packer: Packer = field(init=False)
    events: list[tuple[str, int]] = field(default_factory=list)
    keys_at_record: list[bool] = field(default_factory=list)  # its key set was there
    crash_after: int | None = None  # chunks cut before the cutter "dies"
    claims: int = 0
    _file: int = 0

    def __post_init__(self) -> None:
        keys = ConfiguredKeys()
        self.packer = Packer(
            self.settings,
            self.store,
            on_sealed=self.sealed,
            clock=FakeClock(),
            key_columns=keys,
        )
        self.stage = SplitStage(
            self.settings,
            self.store,
            on_chunk=self.chunk,
            on_small=self.packer.add,
            on_split=self.nothing,
            on_error=lambda _: None,
            cut=self.cutter,
            key_columns=keys,
            on_keys=self.packer.meet,
        )

    async def split(self, route: str, name: str, text: str) -> FileRecord:
        self.claims += 1
        path = self.src / f"{self.claims}-{name}"
        path.write_text(text, encoding="utf-8", newline="")
        file = await claimed_file(
            self.store, route, name, number=self.claims, work_path=str(path), max_chunk_bytes=LIMIT
        )
        return await self.again(file)

    async def again(self, file: FileRecord) -> FileRecord:
        self._file = file.id
        await self.stage.split(await self.store.get_file(file.id))
        return await self.store.get_file(file.id)

    async def cutter(
        self,
        source: Path,
        out_dir: Path,
        *,
        max_bytes: int,
        fmt: str,
        fsync: bool,
        keys: splitter.KeyRule | None,
    ) -> AsyncGenerator[splitter.SplitEvent, None]:
        events = splitter.split_file_async(
            source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync, keys=keys
        )
        cut = 0
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, splitter.Chunk):
                    cut += 1
                    if self.crash_after is not None and cut > self.crash_after:
                        raise Crash
                yield event

    def chunk(self) -> None:
        self.events.append(("chunk", self._file))

    def sealed(self, record: ChunkRecord) -> None:
        self.events.append(("pack", record.id))
        self.keys_at_record.append(keys_path(Path(record.path)).exists())

    async def nothing(self, file_id: int) -> None:
        return None

    async def jobs(self, file: FileRecord) -> list[ChunkRecord]:
        """The jobs holding the file's rows: its chunks, or the pack it joined."""
        views = await self.store.chunks(file_id=file.id)
        every = {c.id: c for c in [*await self.store.chunks(), *await self.store.open_packs()]}
        return [every[v.id] for v in views]


@pytest.fixture
def wired(store: Store, tmp_path: Path) -> Wired:
    settings = fast_settings(
        "http://marketo.invalid",
        tmp_path / "data",
        (LEADS, CARS, MEMBERS, replace(CARS, dir="vins", key_columns=("vin",)), SOLO),
        max_chunk_bytes=LIMIT,
        pack_wait_seconds=3600.0,
    )
    (tmp_path / "src").mkdir()
    return Wired(store, settings, tmp_path / "src")


# -- key columns -----------------------------------------------------------------------------


async def test_key_columns_come_from_the_route_else_the_objects_default() -> None:
    keys = ConfiguredKeys()
    assert await keys(LEADS) == ("email",)
    assert await keys(replace(LEADS, lookup_field="id")) == ("id",)
    assert await keys(MEMBERS) == ("email",)
    assert await keys(replace(CARS, key_columns=("vin", "plate"))) == ("vin", "plate")
    assert await keys(replace(LEADS, key_columns=("externalId",))) == ("externalId",)
    # Until the describe catalogue: no key rule for a custom object without key_columns.
    assert await keys(CARS) == ()
    assert splitter.rule_for(ObjectType.PROGRAM_MEMBERS, "", ("email",)) == splitter.KeyRule(
        LEAD_NAMESPACE, ("email",)
    )


# -- packs ------------------------------------------------------------------------------------


async def test_a_small_file_whose_keys_meet_the_open_pack_seals_it_and_opens_the_next(
    wired: Wired,
) -> None:
    a = await wired.split("leads", "a.csv", table(emails("a", "b")))
    b = await wired.split("leads", "b.csv", table(emails("c")))
    (pack,) = {c.id for c in await wired.jobs(a)} | {c.id for c in await wired.jobs(b)}
    assert wired.events == []

    c = await wired.split("leads", "c.csv", table(emails("d", "B")))  # b again, in capitals

    assert wired.events == [("pack", pack)], "the pack holding b was sealed"
    assert wired.keys_at_record == [True]
    (sealed,) = await wired.jobs(a)
    assert sealed.sealed
    assert list(KeySet.load(keys_path(Path(sealed.path))).hashes) == hashes("a", "b", "c")
    (opened,) = await wired.jobs(c)
    assert opened.id != pack
    assert not opened.sealed


async def test_a_big_files_chunk_whose_keys_meet_an_open_pack_is_recorded_after_it(
    wired: Wired,
) -> None:
    small = await wired.split("leads", "small.csv", table(emails("s1", "s2")))
    other = await wired.split("leads", "other.csv", table(emails("o1"), ["email", "lastName"]))
    (meets,) = await wired.jobs(small)
    (apart,) = await wired.jobs(other)

    big = await wired.split("leads", "big.csv", table(emails("s2", *[f"b{i}" for i in range(30)])))

    chunks = await wired.store.chunks(file_id=big.id)
    assert len(chunks) >= 2
    assert wired.events[0] == ("pack", meets.id), "sealed before any of the big file's chunks"
    assert wired.events[1:] == [("chunk", big.id)] * len(chunks)
    assert [c.id for c in await wired.store.open_packs()] == [apart.id], "its keys meet nothing"


async def test_program_members_and_leads_share_keys_across_packs(wired: Wired) -> None:
    lead = await wired.split("leads", "a.csv", table(emails("p")))
    await wired.split("members", "m.csv", table(emails("q", "P")))

    (pack,) = await wired.jobs(lead)
    assert wired.events == [("pack", pack.id)], "the member p names lead p: sealed first"


async def test_a_route_without_keys_packs_as_before(wired: Wired) -> None:
    a = await wired.split("cars", "a.csv", table([["V1", "red"]], ["vin", "colour"]))
    b = await wired.split("cars", "b.csv", table([["V1", "blue"]], ["vin", "colour"]))

    assert await wired.jobs(a) == await wired.jobs(b), "no key rule: one pack"
    (pack,) = await wired.jobs(a)
    assert not keys_path(Path(pack.path)).exists()
    c = await wired.split("vins", "c.csv", table([["V1", "red"]], ["vin", "colour"]))
    d = await wired.split("vins", "d.csv", table([["v1 ", "blue"]], ["vin", "colour"]))
    assert await wired.jobs(c) != await wired.jobs(d), "key_columns: V1 is v1"


# -- files of their own ---------------------------------------------------------------------------


async def test_a_small_file_with_a_repeated_key_keeps_its_chunks_each_with_its_keys(
    wired: Wired,
) -> None:
    file = await wired.split("leads", "r.csv", table(emails("a", "b", "a")))

    chunks = await wired.store.chunks(file_id=file.id)
    assert [c.rows for c in chunks] == [2, 1], "the second a went to a tail chunk"
    assert [c.files for c in chunks] == [1, 1], "not packed"
    assert [list(KeySet.load(keys_path(Path(c.path))).hashes) for c in chunks] == [
        hashes("a", "b"),
        hashes("a"),
    ]
    assert wired.events == [("chunk", file.id)] * 2


async def test_a_split_cut_short_and_done_again_gives_the_same_chunks_and_key_files(
    wired: Wired, tmp_path: Path
) -> None:
    names = [f"p{i % 17}" for i in range(60)]  # 17 keys, repeated near: tail chunks
    text = table(emails(*names))
    whole = await wired.split("leads", "whole.csv", text)
    expected = {p.name: p.read_bytes() for p in wired.settings.layout.chunk_dir(whole.id).iterdir()}
    assert any(name.endswith(".lines") for name in expected)

    wired.crash_after = 2
    with pytest.raises(Crash):
        await wired.split("leads", "cut.csv", text)
    cut = await wired.store.get_file(wired.claims)
    assert len(await wired.store.chunks(file_id=cut.id)) == 2, "recorded before the kill"
    wired.crash_after = None
    cut = await wired.again(cut)

    chunks = await wired.store.chunks(file_id=cut.id)
    again = {p.name: p.read_bytes() for p in wired.settings.layout.chunk_dir(cut.id).iterdir()}
    assert again == expected
    assert [(c.rows, c.first_line) for c in chunks] == [
        (c.rows, c.first_line) for c in await wired.store.chunks(file_id=whole.id)
    ]


# -- source lines of moved rows -------------------------------------------------------------------

BIG = "x" * 500
SOURCE = table(
    [
        ["a@x.com", "Ann"],  # 2
        ["b@x.com", "Bob"],  # 3
        ["A@x.com", "Ann again"],  # 4: moved to tail level 1
        ["c@x.com", "Cat"],  # 5
        ["e@x.com", BIG],  # 6: set aside, too large
        ["b@x.com", "Bob again"],  # 7: moved to tail level 1
        ["d@x.com", "Dee"],  # 8
        ["a@x.com", "Ann thrice"],  # 9: moved to tail level 2
    ]
)


async def complete(
    store: Store, chunk: ChunkRecord, batch: int, failed: Sequence[tuple[str, str]]
) -> None:
    """Marketo took the chunk and failed these (email, firstName) rows."""
    await store.mark_submitting(chunk.id)
    await store.mark_submitted(
        chunk.id, batch_id=batch, marketo_status="Queued", submitted_at=T_END
    )
    path = Path(chunk.path).with_suffix(".failures")
    out = io.StringIO(newline="")
    rows = [[*HEADER, "Import Failure Reason"], *[[*row, "Invalid"] for row in failed]]
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue(), encoding="utf-8", newline="")
    await store.set_chunk_files(chunk.id, failures_path=str(path), warnings_path=None)
    status = BatchStatus(batch, "Complete", rows_processed=chunk.rows, rows_failed=len(failed))
    await store.finish_chunk(
        chunk.id, status=ChunkStatus.COMPLETE, message="", finished_at=T_END, batch=status
    )


async def test_failed_moved_rows_carry_their_own_source_lines(wired: Wired) -> None:
    file = await wired.split("solo", "f.csv", SOURCE)

    chunks = await wired.store.chunks(file_id=file.id)
    assert [c.rows for c in chunks] == [4, 2, 1]
    first, second, third = chunks
    await complete(wired.store, first, 1, [("c@x.com", "Cat"), ("d@x.com", "Dee")])
    await complete(wired.store, second, 2, [("b@x.com", "Bob again")])
    await complete(wired.store, third, 3, [("a@x.com", "Ann thrice")])
    await finish_file(wired.settings, wired.store, await wired.store.get_file(file.id))

    path = wired.settings.layout.done("solo") / "f.csv.failures.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        failures = list(csv.reader(fh))[1:]
    assert sorted((row[1], row[-1]) for row in failures) == [
        ("Ann thrice", "9"),
        ("Bob again", "7"),
        ("Cat", "5"),
        ("Dee", "8"),
        (BIG, "6"),
    ]


async def test_a_pack_left_open_by_a_kill_gets_its_key_set_from_its_records(
    wired: Wired,
) -> None:
    a = await wired.split("leads", "a.csv", table(emails("a", "b")))
    await wired.split("leads", "b.csv", table(emails("c")))
    (pack,) = await wired.jobs(a)
    keys_path(Path(pack.path)).unlink()  # what was in memory is lost

    restarted = Packer(
        wired.settings, wired.store, on_sealed=wired.sealed, key_columns=ConfiguredKeys()
    )
    await restarted.recover(await wired.store.open_packs())

    (sealed,) = await wired.jobs(a)
    assert sealed.sealed
    assert list(KeySet.load(keys_path(Path(sealed.path))).hashes) == hashes("a", "b", "c")
