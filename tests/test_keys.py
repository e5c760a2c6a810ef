"""Record keys: stable hashes of trimmed, case-folded key values, and chunk key sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path


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
