"""The daemon end to end through its CLI: `marketo-orchestrator run|status` in subprocesses
against the bundled simulator (in this process, on a loopback port).

Time is scaled through knobs (polling, backoff, settle, simulator job times);
every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.config import Route, Settings
from orchestrator.models import ObjectType
from orchestrator.simulator import Simulator
from tests.support.data import (
    LEAD_HEADER,
    all_results,
    drop_leads,
    lead_rows,
    result,
    result_path,
    write_csv,
)
from tests.support.http import RecordingProxy, contains_any, http_get, metric_samples
from tests.support.processes import COMMAND, CliProcess, CliRunner, clean_env, on_terminal
from tests.support.settings import (
    CARS,
    CLIENT_ID,
    CLIENT_SECRET,
    LEADS,
    MEMBERS,
    SIM_KNOBS,
    fast_settings,
    free_port,
    write_settings,
)
from tests.support.simulators import MakeSimulator, imports
from tests.support.waiting import wait_until

SECRET_ENV = {"MARKETO_CLIENT_SECRET": CLIENT_SECRET}
# The daemon logs JSON lines on stdout (CliProcess.events reads them back).
JSON_LOGS = {"format": "json", "level": "info"}


@pytest.fixture
async def cli(tmp_path: Path, make_simulator: MakeSimulator) -> AsyncIterator[CliRunner]:
    """Subprocess factory; depends on make_simulator so daemons die before simulators stop."""
    workdir = tmp_path / "cli"
    workdir.mkdir()
    runner = CliRunner(workdir)
    yield runner
    await runner.close()


@pytest.fixture
async def sim(make_simulator: MakeSimulator) -> Simulator:
    return await make_simulator(**SIM_KNOBS)


@pytest.fixture
async def proxy(sim: Simulator) -> AsyncIterator[RecordingProxy]:
    recorder = RecordingProxy(sim.base_url)
    await recorder.start()
    yield recorder
    await recorder.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def config_file(
    tmp_path: Path, data_dir: Path, base_url: str, routes: tuple[Route, ...], **sections: Any
) -> str:
    """orchestrator.toml in tmp_path: fast_settings, JSON logs, `sections` changed; its path."""
    settings = fast_settings(base_url, data_dir, routes)
    sections["logging"] = {**JSON_LOGS, **sections.get("logging", {})}
    return str(write_settings(tmp_path / "orchestrator.toml", settings, **sections))


async def start_daemon(cli: CliRunner, config: str) -> CliProcess:
    """The long-running daemon (no --once); the test sends SIGTERM."""
    return await cli.start("run", "--config", config, env=SECRET_ENV)


async def run_once(cli: CliRunner, config: str) -> CliProcess:
    proc = await cli.run("run", "--config", config, "--once", env=SECRET_ENV)
    assert "Traceback" not in proc.stderr()
    return proc


async def status_json(cli: CliRunner, config: str) -> dict[str, Any]:
    proc = await cli.run("status", "--config", config, "--json")
    assert proc.returncode == 0, proc.stderr()
    data: dict[str, Any] = json.loads(proc.stdout())
    return data


def append_rows(path: Path, rows: list[list[str]], *, header: list[str] | None = None) -> None:
    with path.open("a", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)
        fh.flush()


def parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- routes, endpoints, startup ------------------------------------------------------


async def test_three_object_types_reach_their_endpoints_with_their_parameters(
    sim: Simulator, proxy: RecordingProxy, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    leads = Route(
        dir="leads",
        object=ObjectType.LEADS,
        lookup_field="email",
        list_id=42,
        partition_name="Default",
    )
    config = config_file(tmp_path, data_dir, proxy.base_url, (leads, CARS, MEMBERS))
    drop_leads(data_dir, "people.csv", 70)
    write_csv(
        data_dir / "inbox" / "cars" / "fleet.tsv",
        ["vin", "model"],
        [[f"VIN{i:04d}", f"Model {i}"] for i in range(200)],
        delimiter="\t",
    )
    write_csv(
        data_dir / "inbox" / "members" / "webinar.csv",
        ["email", "firstName"],
        [[f"m{i}@example.com", "M"] for i in range(150)],
    )

    proc = await run_once(cli, config)
    assert proc.returncode == 0, proc.stderr()

    uploads = {
        "leads": proxy.requests("/bulk/v1/leads.json", "POST"),
        "cars": proxy.requests("/bulk/v1/customobjects/car_c/import.json", "POST"),
        "members": proxy.requests("/bulk/v1/program/1001/members/import.json", "POST"),
    }
    expected = {
        "leads": {
            "format": "csv",
            "lookupField": "email",
            "listId": "42",
            "partitionName": "Default",
        },
        "cars": {"format": "tsv"},
        "members": {"format": "CSV", "programMemberStatus": "Registered"},
    }
    for route, seen in uploads.items():
        assert len(seen) >= 2, f"{route}: a multi-chunk file"
        assert all(s.query == expected[route] for s in seen), (route, [s.query for s in seen])
    assert all(s.bearer and "access_token" not in s.query for s in proxy.seen if "/bulk/" in s.path)

    ops = {str(c["operation"]) for c in sim.calls()}
    assert {
        "importLeadUsingPOST",
        "importCustomObjectUsingPOST",
        "importProgramMemberUsingPOST",
        "getImportLeadStatusUsingGET",
        "getImportCustomObjectStatusUsingGET",
        "getImportProgramMemberStatusUsingGET",
    } <= ops
    member_status = [
        c for c in sim.calls() if c["operation"] == "getImportProgramMemberStatusUsingGET"
    ]
    assert all(str(c["path"]).startswith("/bulk/v1/program/members/import/") for c in member_status)
    lead_imports = [c for c in imports(sim) if c["operation"] == "importLeadUsingPOST"]
    assert all(
        c["query_keys"] == ["format", "listId", "lookupField", "partitionName"]
        for c in lead_imports
    )
    stats = sim.stats()
    assert "1003" not in stats["errors"], "every parameter was accepted"
    assert stats["violations"] == []

    assert len(sim.records("leads")) == 70
    assert len(sim.records("lists", list_id=42)) == 70
    assert len(sim.records("customobject", api_name="car_c")) == 200
    members = sim.records("programmembers", program_id=1001)
    assert len(members) == 150
    assert {m["programMemberStatus"] for m in members} == {"Registered"}
    for folder, route, name, rows in (
        ("done", "leads", "people.csv", 70),
        ("done", "cars", "fleet.tsv", 200),
        ("done", "members", "webinar.csv", 150),
    ):
        doc = result(data_dir, folder, route, name)
        assert (doc["status"], doc["rows"], doc["rows_processed"]) == ("complete", rows, rows)


async def test_files_present_before_startup_are_imported_row_failures_exit_0(
    sim: Simulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS, CARS))
    drop_leads(data_dir, "a.csv", 40, prefix="a", bad={3, 17})
    drop_leads(data_dir, "b.csv", 10, prefix="b")
    write_csv(data_dir / "inbox" / "cars" / "c.csv", ["vin"], [[f"V{i}"] for i in range(25)])

    proc = await run_once(cli, config)

    assert proc.returncode == 0, "row-level failures are reported, not fatal"
    a = result(data_dir, "done", "leads", "a.csv")
    assert (a["status"], a["rows_processed"], a["rows_failed"]) == ("complete", 38, 2)
    assert (data_dir / "done" / "leads" / "a.csv.failures.csv").is_file()
    assert result(data_dir, "done", "leads", "b.csv")["rows_processed"] == 10
    assert result(data_dir, "done", "cars", "c.csv")["rows_processed"] == 25
    assert len(all_results(data_dir)) == 3
    assert not [p for p in (data_dir / "inbox").rglob("*") if p.is_file()], "inbox drained"
    assert len(proc.events("file_finished")) == 3
    assert len(sim.records("leads")) == 48


async def test_file_written_slowly_in_place_is_imported_whole(
    sim: Simulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,), watch={"settle_seconds": 1.0})
    daemon = await start_daemon(cli, config)
    await daemon.wait_for_event("spool_started")
    target = data_dir / "inbox" / "leads" / "slow.csv"
    rows = lead_rows(90, prefix="slow")
    append_rows(target, rows[:10], header=LEAD_HEADER)
    for start in range(10, 90, 10):  # a writer appending every 0.3 s for 2.4 s
        await asyncio.sleep(0.3)  # pacing the writer, not waiting for the daemon
        append_rows(target, rows[start : start + 10])
    last_write = datetime.now(UTC)
    assert not daemon.events("file_claimed"), "claimed while still being written"

    done = result_path(data_dir, "done", "leads", "slow.csv")
    await wait_until(done.exists, "slow.csv's result", process=daemon)
    daemon.terminate()
    assert await daemon.wait(60) == 0

    doc = result(data_dir, "done", "leads", "slow.csv")
    assert (doc["rows"], doc["rows_processed"]) == (90, 90), "the whole file, not a part"
    assert parse_utc(doc["claimed_at"]) >= last_write
    assert len(daemon.events("file_claimed")) == 1
    assert {r["email"] for r in sim.records("leads")} == {row[0] for row in rows}


async def test_part_file_is_claimed_only_after_its_rename(
    sim: Simulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    inbox = data_dir / "inbox" / "leads"
    daemon = await start_daemon(cli, config)
    await daemon.wait_for_event("spool_started")
    part = inbox / "late.csv.part"
    append_rows(part, lead_rows(30, prefix="late"), header=LEAD_HEADER)
    # A probe dropped after the .part file: the scan that claims it lists late.csv.part too.
    drop_leads(data_dir, "probe.csv", 3, prefix="probe")
    await wait_until(
        result_path(data_dir, "done", "leads", "probe.csv").exists, "probe", process=daemon
    )
    assert part.is_file(), "a .part file is never claimed"
    assert [e["file"] for e in daemon.events("file_claimed")] == ["probe.csv"]
    assert [f["file"] for f in (await status_json(cli, config))["files"]] == ["probe.csv"]

    part.rename(inbox / "late.csv")
    late = result_path(data_dir, "done", "leads", "late.csv")
    await wait_until(late.exists, "late.csv's result", process=daemon)
    daemon.terminate()
    assert await daemon.wait(60) == 0
    assert result(data_dir, "done", "leads", "late.csv")["rows_processed"] == 30
    assert len(sim.records("leads")) == 33


async def test_symlink_to_a_file_outside_the_inbox_is_refused_never_uploaded(
    sim: Simulator, proxy: RecordingProxy, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    marker = f"marker-{uuid.uuid4().hex}@example.com"
    outside = write_csv(
        tmp_path / "outside" / "private.csv", LEAD_HEADER, [[marker, "Secret", "x"]]
    )
    before = outside.read_bytes()
    config = config_file(tmp_path, data_dir, proxy.base_url, (LEADS,))
    (data_dir / "inbox" / "leads").mkdir(parents=True)
    (data_dir / "inbox" / "leads" / "link.csv").symlink_to(outside)
    drop_leads(data_dir, "good.csv", 12)

    proc = await run_once(cli, config)

    assert proc.returncode == 1, "a refused entry is a failed file"
    doc = result(data_dir, "failed", "leads", "link.csv")
    assert doc["status"] == "failed"
    assert "symbolic link" in doc["error"]
    assert "refused" in doc["error"]
    assert (doc["chunks"], doc["rows"]) == ([], 0)
    assert result(data_dir, "done", "leads", "good.csv")["rows_processed"] == 12
    assert outside.read_bytes() == before, "the link's target is left alone"
    uploads = proxy.requests("/bulk/", "POST")
    assert len(uploads) == len(imports(sim)) >= 1
    assert not [s.path for s in proxy.seen if contains_any(s.body, [marker])]
    assert not [r for r in sim.records("leads") if marker in json.dumps(r)]
    assert sum(int(j["rows"]) for j in sim.jobs()) == 12


async def test_unrouted_directory_is_left_alone_with_one_warning(
    sim: Simulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    stray = write_csv(
        data_dir / "inbox" / "unknown" / "keep.csv", LEAD_HEADER, lead_rows(4, prefix="k")
    )
    content = stray.read_bytes()
    drop_leads(data_dir, "good.csv", 5)

    proc = await run_once(cli, config)

    assert proc.returncode == 0
    assert stray.read_bytes() == content
    assert sorted(p.name for p in stray.parent.iterdir()) == ["keep.csv"]
    assert [p.name for p in all_results(data_dir)] == ["good.csv.result.json"]
    warnings = proc.events("unrouted_directory")
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["path"] == str(data_dir / "inbox" / "unknown")
    assert not [r for r in sim.records("leads") if str(r["email"]).startswith("k")]


# -- shutdown and restart ---------------------------------------------------------


async def test_sigterm_mid_run_exits_0_and_a_restart_finishes_without_resubmitting(
    make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    sim = await make_simulator(**{**SIM_KNOBS, "job_overhead": 0.8})
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,), limits={"queued_jobs": 3})
    drop_leads(data_dir, "big.csv", 300)
    daemon = await start_daemon(cli, config)
    await daemon.wait_for_event("chunk_submitted", count=3)

    daemon.terminate()
    assert await daemon.wait(50) == 0
    # Within 10 s by the daemon's own clock (this machine may be slow to reap processes).
    (asked,) = daemon.events("shutdown_requested")
    (stopped,) = daemon.events("daemon_stopped")
    assert seconds_between(asked["timestamp"], stopped["timestamp"]) < 10

    between = (await status_json(cli, config))["files"]
    assert [(f["file"], f["status"]) for f in between] == [("big.csv", "split")]
    submitted = {c["index"]: c["batch_id"] for c in between[0]["chunks"] if c["batch_id"]}
    assert len(submitted) >= 3
    assert len(submitted) < len(between[0]["chunks"]), "work was left for the restart"
    assert not result_path(data_dir, "done", "leads", "big.csv").exists()

    second = await run_once(cli, config)

    assert second.returncode == 0, second.stderr()
    doc = result(data_dir, "done", "leads", "big.csv")
    assert (doc["status"], doc["rows"], doc["rows_processed"]) == ("complete", 300, 300)
    batches = {c["index"]: c["batch_id"] for c in doc["chunks"]}
    assert {i: batches[i] for i in submitted} == submitted, "submitted batches were polled"
    calls = imports(sim)
    assert len(calls) == len(doc["chunks"]), "each chunk submitted once across both runs"
    assert sorted(int(c["batch_id"]) for c in calls) == sorted(batches.values())
    assert sum(int(j["rows"]) for j in sim.jobs()) == 300, "no chunk's rows went twice"
    assert len(sim.records("leads")) == 300


async def test_sigterm_with_a_hung_submit_exits_0_and_the_unknown_outcome_is_resubmitted(
    make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    daemon = await described_then_slow(sim, cli, config, data_dir)
    drop_leads(data_dir, "stuck.csv", 20)
    await wait_until(lambda: chunk_statuses(cli, config), "a submit in flight", process=daemon)

    daemon.terminate()
    assert await daemon.wait(50) == 0
    assert [e["task"] for e in daemon.events("shutdown_cut_short")] == ["scheduler"]
    # By the daemon's own clock (this machine may be slow to start or reap processes):
    (asked,) = daemon.events("shutdown_requested")
    (cut,) = daemon.events("shutdown_cut_short")
    assert seconds_between(asked["timestamp"], cut["timestamp"]) < 10
    assert await chunk_statuses(cli, config) == ["submitting"], "outcome unknown, kept as such"

    sim.set_knobs(slow_fraction=0.0)
    second = await run_once(cli, config)

    assert second.returncode == 0, second.stderr()
    assert second.events("recovering")[0]["resubmit"] == 1
    assert result(data_dir, "done", "leads", "stuck.csv")["rows_processed"] == 20
    assert len(imports(sim)) == 2, "the first file's job, and the stuck file's once"
    assert len(sim.records("leads")) == 21


async def test_second_sigint_forces_exit(
    make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    daemon = await described_then_slow(sim, cli, config, data_dir)
    drop_leads(data_dir, "stuck.csv", 20)
    await wait_until(lambda: chunk_statuses(cli, config), "a submit in flight", process=daemon)

    daemon.process.send_signal(signal.SIGINT)
    await daemon.wait_for_event("shutdown_requested")
    daemon.process.send_signal(signal.SIGINT)
    assert await daemon.wait(50) == 130
    assert daemon.events("forced_exit")
    # At once, not after the drain: nothing was cut short, the daemon never stopped.
    assert not daemon.events("shutdown_cut_short")
    assert not daemon.events("daemon_stopped")


async def described_then_slow(
    sim: Simulator, cli: CliRunner, config: str, data_dir: Path
) -> CliProcess:
    """A long-running daemon that imported one file (so it holds the leads' description,
    good for an hour), with the simulator then answering every call after a minute:
    only cutting the next file's submit short ends a run."""
    daemon = await start_daemon(cli, config)
    drop_leads(data_dir, "first.csv", 1, prefix="first")
    first = result_path(data_dir, "done", "leads", "first.csv")
    await wait_until(first.exists, "the first file's result", process=daemon)
    sim.set_knobs(slow_fraction=1.0, slow_seconds=60.0)
    return daemon


