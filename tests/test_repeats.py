"""The splitter with key columns (issue 20, items 1 and 2): no chunk holds a key twice,
a key's rows stay in source order (repeats nearby moved to tail chunks, level by level),
far repeats stay where they are, and every row keeps its source line.

The splitter alone, on real files in tmp_path: each test cuts a file with a `KeyRule` and
reads back the chunks, their key sets, gaps and line maps.
"""

from __future__ import annotations

import csv
import io
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestrator import splitter
from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path
from orchestrator.models import ObjectType
from orchestrator.splitter import Chunk, KeyRule, Rejected, SplitDone, SplitEvent
from orchestrator.splitter.keyed import KeyCollector, RowKeys, key_indexes, meets
from orchestrator.splitter.recent import (
    GENERATION,
    GENERATIONS,
    MAX_WORDS,
    WINDOW,
    MovedKeys,
    RecentKeys,
)

EMAIL = KeyRule(LEAD_NAMESPACE, ("email",))
HEADER = ["email", "firstName", "note"]


def write(path: Path, rows: Sequence[Sequence[str]], *, eol: str = "\n", end: bool = True) -> Path:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator=eol).writerows([HEADER, *rows])
    text = buffer.getvalue()
    path.write_text(text if end else text.removesuffix(eol), encoding="utf-8", newline="")
    return path


def cut(
    source: Path, max_bytes: int, rule: KeyRule | None = EMAIL, block_size: int = 1 << 20
) -> list[SplitEvent]:
    out = source.parent / f"out-{source.stem}"
    return list(
        splitter.split_file(
            source, out, max_bytes=max_bytes, fmt="csv", keys=rule, block_size=block_size
        )
    )


def chunks_of(events: list[SplitEvent]) -> list[Chunk]:
    return [e for e in events if isinstance(e, Chunk)]


def done_of(events: list[SplitEvent]) -> SplitDone:
    (done,) = [e for e in events if isinstance(e, SplitDone)]
    return done


def source_lines(chunk: Chunk, source: Path, rejects: Sequence[Rejected] = ()) -> list[int]:
    """The source line of each record of a chunk, from what the splitter wrote beside it:
    a tail chunk's line map, else its first line plus the lines since, plus the lines of
    the records moved out of it (its gaps) or set aside before each record."""
    records = list(splitter.iter_records(chunk.path, "csv"))
    mapped = splitter.read_numbers(splitter.lines_path(chunk.path))
    if splitter.lines_path(chunk.path).exists():
        assert len(mapped) == len(records)
        return list(mapped)
    numbers = splitter.read_numbers(splitter.gaps_path(chunk.path))
    data = source.read_bytes()
    gaps = sorted(
        [(numbers[i], numbers[i + 1]) for i in range(0, len(numbers), 2)]
        + [(r.line, max(1, data[r.offset : r.offset + r.size].count(b"\n"))) for r in rejects]
    )
    gaps = [g for g in gaps if g[0] >= chunk.first_line]
    lines, shift = [], 0
    for chunk_line, _ in records:
        line = chunk.first_line + chunk_line - records[0][0] + shift
        while gaps and gaps[0][0] <= line:
            shift += gaps.pop(0)[1]
            line = chunk.first_line + chunk_line - records[0][0] + shift
        lines.append(line)
    return lines


def key_of(record: bytes, column: int = 0) -> int | None:
    row = next(csv.reader(io.StringIO(record.decode(), newline="")), [])
    return key_hash(LEAD_NAMESPACE, [row[column] if column < len(row) else ""])


