"""Issue 19 item 4 end to end: a file's header is checked against the route's object as
the simulator describes it before the file's first job (the daemon in-process through
its --once mode), and on demand with `check --file` (the CLI in a subprocess)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from orchestrator.config import Settings
from orchestrator.simulator import Simulator
from tests.support.daemons import LockedDaemon
from tests.support.data import drop_leads, result, write_csv
from tests.support.processes import CliProcess, MakeRunner
from tests.support.settings import (
    CARS,
    CLIENT_ID,
    CLIENT_SECRET,
    LEADS,
    MEMBERS,
    SIM_KNOBS,
    fast_settings,
)
from tests.support.simulators import MakeSimulator, imports
from tests.support.waiting import wait_until

ADOBE_HEADER = ["color", "make", "model", "vin"]
ADOBE_CARS = [
    ["red", "bmw", "2002", "WBA4R7C55HK895912"],
    ["yellow", "bmw", "320i", "WBA4R7C30HK896061"],
    ["blue", "bmw", "325i", "WBS3U9C52HP970604"],
]


async def run_once(settings: Settings) -> int:
    async with asyncio.timeout(60):
        return await LockedDaemon(settings, once=True).run()


def creates(sim: Simulator) -> list[str]:
    """The create calls the simulator saw, answered or not, by operation id."""
    return [str(c["operation"]) for c in sim.calls() if str(c["operation"]).startswith("import")]


def describes(sim: Simulator) -> list[str]:
    return [str(c["operation"]) for c in sim.calls() if "describe" in str(c["operation"])]


# -- the daemon --------------------------------------------------------------------------


async def test_a_missing_key_column_fails_the_file_without_a_create_call(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS, MEMBERS))
    inbox = tmp_path / "inbox"
    write_csv(inbox / "cars" / "no-vin.csv", ADOBE_HEADER[:3], [r[:3] for r in ADOBE_CARS])
    write_csv(inbox / "members" / "no-email.csv", ["firstName", "lastName"], [["Jo", "Ng"]])
    big = [[f"Person{i}", "x" * 40] for i in range(200)]  # several chunks, none recorded
    write_csv(inbox / "leads" / "no-email.csv", ["firstName", "lastName"], big)

    assert await run_once(settings) == 1

    expected = {
        ("cars", "no-vin.csv"): "the header lacks the key column 'vin' of custom object car_c",
        ("members", "no-email.csv"): "the header lacks the key column 'email' of program members",
        ("leads", "no-email.csv"): "the header lacks the key column 'email' of leads",
    }
    for (route, name), error in expected.items():
        doc = result(tmp_path, "failed", route, name)
        assert (doc["status"], doc["error"], doc["chunks"]) == ("failed", error, [])
        assert (tmp_path / "failed" / route / name).is_file(), "the source is kept"
    assert creates(sim) == [], "no job was spent on them"
    assert sim.jobs() == []


async def test_an_unknown_column_is_a_warning_in_the_result_and_the_log(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS))
    inbox = tmp_path / "inbox"
    write_csv(
        inbox / "leads" / "typo.csv",
        ["email", "firstName", "lastNmae"],
        [["ada@example.com", "Ada", "Lovelace"]],
    )
    write_csv(inbox / "cars" / "adobe.csv", ADOBE_HEADER, ADOBE_CARS)
    drop_leads(tmp_path, "clean.csv", 3, route="leads")  # LEAD_HEADER: every field known

    with capture_logs() as logs:
        assert await run_once(settings) == 0

    typo = result(tmp_path, "done", "leads", "typo.csv")
    assert typo["status"] == "complete"
    assert typo["warnings"] == ["column 'lastNmae' matches no field of leads"]
    assert result(tmp_path, "done", "cars", "adobe.csv")["warnings"] == []
    assert result(tmp_path, "done", "leads", "clean.csv")["warnings"] == []
    (warned,) = [e for e in logs if e["event"] == "header_columns_unknown"]
    assert warned["warnings"] == typo["warnings"]
    # Marketo drops the column it does not know; the simulator does too.
    ada = next(r for r in sim.records("leads") if r["email"] == "ada@example.com")
    assert "lastNmae" not in ada
    # Adobe's three cars with their three VINs: three records.
    assert len(sim.records("customobject", api_name="car_c")) == 3


async def test_unknown_columns_fail_the_file_when_the_route_says_so(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    strict = replace(LEADS, unknown_columns="fail")
    settings = fast_settings(sim.base_url, tmp_path, (strict,))
    write_csv(
        tmp_path / "inbox" / "leads" / "typo.csv",
        ["email", "emial", "firstName"],
        [["ada@example.com", "x", "Ada"]],
    )
    drop_leads(tmp_path, "clean.csv", 3)

    assert await run_once(settings) == 1

    doc = result(tmp_path, "failed", "leads", "typo.csv")
    assert doc["error"] == "column 'emial' matches no field of leads (unknown_columns = \"fail\")"
    assert (doc["chunks"], doc["warnings"]) == ([], [])
    assert result(tmp_path, "done", "leads", "clean.csv")["rows_processed"] == 3
    assert [c["rows"] for c in sim.jobs()] == [3], "only the clean file's job"


async def test_many_files_of_a_route_cost_one_describe_call(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, replace(LEADS, dir="more")))
    for n in range(6):
        drop_leads(tmp_path, f"f{n}.csv", 2, prefix=f"f{n}-", route="leads" if n % 2 else "more")

    assert await run_once(settings) == 0

    assert describes(sim) == ["describeUsingGET_6"], "cached for an hour, per object"
    assert len(sim.records("leads")) == 12


async def test_a_describe_marketo_cannot_answer_makes_the_file_wait_not_fail(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    """608 on every call: the client's own retries give up, the file waits with backoff
    (the log says why), and once Marketo answers again it is imported."""
    sim = await make_simulator(**SIM_KNOBS, fault_608=1.0)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    drop_leads(tmp_path, "a.csv", 3)

    with capture_logs() as logs:
        daemon = asyncio.ensure_future(run_once(settings))
        await wait_until(
            lambda: any(e["event"] == "header_check_waits" for e in logs), "a wait for describe"
        )
        sim.set_knobs(fault_608=0.0)
        assert await asyncio.wait_for(daemon, 60) == 0

    wait = next(e for e in logs if e["event"] == "header_check_waits")
    assert "608" in wait["error"]
    doc = result(tmp_path, "done", "leads", "a.csv")
    assert (doc["status"], doc["rows_processed"]) == ("complete", 3)
    assert len(imports(sim)) == 1


# -- check --file ------------------------------------------------------------------------


async def check(runner: Any, *args: str) -> CliProcess:
    proc: CliProcess = await runner.command("check", *args)
    assert "Traceback" not in proc.stderr()
    return proc


async def test_check_file_exits_0_when_the_file_can_be_imported(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    runner = daemons(fast_settings(sim.base_url, tmp_path / "data", (LEADS, CARS)))
    cars = write_csv(tmp_path / "exports" / "cars.csv", ADOBE_HEADER, ADOBE_CARS)
    leads = write_csv(
        tmp_path / "exports" / "leads.csv", ["email", "firstName", "shoeSize"], [["a@x", "A", "9"]]
    )

    ok = await check(runner, "--file", str(cars), "--route", "cars")
    assert ok.returncode == 0, ok.stderr()
    assert ok.stdout().splitlines()[-1] == (
        "header: ok (cars.csv: 4 columns of custom object car_c; keys 'vin')"
    )
    warned = await check(runner, "--file", str(leads), "--route", "leads")
    assert warned.returncode == 0, "unknown columns only warn on this route"
    assert warned.stderr() == (
        "marketo-orchestrator: warning: column 'shoeSize' matches no field of leads\n"
    )
    assert creates(sim) == [], "a check creates no job"
    assert describes(sim) == ["describeUsingGET_1", "describeUsingGET_6"]


async def test_check_file_exits_1_naming_each_problem(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    strict = replace(CARS, dir="strict-cars", unknown_columns="fail")
    runner = daemons(fast_settings(sim.base_url, tmp_path / "data", (CARS, strict)))
    no_vin = write_csv(tmp_path / "exports" / "no-vin.csv", ["color", "mkae"], [["red", "x"]])
    # Adobe's failing example, " vin": trimmed as the daemon sends it, so vin is there.
    padded = write_csv(
        tmp_path / "exports" / "padded.csv", ["colour", "make", " vin"], [["red", "bmw", "W"]]
    )

    missing = await check(runner, "--file", str(no_vin), "--route", "cars")
    assert missing.returncode == 1
    assert missing.stderr().splitlines() == [
        "marketo-orchestrator: header: key column 'vin' of custom object car_c is missing",
        "marketo-orchestrator: header: column 'mkae' matches no field of custom object car_c",
    ]
    warned = await check(runner, "--file", str(padded), "--route", "cars")
    assert warned.returncode == 0, warned.stderr()
    failed = await check(runner, "--file", str(padded), "--route", "strict-cars")
    assert failed.returncode == 1
    assert failed.stderr().splitlines() == [
        "marketo-orchestrator: header: column 'colour' matches no field of custom object car_c"
    ]
    assert creates(sim) == []


async def test_check_needs_client_id_and_base_url_and_a_known_route(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    export = write_csv(tmp_path / "exports" / "a.csv", ["email"], [["a@x"]])

    no_id = daemons(replace(settings, marketo=replace(settings.marketo, client_id="")))
    refused = await check(no_id)
    assert refused.returncode == 2
    assert "marketo.client_id: is required" in refused.stderr()
    assert "configuration: ok" not in refused.stdout()

    no_url = daemons(replace(settings, marketo=replace(settings.marketo, base_url="")))
    refused = await check(no_url)
    assert refused.returncode == 2
    assert "marketo.base_url: is required" in refused.stderr()

    runner = daemons(settings)
    unknown = await check(runner, "--file", str(export), "--route", "nope")
    assert unknown.returncode == 2
    assert "no route 'nope'" in unknown.stderr()
    alone = await check(runner, "--file", str(export))
    assert alone.returncode == 2
    assert "--file and --route go together" in alone.stderr()