def seconds_between(start: str, end: str) -> float:
    """Seconds between two ISO timestamps of the daemon's log lines."""
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


async def chunk_statuses(cli: CliRunner, config: str) -> list[str] | None:
    """Chunk statuses of the first file (status --json) once one is being submitted."""
    proc = await cli.run("status", "--config", config, "--json")
    if proc.returncode == 2:  # no state store yet: the daemon is still starting
        return None
    assert proc.returncode == 0, proc.stderr()
    files = json.loads(proc.stdout())["files"]
    statuses = [c["status"] for c in files[0]["chunks"]] if files else []
    return statuses if "submitting" in statuses else None


# -- status server and status command ---------------------------------------------


async def test_idle_daemon_stays_ready_after_its_token_expired(
    make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    """Issue 10, item 5: ready means the last identity call succeeded and the
    credentials were not refused. An idle daemon's token expires (here after 1 s;
    in production after an hour) and nothing needs another: /readyz stays 200, so
    Kubernetes keeps the pod in service."""
    sim = await make_simulator(**SIM_KNOBS, token_ttl=1.0)
    port = free_port()
    config = config_file(
        tmp_path, data_dir, sim.base_url, (LEADS,), http={"listen": f"127.0.0.1:{port}"}
    )
    daemon = await start_daemon(cli, config)
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            try:
                return (await http_get(session, url))[0] == 200
            except aiohttp.ClientConnectionError:
                return False  # the server is not listening yet

        await wait_until(ready, "/readyz 200", process=daemon)
        issued = len(sim.tokens())
        expired_at = time.monotonic() + 1.5  # the token's life, and some

        def token_expired() -> bool:
            return time.monotonic() > expired_at

        await wait_until(token_expired, "the idle daemon's token to expire", process=daemon)
        status, body = await http_get(session, url)
    assert status == 200, body
    assert json.loads(body) == {"ready": True}
    assert len(sim.tokens()) == issued, "nothing asked for a new token meanwhile"
    daemon.terminate()
    assert await daemon.wait(10) == 0


async def test_status_endpoints_and_status_command_while_running(
    sim: Simulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    port = free_port()
    config = config_file(
        tmp_path, data_dir, sim.base_url, (LEADS,), http={"listen": f"127.0.0.1:{port}"}
    )
    drop_leads(data_dir, "seen.csv", 60, bad={5})
    daemon = await start_daemon(cli, config)
    base = f"http://127.0.0.1:{port}"
    # The canonical log line comes after the file's metrics were counted (and after
    # its result.json, which a pipeline may see a moment before the metrics move).
    await daemon.wait_for_event("file_finished")
    chunks = len(result(data_dir, "done", "leads", "seen.csv")["chunks"])

    async with aiohttp.ClientSession() as session:
        assert await http_get(session, f"{base}/healthz") == (200, "ok")

        async def ready() -> bool:
            return (await http_get(session, f"{base}/readyz"))[0] == 200

        await wait_until(ready, "/readyz 200", process=daemon)
        status, text = await http_get(session, f"{base}/metrics")
        assert status == 200
        samples = metric_samples(text)
        status, jobs_text = await http_get(session, f"{base}/jobs")
        assert status == 200
        jobs = json.loads(jobs_text)
        from_cli = await status_json(cli, config)
        table = await cli.run("status", "--config", config)

    prefix = "marketo_orchestrator_"
    assert samples[(f"{prefix}files", (("status", "complete"),))] == 1
    assert samples[(f"{prefix}files", (("status", "failed"),))] == 0
    assert samples[(f"{prefix}chunks", (("status", "complete"),))] == chunks
    assert samples[(f"{prefix}jobs_outstanding", ())] == 0
    assert samples[(f"{prefix}api_calls_total", (("operation", "importLeadUsingPOST"),))] == chunks
    assert samples[(f"{prefix}rows_total", (("outcome", "processed"),))] == 59
    assert samples[(f"{prefix}rows_total", (("outcome", "failed"),))] == 1
    assert any(name == f"{prefix}build_info" for name, _ in samples)

    assert jobs == from_cli, "status --json is /jobs"
    [entry] = jobs["files"]
    assert (entry["file"], entry["route"], entry["status"]) == ("seen.csv", "leads", "complete")
    assert entry["chunks_done"] == entry["chunks_total"] == chunks
    assert len(entry["batch_ids"]) == chunks
    assert (entry["rows_processed"], entry["rows_failed"]) == (59, 1)
    assert jobs["totals"]["files"]["complete"] == 1
    assert table.returncode == 0
    lines = table.stdout().splitlines()
    assert lines[0].split()[:3] == ["ROUTE", "FILE", "STATE"]
    assert lines[1].split()[:4] == ["leads", "seen.csv", "complete", f"{chunks}/{chunks}"]

    daemon.terminate()
    assert await daemon.wait(60) == 0


# -- exit codes -----------------------------------------------------------------


async def test_run_once_exits_1_when_a_file_fails(
    sim: Simulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    (data_dir / "inbox" / "leads").mkdir(parents=True)
    (data_dir / "inbox" / "leads" / "empty.csv").write_bytes(b"")
    drop_leads(data_dir, "good.csv", 6)

    proc = await run_once(cli, config)

    assert proc.returncode == 1
    doc = result(data_dir, "failed", "leads", "empty.csv")
    assert doc["status"] == "failed"
    assert doc["error"].startswith("empty.csv: ")
    assert result(data_dir, "done", "leads", "good.csv")["status"] == "complete"


async def test_refused_credentials_fail_no_file_and_the_next_run_imports_it(
    make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    drop_leads(data_dir, "waiting.csv", 8)

    wrong = await cli.run(
        "run", "--config", config, "--once", env={"MARKETO_CLIENT_SECRET": "wrong-secret"}
    )
    assert wrong.returncode == 3, "3: Marketo refused the credentials (1 is a failed file)"
    assert "refused the client credentials" in wrong.stderr()
    assert "Traceback" not in wrong.stderr()
    # Nothing was claimed after the refusal: the file still waits in the inbox.
    assert (data_dir / "inbox" / "leads" / "waiting.csv").is_file()
    assert not any((data_dir / "work" / "incoming").iterdir())
    assert not (data_dir / "failed").exists() or not any((data_dir / "failed").rglob("*.json"))
    assert imports(sim) == []

    proc = await run_once(cli, config)
    assert proc.returncode == 0
    assert result(data_dir, "done", "leads", "waiting.csv")["rows_processed"] == 8


@pytest.mark.parametrize(
    ("toml", "args", "env", "expected"),
    [
        ("[limits]\nbogus_key = 1\n", (), SECRET_ENV, "error: limits.bogus_key: unknown key"),
        ('colour = "red"\n', (), SECRET_ENV, "error: colour: unknown key"),
        ('[polling]\ninterval = "fast"\n', (), SECRET_ENV, "error: polling.interval: "),
        ("", (), {}, "error: marketo.client_secret: is required"),
        ("", ("--bogus",), SECRET_ENV, "usage error: unrecognized arguments: --bogus"),
        (
            "[limits]\ndaily_api_calls = 50000\n",
            (),
            SECRET_ENV,
            "error: limits.daily_api_calls: is no longer a key: the daily quota belongs to "
            "the whole subscription; set limits.daily_quota",
        ),
        (
            "",
            (),
            {**SECRET_ENV, "ORCHESTRATOR_LIMITS_DAILY_API_CALLS": "50000"},
            "error: ORCHESTRATOR_LIMITS_DAILY_API_CALLS (sets limits.daily_api_calls): is no "
            "longer a key",
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-top-level-key",
        "wrong-type",
        "missing-secret",
        "unknown-flag",
        "old-daily-key",
        "old-daily-variable",
    ],
)
async def test_user_mistakes_exit_2_with_one_line_naming_the_key(
    cli: CliRunner,
    tmp_path: Path,
    toml: str,
    args: tuple[str, ...],
    env: dict[str, str],
    expected: str,
) -> None:
    marketo = '[marketo]\nbase_url = "http://127.0.0.1:9"\nclient_id = "x"\n'
    path = tmp_path / "bad.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n{toml}{marketo}', encoding="utf-8")

    proc = await cli.run("run", "--config", str(path), "--once", *args, env=env)

    assert proc.returncode == 2
    stderr = proc.stderr()
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("marketo-orchestrator: ")
    assert expected in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "data").exists(), "nothing started"


async def test_missing_config_file_exits_2(cli: CliRunner, tmp_path: Path) -> None:
    proc = await cli.run("run", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2
    assert proc.stderr().count("\n") == 1
    assert "--config: file not found" in proc.stderr()


@pytest.mark.parametrize("inside", [False, True], ids=["a-file", "under-a-file"])
async def test_data_dir_that_cannot_be_a_directory_exits_2(
    cli: CliRunner, tmp_path: Path, inside: bool
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n", encoding="utf-8")
    data_dir = blocker / "data" if inside else blocker
    config = config_file(tmp_path, data_dir, "http://127.0.0.1:9", (LEADS,))

    proc = await cli.run("run", "--config", config, "--once", env=SECRET_ENV)

    assert proc.returncode == 2
    stderr = proc.stderr()
    assert stderr.startswith("marketo-orchestrator: configuration error: data_dir: "), stderr
    assert stderr.count("\n") == 1
    assert "Traceback" not in stderr


async def test_status_port_taken_exits_1_with_one_line(
    cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = config_file(
            tmp_path, data_dir, "http://127.0.0.1:9", (LEADS,), http={"listen": listen}
        )
        proc = await cli.run("run", "--config", config, "--once", env=SECRET_ENV)

    assert proc.returncode == 1
    stderr = proc.stderr()
    assert stderr.count("\n") == 1
    assert f"http.listen {listen}" in stderr
    assert "Traceback" not in stderr


async def test_configuration_from_the_environment_alone(
    sim: Simulator, cli: CliRunner, tmp_path: Path
) -> None:
    """A sidecar's setup: the config path, data_dir, URL, id and secret file all from env."""
    unused = tmp_path / "elsewhere"
    config = config_file(tmp_path, unused, "http://127.0.0.1:9", (LEADS,))
    data_dir = tmp_path / "from-env"
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    drop_leads(data_dir, "env.csv", 8)
    env = {
        "ORCHESTRATOR_CONFIG": config,
        "ORCHESTRATOR_DATA_DIR": str(data_dir),
        "MARKETO_BASE_URL": sim.base_url,
        "MARKETO_CLIENT_ID": CLIENT_ID,
        "MARKETO_CLIENT_SECRET_FILE": str(secret_file),
    }

    proc = await cli.run("run", "--once", env=env)

    assert proc.returncode == 0, proc.stderr()
    assert result(data_dir, "done", "leads", "env.csv")["rows_processed"] == 8
    assert not unused.exists()
    assert len(sim.records("leads")) == 8


async def test_status_without_a_state_store_exits_2_naming_it_and_creates_nothing(
    cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    """A wrong data directory is not "(no files)" with exit 0."""
    config = config_file(tmp_path, data_dir, "http://127.0.0.1:9", (LEADS,))
    for flags in ((), ("--json",)):
        proc = await cli.run("status", "--config", config, *flags)
        assert proc.returncode == 2
        assert proc.stdout() == ""
        [line] = proc.stderr().splitlines()
        assert f"no state store at {data_dir / 'state.db'}" in line
    assert not await asyncio.to_thread(data_dir.exists)


# -- secrets -----------------------------------------------------------------------


async def test_no_secret_or_token_anywhere_we_write(
    make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    sim = await make_simulator(
        **{**SIM_KNOBS, "job_overhead": 0.3},
        client_id=CLIENT_ID,
        client_secret=secret,
        token_ttl=1.0,
    )
    port = free_port()
    config = config_file(
        tmp_path,
        data_dir,
        sim.base_url,
        (LEADS,),
        http={"listen": f"127.0.0.1:{port}"},
        logging={"format": "json", "level": "debug"},
    )
    drop_leads(data_dir, "leak.csv", 400, bad={4, 250}, warn={9})
    daemon = await cli.start("run", "--config", config, env={"MARKETO_CLIENT_SECRET": secret})
    done = result_path(data_dir, "done", "leads", "leak.csv")
    await wait_until(done.exists, "leak.csv's result", process=daemon, within=30)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        pages = [await http_get(session, f"{base}{p}") for p in ("/jobs", "/metrics", "/readyz")]
    from_cli = await cli.run("status", "--config", config, "--json")
    daemon.terminate()
    assert await daemon.wait(60) == 0

    tokens = sim.tokens()
    assert len(tokens) >= 2, "short-lived tokens were renewed during the run"
    assert len(daemon.events("access token obtained")) >= 2, "debug logging was on"
    doc = result(data_dir, "done", "leads", "leak.csv")
    assert doc["failures_file"] is not None
    assert doc["warnings_file"] is not None
    needles = [secret, *tokens]
    places: dict[str, bytes] = {
        "stdout": daemon.stdout_path.read_bytes(),
        "stderr": daemon.stderr_path.read_bytes(),
        "status --json": from_cli.stdout_path.read_bytes(),
    }
    places |= {
        path: text.encode()
        for path, (_, text) in zip(("/jobs", "/metrics", "/readyz"), pages, strict=True)
    }
    places |= files_under(data_dir)
    assert any(name.endswith("state.db") for name in places)
    leaks = {
        name: len(found) for name, data in places.items() if (found := contains_any(data, needles))
    }
    assert leaks == {}
    assert sim.stats()["violations"] == [], "no token or secret in a URL or form"


# -- simulate, terminal --------------------------------------------------------------


async def test_simulate_once_needs_no_credentials_and_says_so_loudly(
    cli: CliRunner, tmp_path: Path, data_dir: Path
) -> None:
    config = write_settings(
        tmp_path / "simulate.toml",
        Settings(data_dir=data_dir),  # no [marketo] credentials, no routes
        polling={"interval": 0.05, "max_interval": 0.2},
        watch={"settle_seconds": 0.0},
        http={"listen": ""},
        logging={"format": "json"},
    )
    drop_leads(data_dir, "sample.csv", 5)

    proc = await cli.run("run", "--config", str(config), "--simulate", "--once")

    assert proc.returncode == 0, proc.stderr()
    loud = [e for e in proc.events() if "SIMULATION MODE" in str(e.get("event"))]
    assert len(loud) == 1
    assert loud[0]["level"] == "warning"
    assert "nothing goes to a real Marketo" in loud[0]["event"]
    assert str(loud[0]["simulator"]).startswith("http://127.0.0.1:")
    doc = result(data_dir, "done", "leads", "sample.csv")
    assert (doc["status"], doc["rows_processed"]) == ("complete", 5)


async def test_run_once_on_a_terminal_shows_progress_and_the_summary_table(
    sim: Simulator, tmp_path: Path, data_dir: Path
) -> None:
    config = config_file(tmp_path, data_dir, sim.base_url, (LEADS,))
    drop_leads(data_dir, "tty.csv", 50)
    screen = await on_terminal(
        [*COMMAND, "run", "--config", config, "--once"],
        clean_env(**SECRET_ENV),
        stdout=tmp_path / "tty.stdout",
    )
    assert "\r\x1b[2Kfiles " in screen, "a live progress line"
    assert "files 1/1  chunks 1/1  rows 50" in screen, "drawn once more at the end"
    lines = screen.replace("\r", "\n").splitlines()
    assert any(line.split()[:3] == ["ROUTE", "FILE", "STATE"] for line in lines)
    assert any(line.split()[:3] == ["leads", "tty.csv", "complete"] for line in lines)
    assert "files: 1 complete" in screen
    assert "Traceback" not in screen


def files_under(directory: Path) -> dict[str, bytes]:
    """Every regular file below `directory` with its bytes (blocking)."""
    return {str(p): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
