"""The splitter: chunks reparse to exactly the source records, and every edge the issue named."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestrator.delimited import DELIMITERS
from orchestrator.errors import InputError
from orchestrator.splitter import (
    Chunk,
    Rejected,
    SplitDone,
    SplitEvent,
    iter_records,
    parse_header,
    split_file,
    split_file_async,
)

BOM = b"\xef\xbb\xbf"


# --- helpers -------------------------------------------------------------------


def encode_field(field: str, delimiter: str) -> str:
    """RFC 4180 quoting; csv.writer would leave a bare CR unquoted, so not used here."""
    if any(c in field for c in (delimiter, '"', "\r", "\n")):
        return '"' + field.replace('"', '""') + '"'
    return field


def encode_record(fields: Sequence[str], delimiter: str) -> str:
    if len(fields) == 1 and not fields[0]:
        return '""'  # a lone empty field must not look like a blank line
    return delimiter.join(encode_field(f, delimiter) for f in fields)


def encode_records(
    rows: Sequence[Sequence[str]], delimiter: str, eol: str, *, final_eol: bool = True
) -> list[bytes]:
    """Each record's bytes as it sits in the file, its line ending included."""
    out = [(encode_record(row, delimiter) + eol).encode() for row in rows]
    if out and not final_eol:
        out[-1] = out[-1].removesuffix(eol.encode())
    return out


def write_source(
    path: Path,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    fmt: str = "csv",
    *,
    eol: str = "\n",
    final_eol: bool = True,
    bom: bool = False,
) -> tuple[bytes, list[bytes]]:
    """Write a source file; returns (header bytes as chunks carry it, record bytes)."""
    delimiter = DELIMITERS[fmt]
    head = (encode_record(header, delimiter) + eol).encode()
    if not rows and not final_eol:
        head = head.removesuffix(eol.encode())
    records = encode_records(rows, delimiter, eol, final_eol=final_eol)
    path.write_bytes((BOM if bom else b"") + head + b"".join(records))
    return head, records


def parse(path: Path, fmt: str) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh, delimiter=DELIMITERS[fmt]))


def run(
    source: Path,
    out: Path,
    *,
    max_bytes: int,
    fmt: str,
    block_size: int = 1 << 20,
    fsync: bool = False,
) -> list[SplitEvent]:
    events = split_file(
        source, out, max_bytes=max_bytes, fmt=fmt, fsync=fsync, block_size=block_size
    )
    return list(events)


def chunks_of(events: Sequence[SplitEvent]) -> list[Chunk]:
    return [e for e in events if isinstance(e, Chunk)]


def rejects_of(events: Sequence[SplitEvent]) -> list[Rejected]:
    return [e for e in events if isinstance(e, Rejected)]


def done_of(events: Sequence[SplitEvent]) -> SplitDone:
    last = events[-1]
    assert isinstance(last, SplitDone)
    return last


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tmp"))


def start_lines(prefix: bytes, records: Sequence[bytes]) -> list[int]:
    """Physical line where each record starts, after `prefix` (BOM and header)."""
    lines, line = [], 1 + prefix.count(b"\n")
    for record in records:
        lines.append(line)
        line += record.count(b"\n")
    return lines


def check_chunks(
    events: Sequence[SplitEvent],
    head: bytes,
    kept: Sequence[bytes],
    lines: Sequence[int],
    max_bytes: int,
    fmt: str,
) -> None:
    """Chunks hold `kept` (the records not rejected) in order, greedily, with the header."""
    chunks = chunks_of(events)
    assert [c.index for c in chunks] == list(range(1, len(chunks) + 1))
    at = 0
    for chunk in chunks:
        assert chunk.path.name == f"chunk-{chunk.index:05d}.{fmt}"
        data = chunk.path.read_bytes()
        assert len(data) == chunk.bytes < max_bytes
        assert data.startswith(head)
        assert chunk.header_bytes == len(head), "packing appends the records after it"
        body = data[len(head) :]
        assert chunk.rows > 0
        assert body == b"".join(kept[at : at + chunk.rows])
        assert chunk.first_line == lines[at]
        at += chunk.rows
        if at < len(kept):  # greedy: the next record would not have fitted
            assert chunk.bytes + len(kept[at]) >= max_bytes
    assert at == len(kept)


