"""kill -9 of a real daemon process at the worst moments, then a restart: nothing lost,
nothing finished resubmitted, every result written exactly once.

The crash points (orchestrator/faults.py) sit between an external effect and the
state change that records it; the process SIGKILLs itself there, which is the
same as an operator's kill -9 at that instant.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import MakeSimulator
from tests.engine_support import (
    CARS,
    CLIENT_SECRET,
    LEADS,
    SIM_KNOBS,
    all_results,
    drop_leads,
    fast_settings,
    result,
    settings_toml,
    write_csv,
)


async def run_daemon(config: Path, crash_at: str | None = None) -> int:
    env = {**os.environ, "MARKETO_CLIENT_SECRET": CLIENT_SECRET}
    env.pop("ORCHESTRATOR_CRASH_AT", None)
    if crash_at:
        env["ORCHESTRATOR_CRASH_AT"] = crash_at
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "run", "--once", "--config", str(config),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            _, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert b"Traceback" not in stderr, stderr.decode()
    assert proc.returncode is not None
    return proc.returncode


@pytest.mark.parametrize(
    ("crash_at", "extra_submits"),
    [
        ("chunk_added:1", 0),  # split interrupted: split again, the known chunk reused
        ("before_submit:3", 0),  # submit recorded as under way, request never sent
        ("after_submit:3", 1),  # Marketo created the batch, we never stored its id
        ("polled:4", 0),  # a status answer received but not recorded
        ("results_written:1", 0),  # failures written, source not yet moved, no result.json
        ("file_finished:1", 0),  # file finished in the store, its chunks not yet removed
    ],
)
async def test_kill_9_then_restart_loses_nothing(
    make_simulator: MakeSimulator, tmp_path: Path, crash_at: str, extra_submits: int
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.15})
    data = tmp_path / "data"
    settings = fast_settings(sim.base_url, data, (LEADS, CARS), max_chunk_bytes=700)
    config = tmp_path / "orchestrator.toml"
    config.write_text(settings_toml(settings))
    drop_leads(data, "a.csv", 200, bad={5, 150})
    write_csv(
        data / "inbox" / "cars" / "b.csv", ["vin", "colour"], [[f"V{i}", "red"] for i in range(120)]
    )

    assert await run_daemon(config, crash_at) == -signal.SIGKILL
    assert await run_daemon(config) == 0

    docs = [result(data, "done", "leads", "a.csv"), result(data, "done", "cars", "b.csv")]
    assert len(all_results(data)) == 2, "each result exactly once"
    assert all(d["status"] == "complete" for d in docs)
    emails = {r["email"] for r in sim.records("leads")}
    assert emails == {f"p{i}@example.com" for i in range(200) if i not in {5, 150}}
    assert len(sim.records("customobject", api_name="car_c")) == 120
    assert docs[0]["rows_failed"] == 2
    failures = (data / "done" / "leads" / "a.csv.failures.csv").read_text().splitlines()
    assert len(failures) == 3, "failed rows reported once each"

    chunks = sum(len(d["chunks"]) for d in docs)
    submits = [c for c in sim.calls() if str(c["operation"]).startswith("import") and c["batch_id"]]
    assert len(submits) == chunks + extra_submits
    async with await Store.open(data / "state.db") as store:
        assert await store.integrity_check() == "ok"
    assert not list((data / "work" / "incoming").iterdir()), "nothing left behind in work/"
    assert not list((data / "work" / "chunks").iterdir()), "no chunks left behind"
