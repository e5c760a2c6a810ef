"""Record keys: stable hashes of trimmed, case-folded key values, and chunk key sets."""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.keyorder import SLICE_KEYS, KeyFile, common_keys, meeting
from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path
from orchestrator.store import Keyed


def test_a_key_is_trimmed_and_case_folded_and_namespaced() -> None:
    a = key_hash(LEAD_NAMESPACE, [" Ada@Example.com "])
    assert a is not None
    assert a == key_hash(LEAD_NAMESPACE, ["ada@example.com"])
    assert a != key_hash("customobject:car_c", ["ada@example.com"])
    assert a != key_hash(LEAD_NAMESPACE, ["bob@example.com"])
    # Two columns are not one column holding both values.
    assert key_hash("co", ["a", "bc"]) != key_hash("co", ["ab", "c"])


def test_a_row_without_key_values_has_no_key() -> None:
    assert key_hash(LEAD_NAMESPACE, ["", "  "]) is None
    assert key_hash(LEAD_NAMESPACE, ["", "x"]) is not None


def test_the_hash_is_the_same_in_another_process() -> None:
    # Python's own hash() is salted per process; ours must not be (restarts, daemons).
    code = "from orchestrator.keys import key_hash; print(key_hash('lead', ['ada@example.com']))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == key_hash(LEAD_NAMESPACE, ["ada@example.com"])


def test_key_sets_intersect_exactly_and_survive_a_round_trip(tmp_path: Path) -> None:
    a = KeySet.of(range(0, 200_000, 2))
    b = KeySet.of(range(1, 200_001, 2))
    c = KeySet.of([5, 10**18, 2**64 - 1])
    assert len(a) == 100_000
    assert a.nbytes == 800_000
    assert not a.intersects(b)
    assert a.intersects(KeySet.of([199_998]))
    assert b.intersects(c)
    assert not a.intersects(KeySet.of([2**64 - 1]))
    assert not KeySet.of([]).intersects(a)
    assert 10**18 in c
    assert 11 not in c
    path = keys_path(tmp_path / "chunk-00001.csv")
    assert path.name == "chunk-00001.csv.keys"
    c.save(path)
    assert list(KeySet.load(path).hashes) == [5, 10**18, 2**64 - 1]
    assert len(KeySet.load(tmp_path / "missing.keys")) == 0


# -- comparing two chunks' key files (orchestrator.keyorder) ---------------------------------------

_HASHES = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))


def keyed(directory: Path, chunk_id: int, hashes: Iterable[int], final: bool = False) -> Keyed:
    """A chunk whose key file holds `hashes` (the chunk file itself is never read)."""
    chunk = directory / f"chunk-{chunk_id:05d}.csv"
    KeySet.of(hashes).save(keys_path(chunk), fsync=False)
    return Keyed(chunk_id=chunk_id, seq=chunk_id, path=str(chunk), final=final)


@settings(max_examples=200, deadline=None)
@given(
    a=st.sets(_HASHES, max_size=60),
    b=st.sets(_HASHES, max_size=60),
    shared=st.sets(_HASHES, max_size=20),
    size=st.integers(1, 9),
)
def test_slice_by_slice_comparison_finds_exactly_the_common_keys(
    a: set[int], b: set[int], shared: set[int], size: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        first = keyed(Path(tmp), 1, a | shared)
        second = keyed(Path(tmp), 2, b | shared)
        x, y = KeyFile.open(first), KeyFile.open(second)
        assert x is not None
        assert y is not None
        with x, y:
            found = list(common_keys(x, y, size))
            assert found == sorted((a | shared) & (b | shared))
            assert found == list(common_keys(y, x, size)), "either way round"
        assert meeting(second, [first]) == ([1] if found else [])


def test_missing_key_files_meet_nothing_unless_their_chunk_is_final(tmp_path: Path) -> None:
    some = keyed(tmp_path, 1, [7, 8])
    none = Keyed(chunk_id=2, seq=2, path=str(tmp_path / "no-keys.csv"), final=False)
    gone = Keyed(chunk_id=3, seq=3, path=str(tmp_path / "gone.csv"), final=True)
    empty = keyed(tmp_path, 4, [])
    later = keyed(tmp_path, 5, [8, 9])
    assert meeting(later, [some, none, gone, empty]) == [1, 3]
    assert meeting(none, [some, gone]) == [], "no keys: it meets nothing"
    assert meeting(empty, [some, gone]) == []


def test_checking_chunks_holds_two_slices_not_a_set_per_chunk(tmp_path: Path) -> None:
    """Each chunk is compared with every earlier one straight from the key files: memory
    stays at a slice of each (sets of at most SLICE_KEYS), and nothing is kept between
    checks, however many chunks are in flight."""
    rng = random.Random(20)
    per_chunk, chunks = 40_000, 10
    shared = rng.getrandbits(64)
    sets = [[rng.getrandbits(64) for _ in range(per_chunk)] for _ in range(chunks)]
    sets[3].append(shared)
    sets[8].append(shared)
    keyed_chunks = [keyed(tmp_path, i, hashes) for i, hashes in enumerate(sets)]
    one_set = sys.getsizeof(set(sets[0])) + per_chunk * 32  # what a set per chunk would take
    tracemalloc.start()
    try:
        found = [meeting(chunk, keyed_chunks[:i]) for i, chunk in enumerate(keyed_chunks)]
        first = tracemalloc.get_traced_memory()[0]
        found += [meeting(chunk, keyed_chunks[:i]) for i, chunk in enumerate(keyed_chunks)]
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found[:chunks] == [[3] if i == 8 else [] for i in range(chunks)]
    assert found[chunks:] == found[:chunks]
    assert peak < 600_000 < one_set / 4, (peak, one_set)
    assert after - first < 20_000, "no cache grows from one round of checks to the next"
    assert SLICE_KEYS * 8 <= 16_384