def check_order(source: Path, events: list[SplitEvent], max_bytes: int) -> list[list[int]]:
    """Every record of the source once, in a chunk under the limit or set aside; no chunk
    holds a key twice and its key set says which; each key's rows in chunks of rising
    index, in source order. Returns each chunk's source lines."""
    rejects = [e for e in events if isinstance(e, Rejected)]
    wanted = dict(splitter.iter_records(source, "csv"))
    last: dict[int, tuple[int, int]] = {}
    seen, per_chunk = [r.line for r in rejects], []
    for chunk in chunks_of(events):
        assert chunk.bytes == chunk.path.stat().st_size < max_bytes
        lines = source_lines(chunk, source, rejects)
        records = [record for _, record in splitter.iter_records(chunk.path, "csv")]
        keys = [k for k in map(key_of, records) if k is not None]
        assert len(set(keys)) == len(keys), f"chunk {chunk.index} holds a key twice"
        assert list(KeySet.load(keys_path(chunk.path)).hashes) == sorted(keys)
        assert chunk.keys == len(keys)
        for line, record, key in zip(lines, records, map(key_of, records), strict=True):
            assert wanted[line] == record, f"chunk {chunk.index}: line {line} is not this row"
            if key is not None:
                if key in last:
                    assert last[key] < (chunk.index, line), "a key's rows out of order"
                last[key] = (chunk.index, line)
        seen += lines
        per_chunk.append(lines)
    assert sorted(seen) == sorted(wanted), "every row once"
    assert not list(chunks_of(events)[0].path.parent.glob(".tail-*")) if per_chunk else True
    return per_chunk


# -- repeats near and far ---------------------------------------------------------------------


def test_repeats_nearby_go_to_tail_chunks_level_by_level_in_source_order(tmp_path: Path) -> None:
    rows = [[f"p{i % 30}@example.com", f"F{i}", f"n{i}"] for i in range(75)]  # 3, 3, 2 ... each
    source = write(tmp_path / "a.csv", rows)
    events = cut(source, 400)

    per_chunk = check_order(source, events, 400)
    chunks = chunks_of(events)
    done = done_of(events)
    assert (done.rows, done.moved) == (75, 45)
    firsts = [line for lines in per_chunk for line in lines if line <= 31]
    assert sorted(firsts) == list(range(2, 32)), "each key's first row stays in place"
    normal = [c for c in chunks if not splitter.lines_path(c.path).exists()]
    tail = chunks[len(normal) :]
    assert sum(c.rows for c in normal) == 30
    assert sum(c.rows for c in tail) == 45
    # Level 1 holds the second rows (lines 32-61), level 2 the third (62-76), each in
    # source order, and a level never shares a chunk with the next.
    tail_lines = [line for c in tail for line in per_chunk[c.index - 1]]
    assert tail_lines == list(range(32, 77))
    level_one = [c for c in tail if per_chunk[c.index - 1][0] < 62]
    assert per_chunk[level_one[-1].index - 1][-1] == 61


def test_a_repeat_further_back_than_the_recent_chunks_stays_in_its_chunk(tmp_path: Path) -> None:
    """Chunks of 40 rows: `far` comes back WINDOW + 3 chunks later, `near` 10 rows later."""
    far = [["far@example.com", "First", "old"]]
    filler = [[f"f{i}@example.com", f"F{i}", "n"] for i in range(40 * (WINDOW + 3))]
    near = [["near@example.com", "First", "a"]]
    near += [[f"n{i}@example.com", "N", "n"] for i in range(10)]
    near += [["near@example.com", "Again", "b"]]
    rows = far + filler + [["far@example.com", "Again", "new"]] + near
    source = write(tmp_path / "a.csv", rows)
    events = cut(source, 1000)

    per_chunk = check_order(source, events, 1000)
    assert done_of(events).moved == 1, "only the near repeat moves"
    far_again = len(filler) + 3  # its source line
    (home,) = [i for i, lines in enumerate(per_chunk) if far_again in lines]
    assert home > WINDOW, "beyond the recent chunks"
    assert not splitter.lines_path(chunks_of(events)[home].path).exists(), "not a tail chunk"
    assert per_chunk[-1] == [far_again + 12], "the near repeat is the tail"


def test_keys_are_compared_trimmed_and_case_folded(tmp_path: Path) -> None:
    rows = [
        ["Ada@Example.COM", "A", "1"],
        [" ada@example.com ", "B", "2"],
        ["STRASSE@example.com", "C", "3"],
        ["straße@example.com", "D", "4"],  # case-folds to strasse
        ["bob@example.com", "E", "5"],
    ]
    source = write(tmp_path / "a.csv", rows)
    events = cut(source, 2000)

    per_chunk = check_order(source, events, 2000)
    assert per_chunk == [[2, 4, 6], [3, 5]]


