"""The split stage alone: a real store and real files in tmp_path, the real splitter, and
plain fakes for what the stage hands on (the scheduler's wake-up, the packer, results).

Each test builds a `SplitStage` with callbacks that record what they are told, splits
claimed files with `split` (or through its `run` loop where the claim queue is what is
tested), and looks at the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchestrator import splitter
from orchestrator.catalogue import HeaderCheck
from orchestrator.config import Route, Settings
from orchestrator.errors import CredentialsError, FatalError, MarketoError, TransientError
from orchestrator.models import FileRecord, FileStatus
from orchestrator.splitting import SplitStage
from orchestrator.store import Store
from tests.support.data import LEAD_HEADER, lead_rows
from tests.support.settings import LEADS, fast_settings
from tests.support.stages import claimed_file
from tests.support.waiting import wait_until

UNPACKED = replace(LEADS, dir="solo", pack=False)
LIMIT = 600  # max_chunk_bytes: a few lead rows per chunk


def leads(n: int, prefix: str = "p") -> str:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows([LEAD_HEADER, *lead_rows(n, prefix=prefix)])
    return out.getvalue()


@dataclass
class Small:
    """What the packer was handed for one small file."""

    file: FileRecord
    chunk: splitter.Chunk
    done: splitter.SplitDone
    fmt: str


@dataclass
class Harness:
    """A split stage whose callbacks record what they are told."""

    store: Store
    settings: Settings
    src: Path
    stage: SplitStage = field(init=False)
    woken: list[int] = field(default_factory=list)  # events cut so far, at each wake-up
    small: list[Small] = field(default_factory=list)
    split: list[int] = field(default_factory=list)  # file ids, as their splits ended
    refused: list[int] = field(default_factory=list)
    rejected: int = 0
    drained: int = 0
    caught_up: list[int] = field(default_factory=list)  # files split, at each "caught up"
    fsync: list[bool] = field(default_factory=list)  # what each cut was asked for
    keys: list[splitter.KeyRule | None] = field(default_factory=list)  # ... and its key rule
    cut: int = 0  # events the splitter handed over so far
    claims: int = 0

    def __post_init__(self) -> None:
        self.stage = SplitStage(
            self.settings,
            self.store,
            on_chunk=self.on_chunk,
            on_small=self.on_small,
            on_split=self.on_split,
            on_error=self.refused.append,
            on_drained=self.on_drained,
            on_caught_up=self.on_caught_up,
            observer=self,
            cut=self.cutter,
        )

    async def claim(self, route: str, name: str, text: str) -> FileRecord:
        """`text` claimed as `name` of `route`, after every earlier claim."""
        self.claims += 1
        path = self.src / f"{self.claims}-{name}"
        path.write_text(text, encoding="utf-8", newline="")
        return await claimed_file(
            self.store,
            route,
            name,
            number=self.claims,
            work_path=str(path),
            max_chunk_bytes=LIMIT,
        )

    async def split_file(self, route: str, name: str, text: str) -> FileRecord:
        file = await self.claim(route, name, text)
        await self.stage.split(file)
        return await self.store.get_file(file.id)

    # -- the fakes ---------------------------------------------------------------------

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
        """The real splitter, counting what it hands over."""
        self.fsync.append(fsync)
        self.keys.append(keys)
        events = splitter.split_file_async(
            source, out_dir, max_bytes=max_bytes, fmt=fmt, fsync=fsync, keys=keys
        )
        async with contextlib.aclosing(events):
            async for event in events:
                self.cut += 1
                yield event

    def on_chunk(self) -> None:
        self.woken.append(self.cut)

    async def on_small(
        self, file: FileRecord, chunk: splitter.Chunk, done: splitter.SplitDone, fmt: str
    ) -> None:
        self.small.append(Small(file, chunk, done, fmt))

    async def on_split(self, file_id: int) -> None:
        self.split.append(file_id)

    async def on_drained(self) -> None:
        self.drained += 1

    async def on_caught_up(self) -> None:
        self.caught_up.append(len(self.split))

    def rows(self, outcome: str, n: int) -> None:
        assert outcome == "rejected"
        self.rejected += n


@pytest.fixture
def harness(store: Store, tmp_path: Path) -> Harness:
    settings = fast_settings(
        "http://marketo.invalid", tmp_path / "data", (LEADS, UNPACKED), max_chunk_bytes=LIMIT
    )
    (tmp_path / "src").mkdir()
    return Harness(store, settings, tmp_path / "src")


# -- small files ---------------------------------------------------------------------------


async def test_a_file_of_one_chunk_goes_to_the_packer_unrecorded(harness: Harness) -> None:
    file = await harness.split_file("leads", "a.csv", leads(3, "a"))

    (small,) = harness.small
    assert (small.file.id, small.chunk.index, small.chunk.rows, small.fmt) == (
        file.id,
        1,
        3,
        "csv",
    )
    assert (small.done.rows, small.done.chunks, small.done.header) == (3, 1, tuple(LEAD_HEADER))
    assert small.chunk.path.exists(), "the packer gets the chunk file as the splitter cut it"
    assert await harness.store.chunks(file_id=file.id) == [], "the packer records it"
    assert harness.woken == [], "nothing to send until the packer seals a pack"
    assert file.status is FileStatus.SPLITTING, "split once the packer took it"


async def test_a_file_of_two_chunks_keeps_its_own_and_the_first_waits_for_the_second(
    harness: Harness,
) -> None:
    file = await harness.split_file("leads", "big.csv", leads(40, "big"))

    chunks = await harness.store.chunks(file_id=file.id)
    assert len(chunks) >= 2
    assert harness.small == []
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    assert all(c.files == 1 and c.sealed for c in chunks), "chunks of its own, never a pack"
    # The first chunk is recorded only once the second is cut: it was not the only one.
    assert harness.woken[0] == 2
    assert (file.status, file.chunks_total) == (FileStatus.SPLIT, len(chunks))


async def test_a_route_that_does_not_pack_records_even_a_small_files_chunk(
    harness: Harness,
) -> None:
    file = await harness.split_file("solo", "a.csv", leads(2, "a"))

    assert harness.small == []
    (chunk,) = await harness.store.chunks(file_id=file.id)
    assert (chunk.rows, chunk.sealed, file.status) == (2, True, FileStatus.SPLIT)
    assert harness.woken == [1]


async def test_chunks_are_recorded_in_order_each_waking_the_scheduler_as_it_is_cut(
    harness: Harness,
) -> None:
    file = await harness.split_file("solo", "big.csv", leads(60, "big"))

    chunks = await harness.store.chunks(file_id=file.id)
    assert len(chunks) >= 4
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c.first_line for c in chunks] == sorted(c.first_line for c in chunks)
    assert sum(c.rows for c in chunks) == file.rows == 60
    # One wake-up per chunk, each as soon as that chunk was cut (not at the split's end).
    assert harness.woken == list(range(1, len(chunks) + 1))
    assert harness.split == []  # split() alone: run() says when a split ended


# -- bad files and set-aside records ---------------------------------------------------------


async def test_a_bad_file_is_ended_early_with_its_error_and_the_chunks_it_had(
    harness: Harness,
) -> None:
    text = leads(20, "ok") + 'x@y,"open,quote\n'
    file = await harness.split_file("solo", "bad.csv", text)

    chunks = await harness.store.chunks(file_id=file.id)
    assert len(chunks) >= 1, "cut before the bad record was met"
    assert file.status is FileStatus.SPLIT
    assert file.chunks_total == len(chunks)
    assert file.rows == sum(c.rows for c in chunks)
    assert file.error is not None
    assert file.error.startswith("bad.csv: unterminated quoted field"), (
        "named as the user dropped it, not by our work path"
    )
    assert harness.refused == [file.id], "told, so its chunks not yet sent are not sent"


async def test_a_bad_small_file_never_reaches_the_packer(harness: Harness) -> None:
    file = await harness.split_file("leads", "bad.csv", 'email,firstName,note\nx@y,"oops\n')

    assert harness.small == []
    assert (file.status, file.chunks_total) == (FileStatus.SPLIT, 0)
    assert "unterminated" in (file.error or "")
    assert harness.refused == [file.id]


async def test_a_file_of_a_route_no_longer_configured_fails_without_being_split(
    harness: Harness,
) -> None:
    file = await harness.split_file("gone", "a.csv", leads(2, "a"))

    assert (file.status, file.chunks_total) == (FileStatus.SPLIT, 0)
    assert file.error == "route 'gone' is not configured"
    assert harness.fsync == [], "never cut"


async def test_set_aside_records_are_recorded_and_counted(harness: Harness) -> None:
    text = "email,firstName,note\na@x,A,n\nb@x,B," + "x" * 700 + "\nc@x,C,n\n"
    file = await harness.split_file("leads", "a.csv", text)

    (reject,) = await harness.store.rejects(file.id)
    assert (reject.line, reject.offset) == (3, len("email,firstName,note\na@x,A,n\n"))
    assert "too large" in reject.reason
    assert harness.rejected == 1
    (small,) = harness.small  # the rest is small: it packs
    assert (small.chunk.rows, small.done.rows, small.done.rejected) == (2, 3, 1)


# -- a split again, and durability -------------------------------------------------------------


async def test_a_split_again_keeps_the_chunks_recorded_before_and_never_packs(
    harness: Harness,
) -> None:
    """A stop after a small file's chunk was recorded (it may be sent already): the split
    again records the same chunk, and the file keeps it rather than joining a pack."""
    file = await harness.claim("leads", "a.csv", leads(3, "a"))
    out = harness.settings.layout.chunk_dir(file.id)
    (first,) = [
        e
        for e in splitter.split_file(Path(file.work_path), out, max_bytes=LIMIT, fmt="csv")
        if isinstance(e, splitter.Chunk)
    ]
    before = await harness.store.add_chunk(
        file.id,
        index=1,
        path=str(first.path),
        rows=first.rows,
        bytes=first.bytes,
        first_line=first.first_line,
    )

    await harness.stage.split(await harness.store.get_file(file.id))

    assert harness.small == []
    assert [c.id for c in await harness.store.chunks(file_id=file.id)] == [before.id]
    after = await harness.store.get_file(file.id)
    assert (after.status, after.chunks_total) == (FileStatus.SPLIT, 1)
    assert harness.fsync == [True]


async def test_only_a_file_that_will_pack_is_cut_without_fsync(harness: Harness) -> None:
    """A file under a chunk's limit on a route that packs is cut without fsync: the packer
    makes the chunk durable if it becomes a pack, and a joiner's chunk file goes. Every
    other chunk is fsynced before the store says it exists."""
    await harness.split_file("leads", "small.csv", leads(2, "s"))
    await harness.split_file("leads", "big.csv", leads(40, "b"))
    await harness.split_file("solo", "solo.csv", leads(2, "o"))

    assert harness.fsync == [False, True, True]


# -- the claim queue ---------------------------------------------------------------------------


async def test_run_splits_in_claim_order_and_says_when_it_is_caught_up_and_drained(
    harness: Harness,
) -> None:
    stage = harness.stage
    files = [await harness.claim("solo", f"{n}.csv", leads(2, n)) for n in "abc"]
    for file in files:
        stage.claimed(file.id)
    stage.drained()
    assert stage.backlog()

    stop = asyncio.Event()
    running = asyncio.ensure_future(stage.run(stop))
    try:
        await wait_until(lambda: harness.drained, "the drain marker")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)

    assert harness.split == [f.id for f in files]
    # The marker still waited after the last file: caught up only once it is taken.
    assert harness.caught_up == []
    assert not stage.backlog()
    for file in files:
        assert (await harness.store.get_file(file.id)).status is FileStatus.SPLIT


async def test_run_is_caught_up_each_time_the_queue_empties(harness: Harness) -> None:
    stage, stop = harness.stage, asyncio.Event()
    running = asyncio.ensure_future(stage.run(stop))
    try:
        first = await harness.claim("solo", "a.csv", leads(1, "a"))
        stage.claimed(first.id)
        await wait_until(lambda: harness.caught_up == [1], "caught up after a.csv")
        later = [await harness.claim("solo", f"{n}.csv", leads(1, n)) for n in "bc"]
        stage.recover(later)  # two at once: caught up after both, not between
        await wait_until(lambda: len(harness.caught_up) == 2, "caught up after c.csv")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)

    assert harness.caught_up == [1, 3]
    assert harness.split == [first.id, *(f.id for f in later)]


# -- the header, checked before the first chunk --------------------------------------------


@dataclass
class Headers:
    """The catalogue's stand-in: a verdict per file name (none: a clean header), after
    raising the errors queued in `trouble`, one per ask."""

    verdicts: dict[str, HeaderCheck] = field(default_factory=dict)
    trouble: list[MarketoError] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    async def check_file(self, route: Route, path: Path, fmt: str) -> HeaderCheck | None:
        name = path.name.split("-", 1)[1]  # the harness's work path: "<n>-<name>"
        self.asked.append(name)
        if self.trouble:
            raise self.trouble.pop(0)
        return self.verdicts.get(name, verdict())

    async def key_columns(self, route: Route) -> tuple[str, ...]:
        return ("email",)


def verdict(*, missing: tuple[str, ...] = (), unknown: tuple[str, ...] = ()) -> HeaderCheck:
    return HeaderCheck("leads", ("email",), missing, unknown, unknown_fails=False)


async def test_a_missing_key_column_fails_the_file_before_any_chunk_is_recorded(
    harness: Harness,
) -> None:
    no_key = verdict(missing=("email",))
    headers = Headers({"big.csv": no_key, "small.csv": no_key})
    harness.stage.catalogue = headers

    big = await harness.split_file("solo", "big.csv", leads(40, "b"))
    small = await harness.split_file("leads", "small.csv", leads(2, "s"))

    for file in (big, small):
        assert file.error == "the header lacks the key column 'email' of leads"
        assert (file.status, file.chunks_total) == (FileStatus.SPLIT, 0)
        assert await harness.store.chunks(file_id=file.id) == []
    assert harness.fsync == [], "never cut"
    assert harness.woken == [], "nothing for the scheduler: no job"
    assert harness.small == [], "a small file is checked before it joins a pack"
    assert harness.refused == [big.id, small.id]


async def test_unknown_columns_are_warned_of_and_kept_for_the_result(harness: Harness) -> None:
    harness.stage.catalogue = Headers({"a.csv": verdict(unknown=("emial",))})
    with capture_logs() as logs:
        file = await harness.split_file("solo", "a.csv", leads(2, "a"))

    assert file.error is None
    assert file.warnings == ("column 'emial' matches no field of leads",)
    assert len(await harness.store.chunks(file_id=file.id)) == 1
    (event,) = [e for e in logs if e["event"] == "header_columns_unknown"]
    assert event["warnings"] == ["column 'emial' matches no field of leads"]


async def test_while_marketo_cannot_describe_the_object_the_file_waits(harness: Harness) -> None:
    """Unreachable, refused credentials, 603: Marketo's state, not the file's. The file
    waits (with backoff) and goes on once Marketo answers; the log says why it waited."""
    headers = Headers(
        trouble=[
            TransientError("608", "API Temporarily Unavailable"),
            CredentialsError("http-401", "refused"),
            FatalError("603", "Access denied"),
        ]
    )
    harness.stage.catalogue = headers
    with capture_logs() as logs:
        file = await harness.split_file("solo", "a.csv", leads(2, "a"))

    assert headers.asked == ["a.csv"] * 4
    assert file.error is None
    assert len(await harness.store.chunks(file_id=file.id)) == 1
    waits = [e for e in logs if e["event"] == "header_check_waits"]
    assert [w["error"] for w in waits] == [
        "Marketo error 608: API Temporarily Unavailable",
        "Marketo error http-401: refused",
        "Marketo error 603: Access denied",
    ]
    assert all(w["retry_in"] > 0 for w in waits)


async def test_an_object_marketo_does_not_have_fails_the_file(harness: Harness) -> None:
    harness.stage.catalogue = Headers(trouble=[FatalError("1013", "Object not found")])
    file = await harness.split_file("solo", "a.csv", leads(2, "a"))

    assert file.error is not None
    assert file.error.startswith("Marketo could not describe leads: ")
    assert "Object not found" in file.error
    assert await harness.store.chunks(file_id=file.id) == []


async def test_a_stop_while_the_file_waits_leaves_it_to_split_again(harness: Harness) -> None:
    headers = Headers(trouble=[TransientError("network", "no route")] * 1000)
    harness.stage.catalogue = headers
    file = await harness.claim("solo", "a.csv", leads(2, "a"))
    harness.stage.claimed(file.id)
    stop = asyncio.Event()
    running = asyncio.ensure_future(harness.stage.run(stop))
    try:
        await wait_until(lambda: len(headers.asked) >= 2, "a second ask after a wait")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)

    after = await harness.store.get_file(file.id)
    assert (after.status, after.error) == (FileStatus.SPLITTING, None), "recovered next start"
    assert await harness.store.chunks(file_id=file.id) == []


async def test_a_split_again_with_chunks_recorded_is_not_checked_again(harness: Harness) -> None:
    """Its chunks may be at Marketo already: it passed its check before."""
    headers = Headers({"big.csv": verdict(missing=("email",))})
    file = await harness.claim("solo", "big.csv", leads(40, "b"))
    out = harness.settings.layout.chunk_dir(file.id)
    first = next(
        e
        for e in splitter.split_file(Path(file.work_path), out, max_bytes=LIMIT, fmt="csv")
        if isinstance(e, splitter.Chunk)
    )
    await harness.store.start_split(file.id)
    await harness.store.add_chunk(
        file.id,
        index=1,
        path=str(first.path),
        rows=first.rows,
        bytes=first.bytes,
        first_line=first.first_line,
    )
    harness.stage.catalogue = headers

    await harness.stage.split(await harness.store.get_file(file.id))

    assert headers.asked == []
    after = await harness.store.get_file(file.id)
    assert (after.status, after.error) == (FileStatus.SPLIT, None)
