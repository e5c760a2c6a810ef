"""What a split remembers of the keys it has placed: the file's recent chunks and the
keys it moved, exactly, in a few MB.

A row goes to a later chunk when its key is in the chunk being cut or in one of the
`WINDOW` chunks before it, or was moved already (see `splitter.repeats`). Holding the
recent chunks' keys in memory would cost 8 bytes a key, 15 MB for 13 chunks of a file
of 70-byte rows, where the daemon has a few MB to spare (bench/finish.py: 64 MB in
all). But every closed chunk's key set is on disk beside it, sorted. So:

- a filter answers first, for every row: a blocked Bloom filter in generations (each
  over `GENERATION` consecutive chunks; a key sets 4 bits in each of two 64-bit words,
  masks made by table reads: this runs once a row in Python). `GENERATIONS` of them
  are kept, which covers the chunk being cut and at least `WINDOW` before it; the
  oldest is dropped whole, which is how a Bloom filter forgets. It never misses a key
  of those chunks, and takes about 1 key in 100 it never saw for one it did;
- only then is the key looked up exactly: in the chunk being cut (its keys in memory,
  `KeyCollector`) and in the key files of the recent chunks of the generations that
  said yes, each through every 256th of its keys held in memory and one read of 2 KB
  (`KeyFile`). So a file whose keys are all distinct is cut exactly as without keys.

Each generation is sized from the keys per chunk seen so far (12 bits a key), within
`MAX_WORDS`: a file of very narrow rows costs more lookups rather than more memory.

The keys moved are remembered for the whole file, exactly (`MovedKeys`, about 12
bytes each): the row after a moved one must go after it, however far apart. They are
put in every new generation too, so the filter says yes for them.
"""

from __future__ import annotations

import bisect
import os
import sys
from array import array
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Final

WINDOW: Final = 12  # chunks before the one being cut whose keys are recent (Marketo's 10
# queued jobs and a margin: a repeat further back is most likely imported already)
GENERATION: Final = 6  # chunks per generation of the filter
GENERATIONS: Final = 3  # generations kept: the chunk being cut and 12 to 17 before it
BITS_PER_KEY: Final = 12
MIN_WORDS: Final = 1 << 10  # 8 KiB
MAX_WORDS: Final = 1 << 18  # 2 MiB a generation at most
SPARSE: Final = 256  # every 256th key of a recent chunk's key file is held in memory
_M32: Final = 0xFFFFFFFF
# Two bits of a 64-bit word for each 12-bit value: two table reads make a 4-bit mask.
# A key's first word is chosen by its low 32 bits and masked by bits 32-55; its second
# by its high 32 bits, masked by bits 0-23 (measured: as few false hits as fully
# independent choices, about 0.5 % for a full generation at 12 bits a key).
_MASKS: Final = tuple((1 << (i & 63)) | (1 << (i >> 6)) for i in range(1 << 12))


class Filter:
    """A blocked Bloom filter of 64-bit words (see the module docstring)."""

    __slots__ = ("chunks", "keys", "n", "words")

    def __init__(self, words: int) -> None:
        self.n = max(1, words)
        self.words = array("Q", (0,)) * self.n  # one allocation, no zeroed bytes first
        self.keys = 0
        self.chunks: list[int] = []  # the chunks whose keys it holds, by number

    @property
    def nbytes(self) -> int:
        return 8 * self.n

    def add(self, key: int) -> None:
        masks, words, n = _MASKS, self.words, self.n
        words[(key & _M32) % n] |= masks[(key >> 32) & 4095] | masks[(key >> 44) & 4095]
        words[(key >> 32) % n] |= masks[key & 4095] | masks[(key >> 12) & 4095]
        self.keys += 1

    def __contains__(self, key: int) -> bool:
        masks, words, n = _MASKS, self.words, self.n
        mask = masks[(key >> 32) & 4095] | masks[(key >> 44) & 4095]
        if words[(key & _M32) % n] & mask != mask:
            return False
        mask = masks[key & 4095] | masks[(key >> 12) & 4095]
        return words[(key >> 32) % n] & mask == mask