def test_rows_without_key_values_are_never_moved(tmp_path: Path) -> None:
    rows = [["", "A", "1"], ["  ", "B", "2"], ["", "C", "3"], ["x@y.z", "D", "4"]]
    rows.append(["x@y.z", "E", "5"])
    source = write(tmp_path / "a.csv", rows)
    events = cut(source, 2000)

    per_chunk = check_order(source, events, 2000)
    assert per_chunk == [[2, 3, 4, 5], [6]]
    assert chunks_of(events)[0].keys == 1


def test_a_header_without_the_key_column_gives_no_keys_and_moves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "a.csv"
    source.write_text("mail,name\na@x,A\na@x,B\n", encoding="utf-8")
    with capture_logs() as logs:
        events = cut(source, 2000)

    (chunk,) = chunks_of(events)
    assert chunk.rows == 2
    assert chunk.keys is None
    assert not keys_path(chunk.path).exists(), "no keys: no waiting"
    assert [e["event"] for e in logs] == ["key_columns_missing"]


def test_a_route_without_a_key_rule_cuts_as_before(tmp_path: Path) -> None:
    rows = [["a@x", "A", "1"]] * 5
    source = write(tmp_path / "a.csv", rows)
    (chunk,) = chunks_of(cut(source, 2000, rule=None))
    assert (chunk.rows, chunk.keys) == (5, None)
    assert not keys_path(chunk.path).exists()


def test_quoted_fields_line_breaks_and_crlf_keep_keys_and_lines(tmp_path: Path) -> None:
    rows = [
        ['"q"@x.com', "A", "line one\nline two"],
        ["b@x.com", "B", 'said "hi", left'],
        ['"Q"@X.com ', "C", "x\r\ny"],
        ["b@x.com", "D", "three\nlines\nhere"],
        ['"q"@x.com', "E", "last"],
    ]
    source = write(tmp_path / "a.csv", rows, eol="\r\n", end=False)
    for block_size in (7, 64, 1 << 20):
        events = cut(source, 2000, block_size=block_size)
        per_chunk = check_order(source, events, 2000)
        assert [len(lines) for lines in per_chunk] == [2, 2, 1]
        assert done_of(events).moved == 3


def test_a_key_in_another_column_and_a_key_of_two_columns(tmp_path: Path) -> None:
    source = tmp_path / "cars.csv"
    source.write_text("colour,vin,plate\nred,V1,P\nblue,v1 ,Q\ngreen,V1,P\nred,V2,P\n")
    rule = KeyRule("customobject:car_c", ("vin",))
    per_vin = [c.rows for c in chunks_of(cut(source, 2000, rule))]
    assert per_vin == [2, 1, 1]
    both = KeyRule("customobject:car_c", ("vin", "plate"))
    assert [c.rows for c in chunks_of(cut(source, 2000, both))] == [3, 1]
    assert key_indexes(KeyRule("x", ("VIN",)), ("colour", " vin ", "plate")) == (1,)
    assert key_indexes(KeyRule("x", ("vin", "make")), ("colour", "vin")) is None


def test_the_same_file_cut_again_gives_the_same_chunks_and_key_files(tmp_path: Path) -> None:
    rng = random.Random(7)
    rows = [
        [f"p{rng.randrange(300)}@example.com", f"F{i}", "n" * rng.randrange(30)] for i in range(900)
    ]
    source = write(tmp_path / "a.csv", rows)
    first = chunks_of(cut(source, 700))
    files = {p.name: p.read_bytes() for p in first[0].path.parent.iterdir()}
    second = chunks_of(cut(source, 700))

    assert first == second
    assert {p.name: p.read_bytes() for p in second[0].path.parent.iterdir()} == files
    assert any(name.endswith(".lines") for name in files)
    assert any(name.endswith(".gaps") for name in files)
    assert not [name for name in files if name.startswith(".")], "no spill or temp file left"


# -- properties ----------------------------------------------------------------------------------


@st.composite
def keyed_tables(draw: st.DrawFn) -> tuple[list[list[str]], str, bool, int]:
    keys = draw(st.integers(1, 40))
    emails = st.sampled_from(
        [f"p{i}@example.com" for i in range(keys)] + [" P0@Example.com", "", '"q"@x']
    )
    notes = st.sampled_from(["n", "", 'a "quoted", note', "two\nlines", "cr\rinside", "é李"])
    rows = draw(st.lists(st.tuples(emails, notes).map(lambda t: [t[0], "F", t[1]]), max_size=80))
    return (
        rows,
        draw(st.sampled_from(["\n", "\r\n"])),
        draw(st.booleans()),
        draw(st.sampled_from([60, 120, 300, 2000])),
    )


