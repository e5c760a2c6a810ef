"""Per-file results alone: a real store and real files in tmp_path, no Marketo.

Chunks, failures and warnings files are written by hand in Marketo's shape (the
chunk's header plus a reason column), and the store is walked through the same
transitions the pipeline makes (claim, split, submit, finish).
"""

from __future__ import annotations

import csv
import io
import json
import random
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator import constants, splitter
from orchestrator.config import Settings
from orchestrator.layout import part_name
from orchestrator.models import (
    BatchStatus,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
)
from orchestrator.results import (
    Outcome,
    Results,
    attribute_chunk,
    attribution,
    finish,
    finish_file,
    matching,
    merge,
    outcome,
)
from orchestrator.store import Store
from tests.support.settings import CARS, LEADS, fast_settings
from tests.support.stages import claimed_file

RESULT_KEYS = {
    "id", "file", "route", "object", "status", "error", "warnings", "rows", "rows_processed",
    "rows_failed", "rows_with_warning", "chunks", "failures_file", "warnings_file",
    "claimed_at", "finished_at",
}  # fmt: skip
CHUNK_KEYS = {
    "index", "rows", "bytes", "batch_id", "status", "rows_processed", "rows_failed",
    "rows_with_warning", "submits", "message", "shared", "unmatched_rows",
}  # fmt: skip
HEADER = "email,firstName\n"
BIG = "x" * 300
# Source line numbers on the left; the record at line 2 spans two lines, and the
# one at line 5 was set aside by the splitter (too large for a chunk).
SOURCE_LINES = [
    HEADER,  # 1
    'a@x.com,"Ann\nMarie"\n',  # 2-3
    "b@x.com,Bob\n",  # 4
    f"c@x.com,{BIG}\n",  # 5
    "d@x.com,Dee\n",  # 6
    "e@x.com,Eve\n",  # 7
]
SOURCE = "".join(SOURCE_LINES)
REJECT_OFFSET = len("".join(SOURCE_LINES[:3]).encode())
REJECT_SIZE = len(SOURCE_LINES[3].encode())
REJECT_REASON = f"record of {REJECT_SIZE} bytes is too large"
T_END = "2026-11-23T14:05:00.000000Z"
MARKETO_FAILED = "Import failed: field 'email' is not a column of the file"


def make_settings(tmp_path: Path) -> Settings:
    return fast_settings("http://marketo.invalid", tmp_path / "data", (LEADS, CARS))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@dataclass
class Files:
    """Builds claimed files, their chunks and Marketo's answers, as the pipeline would."""

    settings: Settings
    store: Store
    claims: int = 0

    async def claim(self, name: str, text: str = SOURCE, route: str = "leads") -> FileRecord:
        self.claims += 1
        layout = self.settings.layout
        work = layout.incoming / f"{self.claims}-{name}"
        work.parent.mkdir(parents=True, exist_ok=True)
        work.write_text(text, encoding="utf-8", newline="")
        return await claimed_file(
            self.store, route, name, number=self.claims, work_path=str(work), max_chunk_bytes=256
        )

    async def chunk(
        self, file: FileRecord, index: int, lines: list[str], first_line: int, header: str = HEADER
    ) -> ChunkRecord:
        """A chunk file of the source's header and `lines` (whole records)."""
        directory = self.settings.layout.chunk_dir(file.id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"chunk-{index:05d}.csv"
        data = header + "".join(lines)
        path.write_text(data, encoding="utf-8", newline="")
        return await self.store.add_chunk(
            file.id,
            index=index,
            path=str(path),
            rows=len(lines),
            bytes=len(data.encode()),
            first_line=first_line,
        )

    async def complete(
        self,
        chunk: ChunkRecord,
        batch_id: int,
        *,
        failures: Sequence[tuple[list[str], str]] = (),
        warnings: Sequence[tuple[list[str], str]] = (),
        columns: Sequence[str] = ("email", "firstName"),
    ) -> ChunkRecord:
        """Marketo took the chunk and said Complete, with these failed and warned rows (under
        `columns`, Marketo's header before its reason column)."""
        await self.submit(chunk, batch_id)
        paths: dict[str, str | None] = {"failures": None, "warnings": None}
        for kind, rows, column in (
            ("failures", failures, constants.FAILURE_REASON_COLUMN),
            ("warnings", warnings, constants.WARNING_REASON_COLUMN),
        ):
            if rows:
                path = Path(chunk.path).with_suffix(f".{kind}")
                write_csv(path, [[*columns, column], *[[*f, r] for f, r in rows]])
                paths[kind] = str(path)
        await self.store.set_chunk_files(
            chunk.id, failures_path=paths["failures"], warnings_path=paths["warnings"]
        )
        batch = BatchStatus(
            batch_id,
            "Complete",
            rows_processed=chunk.job_rows - len(failures),
            rows_failed=len(failures),
            rows_with_warning=len(warnings),
        )
        return await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.COMPLETE, message="", finished_at=T_END, batch=batch
        )

    async def fail(self, chunk: ChunkRecord, batch_id: int, message: str) -> ChunkRecord:
        await self.submit(chunk, batch_id)
        batch = BatchStatus(batch_id, "Failed", message=message)
        return await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.FAILED, message=message, finished_at=T_END, batch=batch
        )

    async def submit(self, chunk: ChunkRecord, batch_id: int) -> None:
        await self.store.mark_submitting(chunk.id)
        await self.store.mark_submitted(
            chunk.id, batch_id=batch_id, marketo_status="Queued", submitted_at=T_END
        )

    async def big_csv(self, name: str = "big.csv") -> FileRecord:
        """The SOURCE file, split in two chunks around its set-aside record, both Complete:
        a failure in each chunk and a warning in the second."""
        file = await self.claim(name)
        first = await self.chunk(file, 1, SOURCE_LINES[1:3], first_line=2)
        second = await self.chunk(file, 2, SOURCE_LINES[4:6], first_line=6)
        await self.store.add_reject(
            file.id, line=5, offset=REJECT_OFFSET, size=REJECT_SIZE, reason=REJECT_REASON
        )
        await self.store.finish_split(file.id, rows=5, chunks_total=2)
        await self.complete(first, 1001, failures=[(["b@x.com", "Bob"], "Invalid email")])
        await self.complete(
            second,
            1002,
            failures=[(["e@x.com", "Eve"], "Duplicate lead")],
            warnings=[(["d@x.com", "Dee"], "Field truncated")],
        )
        return await self.store.get_file(file.id)


def write_csv(path: Path, rows: list[list[str]]) -> None:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")


def read_csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def exists(path: str) -> bool:
    return Path(path).exists()


def temp_files(root: Path) -> list[Path]:
    """Temp files (ours start with "." and end in .tmp) anywhere under `root`."""
    return list(root.rglob(".*.tmp"))


def by_line(rows: list[list[str]]) -> list[list[str]]:
    """Data rows ordered by their Source Line column (the last one)."""
    return sorted(rows, key=lambda row: int(row[-1]))


@pytest.fixture
def files(settings: Settings, store: Store) -> Files:
    return Files(settings, store)


