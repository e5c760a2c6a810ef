"""Reading records' keys while a file is split: which columns, how they hash, and a
chunk's keys gathered into a `KeySet` without a burst of memory.

A route's key is its key columns (`KeyRule`); the header says where they are. Each
record's key values are taken from its bytes and hashed exactly as `keys.key_hash`
does (trimmed, case-folded, joined with the namespace, BLAKE2b), a region of records
at a time, so the work per record is a few C calls:

- a record without a quote is split at the delimiter (padded, so a short record has
  empty values, as Marketo pads short rows);
- a record with a quote is read by the csv module, which knows quoted fields;
- values of a pure-ASCII region are trimmed and lowered as bytes (for ASCII, `lower`
  is `casefold`, and the stripped bytes are exactly those `str.strip` strips); any
  other region goes through `str`.

A header that lacks one of the key columns gives the file no keys: the header check
before a job (issue 19) is where a missing column fails a file, not here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from orchestrator import delimited
from orchestrator.keys import LEAD_NAMESPACE, SEPARATOR, KeySet
from orchestrator.models import ObjectType
from orchestrator.splitter.scan import iter_records, parse_header

# What str.strip() strips from an ASCII string: the ASCII characters that are space.
ASCII_SPACE: Final = bytes(b for b in range(128) if chr(b).isspace())
_SEP: Final = SEPARATOR.encode()
_QUOTE: Final = b'"'
BUCKET_SHIFT: Final = 52  # a chunk's hashes are gathered in 4096 buckets by their top bits
_PROBE: Final = 1 << 14  # hashes held in a set at once when two arrays are compared


@dataclass(frozen=True, slots=True)
class KeyRule:
    """Which rows name the same record: the key's namespace and the columns of its values."""

    namespace: str
    columns: tuple[str, ...]


def namespace_for(object_type: ObjectType, api_name: str = "") -> str:
    """Leads and program members share one namespace (a member's email names a lead);
    each custom object has its own."""
    if object_type is ObjectType.CUSTOM_OBJECT:
        return f"customobject:{api_name}"
    return LEAD_NAMESPACE


def rule_for(object_type: ObjectType, api_name: str, columns: tuple[str, ...]) -> KeyRule | None:
    """A route's key rule from its key columns; None when it has none."""
    return KeyRule(namespace_for(object_type, api_name), columns) if columns else None


def key_indexes(rule: KeyRule, header: Sequence[str]) -> tuple[int, ...] | None:
    """Where the key columns are in `header` (names compared trimmed, then case-folded
    when that finds exactly one), or None when one of them is missing."""
    names = [name.strip() for name in header]
    folded = [name.casefold() for name in names]
    found = []
    for column in rule.columns:
        wanted = column.strip()
        if wanted in names:
            found.append(names.index(wanted))
        elif folded.count(wanted.casefold()) == 1:
            found.append(folded.index(wanted.casefold()))
        else:
            return None
    return tuple(found) if found else None


