"""603 is a configuration problem, not a bad file (issue 19, item 3): the API role lacks
Read-Write Lead / Custom Object, or an IP allow-list refuses the caller.

Handled like refused credentials: nothing fails, nothing new is sent, /readyz says
Marketo's message, `run --once` and `submit --wait` exit 3, and once the role is fixed
work goes on without a restart. `check --credentials` confirms the role may import each
route's object. The simulator's `permissions` knob is the API role's grants.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator import client
from orchestrator.config import Settings
from orchestrator.models import ChunkStatus
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.daemons import LockedDaemon
from tests.support.data import LEAD_HEADER, all_results, drop_leads, lead_rows, result, write_csv
from tests.support.http import http_get
from tests.support.processes import CliProcess, CliRunner
from tests.support.settings import (
    CARS,
    LEADS,
    MEMBERS,
    SIM_KNOBS,
    fast_settings,
    free_port,
    with_sections,
)
from tests.support.simulators import MakeSimulator, imports
from tests.support.waiting import wait_until

ALL = "leads,customobjects"


async def readiness(session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, Any]]:
    try:
        status, body = await http_get(session, f"http://127.0.0.1:{port}/readyz")
    except aiohttp.ClientConnectionError:
        return 0, {}  # not listening yet
    return status, json.loads(body)


async def refusals(settings: Settings) -> list[str]:
    """What the daemon recorded in its state store, as `submit --wait` reads it."""
    if not settings.layout.state_db.is_file():
        return []
    async with await Store.open(settings.layout.state_db, check=False) as store:
        return [r.what for r in await store.refusals()]


async def test_603_fails_nothing_sends_nothing_and_work_goes_on_once_the_role_is_fixed(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS, permissions="customobjects")
    port = free_port()
    settings = with_sections(
        fast_settings(sim.base_url, tmp_path / "data", (LEADS,)),
        http={"listen": f"127.0.0.1:{port}"},
    )
    drop_leads(settings.data_dir, "waits.csv", 120)
    daemon = LockedDaemon(settings, once=False)
    running = asyncio.create_task(daemon.run())
    async with aiohttp.ClientSession() as session:

        async def refused() -> dict[str, Any] | None:
            status, body = await readiness(session, port)
            return body if status == 503 and "603" in body.get("reason", "") else None

        body = await wait_until(refused, "/readyz 503 naming the 603")
        assert "Read-Write Lead" in body["reason"]
        assert "allow-list" in body["reason"]
        assert await wait_until(lambda: refusals(settings), "the refusal in the state store") == [
            "Read-Write Lead"
        ]
        # The header check asks first: Marketo refuses to describe leads to a role
        # without a lead grant, so no create is even tried.
        describes = [c for c in sim.calls() if c["operation"] == "describeUsingGET_6"]
        assert describes, "the header check asked"
        assert {c["code"] for c in describes} == {"603"}
        assert sim.jobs() == [], "nothing was made"
        async with await Store.open(settings.layout.state_db, check=False) as store:
            assert {c.status for c in await store.chunks()} <= {ChunkStatus.PENDING}
            assert all(f.error is None for f in await store.files())
        assert all_results(settings.data_dir) == [], "nothing failed"

        sim.set_knobs(permissions=ALL)  # the administrator grants Read-Write Lead

        def done() -> bool:
            return (settings.data_dir / "done" / "leads" / "waits.csv.result.json").is_file()

        await wait_until(done, "the file to complete without a restart")
        assert result(settings.data_dir, "done", "leads", "waits.csv")["rows_processed"] == 120

        async def ready() -> bool:
            return (await readiness(session, port))[0] == 200

        await wait_until(ready, "/readyz 200 again")
        assert await refusals(settings) == []
    daemon.stop.set()
    assert await asyncio.wait_for(running, 30) == 0


async def test_603_while_polling_keeps_the_job_and_run_once_exits_3(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    """The job was made and imports; a 603 on its status call must not fail it: `run
    --once` stops with exit 3, the batch still outstanding, and the next run polls it to
    its end without creating it again."""
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 1.0})
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    drop_leads(settings.data_dir, "made.csv", 20)
    first = asyncio.create_task(LockedDaemon(settings, once=True).run())
    await wait_until(lambda: sim.jobs(), "the job to be made")
    sim.set_knobs(permissions="")  # the role is taken away while the job imports

    assert await asyncio.wait_for(first, 60) == 3
    assert all_results(settings.data_dir) == []
    async with await Store.open(settings.layout.state_db, check=False) as store:
        [chunk] = await store.chunks()
        assert chunk.status is ChunkStatus.SUBMITTED
    assert {c["code"] for c in sim.calls() if c["operation"] == "getImportLeadStatusUsingGET"} >= {
        "603"
    }
    assert await refusals(settings) == ["Read-Write Lead"]

    sim.set_knobs(permissions=ALL)
    assert await asyncio.wait_for(LockedDaemon(settings, once=True).run(), 60) == 0
    assert result(settings.data_dir, "done", "leads", "made.csv")["rows_processed"] == 20
    assert len(imports(sim)) == 1, "polled to its end, never created again"
    assert await refusals(settings) == []


async def test_run_once_with_603_on_every_create_exits_3_and_fails_nothing(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS, permissions="")
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    drop_leads(settings.data_dir, "a.csv", 10)

    assert await asyncio.wait_for(LockedDaemon(settings, once=True).run(), 60) == 3
    assert all_results(settings.data_dir) == []
    assert sim.jobs() == []
    assert any((settings.data_dir / "work" / "incoming").iterdir()), "it waits in work/"


async def running_daemon(runner: CliRunner) -> CliProcess:
    daemon = await runner.daemon()
    await daemon.wait_for_event("spool_started")
    return daemon


async def test_submit_wait_and_the_python_api_learn_of_603_from_a_running_daemon(
    make_simulator: MakeSimulator, daemons: Any, tmp_path: Path
) -> None:
    """Before, `submit --wait` could not learn that a running daemon was refused and
    exited 4 at its timeout; the daemon now records the refusal in the state store."""
    sim = await make_simulator(**SIM_KNOBS, permissions="customobjects")
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    runner = daemons(settings)
    daemon = await running_daemon(runner)
    export = write_csv(tmp_path / "exports" / "x.csv", LEAD_HEADER, lead_rows(5))

    proc = await runner.command(
        "submit", str(export), "--route", "leads", "--wait", "--timeout", "60", "--poll", "0.05"
    )
    assert proc.returncode == 3, proc.stderr()
    err = proc.stderr()
    assert "Traceback" not in err
    assert "603" in err
    assert "Read-Write Lead" in err
    assert "x.csv" in err, "it says where the file waits"

    handle = await asyncio.to_thread(client.submit, export, "leads", data_dir=settings.data_dir)
    with pytest.raises(client.Refused) as caught:
        await handle.result(60, poll=0.05)
    assert caught.value.refusal.what == "Read-Write Lead"
    assert handle.id in str(caught.value)

    sim.set_knobs(permissions=ALL)  # fixed: a file handed over now is not told of the past
    again = await asyncio.to_thread(client.submit, export, "leads", data_dir=settings.data_dir)
    assert (await again.result(60, poll=0.05)).status == "complete"
    daemon.terminate()
    assert await daemon.wait() == 0


async def test_check_credentials_confirms_each_routes_import_permission(
    make_simulator: MakeSimulator, daemons: Any, tmp_path: Path
) -> None:
    sim: Simulator = await make_simulator(**SIM_KNOBS, permissions="leads,customobjects:read")
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS, CARS, MEMBERS))
    runner = daemons(settings)

    missing = await runner.command("check", "--credentials")
    assert missing.returncode == 3, missing.stderr()
    assert missing.stdout().splitlines()[-1].startswith("credentials: ok")
    [line] = missing.stderr().splitlines()
    assert "route cars (customobject)" in line
    assert "Read-Write Custom Object" in line
    creates = [c for c in sim.calls() if str(c["operation"]).startswith("import")]
    assert creates == [], "the check creates nothing"
    assert sim.jobs() == []

    sim.set_knobs(permissions=ALL)
    ok = await runner.command("check", "--credentials")
    assert ok.returncode == 0, ok.stderr()
    permissions = ok.stdout().splitlines()[-1]
    assert permissions.startswith("permissions: ok")
    for granted in ("leads: Read-Write Lead", "cars: Read-Write Custom Object", "members"):
        assert granted in permissions
    assert sim.jobs() == []
