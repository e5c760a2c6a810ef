"""Source files as a pipeline drops them, and what the daemon and Marketo make of them.

Writers: `lead_rows`, `write_csv`, `drop_leads`, `drop_workload` (leads, a custom object
and program members in one go: the engine, chaos and faults tests and bench/soak.py),
`drop_tiny_files` (a flood of one-row files).
Readers: `result_path`, `result`, `all_results`, `result_docs`, `results_per_source`,
`landed` (the keys that reached the simulator), `integrity` (PRAGMA integrity_check).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

from orchestrator.simulator import Simulator

LEAD_HEADER = ["email", "firstName", "note"]


# -- writing sources ---------------------------------------------------------------------


def lead_rows(
    n: int, *, prefix: str = "p", bad: Collection[int] = (), warn: Collection[int] = ()
) -> list[list[str]]:
    """Rows of a leads file: a multi-line quoted note every 7th row, bad emails and warn markers where asked."""
    rows = []
    for i in range(n):
        email = f"{prefix}{i}.example.com" if i in bad else f"{prefix}{i}@example.com"
        note = (
            "__WARN__" if i in warn else ('line one\nline "two", three' if i % 7 == 0 else f"n{i}")
        )
        rows.append([email, f"First{i}", note])
    return rows


def write_csv(
    path: Path,
    header: list[str],
    rows: list[list[str]],
    *,
    delimiter: str = ",",
    mtime: float | None = None,
) -> Path:
    """A source file as a pipeline would write it (quoting only where needed), renamed
    into place whole."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerows([header, *rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    tmp.rename(path)
    return path


def drop_leads(
    data_dir: Path,
    name: str,
    n: int,
    *,
    route: str = "leads",
    mtime: float | None = None,
    **kw: Any,
) -> Path:
    """`n` lead rows (see lead_rows for `prefix`, `bad`, `warn`) as inbox/<route>/<name>."""
    return write_csv(
        data_dir / "inbox" / route / name, LEAD_HEADER, lead_rows(n, **kw), mtime=mtime
    )


def drop_workload(
    data_dir: Path,
    *,
    leads: int,
    cars: int,
    members: int = 0,
    names: tuple[str, str, str] = ("leads.csv", "cars.csv", "members.csv"),
    prefix: str = "s",
    car_note: str | None = "y" * 12,
    mtime: float | None = None,
) -> dict[str, set[str]]:
    """One file each for the leads, cars (custom object car_c) and members routes.

    Leads are `{prefix}{i}@example.com`, cars `VIN{i:05d}` (with a `car_note` column
    unless it is None), members `m{i}@example.com`; a route given 0 rows gets no file.
    With `mtime`, the files are one second apart in that order (their claim order).
    Returns the keys that must land, per object (the keys of `landed`).
    """
    leads_name, cars_name, members_name = names
    if leads:
        drop_leads(data_dir, leads_name, leads, prefix=prefix, mtime=mtime)
    if cars:
        note = [] if car_note is None else [car_note]
        write_csv(
            data_dir / "inbox" / "cars" / cars_name,
            ["vin", "model", "note"][: 2 + len(note)],
            [[f"VIN{i:05d}", "Model T", *note] for i in range(cars)],
            mtime=None if mtime is None else mtime + 1,
        )
    if members:
        write_csv(
            data_dir / "inbox" / "members" / members_name,
            ["email", "firstName"],
            [[f"m{i}@example.com", "M"] for i in range(members)],
            mtime=None if mtime is None else mtime + 2,
        )
    return {
        "leads": {f"{prefix}{i}@example.com" for i in range(leads)},
        "cars": {f"VIN{i:05d}" for i in range(cars)},
        "members": {f"m{i}@example.com" for i in range(members)},
    }


def drop_tiny_files(inbox: Path, n: int, first: int = 0) -> None:
    """n one-row lead files, each renamed into the inbox whole (as a pipeline would)."""
    staging = inbox.parent.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        part = staging / f"t{i:05d}.csv"
        part.write_text(f"email,firstName\nt{i}@example.com,T\n", encoding="utf-8")
        part.rename(inbox / part.name)


# -- reading what came of them -------------------------------------------------------------


def result_path(data_dir: Path, folder: str, route: str, name: str) -> Path:
    return data_dir / folder / route / f"{name}.result.json"


def result(data_dir: Path, folder: str, route: str, name: str) -> dict[str, Any]:
    """The result.json of `name` in done/ or failed/ (`folder`)."""
    data: dict[str, Any] = json.loads(
        result_path(data_dir, folder, route, name).read_text(encoding="utf-8")
    )
    return data


def all_results(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*/*/*.result.json"))


def result_docs(data_dir: Path) -> list[dict[str, Any]]:
    """Every result.json under data_dir, parsed (in the order of all_results)."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in all_results(data_dir)]


def results_per_source(data_dir: Path) -> Counter[tuple[str, str]]:
    """How many results each (route, source file name) has: one each, or something is wrong."""
    return Counter((doc["route"], doc["file"]) for doc in result_docs(data_dir))


def landed(sim: Simulator) -> dict[str, set[str]]:
    """The keys that reached the simulator per object, for the routes of drop_workload."""
    return {
        "leads": {str(r["email"]) for r in sim.records("leads")},
        "cars": {str(r["vin"]) for r in sim.records("customobject", api_name="car_c")},
        "members": {str(r["email"]) for r in sim.records("programmembers", program_id=1001)},
    }


def integrity(db: Path) -> str:
    """`PRAGMA integrity_check` of a state.db ("ok" when sound)."""
    conn = sqlite3.connect(db)
    try:
        return "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()