# --- properties ------------------------------------------------------------------

FIELD_CHARS = list("ab ,;\t\"'\r\néß李😀")
fields = st.text(alphabet=st.sampled_from(FIELD_CHARS), max_size=10)


@st.composite
def tables(draw: st.DrawFn) -> tuple[str, list[str], list[list[str]], str, bool, bool]:
    fmt = draw(st.sampled_from(sorted(DELIMITERS)))
    width = draw(st.integers(1, 4))
    header = [f"c{i}" for i in range(width)]
    if draw(st.booleans()):  # header names that need quoting too
        header[0] = f'name {DELIMITERS[fmt]} "quoted"'
    rows = draw(st.lists(st.lists(fields, min_size=width, max_size=width), max_size=25))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return fmt, header, rows, eol, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(table=tables(), slack=st.integers(0, 120), block_size=st.sampled_from([4, 9, 64, 1 << 20]))
def test_chunks_reparse_to_exactly_the_source_records(
    table: tuple[str, list[str], list[list[str]], str, bool, bool], slack: int, block_size: int
) -> None:
    fmt, header, rows, eol, final_eol, bom = table
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp, f"in.{fmt}"), Path(tmp, "out")
        head, records = write_source(
            source, header, rows, fmt, eol=eol, final_eol=final_eol, bom=bom
        )
        max_bytes = len(head) + max((len(r) for r in records), default=0) + 1 + slack
        events = run(source, out, max_bytes=max_bytes, fmt=fmt, block_size=block_size)

        assert not rejects_of(events)
        lines = start_lines(head, records)
        check_chunks(events, head, records, lines, max_bytes, fmt)
        chunks = chunks_of(events)
        reparsed = []
        for chunk in chunks:
            parsed = parse(chunk.path, fmt)
            assert parsed[0] == header
            assert len(parsed) - 1 == chunk.rows
            reparsed.extend(parsed[1:])
            got = list(iter_records(chunk.path, fmt))
            assert [chunk.first_line + line - 2 for line, _ in got] == lines[
                len(reparsed) - chunk.rows : len(reparsed)
            ]
            assert [raw for _, raw in got] == [
                encode_record(row, DELIMITERS[fmt]).encode()
                for row in rows[len(reparsed) - chunk.rows : len(reparsed)]
            ]
        assert reparsed == rows
        assert done_of(events) == SplitDone(len(rows), len(chunks), 0, tuple(header))


@settings(max_examples=60, deadline=None)
@given(table=tables(), limit=st.integers(0, 60), block_size=st.sampled_from([5, 64, 1 << 20]))
def test_records_too_large_are_set_aside_and_the_rest_is_split(
    table: tuple[str, list[str], list[list[str]], str, bool, bool], limit: int, block_size: int
) -> None:
    fmt, header, rows, eol, final_eol, bom = table
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp, f"in.{fmt}"), Path(tmp, "out")
        head, records = write_source(
            source, header, rows, fmt, eol=eol, final_eol=final_eol, bom=bom
        )
        max_bytes = len(head) + 2 + limit
        events = run(source, out, max_bytes=max_bytes, fmt=fmt, block_size=block_size)

        lines = start_lines(head, records)
        too_large = [i for i, r in enumerate(records) if len(head) + len(r) >= max_bytes]
        rejected = rejects_of(events)
        assert [r.line for r in rejected] == [lines[i] for i in too_large]
        assert [r.size for r in rejected] == [len(records[i]) for i in too_large]
        whole = source.read_bytes()
        for r, i in zip(rejected, too_large, strict=True):
            assert whole[r.offset : r.offset + r.size] == records[i]
        keep = [i for i in range(len(records)) if i not in too_large]
        check_chunks(
            events, head, [records[i] for i in keep], [lines[i] for i in keep], max_bytes, fmt
        )
        done = done_of(events)
        assert (done.rows, done.rejected) == (len(rows), len(too_large))


# --- named cases ------------------------------------------------------------------


