"""Storage faults: the data directory turns read-only, the disk fills, state.db is
corrupted or deleted while the daemon is stopped.

We run as root, and chmod does not stop root, so the faults are real filesystems: a
bind mount swapped for a read-only one (`Volume.read_only`), and a small tmpfs filled
with a ballast file. The contract (the issue, SPEC section 5): a clear error naming
the path and a non-zero exit, never a silent loss; once the fault is gone, a restart
lands every row. On a corrupt store the daemon refuses to start and says how to recover.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from orchestrator.simulator import Simulator
from tests.support.data import drop_leads, result_docs
from tests.support.processes import CliRunner, MakeRunner
from tests.support.reliability import MakeVolume, Record
from tests.support.settings import LEADS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator, imports
from tests.support.waiting import wait_until

PROG = "marketo-orchestrator"


@pytest.fixture
async def sim(make_simulator: MakeSimulator) -> Simulator:
    return await make_simulator(**SIM_KNOBS)


def runner_for(daemons: MakeRunner, sim: Simulator, data: Path, **limits: int) -> CliRunner:
    return daemons(fast_settings(sim.base_url, data, (LEADS,), **limits))


def emails(sim: Simulator) -> set[str]:
    return {str(r["email"]) for r in sim.records("leads")}


def wanted(prefix: str, n: int) -> set[str]:
    return {f"{prefix}{i}@example.com" for i in range(n)}


def one_error_line(stderr: str) -> str:
    """The one line a user sees: no traceback, a single `marketo-orchestrator: ...` line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PROG}: "), lines[0]
    return lines[0]


def submitted_once(sim: Simulator) -> bool:
    return bool(imports(sim))


def results(data: Path) -> dict[str, dict[str, object]]:
    """Result documents by source file name."""
    return {str(doc["file"]): doc for doc in result_docs(data)}


# -- state.db while stopped -------------------------------------------------------------


async def test_corrupt_state_db_refuses_to_start_and_says_how_to_recover(
    sim: Simulator, daemons: MakeRunner, tmp_path: Path, figures: Record
) -> None:
    data = tmp_path / "data"
    runner = runner_for(daemons, sim, data)
    drop_leads(data, "first.csv", 30, prefix="a")
    assert (await runner.once()).returncode == 0
    db = data / "state.db"
    damaged = bytearray(db.read_bytes())
    damaged[100:4096] = random.Random(7).randbytes(4096 - 100)  # page 1 past the header
    db.write_bytes(bytes(damaged))
    source = drop_leads(data, "second.csv", 20, prefix="b")

    refused = await runner.once()
    assert refused.returncode == 1
    line = one_error_line(refused.stderr())
    assert str(db) in line
    assert "corrupt" in line
    assert "move it aside" in line, "the message says how to recover"
    assert db.read_bytes() == bytes(damaged), "a corrupt store is never 'repaired' silently"
    assert source.is_file(), "nothing was claimed"

    for part in data.glob("state.db*"):  # the advice, followed
        part.rename(tmp_path / part.name)
    assert (await runner.once()).returncode == 0
    assert wanted("b", 20) <= emails(sim)
    figures(exit_code=refused.returncode, message=line.replace(str(tmp_path), "$TMP"))


async def test_deleted_state_db_with_work_in_flight_is_refused(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.3})
    data = tmp_path / "data"
    runner = runner_for(daemons, sim, data, max_chunk_bytes=700)
    drop_leads(data, "big.csv", 300)
    life = await runner.daemon()
    await wait_until(lambda: submitted_once(sim), "a first submit")
    life.kill()
    await life.wait(60)
    claimed = list((data / "work" / "incoming").iterdir())
    assert claimed, "the file was claimed before the kill"
    for part in data.glob("state.db*"):
        part.unlink()

    after = await runner.once()
    stderr = after.stderr()
    assert after.returncode != 0, "work/ holds files the store does not know: never exit 0"
    assert str(data / "state.db") in stderr
    assert all(path.exists() for path in claimed), "the claimed file is kept"


# -- the data directory turns read-only ----------------------------------------------------