class RowKeys:
    """The key hashes of one file's records (None for a record whose key values are all
    empty: it names no record, so it never waits for another)."""

    def __init__(self, rule: KeyRule, indexes: tuple[int, ...], fmt: str) -> None:
        self.indexes = indexes
        self._delimiter = delimited.DELIMITERS[fmt]
        self._split_on = self._delimiter.encode()
        self._maxsplit = max(indexes) + 1
        self._pad = self._split_on * self._maxsplit
        self._prefix = (rule.namespace + SEPARATOR).encode()
        self._empty = _SEP * (len(indexes) - 1)  # what joined values are when all are empty

    def hashes(self, records: Sequence[bytes], *, ascii: bool) -> list[int | None]:
        """Each record's key hash; `records` may end with their line endings, and `ascii`
        says that all of them are pure ASCII."""
        if len(self.indexes) == 1:  # one column: one pass, no tuples
            (at,) = self.indexes
            on, pad = self._split_on, self._pad
            if at == 0:
                columns = [[record.split(on, 1)[0] for record in records]]
            else:
                columns = [[(record + pad).split(on, at + 1)[at] for record in records]]
        else:
            fields = [
                (record + self._pad).split(self._split_on, self._maxsplit) for record in records
            ]
            columns = [[row[i] for row in fields] for i in self.indexes]
            del fields
        if ascii:
            normed = [[value.strip(ASCII_SPACE).lower() for value in col] for col in columns]
        else:
            normed = [
                [value.decode().strip().casefold().encode() for value in col] for col in columns
            ]
        values = (
            normed[0]
            if len(normed) == 1
            else [_SEP.join(parts) for parts in zip(*normed, strict=True)]
        )
        prefix, empty = self._prefix, self._empty
        digests = b"".join(
            [hashlib.blake2b(prefix + value, digest_size=8).digest() for value in values]
        )
        hashes = array("Q")
        hashes.frombytes(digests)
        if sys.byteorder != "little":
            hashes.byteswap()
        found: list[int | None] = list(hashes)
        for at, value in enumerate(values):
            if value == empty:
                found[at] = None
        for at, record in enumerate(records):
            if _QUOTE in record:  # quoted fields: the csv module knows where they end
                found[at] = self.quoted(record)
        return found

    def quoted(self, record: bytes) -> int | None:
        """The key hash of one record read by the csv module."""
        text = record.decode().removesuffix("\n").removesuffix("\r")
        row = next(csv.reader(io.StringIO(text, newline=""), delimiter=self._delimiter), [])
        parts = [(row[i] if i < len(row) else "").strip().casefold().encode() for i in self.indexes]
        if not any(parts):
            return None
        data = self._prefix + _SEP.join(parts)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class KeyCollector:
    """One chunk's key hashes, gathered in 4096 buckets by their top 12 bits, so that
    the sorted set is made (and written) a bucket at a time: a chunk of 140,000 keys
    never becomes a list of 140,000 Python ints (6 MB) to be sorted, nor a second
    array; and a key is looked up among the 30-odd of its bucket."""

    def __init__(self) -> None:
        self.buckets = [array("Q") for _ in range(1 << (64 - BUCKET_SHIFT))]  # appended to in loops

    def add(self, key: int) -> None:
        self.buckets[key >> BUCKET_SHIFT].append(key)

    def extend(self, keys: Iterable[int]) -> None:
        for key in keys:
            self.add(key)

    def sorted_buckets(self) -> Iterator[array[int]]:
        """Each bucket's keys sorted and distinct, in order (so all of them are sorted);
        the collector is empty afterwards."""
        for bucket in self.buckets:
            if bucket:
                keys = array("Q", sorted(set(bucket)))
                del bucket[:]  # in place: loops hold the list
                yield keys

    def take(self) -> KeySet:
        """The keys gathered so far, sorted and distinct; the collector is empty after."""
        hashes = array("Q")
        for keys in self.sorted_buckets():
            hashes.extend(keys)
        return KeySet(hashes)


def meets(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two arrays of hashes (sorted or not) share one: a slice of the smaller at
    a time is made a set and probed by the larger, all in C, never more than `_PROBE`
    Python ints held at once."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    return any(
        not set(small[at : at + _PROBE]).isdisjoint(large) for at in range(0, len(small), _PROBE)
    )


def file_keys(path: Path, fmt: str, rule: KeyRule) -> KeySet:
    """The key set of a whole chunk file (a pack read again after a crash), read with the
    splitter's own record rules. Blocking."""
    collector = KeyCollector()
    with path.open("rb") as fh:
        header = fh.readline()
    indexes = key_indexes(rule, parse_header(header, fmt, path))
    if indexes is None:
        return collector.take()
    keys = RowKeys(rule, indexes, fmt)
    batch: list[bytes] = []
    for _, record in iter_records(path, fmt):
        batch.append(record)
        if len(batch) >= 4096:
            collector.extend(h for h in keys.hashes(batch, ascii=False) if h is not None)
            batch = []
    collector.extend(h for h in keys.hashes(batch, ascii=False) if h is not None)
    return collector.take()