@settings(max_examples=120, deadline=None)
@given(table=keyed_tables(), block_size=st.sampled_from([5, 64, 1 << 20]))
def test_no_chunk_holds_a_key_twice_and_every_row_keeps_its_order_and_line(
    table: tuple[list[list[str]], str, bool, int], block_size: int
) -> None:
    rows, eol, end, max_bytes = table
    with tempfile.TemporaryDirectory() as tmp:
        source = write(Path(tmp, "a.csv"), rows, eol=eol, end=end)
        events = cut(source, max_bytes, block_size=block_size)
        check_order(source, events, max_bytes)
        assert done_of(events).rows == len(rows)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.text(st.sampled_from(list(' \tAbßẞİ李,"\x1f\u00a0\u2003é')), max_size=6),
        min_size=2,
        max_size=3,
    ),
    ascii_only=st.booleans(),
)
def test_hashes_read_from_records_are_key_hash(values: list[str], ascii_only: bool) -> None:
    if ascii_only:
        values = [v.encode("ascii", "ignore").decode() for v in values]
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerow(["x", *values])
    record = buffer.getvalue().encode()
    for rule, columns in (
        (KeyRule("ns", ("a",)), [values[0]]),
        (KeyRule("ns", ("a", "b")), values[:2]),
    ):
        keys = RowKeys(rule, tuple(range(1, len(rule.columns) + 1)), "csv")
        (found,) = keys.hashes([record], ascii=record.isascii())
        assert found == key_hash("ns", columns)


# -- memory ----------------------------------------------------------------------------------


def test_the_recent_chunks_filter_never_misses_a_key_and_its_memory_is_capped() -> None:
    rng = random.Random(3)
    recent, moved = RecentKeys(2000), MovedKeys()
    chunks: list[list[int]] = []
    for _ in range(GENERATION * GENERATIONS * 2):
        chunk = [rng.getrandbits(64) for _ in range(2000)]
        recent.add_all(chunk)
        chunks.append(chunk)
        for back, older in enumerate(reversed(chunks)):
            if back <= (GENERATIONS - 1) * GENERATION:
                assert all(key in recent for key in older), f"missed a key {back} chunks back"
        recent.chunk_closed(None, len(chunk), moved)
    strangers = [rng.getrandbits(64) for _ in range(20000)]
    assert sum(key in recent for key in strangers) < 20000 * 0.02
    assert len(recent.maybe([*strangers[:50], None])) <= 1
    huge = RecentKeys(10**9)
    assert huge.nbytes <= 8 * MAX_WORDS, "a generation never takes more than MAX_WORDS"


def test_moved_keys_are_exact_and_compact() -> None:
    moved = MovedKeys()
    rng = random.Random(4)
    keys = list({rng.getrandbits(64) for _ in range(30000)})
    for n, key in enumerate(keys):
        moved.set(key, 1 + n % 3)
    moved.set(keys[0], 9)
    assert [moved.level(k) for k in keys[:4]] == [9, 2, 3, 1]
    assert moved.level(12345) == 0
    assert len(moved) == 30000
    assert sorted(moved) == sorted(keys)
    assert moved.nbytes < 30000 * 40


def test_a_chunks_keys_are_gathered_sorted_and_compared_without_a_big_set() -> None:
    rng = random.Random(5)
    keys = [rng.getrandbits(64) for _ in range(50000)]
    collector = KeyCollector()
    collector.extend(keys)
    taken = collector.take()
    assert list(taken.hashes) == sorted(keys)
    assert len(collector.take()) == 0, "taking empties it"
    assert meets(taken.hashes, [keys[-1]])
    assert not meets(taken.hashes, [1, 2, 3])
    assert not meets([], taken.hashes)


@pytest.mark.parametrize("object_type", list(ObjectType))
def test_leads_and_program_members_share_a_namespace(object_type: ObjectType) -> None:
    namespace = splitter.namespace_for(object_type, "car_c")
    lead_like = object_type is not ObjectType.CUSTOM_OBJECT
    assert (namespace == LEAD_NAMESPACE) == lead_like
    assert splitter.rule_for(object_type, "car_c", ()) is None