async def test_read_only_data_dir_at_start_is_one_clear_error(
    sim: Simulator, daemons: MakeRunner, volume: MakeVolume, figures: Record
) -> None:
    vol = volume()
    runner = runner_for(daemons, sim, vol.path)
    drop_leads(vol.path, "first.csv", 10, prefix="a")
    assert (await runner.once()).returncode == 0
    source = drop_leads(vol.path, "second.csv", 25, prefix="b")
    vol.read_only()

    refused = await runner.once()
    assert refused.returncode == 1
    line = one_error_line(refused.stderr())
    assert str(vol.path) in line
    assert source.is_file()
    vol.writable()
    assert (await runner.once()).returncode == 0
    assert wanted("b", 25) <= emails(sim)
    figures(exit_code=refused.returncode, message=line.replace(str(vol.path), "$DATA"))


async def test_read_only_mid_run_stops_and_loses_nothing(
    make_simulator: MakeSimulator, daemons: MakeRunner, volume: MakeVolume, figures: Record
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.2})
    vol = volume()
    runner = runner_for(daemons, sim, vol.path, max_chunk_bytes=700)
    drop_leads(vol.path, "a.csv", 300, prefix="a")
    drop_leads(vol.path, "b.csv", 100, prefix="b")
    life = await runner.daemon()
    await wait_until(lambda: submitted_once(sim), "a first submit")
    vol.read_only()
    code = await life.wait(20)
    assert code not in (0, None), "a daemon that cannot write must not carry on or exit 0"

    vol.writable()
    drain = await runner.once()
    assert drain.returncode == 0, drain.stderr()[-2000:]
    assert wanted("a", 300) | wanted("b", 100) <= emails(sim)
    assert sorted(results(vol.path)) == ["a.csv", "b.csv"]
    stderr = life.stderr()
    figures(
        exit_code=code, traceback="Traceback" in stderr, stderr_says=error_line(stderr, vol.path)
    )


def error_line(stderr: str, data: Path) -> str:
    """The last line of stderr that states an error (inside a traceback, if there is one)."""
    lines = [
        line.strip(" |")
        for line in stderr.splitlines()
        if "Error:" in line or line.startswith(f"{PROG}: ")
    ]
    return lines[-1].replace(str(data), "$DATA") if lines else ""


# -- the disk fills ----------------------------------------------------------------------


async def fill_while_running(
    sim: Simulator, daemons: MakeRunner, volume: MakeVolume
) -> tuple[CliRunner, int, str, Path, Path]:
    """A 6 MB tmpfs with 250 kB left when the daemon starts on a 600 kB file.

    Once the ballast goes, the restart needs room for the source, its chunks and
    SQLite's write-ahead log, which grows to about 4 MB (1,000 pages) before its
    first automatic checkpoint."""
    vol = volume(size="6m")
    runner = runner_for(daemons, sim, vol.path, max_chunk_bytes=20_000)
    drop_leads(vol.path, "big.csv", 15_000, prefix="x")
    ballast = vol.fill(leave_bytes=250_000)
    life = await runner.daemon()
    code = await life.wait(30)
    return runner, code, life.stderr(), vol.path, ballast


async def test_disk_full_stops_and_a_restart_loses_nothing(
    sim: Simulator, daemons: MakeRunner, volume: MakeVolume, figures: Record
) -> None:
    runner, code, stderr, data, ballast = await fill_while_running(sim, daemons, volume)
    assert code not in (0, None), "a daemon that cannot write must stop, not carry on"
    assert "big.csv" not in results(data), "no result was written for a half-done file"

    ballast.unlink()  # the operator frees space
    drain = await runner.once()
    assert drain.returncode == 0, drain.stderr()[-2000:]
    assert wanted("x", 15_000) <= emails(sim)
    doc = results(data)["big.csv"]
    assert doc["status"] == "complete"
    assert doc["rows"] == doc["rows_processed"] == 15_000
    figures(exit_code=code, traceback="Traceback" in stderr, stderr_says=error_line(stderr, data))


async def test_disk_full_is_reported_in_one_line_naming_the_path(
    sim: Simulator, daemons: MakeRunner, volume: MakeVolume
) -> None:
    _, code, stderr, data, _ = await fill_while_running(sim, daemons, volume)
    assert code == 1
    line = one_error_line(stderr)
    assert str(data) in line
    assert "full" in line or "No space" in line


def test_volume_helper_really_is_read_only(volume: MakeVolume) -> None:
    vol = volume(size="1m")
    (vol.path / "before").write_text("x")
    vol.read_only()
    with pytest.raises(OSError, match=r"Read-only|Permission denied"):
        (vol.path / "after").write_text("x")
    vol.writable()
    (vol.path / "after").write_text("x")
    vol.fill(leave_bytes=0)
    with pytest.raises(OSError, match="No space"):
        (vol.path / "more").write_bytes(b"y" * 65536)