# -- outcome ------------------------------------------------------------------------------------

FILE = FileRecord(
    id=7,
    route="leads",
    name="big.csv",
    source_path="/data/inbox/leads/big.csv",
    work_path="/data/work/incoming/1-big.csv",
    status=FileStatus.SPLIT,
    max_chunk_bytes=2000,
    claimed_at="2026-11-23T14:00:00Z",
)


def chunk_record(index: int, status: ChunkStatus, **fields: Any) -> ChunkRecord:
    return ChunkRecord(
        id=index,
        file_id=7,
        index=index,
        path=f"/data/work/chunks/7/chunk-{index:05d}.csv",
        rows=10,
        bytes=900,
        first_line=2 + 10 * (index - 1),
        status=status,
        **fields,
    )


def test_outcome_is_complete_when_every_chunk_is_complete() -> None:
    chunks = [
        chunk_record(1, ChunkStatus.COMPLETE, batch_id=1001, rows_failed=3),
        chunk_record(2, ChunkStatus.COMPLETE, batch_id=1002),
    ]
    assert outcome(FILE, chunks) == Outcome(FileStatus.COMPLETE, None)
    assert outcome(FILE, []) == Outcome(FileStatus.COMPLETE, None)  # header-only file


def test_outcome_names_the_first_failed_chunk_and_its_batch() -> None:
    chunks = [
        chunk_record(1, ChunkStatus.COMPLETE, batch_id=1001),
        chunk_record(2, ChunkStatus.FAILED, batch_id=1002, message=MARKETO_FAILED),
        chunk_record(3, ChunkStatus.FAILED, batch_id=1003, message="Import failed: other"),
    ]
    assert outcome(FILE, chunks) == Outcome(
        FileStatus.FAILED, f"chunk 2 (batch 1002) failed: {MARKETO_FAILED}"
    )


def test_outcome_of_a_chunk_that_never_got_a_batch() -> None:
    chunks = [chunk_record(1, ChunkStatus.FAILED), chunk_record(2, ChunkStatus.FAILED)]
    assert outcome(FILE, chunks) == Outcome(FileStatus.FAILED, "chunk 1 failed: import failed")


def test_outcome_prefers_the_files_own_error() -> None:
    refused = replace(FILE, error="big.csv: file is empty: no header line (line 1)")
    chunks = [chunk_record(1, ChunkStatus.FAILED, batch_id=1001, message=MARKETO_FAILED)]
    assert outcome(refused, chunks) == Outcome(FileStatus.FAILED, refused.error)


# -- finish_file --------------------------------------------------------------------------------


async def test_complete_file_result_and_merged_failures(
    settings: Settings, store: Store, files: Files
) -> None:
    file = await files.big_csv()

    record, document = await finish_file(settings, store, file)

    done = settings.layout.done("leads")
    result_path = done / "big.csv.result.json"
    assert record.status is FileStatus.COMPLETE
    assert record.result_path == str(result_path)
    assert json.loads(result_path.read_text(encoding="utf-8")) == document
    assert set(document) == RESULT_KEYS
    assert {k: v for k, v in document.items() if k not in ("chunks", "finished_at")} == {
        "id": file.ticket,
        "file": "big.csv",
        "route": "leads",
        "object": "leads",
        "status": "complete",
        "error": None,
        "warnings": [],
        "rows": 5,
        "rows_processed": 2,
        "rows_failed": 3,  # one per chunk, and the record the splitter set aside
        "rows_with_warning": 1,
        "failures_file": "big.csv.failures.csv",
        "warnings_file": "big.csv.warnings.csv",
        "claimed_at": file.claimed_at,
    }
    assert document["finished_at"] == record.finished_at
    assert [set(c) for c in document["chunks"]] == [CHUNK_KEYS, CHUNK_KEYS]
    assert [
        (c["index"], c["batch_id"], c["status"], c["rows"], c["rows_failed"])
        for c in document["chunks"]
    ] == [(1, 1001, "Complete", 2, 1), (2, 1002, "Complete", 2, 1)]
    assert [c["submits"] for c in document["chunks"]] == [1, 1]
    assert [c["shared"] for c in document["chunks"]] == [None, None]  # chunks of its own

    failures = read_csv(done / "big.csv.failures.csv")
    assert failures[0] == [
        "email",
        "firstName",
        constants.FAILURE_REASON_COLUMN,
        constants.SOURCE_LINE_COLUMN,
    ]
    assert by_line(failures[1:]) == [
        ["b@x.com", "Bob", "Invalid email", "4"],  # after a record of two lines
        ["c@x.com", BIG, REJECT_REASON, "5"],  # set aside by the splitter
        ["e@x.com", "Eve", "Duplicate lead", "7"],  # chunk 2 starts at source line 6
    ]
    assert read_csv(done / "big.csv.warnings.csv") == [
        ["email", "firstName", constants.WARNING_REASON_COLUMN, constants.SOURCE_LINE_COLUMN],
        ["d@x.com", "Dee", "Field truncated", "6"],
    ]

    # The source moved to done/, work/ cleaned, nothing in failed/.
    assert (done / "big.csv").read_text(encoding="utf-8") == SOURCE
    assert not exists(file.work_path)
    assert not settings.layout.chunk_dir(file.id).exists()
    assert not settings.layout.failed("leads").exists()


async def test_complete_file_without_failures_writes_no_failures_file(
    settings: Settings, store: Store, files: Files
) -> None:
    file = await files.claim("clean.csv", HEADER + "a@x.com,Ann\n")
    chunk = await files.chunk(file, 1, ["a@x.com,Ann\n"], first_line=2)
    await store.finish_split(file.id, rows=1, chunks_total=1)
    await files.complete(chunk, 1001)

    _, document = await finish_file(settings, store, await store.get_file(file.id))

    assert (document["failures_file"], document["warnings_file"]) == (None, None)
    assert sorted(p.name for p in settings.layout.done("leads").iterdir()) == [
        "clean.csv",
        "clean.csv.result.json",
    ]


async def test_failed_file_goes_to_failed_with_one_sentence_why(
    settings: Settings, store: Store, files: Files
) -> None:
    file = await files.claim("big.csv")
    first = await files.chunk(file, 1, SOURCE_LINES[1:3], first_line=2)
    second = await files.chunk(file, 2, SOURCE_LINES[4:6], first_line=6)
    await store.finish_split(file.id, rows=5, chunks_total=2)
    await files.complete(first, 1001)
    await files.fail(second, 1002, MARKETO_FAILED)

    record, document = await finish_file(settings, store, await store.get_file(file.id))

    failed = settings.layout.failed("leads")
    why = f"chunk 2 (batch 1002) failed: {MARKETO_FAILED}"
    assert (record.status, record.error) == (FileStatus.FAILED, why)
    assert (document["status"], document["error"]) == ("failed", why)
    assert [c["status"] for c in document["chunks"]] == ["Complete", "Failed"]
    assert document["chunks"][1]["message"] == MARKETO_FAILED
    assert (failed / "big.csv").read_text(encoding="utf-8") == SOURCE
    assert json.loads((failed / "big.csv.result.json").read_text(encoding="utf-8")) == document
    assert not (settings.layout.done("leads") / "big.csv").exists()


