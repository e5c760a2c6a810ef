"""Byte-level reading of delimited files: record ends, checks, header, records.

The cutter reads source files through this module, and `iter_records` reads
records back the same way, so both agree on where records start and end and on
what makes a file unreadable. Nothing here writes files.

How records are found. Quoting follows RFC 4180 with the format's delimiter; the
delimiter itself never matters for cutting, only quotes and LF bytes do. An LF
ends a record when the number of quotes since the record began is even. So the
scan works on whole blocks with C-speed bytes methods, never record by record:
a block without quotes is all `count`/`find`; a block with quotes is reduced to
its quotes and LFs by `translate`, quote pairs on one physical line cancel, and
the few odd lines that are left say which LFs are inside a quoted field.

Decisions (the issue left these open):
- Only LF ends a record; a CR before it is part of the line ending and kept. A
  lone CR outside quotes is ordinary data.
- A quote anywhere toggles quoting, as RFC 4180 reads it. A stray quote inside
  an unquoted field therefore opens a quoted section; if nothing closes it, the
  file ends inside a quote and `InputError` names the line of the record where
  it opened.
- A blank line is a record (an empty row, as `csv.reader` sees it). A final LF
  at the end of the file ends the last record; it is not a record of its own.
- A UTF-8 byte order mark is dropped; UTF-16 (by its mark), NUL bytes and text
  that is not UTF-8 are refused.
- Header names are compared exactly after trimming surrounding spaces: an
  empty one (a trailing delimiter makes one) or a repeated one is an error.
- "line" in errors is the physical line: 1 + the LF bytes before the position
  (the header is line 1). "offset" is a byte offset in the source file as it
  is on disk (a BOM counts).
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from orchestrator.delimited import DELIMITERS
from orchestrator.errors import InputError

DEFAULT_BLOCK_SIZE: Final = 1 << 20
# UTF-8 is checked in pieces this size, so that one wide character does not
# slow the decoding of a whole block, and pure-ASCII pieces are skipped.
_VALIDATE_PIECE: Final = 1 << 16

LF: Final = b"\n"
QUOTE: Final = b'"'
_NUL: Final = b"\x00"
# Second argument to bytes.translate: delete every byte but the quote and LF.
_NOT_QUOTE_OR_LF: Final = bytes(b for b in range(256) if b not in b'"\n')
_UTF16_BOMS: Final = ((codecs.BOM_UTF16_LE, "FF FE"), (codecs.BOM_UTF16_BE, "FE FF"))


# --- the header ------------------------------------------------------------------


def parse_header(line: bytes, fmt: str, source: Path) -> tuple[str, ...]:
    """Column names of a header record; InputError for a header Marketo cannot map."""
    delimiter = delimiter_for(fmt)
    raw = line.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(source, f"header is not valid UTF-8 ({exc.reason})", line=1) from None
    text = text.removesuffix("\n").removesuffix("\r")
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise InputError(source, f"header is not valid {fmt}: {exc}", line=1) from None
    if not rows or rows == [[]]:
        raise InputError(source, "header line is empty", line=1)
    if len(rows) > 1:
        raise InputError(source, "header spans more than one record", line=1)
    return _checked_columns(rows[0], source)


def _checked_columns(names: list[str], source: Path) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        key = name.strip()
        if not key:
            problem = f"header column {number} has an empty name"
            if number == len(names):
                problem += " (a trailing delimiter?)"
            raise InputError(source, problem, line=1)
        if key in seen:
            raise InputError(
                source,
                f"header column {number} {key!r} duplicates column {seen[key]}",
                line=1,
            )
        seen[key] = number
    return tuple(names)


def delimiter_for(fmt: str) -> str:
    try:
        return DELIMITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(DELIMITERS)}") from None


# --- the scan: quote parity with bytes methods --------------------------------


@dataclass(frozen=True, slots=True)
class Scan:
    """Where records end in one block, given whether it starts inside a quote."""

    lfs: int  # LF bytes in the block
    ends: int  # LFs that end a record
    first: int  # offset just past the first record-ending LF, -1 if none
    last: int  # offset just past the last record-ending LF, -1 if none
    parity: int  # 1 if the block ends inside a quoted field


def scan_block(data: bytes, parity: int) -> Scan:
    if data.find(QUOTE) < 0:
        lfs = data.count(LF)
        if parity or not lfs:
            return Scan(lfs, 0, -1, -1, parity)
        return Scan(lfs, lfs, data.find(LF) + 1, data.rfind(LF) + 1, 0)
    # Keep only quotes and LFs. The quotes of one physical line are then
    # adjacent; removing pairs leaves one quote per line with an odd count, and
    # parts[i] of the split lies inside a quote when parity + i is odd.
    marks = data.translate(None, _NOT_QUOTE_OR_LF).replace(b'""', b"")
    parts = marks.split(QUOTE)
    lfs = marks.count(LF)
    quoted = b"".join(parts[1 - parity :: 2]).count(LF)
    end_parity = (parity + len(parts) - 1) & 1
    if quoted == lfs:
        return Scan(lfs, 0, -1, -1, end_parity)
    before, after = _quoted_lfs_around(parts, parity)
    first = _past_nth_lf(data, before)
    last = _past_nth_lf_from_end(data, after)
    return Scan(lfs, lfs - quoted, first, last, end_parity)


def _quoted_lfs_around(parts: list[bytes], parity: int) -> tuple[int, int]:
    """LFs before the first and after the last record-ending LF (parts has one)."""
    before = 0
    for i, part in enumerate(parts):
        if not (parity + i) & 1 and LF in part:
            break
        before += part.count(LF)
    after = 0
    for i in range(len(parts) - 1, -1, -1):
        if not (parity + i) & 1 and LF in parts[i]:
            break
        after += parts[i].count(LF)
    return before, after


def _past_nth_lf(data: bytes, n: int) -> int:
    pos = -1
    for _ in range(n + 1):
        pos = data.find(LF, pos + 1)
    return pos + 1


def _past_nth_lf_from_end(data: bytes, n: int) -> int:
    pos = len(data)
    for _ in range(n + 1):
        pos = data.rfind(LF, 0, pos)
    return pos + 1


def last_end(data: bytes, start: int, limit: int) -> int:
    """Offset past the last record-ending LF in data[start:limit]; -1 if none.

    `start` is a record boundary. Walks back LF by LF only while the quote
    count since `start` is odd.
    """
    pos = data.rfind(LF, start, limit)
    if pos < 0:
        return -1
    odd = data.count(QUOTE, start, pos) & 1
    while odd:
        prev = data.rfind(LF, start, pos)
        if prev < 0:
            return -1
        odd ^= data.count(QUOTE, prev, pos) & 1
        pos = prev
    return pos + 1


def first_end(data: bytes, start: int, parity: int) -> int:
    """Offset past the first record-ending LF at or after `start`; -1 if none."""
    pos = data.find(LF, start)
    while pos >= 0:
        parity ^= data.count(QUOTE, start, pos) & 1
        if not parity:
            return pos + 1
        start = pos
        pos = data.find(LF, pos + 1)
    return -1


def ends_between(data: bytes, pos: int, cut: int, end: int, ends: int) -> int:
    """Record ends in data[pos:cut], both record boundaries; `ends` is for pos:end."""
    if cut - pos <= end - cut:
        return scan_block(data[pos:cut], 0).ends
    return ends - scan_block(data[cut:end], 0).ends


# --- reading and checking the source -------------------------------------------


def read_blocks(
    fh: io.BufferedReader, source: Path, block_size: int
) -> Iterator[tuple[bytes, int]]:
    """The file in blocks with their offsets; a UTF-8 BOM dropped, UTF-16 refused."""
    data = fh.read(block_size)
    offset = 0
    for bom, name in _UTF16_BOMS:
        if data.startswith(bom):
            raise InputError(
                source,
                f"file is UTF-16 (byte order mark {name}); save it as UTF-8",
                offset=0,
                line=1,
            )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
        offset = len(codecs.BOM_UTF8)
        if not data:
            data = fh.read(block_size)
    while data:
        yield data, offset
        offset += len(data)
        data = fh.read(block_size)


class Validator:
    """Refuses NUL bytes and text that is not UTF-8, block by block at C speed."""

    def __init__(self, source: Path) -> None:
        self._source = source
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def check(self, data: bytes, offset: int, line: int) -> None:
        """`line` is the physical line at data[0]."""
        nul = data.find(_NUL)
        if nul >= 0:
            raise InputError(
                self._source,
                "NUL byte: binary data, or UTF-16/UTF-32 text without a byte order mark",
                offset=offset + nul,
                line=line + data.count(LF, 0, nul),
            )
        if not self._held() and data.isascii():
            return
        for start in range(0, len(data), _VALIDATE_PIECE):
            piece = data[start : start + _VALIDATE_PIECE]
            held = self._held()
            if not held and piece.isascii():
                continue
            try:
                self._decoder.decode(piece)
            except UnicodeDecodeError as exc:
                bad = start - len(held) + exc.start
                self._fail(exc.reason, offset + bad, line + data.count(LF, 0, max(bad, 0)))

    def finish(self, offset: int, line: int) -> None:
        """`offset` and `line` are those of the end of the file."""
        held = self._held()
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            self._fail(exc.reason, offset - len(held) + exc.start, line)

    def _held(self) -> bytes:
        return self._decoder.getstate()[0]

    def _fail(self, reason: str, offset: int, line: int) -> NoReturn:
        raise InputError(self._source, f"not valid UTF-8 ({reason})", offset=offset, line=line)


def unterminated_error(source: Path, offset: int, line: int) -> InputError:
    return InputError(
        source,
        "unterminated quoted field: a quote opened in the record starting here is never closed",
        offset=offset,
        line=line,
    )


def empty_file_error(source: Path) -> InputError:
    return InputError(source, "file is empty: no header line", offset=0, line=1)


# --- reading records back ------------------------------------------------------


def iter_records(data_path: Path, fmt: str) -> Iterator[tuple[int, bytes]]:
    """(line, record bytes without its line ending) for each data record of a file.

    The file's first record is its header and is skipped. `line` is the
    physical line in this file where the record starts (header is line 1).
    Uses the splitter's reading, checks and quote rules; raises `InputError`.
    """
    delimiter_for(fmt)
    validator = Validator(data_path)
    buf = b""  # the unfinished record, then the new block
    scanned = 0  # buf[:scanned] holds no record end; quote parity there:
    parity = 0
    line = 1  # line where buf starts
    offset = 0  # file offset of buf[0]
    header_seen = False
    with data_path.open("rb") as fh:
        for data, at in read_blocks(fh, data_path, DEFAULT_BLOCK_SIZE):
            if not buf:
                offset = at
            validator.check(data, at, line + buf.count(LF))
            buf += data
            start = 0
            end = first_end(buf, scanned, parity)
            while end >= 0:
                if header_seen:
                    yield line, _without_line_ending(buf[start:end])
                header_seen = True
                line += buf.count(LF, start, end)
                start = end
                end = first_end(buf, start, 0)
            if start:
                parity = buf.count(QUOTE, start) & 1
            else:
                parity ^= buf.count(QUOTE, scanned) & 1
            buf = buf[start:]
            offset += start
            scanned = len(buf)
        validator.finish(offset + len(buf), line + buf.count(LF))
    if parity:
        raise unterminated_error(data_path, offset, line)
    if not header_seen and not buf:
        raise empty_file_error(data_path)
    if buf and header_seen:
        yield line, _without_line_ending(buf)


def line_ending(record: bytes) -> bytes:
    """The line ending `record` ends with: CRLF, LF, or none (a file's last record)."""
    if record.endswith(LF):
        return b"\r\n" if record.endswith(b"\r\n") else LF
    return b""


def _without_line_ending(record: bytes) -> bytes:
    return record[: len(record) - len(line_ending(record))]