def words_for(keys: int) -> int:
    """Words for a generation expected to hold `keys` keys."""
    return min(MAX_WORDS, max(MIN_WORDS, keys * BITS_PER_KEY // 64))


class KeyFile:
    """A closed chunk's key set on disk (sorted 64-bit hashes, as `KeySet.save` writes
    them), looked up through every `SPARSE`-th key held in memory and one read."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._sparse = array("Q")
        block = SPARSE * 64 * 8  # 64 index entries a read
        offset = 0
        while data := os.pread(self._fd, block, offset):
            self._sparse.extend(_numbers(data)[::SPARSE])
            offset += len(data)

    def __contains__(self, key: int) -> bool:
        at = bisect.bisect_right(self._sparse, key) - 1
        if at < 0:
            return False
        block = _numbers(os.pread(self._fd, SPARSE * 8, at * SPARSE * 8))
        found = bisect.bisect_left(block, key)
        return found < len(block) and block[found] == key

    def close(self) -> None:
        os.close(self._fd)


def _numbers(data: bytes) -> array[int]:
    numbers = array("Q")
    numbers.frombytes(data)
    if sys.byteorder != "little":
        numbers.byteswap()
    return numbers


class RecentKeys:
    """The keys of the chunk being cut and of the `WINDOW` chunks before it: a filter
    first, then exactly (see the module docstring)."""

    def __init__(self, keys_per_chunk: int) -> None:
        self._per_chunk = max(1, keys_per_chunk)  # the most seen in one chunk (or a guess)
        self._generations: deque[Filter] = deque(maxlen=GENERATIONS)
        self._generations.append(Filter(words_for(GENERATION * self._per_chunk)))
        self._chunks = 0  # chunks closed so far: the number of the chunk being cut
        self._files: dict[int, KeyFile] = {}  # the recent closed chunks' key files

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self._generations)

    def __contains__(self, key: int) -> bool:
        """Whether the filter may hold `key` (it never misses a recent or moved key)."""
        return any(key in generation for generation in self._generations)

    def add_all(self, keys: list[int]) -> None:
        """Keys placed in the chunk being cut, or moved: one call, one loop."""
        masks, current = _MASKS, self._generations[-1]
        words, n = current.words, current.n
        for key in keys:
            words[(key & _M32) % n] |= masks[(key >> 32) & 4095] | masks[(key >> 44) & 4095]
            words[(key >> 32) % n] |= masks[key & 4095] | masks[(key >> 12) & 4095]
        current.keys += len(keys)

    def maybe(self, keys: list[int | None]) -> list[int]:
        """The places in `keys` of those the filter may hold (None is no key): each
        generation's first words are read for all of them at once, the second word only
        for those the first lets through."""
        masks = _MASKS
        present = [(i, k) for i, k in enumerate(keys) if k is not None]
        firsts = [masks[(k >> 32) & 4095] | masks[(k >> 44) & 4095] for _, k in present]
        lows = [k & _M32 for _, k in present]
        found: set[int] = set()
        for generation in self._generations:
            words, n = generation.words, generation.n
            hits = [
                w
                for w, (low, m) in enumerate(zip(lows, firsts, strict=True))
                if words[low % n] & m == m
            ]
            found.update(present[w][0] for w in hits if present[w][1] in generation)
        return sorted(found)

    def holds(self, key: int, current: array[int]) -> bool:
        """Whether `key` is, exactly, in one of the recent closed chunks, or among the
        chunk being cut's keys (`current`: the bucket of them it would be in)."""
        if key in current:
            return True
        oldest = self._chunks - WINDOW
        for generation in self._generations:
            if key in generation:
                for number in generation.chunks:
                    keys_file = self._files.get(number) if number >= oldest else None
                    if keys_file is not None and key in keys_file:
                        return True
        return False

    def chunk_closed(self, keys_file: Path | None, keys: int, moved: MovedKeys) -> None:
        """The chunk being cut is closed with `keys` keys, saved at `keys_file`: it is
        looked up there while recent; after every `GENERATION` chunks a new generation
        starts (the oldest is dropped), holding the moved keys."""
        number = self._chunks
        self._generations[-1].chunks.append(number)
        if keys_file is not None and keys:
            self._files[number] = KeyFile(keys_file)
        self._chunks += 1
        stale = self._files.pop(self._chunks - WINDOW - 1, None)
        if stale is not None:
            stale.close()
        self._per_chunk = max(self._per_chunk, keys)
        if self._chunks % GENERATION == 0:
            if len(self._generations) == GENERATIONS:
                self._generations.popleft()  # gone before the next is made: one less at once
            fresh = Filter(words_for(GENERATION * self._per_chunk + len(moved)))
            for key in moved:
                fresh.add(key)
            self._generations.append(fresh)

    def close(self) -> None:
        for keys_file in self._files.values():
            keys_file.close()
        self._files.clear()


class MovedKeys:
    """Each moved key and the level of its latest moved row (1 for the second row of a
    key, 2 for the third, ...), exactly: new keys in a dict, merged into two sorted
    arrays (8 + 4 bytes a key) once the dict holds a quarter as many, so merging costs
    each key a constant amortised share."""

    MERGE_AT: Final = 4096

    def __init__(self) -> None:
        self._new: dict[int, int] = {}
        self._keys = array("Q")  # sorted
        self._levels = array("I")  # the level of the key at the same place

    def __len__(self) -> int:
        return len(self._new) + len(self._keys)

    def __iter__(self) -> Iterator[int]:
        yield from self._keys
        yield from self._new

    @property
    def nbytes(self) -> int:
        """About what the moved keys take (the dict's entries counted at 100 bytes)."""
        return 12 * len(self._keys) + 100 * len(self._new)

    def level(self, key: int) -> int:
        """The level of the key's latest moved row, 0 if it never moved."""
        found = self._new.get(key)
        if found is not None:
            return found
        at = bisect.bisect_left(self._keys, key)
        if at < len(self._keys) and self._keys[at] == key:
            return self._levels[at]
        return 0

    def set(self, key: int, level: int) -> None:
        at = bisect.bisect_left(self._keys, key)
        if at < len(self._keys) and self._keys[at] == key:
            self._levels[at] = level
            return
        self._new[key] = level
        if len(self._new) >= max(self.MERGE_AT, len(self._keys) // 4):
            self._merge()

    def _merge(self) -> None:
        keys, levels = array("Q"), array("I")
        start = 0
        for key in sorted(self._new):
            at = bisect.bisect_left(self._keys, key, start)
            keys.extend(self._keys[start:at])
            levels.extend(self._levels[start:at])
            keys.append(key)
            levels.append(self._new[key])
            start = at
        keys.extend(self._keys[start:])
        levels.extend(self._levels[start:])
        self._keys, self._levels = keys, levels
        self._new.clear()