async def test_refused_chunks_are_reported_as_not_submitted(
    settings: Settings, store: Store, files: Files
) -> None:
    file = await files.claim("big.csv")
    first = await files.chunk(file, 1, SOURCE_LINES[1:3], first_line=2)
    second = await files.chunk(file, 2, SOURCE_LINES[4:6], first_line=6)
    await store.finish_split(file.id, rows=5, chunks_total=2)
    refused = "import: Marketo error 1003: Invalid file format"
    await store.set_file_error(file.id, refused)
    for chunk, message in ((first, refused), (second, "not submitted: chunk 1 was refused")):
        await store.finish_chunk(
            chunk.id, status=ChunkStatus.FAILED, message=message, finished_at=T_END
        )

    record, document = await finish_file(settings, store, await store.get_file(file.id))

    assert (record.status, document["error"]) == (FileStatus.FAILED, refused)
    assert [(c["status"], c["batch_id"]) for c in document["chunks"]] == [
        ("NotSubmitted", None),
        ("NotSubmitted", None),
    ]
    assert (settings.layout.failed("leads") / "big.csv.result.json").exists()


async def test_a_second_file_of_the_same_name_never_overwrites_the_first(
    settings: Settings, store: Store, files: Files
) -> None:
    one = await files.big_csv()
    await finish_file(settings, store, one)
    done = settings.layout.done("leads")
    first_result = (done / "big.csv.result.json").read_bytes()
    first_failures = (done / "big.csv.failures.csv").read_bytes()

    two = await files.claim("big.csv", HEADER + "z@x.com,Zed\n")
    chunk = await files.chunk(two, 1, ["z@x.com,Zed\n"], first_line=2)
    await store.finish_split(two.id, rows=1, chunks_total=1)
    await files.complete(chunk, 2001, failures=[(["z@x.com", "Zed"], "Invalid email")])
    record, document = await finish_file(settings, store, await store.get_file(two.id))

    assert record.result_path == str(done / "big.2.csv.result.json")
    assert document["file"] == "big.csv"
    assert document["failures_file"] == "big.2.csv.failures.csv"
    assert (done / "big.2.csv").read_text(encoding="utf-8") == HEADER + "z@x.com,Zed\n"
    assert read_csv(done / "big.2.csv.failures.csv")[1:] == [
        ["z@x.com", "Zed", "Invalid email", "2"]
    ]
    assert (done / "big.csv.result.json").read_bytes() == first_result
    assert (done / "big.csv.failures.csv").read_bytes() == first_failures
    assert (done / "big.csv").read_text(encoding="utf-8") == SOURCE


async def test_a_name_taken_on_disk_is_not_overwritten(
    settings: Settings, store: Store, files: Files
) -> None:
    done = settings.layout.done("leads")
    done.mkdir(parents=True)
    (done / "big.csv").write_text("someone else's file\n", encoding="utf-8")
    file = await files.big_csv()

    record, _ = await finish_file(settings, store, file)

    assert record.result_path == str(done / "big.2.csv.result.json")
    assert (done / "big.csv").read_text(encoding="utf-8") == "someone else's file\n"
    assert (done / "big.2.csv").read_text(encoding="utf-8") == SOURCE


# -- finishing again after a crash ----------------------------------------------------------------


class Crash(Exception):
    """Stands for kill -9 at a crash point."""


async def expected_outputs(tmp_path: Path) -> dict[str, bytes]:
    """What a clean run leaves in done/leads/ for `big_csv`, but result.json (timestamps)."""
    settings = make_settings(tmp_path / "clean")
    async with await Store.open(tmp_path / "clean" / "state.db") as store:
        file = await Files(settings, store).big_csv()
        await finish_file(settings, store, file)
    done = settings.layout.done("leads")
    return {p.name: p.read_bytes() for p in done.iterdir() if not p.name.endswith(".json")}