def test_bom_is_dropped_from_the_header_and_every_chunk(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    head, records = write_source(source, ["email", "name"], [["a@x", "Ä"]] * 6, bom=True)
    events = run(source, tmp_path / "out", max_bytes=len(head) + 2 * len(records[0]) + 1, fmt="csv")
    chunks = chunks_of(events)
    assert len(chunks) == 3
    assert all(c.path.read_bytes().startswith(b"email,name\n") for c in chunks)
    assert done_of(events).header == ("email", "name")


def test_padded_header_names_are_trimmed_in_every_chunk_with_a_warning(tmp_path: Path) -> None:
    """Item 6: Marketo matches names exactly (" vin" fails every row), so every chunk's
    header carries them trimmed, line ending kept, and a warning names the columns."""
    source = tmp_path / "in.tsv"
    source.write_bytes(b"color\t vin \tmodel\r\nred\tV1\tT\r\nblue\tV2\tT\r\n")
    with capture_logs() as logs:
        chunks = chunks_of(run(source, tmp_path / "out", max_bytes=30, fmt="tsv"))
    assert len(chunks) == 2
    for chunk in chunks:
        assert chunk.path.read_bytes().startswith(b"color\tvin\tmodel\r\n")
        assert chunk.header_bytes == len(b"color\tvin\tmodel\r\n"), "the header as written"
    warned = [e for e in logs if e["event"] == "header_names_trimmed"]
    assert [w["columns"] for w in warned] == [[" vin "]]
    assert warned[0]["log_level"] == "warning"


def test_clean_header_is_copied_unchanged(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b'"email",name\na@x,A\n')
    with capture_logs() as logs:
        (chunk,) = chunks_of(run(source, tmp_path / "out", max_bytes=100, fmt="csv"))
    assert chunk.path.read_bytes() == b'"email",name\na@x,A\n'
    assert not [e for e in logs if e["event"] == "header_names_trimmed"]


def test_crlf_line_endings_are_kept(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"a,b\r\n1,2\r\n3,4\r\n")
    (chunk,) = chunks_of(run(source, tmp_path / "out", max_bytes=100, fmt="csv"))
    assert chunk.path.read_bytes() == b"a,b\r\n1,2\r\n3,4\r\n"
    assert (chunk.rows, chunk.first_line) == (2, 2)


def test_quoted_newline_at_the_cut_point_is_not_a_cut(tmp_path: Path) -> None:
    # The limit falls just past the LF inside the quoted field of the second record.
    source = tmp_path / "in.csv"
    source.write_bytes(b'h\n1\n"x\ny"\n2\n')
    events = run(source, tmp_path / "out", max_bytes=9, fmt="csv")
    assert [c.path.read_bytes() for c in chunks_of(events)] == [
        b"h\n1\n",
        b'h\n"x\ny"\n',
        b"h\n2\n",
    ]
    assert [c.first_line for c in chunks_of(events)] == [2, 3, 5]


def test_doubled_quote_at_the_cut_point_stays_in_its_record(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    record = b'"say ""\nhi"""\n'
    source.write_bytes(b"h\n" + record + b"z\n" + record)
    for limit in range(len(record) + 3, 2 * len(record) + 6):
        events = run(source, tmp_path / f"out{limit}", max_bytes=limit, fmt="csv")
        rows = [row for c in chunks_of(events) for row in parse(c.path, "csv")[1:]]
        assert rows == [['say "\nhi"'], ["z"], ['say "\nhi"']]


def test_oversized_record_in_the_middle_is_rejected_and_the_rest_split(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    big = "x" * 500
    head, records = write_source(source, ["id", "note"], [["1", "a"], ["2", big], ["3", "c"]])
    events = run(source, tmp_path / "out", max_bytes=100, fmt="csv")
    (rejected,) = rejects_of(events)
    assert (rejected.line, rejected.offset, rejected.size) == (3, len(head) + 4, len(records[1]))
    assert "100" in rejected.reason
    assert [parse(c.path, "csv")[1:] for c in chunks_of(events)] == [[["1", "a"], ["3", "c"]]]
    assert done_of(events) == SplitDone(3, 1, 1, ("id", "note"))


def test_oversized_record_at_the_end_without_newline(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"id\n1\n2\n" + b'"' + b"y\n" * 300 + b'"')
    events = run(source, tmp_path / "out", max_bytes=50, fmt="csv", block_size=16)
    (rejected,) = rejects_of(events)
    assert (rejected.line, rejected.offset, rejected.size) == (4, 7, 602)
    assert [c.rows for c in chunks_of(events)] == [2]
    assert done_of(events).rows == 3


def test_unterminated_quote_names_the_line_where_it_opened(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b'h\n1\n2\n3,"open\nmore\nstill\n')
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unterminated") as caught:
        run(source, out, max_bytes=1000, fmt="csv")
    assert (caught.value.line, caught.value.offset) == (4, 6)
    assert list(out.iterdir()) == []


def test_stray_quote_in_an_unquoted_field_is_reported_at_its_line(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h,i\n1,ok\n2,O'Brien 5\" screen\n3,x\n4,y\n")
    with pytest.raises(InputError, match="unterminated") as caught:
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv")
    assert caught.value.line == 3


@pytest.mark.parametrize("block_size", [4, 5, 6, 7])
def test_invalid_utf8_at_a_block_boundary_names_offset_and_line(
    tmp_path: Path, block_size: int
) -> None:
    source = tmp_path / "in.csv"
    good = "ü李😀".encode()
    source.write_bytes(b"h\n" + good + b"\nab\xe6\x9d\n")  # 李 cut short by a newline
    with pytest.raises(InputError, match="UTF-8") as caught:
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv", block_size=block_size)
    assert (caught.value.line, caught.value.offset) == (3, 2 + len(good) + 3)


def test_truncated_utf8_at_the_end_of_the_file(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\nab\xf0\x9f")
    with pytest.raises(InputError, match="UTF-8") as caught:
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv", block_size=4)
    assert (caught.value.line, caught.value.offset) == (2, 4)


def test_multibyte_characters_across_block_boundaries_are_fine(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    write_source(source, ["n"], [["ü李😀é"]] * 20)
    for block_size in range(4, 12):
        events = run(source, tmp_path / "out", max_bytes=200, fmt="csv", block_size=block_size)
        assert done_of(events).rows == 20


@pytest.mark.parametrize(("bom", "name"), [(b"\xff\xfe", "FF FE"), (b"\xfe\xff", "FE FF")])
def test_utf16_is_refused_by_name(tmp_path: Path, bom: bytes, name: str) -> None:
    source = tmp_path / "in.csv"
    codec = "utf-16-le" if bom == b"\xff\xfe" else "utf-16-be"
    source.write_bytes(bom + "email\na@b\n".encode(codec))
    with pytest.raises(InputError, match=f"UTF-16.*{name}") as caught:
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv")
    assert (caught.value.offset, caught.value.line) == (0, 1)


def test_nul_bytes_are_refused_as_binary(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\n1\n2\x00\x01\x02junk\n")
    with pytest.raises(InputError, match="NUL") as caught:
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv")
    assert (caught.value.offset, caught.value.line) == (5, 3)


@pytest.mark.parametrize("content", [b"", BOM])
def test_empty_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(content)
    with pytest.raises(InputError, match="empty"):
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv")


@pytest.mark.parametrize("content", [b"email;name\n", b"email;name", b"email;name\r\n"])
def test_header_only_gives_no_chunks(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "in.ssv"
    source.write_bytes(content)
    events = run(source, tmp_path / "out", max_bytes=1000, fmt="ssv")
    assert events == [SplitDone(0, 0, 0, ("email", "name"))]
    assert list((tmp_path / "out").iterdir()) == []


def test_duplicate_header_column_is_named(tmp_path: Path) -> None:
    source = tmp_path / "in.tsv"
    source.write_bytes(b"email\tname\temail\na\tb\tc\n")
    with pytest.raises(InputError, match="column 3 'email' duplicates column 1"):
        run(source, tmp_path / "out", max_bytes=1000, fmt="tsv")


def test_trailing_delimiter_in_header_is_an_empty_column(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"email,name,\na,b,\n")
    with pytest.raises(InputError, match="column 3 has an empty name") as caught:
        run(source, tmp_path / "out", max_bytes=1000, fmt="csv")
    assert caught.value.line == 1


def test_parse_header_unquotes_names_and_strips_the_line_ending() -> None:
    names = parse_header(BOM + b'email;"a;b";"say ""hi"""\r\n', "ssv", Path("x.ssv"))
    assert names == ("email", "a;b", 'say "hi"')
    with pytest.raises(InputError, match="empty"):
        parse_header(b"\n", "csv", Path("x.csv"))


def test_last_record_without_newline_stays_without_one(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\n1\n2\n3")
    events = run(source, tmp_path / "out", max_bytes=7, fmt="csv")
    assert [c.path.read_bytes() for c in chunks_of(events)] == [b"h\n1\n2\n", b"h\n3"]
    assert done_of(events).rows == 3


def test_blank_lines_are_records_and_a_final_newline_is_not(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\n1\n\n\r\n2\n")
    (chunk,) = chunks_of(run(source, tmp_path / "out", max_bytes=100, fmt="csv"))
    assert chunk.rows == 4
    assert [line for line, _ in iter_records(chunk.path, "csv")] == [2, 3, 4, 5]


def test_lone_cr_outside_quotes_is_data(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\na\rb\nc\n")
    (chunk,) = chunks_of(run(source, tmp_path / "out", max_bytes=100, fmt="csv"))
    assert chunk.rows == 2


def test_header_too_large_for_any_record(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"abcdefghij\n1\n")
    with pytest.raises(InputError, match="header alone"):
        run(source, tmp_path / "out", max_bytes=12, fmt="csv")


def test_an_error_leaves_no_partial_chunk_behind(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\n" + b"row\n" * 40 + b"bad \xff\n" + b"row\n" * 10)
    out = tmp_path / "out"
    announced: list[Chunk] = []

    def consume() -> None:
        for event in split_file(source, out, max_bytes=20, fmt="csv", block_size=8):
            if isinstance(event, Chunk):
                announced.append(event)

    with pytest.raises(InputError, match="UTF-8"):
        consume()
    assert announced  # chunks were cut before the bad byte was read
    assert sorted(out.iterdir()) == [c.path for c in announced]
    assert all(c.path.read_bytes() == b"h\n" + b"row\n" * c.rows for c in announced)


def test_closing_the_generator_early_removes_the_chunk_being_written(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(b"h\n" + b"row\n" * 100)
    out = tmp_path / "out"
    events = split_file(source, out, max_bytes=20, fmt="csv", block_size=16)
    assert isinstance(next(events), Chunk)
    events.close()
    assert leftovers(out) == []
    assert [p.name for p in out.iterdir()] == ["chunk-00001.csv"]


def test_same_input_gives_byte_identical_chunks(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    rows = [[str(i), "é" * (i % 7), 'x,"y"\nz' * (i % 3)] for i in range(200)]
    write_source(source, ["id", "a", "b"], rows, eol="\r\n")
    first = run(source, tmp_path / "one", max_bytes=300, fmt="csv", fsync=True)
    second = run(source, tmp_path / "two", max_bytes=300, fmt="csv")
    assert len(chunks_of(first)) > 5
    assert [(c.path.name, c.path.read_bytes(), c.rows, c.first_line) for c in chunks_of(first)] == [
        (c.path.name, c.path.read_bytes(), c.rows, c.first_line) for c in chunks_of(second)
    ]


def test_iter_records_gives_lines_and_raw_bytes(tmp_path: Path) -> None:
    chunk = tmp_path / "chunk.csv"
    chunk.write_bytes(b'h\r\n1,"a\r\nb"\r\n2,"c""d"\r\n\r\n3')
    assert list(iter_records(chunk, "csv")) == [
        (2, b'1,"a\r\nb"'),
        (4, b'2,"c""d"'),
        (5, b""),
        (6, b"3"),
    ]


def test_iter_records_refuses_an_unterminated_quote(tmp_path: Path) -> None:
    chunk = tmp_path / "chunk.csv"
    chunk.write_bytes(b'h\n1\n2,"x\n')
    with pytest.raises(InputError, match="unterminated") as caught:
        list(iter_records(chunk, "csv"))
    assert caught.value.line == 3


def test_large_blocks_with_quotes_everywhere(tmp_path: Path) -> None:
    """The 1 MiB block path: quoted LFs and doubled quotes across block and chunk edges."""
    source = tmp_path / "in.csv"
    rows = [[str(i), f'note "{i}", more\nline {i % 5}', "ü" * (i % 4)] for i in range(60_000)]
    head, records = write_source(source, ["id", "note", "x"], rows)
    max_bytes = 250_000
    events = run(source, tmp_path / "out", max_bytes=max_bytes, fmt="csv")
    check_chunks(events, head, records, start_lines(head, records), max_bytes, "csv")
    assert done_of(events).rows == len(rows)


# --- async wrapper ---------------------------------------------------------------


def many_chunks(path: Path, count: int = 40) -> None:
    path.write_bytes(b"id\n" + b"".join(b"%08d\n" % i for i in range(count * 10)))


async def test_async_first_chunk_arrives_before_later_ones_are_cut(tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out"
    many_chunks(source)
    events = split_file_async(source, out, max_bytes=100, fmt="csv")
    async with contextlib.aclosing(events):
        first = await anext(events)
        assert isinstance(first, Chunk)
        assert first.index == 1
        # The worker runs at most a couple of events ahead of this consumer.
        assert not (out / "chunk-00006.csv").exists()
        rest = [event async for event in events]
    done = rest[-1]
    assert isinstance(done, SplitDone)
    assert done.chunks == 40
    assert leftovers(out) == []


async def test_async_early_close_stops_the_worker(tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out"
    many_chunks(source, 200)
    events = split_file_async(source, out, max_bytes=100, fmt="csv")
    assert isinstance(await anext(events), Chunk)
    await asyncio.wait_for(events.aclose(), timeout=10)  # returns once the worker has stopped
    cut = sorted(out.iterdir())
    assert len(cut) <= 5
    assert leftovers(out) == []


async def test_async_cancel_stops_the_worker(tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out"
    many_chunks(source, 200)
    got_one = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(
            split_file_async(source, out, max_bytes=100, fmt="csv")
        ) as ev:
            async for _ in ev:
                got_one.set()
                await asyncio.Event().wait()  # a consumer stuck elsewhere, then cancelled

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
    assert len(list(out.iterdir())) <= 5
    assert leftovers(out) == []


async def test_async_errors_are_raised_in_the_consumer(tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out"
    source.write_bytes(b"h\n" + b"row\n" * 50 + b'"open\n')
    seen: list[SplitEvent] = []

    async def consume() -> None:
        async for event in split_file_async(source, out, max_bytes=30, fmt="csv"):
            seen.append(event)

    with pytest.raises(InputError, match="unterminated"):
        await consume()
    assert seen
    assert leftovers(out) == []


def test_bad_arguments_are_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        split_file(tmp_path / "x.csv", tmp_path, max_bytes=100, fmt="xlsx")
    with pytest.raises(ValueError, match="max_bytes"):
        split_file(tmp_path / "x.csv", tmp_path, max_bytes=1, fmt="csv")


# --- a disk that fills up ------------------------------------------------------

FULL_DISK = r"""
import errno, resource, signal, sys
from pathlib import Path
from orchestrator.splitter import split_file

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of dying
# Root ignores file modes but not RLIMIT_FSIZE: no file grows past 64 KiB, so
# write(2) fails with an OSError that names no file, as ENOSPC does on a full disk.
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    for _ in split_file(Path(sys.argv[1]), Path(sys.argv[2]), max_bytes=1_000_000, fmt="csv"):
        pass
except OSError as exc:
    print(exc.errno == errno.EFBIG, exc.filename, sep="\n")
    sys.exit(3)
"""


async def test_a_failed_chunk_write_names_the_chunk_file(tmp_path: Path) -> None:
    """The daemon reports an OSError in one line only when it names a path."""
    source = tmp_path / "big.csv"
    source.write_bytes(b"email\n" + b"".join(b"user%06d@example.com\n" % n for n in range(20_000)))
    out = tmp_path / "chunks"
    out.mkdir()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", FULL_DISK, str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    is_efbig, filename = done.stdout.splitlines()
    assert is_efbig == "True"
    assert filename == str(out / "chunk-00001.csv.tmp")
