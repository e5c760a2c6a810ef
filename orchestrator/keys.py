"""Record keys: which rows name the same record at Marketo, as 64-bit hashes.

Marketo's bulk import is insert-or-update by a key (a lead's lookup field, a custom
object's dedupe fields, a program member's email). Two of our jobs whose rows share a
key must not import at once (the older value may win, or Marketo makes twin records),
and one job must not hold two rows of one key (Marketo documents no order inside a
job). To tell, every row's key is hashed while its file is split:

- the key is the values of the route's key columns, each trimmed and case-folded (a
  coarser key than Marketo's own only adds waiting, never breaks order), joined with
  the key's namespace: leads and program members share one ("lead": a program
  member's email names a lead), each custom object has its own;
- the hash is 8 bytes of BLAKE2b: stable across processes, machines and restarts
  (Python's own `hash` is salted per process), and with at most a few million keys in
  flight the chance of two keys sharing a hash is about 1e-7: a false conflict costs
  some waiting, never a lost or reordered row;
- a row whose key values are all empty has no key: Marketo cannot match it to a record
  (it fails, or creates a new one every time), so it never waits for another row.

A chunk's keys are a `KeySet`: its hashes sorted in an `array('Q')`, 8 bytes a row,
kept in a file beside the chunk (`<chunk>.keys`) until the chunk is final.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import sys
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from orchestrator.durable import fsync_dir

LEAD_NAMESPACE: Final = "lead"  # leads and program members: one person, one email
SEPARATOR: Final = "\x1f"  # the unit separator: never part of a trimmed field's meaning
KEYS_SUFFIX: Final = ".keys"


def normalise(value: str) -> str:
    """A key value as compared: trimmed and case-folded."""
    return value.strip().casefold()


def key_hash(namespace: str, values: Sequence[str]) -> int | None:
    """The 64-bit hash of a row's key, or None when every key value is empty."""
    parts = [normalise(value) for value in values]
    if not any(parts):
        return None
    data = SEPARATOR.join([namespace, *parts]).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class KeySet:
    """The keys of one chunk: distinct hashes, sorted, 8 bytes each."""

    __slots__ = ("_hashes",)

    def __init__(self, hashes: array[int]) -> None:
        self._hashes = hashes  # sorted, distinct

    @classmethod
    def of(cls, hashes: Iterable[int]) -> KeySet:
        return cls(array("Q", sorted(set(hashes))))

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int):
            return False
        at = bisect.bisect_left(self._hashes, key)
        return at < len(self._hashes) and self._hashes[at] == key

    @property
    def hashes(self) -> array[int]:
        """The sorted hashes (do not change them)."""
        return self._hashes

    def __repr__(self) -> str:
        return f"<KeySet {len(self)} keys>"

    @property
    def nbytes(self) -> int:
        """Memory the hashes take (the array's buffer)."""
        return self._hashes.itemsize * len(self._hashes)

    def intersects(self, other: KeySet) -> bool:
        """Whether the two share a key (a set of the smaller, probed by the larger's items,
        all in C: about 10 ms for two sets of 100,000)."""
        small, large = (self, other) if len(self) <= len(other) else (other, self)
        if not small._hashes or not large._hashes:
            return False
        if small._hashes[-1] < large._hashes[0] or large._hashes[-1] < small._hashes[0]:
            return False  # disjoint ranges: nothing to probe
        return not set(small._hashes).isdisjoint(large._hashes)

    def save(self, path: Path, *, fsync: bool = True) -> None:
        """Write the hashes to `path` (little-endian), whole or not at all."""
        tmp = path.with_name(f".{path.name}.tmp")
        data = self._hashes
        if sys.byteorder != "little":
            data = array("Q", data)
            data.byteswap()
        with open(tmp, "wb") as fh:
            data.tofile(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path) -> KeySet:
        """The set `save` wrote to `path`; an empty set if there is no such file."""
        hashes = array("Q")
        try:
            with open(path, "rb") as fh:
                hashes.frombytes(fh.read())
        except FileNotFoundError:
            return cls(hashes)
        if sys.byteorder != "little":
            hashes.byteswap()
        return cls(hashes)


def keys_path(chunk_path: Path) -> Path:
    """Where a chunk file's key set lives: beside it."""
    return chunk_path.with_name(chunk_path.name + KEYS_SUFFIX)