async def test_finishing_again_after_a_crash_before_the_source_moved(
    settings: Settings,
    store: Store,
    files: Files,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    file = await files.big_csv()

    def crash_at_results_written(name: str) -> None:
        if name == "results_written":
            raise Crash(name)

    monkeypatch.setattr(finish, "crashpoint", crash_at_results_written)
    with pytest.raises(Crash):
        await finish_file(settings, store, file)
    done = settings.layout.done("leads")
    assert exists(file.work_path)  # the failures file is written, the source not moved
    assert not (done / "big.csv.result.json").exists()
    assert (await store.get_file(file.id)).status is FileStatus.FINISHING

    monkeypatch.undo()
    record, document = await finish_file(settings, store, await store.get_file(file.id))

    assert record.status is FileStatus.COMPLETE
    assert record.result_path == str(done / "big.csv.result.json")
    outputs = {p.name: p.read_bytes() for p in done.iterdir() if not p.name.endswith(".json")}
    assert outputs == await expected_outputs(tmp_path)
    assert json.loads((done / "big.csv.result.json").read_text(encoding="utf-8")) == document
    assert document["rows_failed"] == 3


async def test_finishing_again_after_a_crash_after_the_result_was_written(
    settings: Settings,
    store: Store,
    files: Files,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    file = await files.big_csv()

    async def crash(*args: object, **kwargs: object) -> FileRecord:
        raise Crash("before the store recorded the finish")

    monkeypatch.setattr(store, "finish_file", crash)
    with pytest.raises(Crash):
        await finish_file(settings, store, file)
    done = settings.layout.done("leads")
    written = (done / "big.csv.result.json").read_bytes()
    assert not exists(file.work_path)  # the source is in done/ already

    monkeypatch.undo()
    record, document = await finish_file(settings, store, await store.get_file(file.id))

    # The result written first stands, and the store agrees with it.
    assert (done / "big.csv.result.json").read_bytes() == written
    assert json.loads(written) == document
    assert (record.status, record.finished_at) == (FileStatus.COMPLETE, document["finished_at"])
    outputs = {p.name: p.read_bytes() for p in done.iterdir() if not p.name.endswith(".json")}
    assert outputs == await expected_outputs(tmp_path)  # rejects read back from done/
    assert not (done / "big.2.csv").exists()


# -- known gaps ---------------------------------------------------------------------------------------


async def test_source_lines_after_a_record_set_aside_inside_a_chunk(
    settings: Settings, store: Store, files: Files, tmp_path: Path
) -> None:
    text = f"{HEADER}a@x.com,Ann\nb@x.com,{BIG}\nc@x.com,Cat\nd@x.com,Dee\n"
    file = await files.claim("mid.csv", text)
    out = settings.layout.chunk_dir(file.id)
    out.mkdir(parents=True)
    # The real splitter, recorded as the pipeline records its events.
    for event in splitter.split_file(Path(file.work_path), out, max_bytes=256, fmt="csv"):
        if isinstance(event, splitter.Chunk):
            await store.add_chunk(
                file.id,
                index=event.index,
                path=str(event.path),
                rows=event.rows,
                bytes=event.bytes,
                first_line=event.first_line,
            )
        elif isinstance(event, splitter.Rejected):
            await store.add_reject(
                file.id, line=event.line, offset=event.offset, size=event.size, reason=event.reason
            )
        else:
            await store.finish_split(file.id, rows=event.rows, chunks_total=event.chunks)
    (chunk,) = await store.chunks(file_id=file.id)
    assert (chunk.rows, chunk.first_line) == (3, 2)  # a, c, d: b (line 3) was set aside
    await files.complete(chunk, 1001, failures=[(["c@x.com", "Cat"], "Invalid email")])

    await finish_file(settings, store, await store.get_file(file.id))

    failures = read_csv(settings.layout.done("leads") / "mid.csv.failures.csv")
    assert [(row[0], row[-1]) for row in by_line(failures[1:])] == [
        ("b@x.com", "3"),
        ("c@x.com", "4"),
    ]


async def test_chunk_summaries_count_the_submits(
    settings: Settings, store: Store, files: Files
) -> None:
    file = await files.big_csv()

    _, document = await finish_file(settings, store, file)

    assert [c.get("submits") for c in document["chunks"]] == [1, 1]


# -- shared chunks: each file's share of a pack ---------------------------------------------------

# Four small files packed into one chunk, in this order. Source line numbers on the left.
PACKED = {
    "a.csv": [
        HEADER,  # 1
        "a1@x.com,Ann\n",  # 2
        'a2@x.com,"Al\nLine"\n',  # 3-4
        f"a3@x.com,{BIG}\n",  # 5: set aside by the splitter
        "bad-a4,Ada\n",  # 6: fails
        "a5@x.com,Abe\n",  # 7: warned
    ],
    "b.csv": [
        HEADER,  # 1
        'b1@x.com,"Bo\nB"\n',  # 2-3: fails
        "b2@x.com,Bea\n",  # 4
        "bad-b3,Ben\n",  # 5: fails
    ],
    "c.csv": [HEADER, "c1@x.com,Cy\n", "c2@x.com,Cat\n"],  # c1 (line 2) warned
    "d.csv": [HEADER, "d1@x.com,Di\n"],
}
PACK_FAILURES = [
    (["bad-a4", "Ada"], "1003 Invalid email address"),
    (["b1@x.com", "Bo\nB"], "Duplicate lead"),
    (["bad-b3", "Ben"], "1003 Invalid email address"),
]
PACK_WARNINGS = [(["a5@x.com", "Abe"], "Field truncated"), (["c1@x.com", "Cy"], "Field truncated")]
A_REJECT_OFFSET = len("".join(PACKED["a.csv"][:3]).encode())
A_REJECT_SIZE = len(PACKED["a.csv"][3].encode())


@dataclass
class Pack:
    chunk: ChunkRecord  # the job, as its owner sees it
    files: dict[str, FileRecord]
    text: str  # the pack file


async def make_pack(files: Files) -> Pack:
    """PACKED's files claimed, split and packed into one sealed chunk as the packer does:
    the owner's chunk file, the later files' records appended, each piece recorded."""
    store, claimed = files.store, {}
    for name, lines in PACKED.items():
        claimed[name] = await files.claim(name, "".join(lines))
    a = claimed["a.csv"]
    await store.add_reject(
        a.id, line=5, offset=A_REJECT_OFFSET, size=A_REJECT_SIZE, reason=REJECT_REASON
    )
    directory = files.settings.layout.chunk_dir(a.id)
    directory.mkdir(parents=True)
    path = directory / "chunk-00001.csv"
    kept = [line for line in PACKED["a.csv"][1:] if not line.startswith("a3@")]
    text = HEADER + "".join(kept)
    path.write_text(text, encoding="utf-8", newline="")
    chunk = await store.open_pack(
        a.id, path=str(path), rows=4, bytes=len(text.encode()), first_line=2, file_rows=5
    )
    for name in ("b.csv", "c.csv", "d.csv"):
        records = "".join(PACKED[name][1:])
        with path.open("a", encoding="utf-8", newline="") as fh:
            fh.write(records)
        text += records
        await store.join_pack(
            chunk.id,
            claimed[name].id,
            rows=len(PACKED[name]) - 1,
            bytes=len(records.encode()),
            first_line=2,
            file_rows=len(PACKED[name]) - 1,
        )
    await store.seal_pack(chunk.id)
    (chunk,) = await store.chunks(file_id=a.id)
    return Pack(chunk, claimed, text)


async def finish_all(
    settings: Settings,
    store: Store,
    pack: Pack,
    order: Sequence[str] = ("d.csv", "a.csv", "b.csv", "c.csv"),
) -> dict[str, dict[str, Any]]:
    """Finish the packed files (a member before the owner, by default); their documents."""
    documents = {}
    for name in order:
        _, documents[name] = await finish_file(
            settings, store, await store.get_file(pack.files[name].id)
        )
    return documents


def outputs(settings: Settings) -> dict[str, bytes]:
    """Every result file but result.json (timestamps), complete or failed."""
    found = {}
    for directory in (settings.layout.done("leads"), settings.layout.failed("leads")):
        if directory.is_dir():
            found |= {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix != ".json"}
    return found


async def test_a_shared_chunk_gives_each_file_its_own_counts_and_source_lines(
    settings: Settings, store: Store, files: Files
) -> None:
    pack = await make_pack(files)
    job = await files.complete(pack.chunk, 3001, failures=PACK_FAILURES, warnings=PACK_WARNINGS)
    assert (job.job_rows, job.files, job.rows_processed, job.rows_failed) == (10, 4, 7, 3)

    documents = await finish_all(settings, store, pack)

    counts = {
        name: (
            d["status"],
            d["rows"],
            d["rows_processed"],
            d["rows_failed"],
            d["rows_with_warning"],
        )
        for name, d in documents.items()
    }
    assert counts == {
        "a.csv": ("complete", 5, 3, 2, 1),  # 4 in the pack, 1 failed; 1 set aside
        "b.csv": ("complete", 3, 1, 2, 0),
        "c.csv": ("complete", 2, 2, 0, 1),
        "d.csv": ("complete", 1, 1, 0, 0),
    }
    shared = {"files": 4, "rows": 10, "bytes": len(pack.text.encode())}
    for name, document in documents.items():
        (chunk,) = document["chunks"]
        lines = PACKED[name][1:]
        rows = len(lines) - (name == "a.csv")
        assert (chunk["batch_id"], chunk["status"], chunk["rows"]) == (3001, "Complete", rows)
        assert chunk["shared"] == shared
        assert (chunk["rows_processed"], chunk["rows_failed"], chunk["rows_with_warning"]) == {
            "a.csv": (3, 1, 1),  # its set-aside record is not in the chunk
            "b.csv": (1, 2, 0),
            "c.csv": (2, 0, 1),
            "d.csv": (1, 0, 0),
        }[name]
    assert documents["b.csv"]["chunks"][0]["bytes"] == len("".join(PACKED["b.csv"][1:]).encode())
    done = settings.layout.done("leads")
    reason, line = constants.FAILURE_REASON_COLUMN, constants.SOURCE_LINE_COLUMN
    assert read_csv(done / "a.csv.failures.csv") == [
        ["email", "firstName", reason, line],
        ["bad-a4", "Ada", "1003 Invalid email address", "6"],  # after a set-aside record
        ["a3@x.com", BIG, REJECT_REASON, "5"],
    ]
    assert read_csv(done / "b.csv.failures.csv") == [
        ["email", "firstName", reason, line],
        ["b1@x.com", "Bo\nB", "Duplicate lead", "2"],
        ["bad-b3", "Ben", "1003 Invalid email address", "5"],  # after a record of two lines
    ]
    warned = [["email", "firstName", constants.WARNING_REASON_COLUMN, line]]
    assert read_csv(done / "a.csv.warnings.csv") == [
        *warned,
        ["a5@x.com", "Abe", "Field truncated", "7"],
    ]
    assert read_csv(done / "c.csv.warnings.csv") == [
        *warned,
        ["c1@x.com", "Cy", "Field truncated", "2"],
    ]
    assert sorted(outputs(settings)) == [
        "a.csv", "a.csv.failures.csv", "a.csv.warnings.csv", "b.csv", "b.csv.failures.csv",
        "c.csv", "c.csv.warnings.csv", "d.csv",
    ]  # fmt: skip
    assert [documents[n]["failures_file"] for n in PACKED] == [
        "a.csv.failures.csv", "b.csv.failures.csv", None, None
    ]  # fmt: skip
    for file in pack.files.values():
        assert not settings.layout.chunk_dir(file.id).exists()


async def test_a_failed_shared_job_fails_every_file_in_it_saying_so(
    settings: Settings, store: Store, files: Files
) -> None:
    pack = await make_pack(files)
    await files.fail(pack.chunk, 3001, MARKETO_FAILED)

    documents = await finish_all(settings, store, pack, order=("b.csv", "a.csv", "c.csv", "d.csv"))

    why = f"chunk 1 (batch 3001, shared with 3 other files) failed: {MARKETO_FAILED}"
    for name, document in documents.items():
        assert (document["status"], document["error"]) == ("failed", why), name
        assert document["rows_processed"] == 0
        assert document["chunks"][0]["status"] == "Failed"
        record = await store.get_file(pack.files[name].id)
        assert (record.status, record.error) == (FileStatus.FAILED, why)
        assert (settings.layout.failed("leads") / f"{name}.result.json").exists()
    assert documents["a.csv"]["rows_failed"] == 1  # its set-aside record
    assert read_csv(settings.layout.failed("leads") / "a.csv.failures.csv")[1:] == [
        ["a3@x.com", BIG, REJECT_REASON, "5"]
    ]


async def test_matching_a_shared_chunk_again_after_a_crash_gives_the_same_results(
    settings: Settings,
    store: Store,
    files: Files,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a run without a crash leaves behind.
    clean = make_settings(tmp_path / "clean")
    async with await Store.open(tmp_path / "clean" / "state.db") as clean_store:
        clean_files = Files(clean, clean_store)
        clean_pack = await make_pack(clean_files)
        await clean_files.complete(
            clean_pack.chunk, 3001, failures=PACK_FAILURES, warnings=PACK_WARNINGS
        )
        expected = await finish_all(clean, clean_store, clean_pack)

    pack = await make_pack(files)
    await files.complete(pack.chunk, 3001, failures=PACK_FAILURES, warnings=PACK_WARNINGS)
    # Killed after a's part is in place, while b's is being written.
    closing = attribution.Parts.close
    closed = 0

    def crash_at_second_part(parts: attribution.Parts) -> None:
        nonlocal closed
        if parts._fh is not None:
            closed += 1
            if closed == 2:
                raise Crash("while writing b's part")
        closing(parts)

    monkeypatch.setattr(attribution.Parts, "close", crash_at_second_part)
    with pytest.raises(Crash):
        await attribute_chunk(settings, store, pack.chunk.id)
    monkeypatch.undo()
    a, b = pack.files["a.csv"].id, pack.files["b.csv"].id
    assert settings.layout.part_file(a, pack.chunk.id, "failures").exists()
    assert not settings.layout.part_file(b, pack.chunk.id, "failures").exists()
    b_dir = settings.layout.chunk_dir(b)
    assert not list(b_dir.glob(".*.tmp"))  # the part being written was dropped
    assert not (await store.chunks(file_id=pack.files["a.csv"].id))[0].attributed

    # Killed after every part is in place, before the shares were recorded.
    async def crash(*args: object, **kwargs: object) -> None:
        raise Crash("before the shares were recorded")

    monkeypatch.setattr(store, "set_shares", crash)
    with pytest.raises(Crash):
        await attribute_chunk(settings, store, pack.chunk.id)
    monkeypatch.undo()

    assert await attribute_chunk(settings, store, pack.chunk.id)
    assert not await attribute_chunk(settings, store, pack.chunk.id)  # done: a no-op
    documents = await finish_all(settings, store, pack)

    assert outputs(settings) == outputs(clean)
    for name, document in documents.items():
        assert without_times(document) == without_times(expected[name])


def without_times(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in ("id", "claimed_at", "finished_at")}


async def test_a_row_matching_no_record_is_kept_and_looking_for_it_stays_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 5th record of two files' pieces failed, each followed in Marketo's file by a
    row that is in no record: those go to both files (a blank line, after each file's own
    rows, counted in each), the others to their own file with their lines, and the records
    read stay a few times the chunk's, not rows times records (about 400,000 here)."""
    monkeypatch.setattr(matching, "KEEP_RECORDS", 20)
    chunk = tmp_path / "chunk.csv"
    records = [[f"e{i}@x.com", f"N{i}"] for i in range(2000)]
    write_csv(chunk, [["email", "firstName"], *records])
    marketo: list[list[str]] = [["email", "firstName", constants.FAILURE_REASON_COLUMN]]
    for i in range(0, 2000, 5):
        marketo += [[*records[i], "Invalid"], [f"ghost{i}", "G", "Invalid"]]
    write_csv(tmp_path / "failures.csv", marketo)
    pieces = [
        matching.Piece(file_id=1, first_row=0, first_line=2, out_dir=tmp_path / "1"),
        matching.Piece(file_id=2, first_row=1000, first_line=2, out_dir=tmp_path / "2"),
    ]

    tallies = attribution.attribute(
        9, chunk, "csv", pieces, {"failures": tmp_path / "failures.csv", "warnings": None}
    )

    found = tallies["failures"]
    assert (found.rows, found.unmatched, found.total) == ({1: 600, 2: 600}, 400, 800)
    assert found.reads < 40_000
    for piece in pieces:
        rows = read_csv(piece.out_dir / part_name(9, "failures"))[1:]
        first = piece.first_row
        assert rows[:200] == [
            [*records[i], "Invalid", str(i - first + 2)] for i in range(first, first + 1000, 5)
        ]
        assert rows[200:] == [[f"ghost{i}", "G", "Invalid", ""] for i in range(0, 2000, 5)]
    assert temp_files(tmp_path) == [], "no spill or temp file is left"


async def finishing_peak(tmp_path: Path, rows: int) -> int:
    """Peak bytes Python allocated while finishing a file of one chunk of `rows` records,
    every one of them failed."""
    settings = make_settings(tmp_path)
    async with await Store.open(tmp_path / "state.db") as store:
        files = Files(settings, store)
        lines = [f"e{i}@x.com,Name number {i}\n" for i in range(rows)]
        file = await files.claim("all.csv", HEADER + "".join(lines))
        chunk = await files.chunk(file, 1, lines, first_line=2)
        await store.finish_split(file.id, rows=rows, chunks_total=1)
        failures = [([f"e{i}@x.com", f"Name number {i}"], "Invalid") for i in range(rows)]
        await files.complete(chunk, 1001, failures=failures)
        del lines, failures
        file = await store.get_file(file.id)
        tracemalloc.start()
        try:
            _, document = await finish_file(settings, store, file)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (document["rows_failed"], document["rows_processed"]) == (rows, 0)
    failed = read_csv(settings.layout.done("leads") / "all.csv.failures.csv")
    assert failed[-1] == [f"e{rows - 1}@x.com", f"Name number {rows - 1}", "Invalid", str(rows + 1)]
    return peak


async def test_finishing_memory_does_not_grow_with_the_failed_rows(tmp_path: Path) -> None:
    small = await finishing_peak(tmp_path / "small", 2_000)
    large = await finishing_peak(tmp_path / "large", 12_000)  # six times the rows, 0.4 MB

    assert large < small + 256 * 1024, (small, large)


async def test_a_shared_chunk_going_final_finishes_every_file_in_it(
    settings: Settings, store: Store, files: Files
) -> None:
    """The results stage alone: rows matched back while the pack is there, then each
    member finished, not only the owner; each counted and announced once."""
    pack = await make_pack(files)
    job = await files.complete(pack.chunk, 3001, failures=PACK_FAILURES, warnings=PACK_WARNINGS)
    announced: list[int] = []
    stage = Results(settings, store, on_finished=lambda f: announced.append(f.id))
    await stage.chunk_final(job)

    assert stage.finished_total == 4
    assert announced == [f.id for f in reversed(pack.files.values())], "members, then the owner"
    for name, file in pack.files.items():
        assert (await store.get_file(file.id)).status is FileStatus.COMPLETE
        document = json.loads(
            (settings.layout.done("leads") / f"{name}.result.json").read_text(encoding="utf-8")
        )
        assert document["chunks"][0]["shared"]["files"] == 4
    failed = read_csv(settings.layout.done("leads") / "b.csv.failures.csv")
    assert [row[-1] for row in failed[1:]] == ["2", "5"]


async def test_a_large_set_aside_record_is_copied_not_read_into_memory(
    settings: Settings, store: Store, files: Files
) -> None:
    """A record the splitter set aside is at least a chunk's size (9.5 MB by default):
    finishing copies it into the failures file instead of parsing it."""
    huge = "x" * (3 * merge.RAW_REJECT_BYTES)
    text = f'{HEADER}a@x.com,Ann\nbig@x.com,"{huge}"\r\n'
    file = await files.claim("huge.csv", text)
    chunk = await files.chunk(file, 1, ["a@x.com,Ann\n"], first_line=2)
    offset = len(f"{HEADER}a@x.com,Ann\n")
    await store.add_reject(
        file.id, line=3, offset=offset, size=len(text) - offset, reason="record too large"
    )
    await store.finish_split(file.id, rows=2, chunks_total=1)
    await files.complete(chunk, 1001)
    file = await store.get_file(file.id)

    tracemalloc.start()
    try:
        _, document = await finish_file(settings, store, file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < merge.RAW_REJECT_BYTES, peak
    assert document["rows_failed"] == 1
    failures = settings.layout.done("leads") / "huge.csv.failures.csv"
    assert read_csv(failures)[1:] == [["big@x.com", huge, "record too large", "3"]]


async def test_set_aside_records_copied_or_parsed_give_the_same_failures_file(
    settings: Settings,
    store: Store,
    files: Files,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(merge, "RAW_REJECT_BYTES", 10)  # BIG's record is copied
    file = await files.big_csv()

    await finish_file(settings, store, file)

    done = settings.layout.done("leads")
    outputs = {p.name: p.read_bytes() for p in done.iterdir() if not p.name.endswith(".json")}
    assert outputs == await expected_outputs(tmp_path)


def test_matching_in_c_gives_what_matching_record_by_record_gives(tmp_path: Path) -> None:
    """Records with line breaks of every kind inside quotes, short and blank records,
    three pieces (one with set-aside records), padded and unmatched rows: the part files
    and counts are the same whether the chunk's record count is known (compared in C) or
    not (record by record)."""
    rng = random.Random(13)
    values = ["a", "b,c", "x\ny", "p\r\nq", "r\rs", "", '"q"', "t\n\nu", "plain"]
    records: list[list[str]] = []
    for _ in range(400):
        if rng.random() < 0.03:
            records.append([])  # a blank line
        else:
            records.append([rng.choice(values) for _ in range(rng.choice((2, 3, 3, 3)))])
    chunk = tmp_path / "chunk.csv"

    def write_quoted(path: Path, rows: list[list[str]]) -> None:
        """Every field quoted: csv.writer leaves a lone CR unquoted otherwise."""
        with path.open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(rows)

    write_quoted(chunk, [["k", "v", "w"], *records])
    marketo: list[list[str]] = [["k", "v", "w", constants.FAILURE_REASON_COLUMN]]
    for i, record in enumerate(records):
        if record and rng.random() < 0.2:
            marketo.append([*record, *[""] * (3 - len(record)), f"reason {i}"])
        if rng.random() < 0.02:
            marketo.append(["ghost", str(i), "", "no such record"])
    write_quoted(tmp_path / "failures.csv", marketo)

    def run(name: str, rows: int | None) -> tuple[dict[int, int], int, list[bytes]]:
        pieces = [
            matching.Piece(1, 0, 2, tmp_path / name / "1"),
            matching.Piece(2, 150, 10, tmp_path / name / "2", gaps=((12, 3), (40, 1))),
            matching.Piece(3, 320, 5, tmp_path / name / "3"),
        ]
        marketo_files: dict[str, Path | None] = {"failures": tmp_path / "failures.csv"}
        found = attribution.attribute(7, chunk, "csv", pieces, marketo_files, rows)["failures"]
        parts = [p.out_dir / part_name(7, "failures") for p in pieces]
        return found.rows, found.unmatched, [p.read_bytes() for p in parts if p.exists()]

    in_c = run("c", len(records))
    one_by_one = run("slow", None)

    assert in_c == one_by_one
    ghosts = [row for row in marketo if row[0] == "ghost"]
    assert in_c[1] == len(ghosts)
    assert sum(in_c[0].values()) == len(marketo) - 1 + 2 * len(ghosts)  # in each of three
    read_back = [read_csv(p)[1:] for p in sorted((tmp_path / "c").glob("*/part-7.failures.csv"))]
    matched = [row[:-1] for part in read_back for row in part if row[-1]]
    assert matched == [row for row in marketo[1:] if row[0] != "ghost"]  # a lone CR quoted
    for part in read_back:
        assert [row[:-1] for row in part if not row[-1]] == ghosts


def test_a_piece_that_comes_back_keeps_its_rows(tmp_path: Path) -> None:
    """Rows come in piece order; should one piece's rows resume after another's, its part
    keeps what it had (one header) rather than starting again."""
    a = matching.Piece(1, 0, 2, tmp_path / "1")
    b = matching.Piece(2, 5, 2, tmp_path / "2")
    parts = attribution.Parts(4, "failures", ",")
    header = ["email", constants.FAILURE_REASON_COLUMN]
    for piece, row in ((a, ["a1", "r", "2"]), (b, ["b1", "r", "3"]), (a, ["a2", "r", ""])):
        parts.write(piece, header, row)
    parts.close()

    assert read_csv(a.out_dir / part_name(4, "failures")) == [
        [*header, constants.SOURCE_LINE_COLUMN],
        ["a1", "r", "2"],
        ["a2", "r", ""],
    ]
    assert len(read_csv(b.out_dir / part_name(4, "failures"))) == 2


# -- rows Marketo sent without their empty columns (issue 19) -----------------------------------

WIDE = "email,firstName,lastName,phone\n"
# The pack of two from issue 19: A's three rows import, B's second row fails for its empty
# email, and Marketo's failures file leaves the empty column out. A holds a Benji too, with
# an email: a column Marketo left out matches an empty source value only.
ISSUE_PACK = {
    "a.csv": [
        WIDE,
        "a1@x.com,Ann,Lee,212-555-0001\n",
        "benji@x.com,Benji,Nordstrom,212-555-2323\n",
        "a3@x.com,Abe,Cole,\n",
    ],
    "b.csv": [WIDE, "b1@x.com,Bea,Moss,212-555-1111\n", ",Benji,Nordstrom,212-555-2323\n"],
}
EMPTY_EMAIL = "Value for lookup field 'email' not found"
WIDE_FAILURE_HEADER = [
    "email",
    "firstName",
    "lastName",
    "phone",
    constants.FAILURE_REASON_COLUMN,
    constants.SOURCE_LINE_COLUMN,
]


async def pack_of(files: Files, sources: dict[str, list[str]]) -> Pack:
    """`sources` (header line first) claimed and packed into one sealed chunk, in order."""
    store, claimed = files.store, {}
    for name, lines in sources.items():
        claimed[name] = await files.claim(name, "".join(lines))
    first, *later = sources
    owner = claimed[first]
    directory = files.settings.layout.chunk_dir(owner.id)
    directory.mkdir(parents=True)
    path = directory / "chunk-00001.csv"
    text = "".join(sources[first])
    path.write_text(text, encoding="utf-8", newline="")
    rows = len(sources[first]) - 1
    chunk = await store.open_pack(
        owner.id, path=str(path), rows=rows, bytes=len(text.encode()), first_line=2, file_rows=rows
    )
    for name in later:
        records = "".join(sources[name][1:])
        with path.open("a", encoding="utf-8", newline="") as fh:
            fh.write(records)
        text += records
        await store.join_pack(
            chunk.id,
            claimed[name].id,
            rows=len(sources[name]) - 1,
            bytes=len(records.encode()),
            first_line=2,
            file_rows=len(sources[name]) - 1,
        )
    await store.seal_pack(chunk.id)
    (chunk,) = await store.chunks(file_id=owner.id)
    return Pack(chunk, claimed, text)


async def test_a_row_marketo_sent_without_its_empty_column_goes_to_the_file_that_sent_it(
    settings: Settings, store: Store, files: Files
) -> None:
    """Issue 19's pack of two: B's row that failed for an empty email came back as
    `firstName,lastName,phone,Import Failure Reason`. Matched by column name it is B's,
    on B's line 3; A, whose Benji has an email, is told of no failed row."""
    pack = await pack_of(files, ISSUE_PACK)
    await files.complete(
        pack.chunk,
        3001,
        failures=[(["Benji", "Nordstrom", "212-555-2323"], EMPTY_EMAIL)],
        columns=("firstName", "lastName", "phone"),
    )

    documents = await finish_all(settings, store, pack, order=("b.csv", "a.csv"))

    counts = {n: (d["rows_processed"], d["rows_failed"]) for n, d in documents.items()}
    assert counts == {"a.csv": (3, 0), "b.csv": (1, 1)}
    assert documents["a.csv"]["failures_file"] is None
    assert read_csv(settings.layout.done("leads") / "b.csv.failures.csv") == [
        WIDE_FAILURE_HEADER,
        ["", "Benji", "Nordstrom", "212-555-2323", EMPTY_EMAIL, "3"],
    ]
    assert [d["chunks"][0]["unmatched_rows"] for d in documents.values()] == [0, 0]


async def test_chunks_whose_failures_files_have_different_headers_merge_under_the_full_header(
    settings: Settings, store: Store, files: Files
) -> None:
    """Marketo left a different empty column out of each chunk's failures file: the merged
    file has the source's header in full, every value under its own column, and the
    record the splitter set aside fits the same header."""
    lines = [
        WIDE,  # 1
        "a@x.com,Ann,Lee,\n",  # 2: fails, no phone
        "b@x.com,Bob,Ray,212-555-0002\n",  # 3
        f"c@x.com,{BIG},Cole,212-555-0003\n",  # 4: set aside
        ",Cy,Cole,212-555-0005\n",  # 5: fails, no email
        "d@x.com,Dee,Moss,212-555-0006\n",  # 6: warned, no value left out
    ]
    file = await files.claim("wide.csv", "".join(lines))
    first = await files.chunk(file, 1, lines[1:3], first_line=2, header=WIDE)
    second = await files.chunk(file, 2, lines[4:6], first_line=5, header=WIDE)
    offset, size = len("".join(lines[:3]).encode()), len(lines[3].encode())
    await store.add_reject(file.id, line=4, offset=offset, size=size, reason=REJECT_REASON)
    await store.finish_split(file.id, rows=5, chunks_total=2)
    await files.complete(
        first,
        1001,
        failures=[(["a@x.com", "Ann", "Lee"], "1003 Invalid phone")],
        columns=("email", "firstName", "lastName"),
    )
    await files.complete(
        second,
        1002,
        failures=[(["Cy", "Cole", "212-555-0005"], EMPTY_EMAIL)],
        warnings=[(["Dee", "Moss", "212-555-0006"], "Field truncated")],
        columns=("firstName", "lastName", "phone"),
    )
    # The warnings file of that chunk has every column, in another order even.
    (_, second_done) = await store.chunks(file_id=file.id)
    assert second_done.warnings_path is not None
    write_csv(
        Path(second_done.warnings_path),
        [
            ["phone", "firstName", "lastName", "email", constants.WARNING_REASON_COLUMN],
            ["212-555-0006", "Dee", "Moss", "d@x.com", "Field truncated"],
        ],
    )

    _, document = await finish_file(settings, store, await store.get_file(file.id))

    done = settings.layout.done("leads")
    assert (document["rows_failed"], document["rows_with_warning"]) == (3, 1)
    assert read_csv(done / "wide.csv.failures.csv") == [
        WIDE_FAILURE_HEADER,
        ["a@x.com", "Ann", "Lee", "", "1003 Invalid phone", "2"],
        ["", "Cy", "Cole", "212-555-0005", EMPTY_EMAIL, "5"],
        ["c@x.com", BIG, "Cole", "212-555-0003", REJECT_REASON, "4"],
    ]
    assert read_csv(done / "wide.csv.warnings.csv") == [
        [*WIDE_FAILURE_HEADER[:4], constants.WARNING_REASON_COLUMN, constants.SOURCE_LINE_COLUMN],
        ["d@x.com", "Dee", "Moss", "212-555-0006", "Field truncated", "6"],
    ]
    assert [c["unmatched_rows"] for c in document["chunks"]] == [0, 0]


GHOST = (["ghost@x.com", "Gus"], "1003 Invalid email address")


async def test_a_row_of_a_shared_job_that_matches_no_record_is_in_every_members_file(
    settings: Settings, store: Store, files: Files
) -> None:
    """A row Marketo changed matches no record of the pack: it cannot be given to one file
    honestly, so every file lists it (Source Line empty) and counts it, which keeps a
    `--max-failed-rows` limit on the safe side; each chunk entry says how many."""
    pack = await make_pack(files)
    await files.complete(pack.chunk, 3001, failures=[*PACK_FAILURES, GHOST], warnings=PACK_WARNINGS)

    documents = await finish_all(settings, store, pack)

    counts = {
        name: (d["rows_processed"], d["rows_failed"], d["chunks"][0]["rows_failed"])
        for name, d in documents.items()
    }
    assert counts == {
        "a.csv": (2, 3, 2),  # its own failed row and the ghost; its set-aside record
        "b.csv": (0, 3, 3),
        "c.csv": (1, 1, 1),
        "d.csv": (0, 1, 1),
    }
    reason, line = constants.FAILURE_REASON_COLUMN, constants.SOURCE_LINE_COLUMN
    ghost = [*GHOST[0], GHOST[1], ""]
    done = settings.layout.done("leads")
    assert read_csv(done / "c.csv.failures.csv") == [["email", "firstName", reason, line], ghost]
    assert read_csv(done / "d.csv.failures.csv") == [["email", "firstName", reason, line], ghost]
    assert read_csv(done / "b.csv.failures.csv")[1:] == [
        ["b1@x.com", "Bo\nB", "Duplicate lead", "2"],
        ["bad-b3", "Ben", "1003 Invalid email address", "5"],
        ghost,
    ]
    assert ghost in read_csv(done / "a.csv.failures.csv")
    for document in documents.values():
        (chunk,) = document["chunks"]
        assert chunk["unmatched_rows"] == 1
        assert chunk["message"] == (
            "1 row of Marketo's failures and warnings for this shared job matched no record"
            " of its files, so each of its 4 files lists and counts them (Source Line empty)."
        )
    assert temp_files(settings.layout.chunks) == [], "no spill file is left"


async def test_a_row_that_matches_no_record_of_a_chunk_of_one_file_stays_that_files(
    settings: Settings, store: Store, files: Files
) -> None:
    file = await files.claim("own.csv", HEADER + "a@x.com,Ann\nb@x.com,Bob\n")
    chunk = await files.chunk(file, 1, ["a@x.com,Ann\n", "b@x.com,Bob\n"], first_line=2)
    await store.finish_split(file.id, rows=2, chunks_total=1)
    await files.complete(chunk, 1001, failures=[(["b@x.com", "Bob"], "Invalid"), GHOST])

    _, document = await finish_file(settings, store, await store.get_file(file.id))

    assert document["rows_failed"] == 2  # Marketo's counter, as for any chunk of its own
    (entry,) = document["chunks"]
    assert entry["unmatched_rows"] == 1
    assert entry["message"].endswith(
        "1 row of Marketo's failures and warnings matched no record of this chunk"
        " (Source Line empty)."
    )
    assert read_csv(settings.layout.done("leads") / "own.csv.failures.csv")[1:] == [
        ["b@x.com", "Bob", "Invalid", "3"],
        [*GHOST[0], GHOST[1], ""],
    ]


def test_a_part_in_another_layout_is_merged_by_column_name(tmp_path: Path) -> None:
    """A part written in Marketo's layout (by a release before this one, say) is placed
    under the source's columns by name; a part in the source's layout is copied."""
    line = constants.SOURCE_LINE_COLUMN
    ours, theirs = tmp_path / "part-1.failures.csv", tmp_path / "part-2.failures.csv"
    write_csv(ours, [[*WIDE_FAILURE_HEADER[:5], line], ["a@x.com", "Ann", "Lee", "", "r1", "2"]])
    write_csv(
        theirs,
        [
            ["lastName", " firstName", constants.FAILURE_REASON_COLUMN, line],
            ["Cole", "Cy", "r2", "5"],
        ],
    )

    name = merge.write_merged(
        tmp_path / "out.csv",
        [ours, theirs],
        iter(()),
        ",",
        ["email", "firstName", "lastName", "phone"],
    )

    assert name == "out.csv"
    assert read_csv(tmp_path / "out.csv") == [
        WIDE_FAILURE_HEADER,
        ["a@x.com", "Ann", "Lee", "", "r1", "2"],
        ["", "Cy", "Cole", "", "r2", "5"],
    ]


async def test_matching_again_after_a_crash_while_spreading_unmatched_rows_gives_the_same_results(
    settings: Settings,
    store: Store,
    files: Files,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed after the unmatched row went to some members' parts but not all: the next
    attribution writes every part anew (no member gets the row twice)."""
    clean = make_settings(tmp_path / "clean")
    async with await Store.open(tmp_path / "clean" / "state.db") as clean_store:
        clean_files = Files(clean, clean_store)
        clean_pack = await make_pack(clean_files)
        await clean_files.complete(clean_pack.chunk, 3001, failures=[*PACK_FAILURES, GHOST])
        await finish_all(clean, clean_store, clean_pack)

    pack = await make_pack(files)
    await files.complete(pack.chunk, 3001, failures=[*PACK_FAILURES, GHOST])
    synced = 0
    really_fsync_dir = attribution.fsync_dir

    def crash_at_the_fifth_part(path: Path) -> None:
        nonlocal synced
        synced += 1  # a's and b's own parts, then the ghost in a's, b's and c's
        really_fsync_dir(path)
        if synced == 5:
            raise Crash("before d's part had the unmatched row")

    monkeypatch.setattr(attribution, "fsync_dir", crash_at_the_fifth_part)
    with pytest.raises(Crash):
        await attribute_chunk(settings, store, pack.chunk.id)
    monkeypatch.undo()
    c, d = pack.files["c.csv"].id, pack.files["d.csv"].id
    assert settings.layout.part_file(c, pack.chunk.id, "failures").exists()
    assert not settings.layout.part_file(d, pack.chunk.id, "failures").exists()

    await finish_all(settings, store, pack)

    assert outputs(settings) == outputs(clean)
    assert temp_files(settings.layout.chunks) == []
