"""A daemon that lives for months: one owner per data directory, health before
recovery, a rotated client secret, and one log format for every line.

Real processes (`marketo-orchestrator run` in subprocesses) against the simulator on
loopback; kill -9 is a real SIGKILL; recovery is held open through the hold point in
orchestrator.crashpoints (a named pipe the test writes to when it has seen enough).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import structlog

from orchestrator import dirlock, logs
from orchestrator.cli import lock_data_dir
from orchestrator.config import Secret, Settings, with_marketo
from orchestrator.daemon import Daemon
from orchestrator.errors import DataDirInUse
from orchestrator.simulator import Simulator
from tests.support.data import drop_leads, result_path
from tests.support.faults import release
from tests.support.http import http_get
from tests.support.processes import CliProcess, MakeRunner
from tests.support.settings import (
    CLIENT_ID,
    LEADS,
    SIM_KNOBS,
    fast_settings,
    free_port,
    with_sections,
)
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until


@pytest.fixture
async def sim(make_simulator: MakeSimulator) -> Simulator:
    return await make_simulator(**SIM_KNOBS)


def listening(settings: Settings) -> tuple[Settings, str]:
    """The settings with the status server on a free loopback port, and its base URL."""
    port = free_port()
    return with_sections(settings, http={"listen": f"127.0.0.1:{port}"}), f"http://127.0.0.1:{port}"


async def answer(url: str) -> tuple[int, str] | None:
    """(status, body) of a GET, or None while nothing listens."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            return await http_get(http, url)
    except aiohttp.ClientError:
        return None


async def ready(base: str, process: CliProcess) -> None:
    async def check() -> bool:
        got = await answer(base + "/readyz")
        return got is not None and got[0] == 200

    await wait_until(check, "/readyz 200", process=process)


# -- one owner per data directory ----------------------------------------------------------


async def test_a_second_daemon_on_the_same_data_dir_exits_2_naming_the_holder(
    sim: Simulator, tmp_path: Path, daemons: MakeRunner
) -> None:
    data_dir = tmp_path / "data"
    first_settings, first_url = listening(fast_settings(sim.base_url, data_dir, (LEADS,)))
    first = await daemons(first_settings).daemon()
    await ready(first_url, first)

    # Another port, so only the data directory is shared; a file is waiting in the inbox.
    second_settings, second_url = listening(fast_settings(sim.base_url, data_dir, (LEADS,)))
    runner = daemons(second_settings)
    second = await runner.daemon()
    assert await second.wait() == 2
    [line] = second.stderr().strip().splitlines()
    assert str(data_dir) in line
    assert f"pid {first.pid}" in line
    assert "Traceback" not in second.stderr()
    assert second.events("recovering") == []
    assert second.events("status_server") == []  # it stopped before anything else
    assert await answer(second_url + "/healthz") is None

    # Reading beside the running daemon is fine, and so are check and a hand-over.
    status = await runner.command("status", "--json")
    assert status.returncode == 0, status.stderr()
    check = await runner.command("check")
    assert check.returncode == 0, check.stderr()

    # submit --once runs a daemon of its own: refused like `run`, before anything is
    # handed over (the running daemon would otherwise import the file behind its back).
    export = tmp_path / "exports" / "once.csv"
    export.parent.mkdir()
    export.write_text("email,firstName\nada@example.com,Ada\n", encoding="utf-8")
    once = await runner.command("submit", str(export), "--route", "leads", "--once")
    assert once.returncode == 2, once.stderr()
    [line] = once.stderr().strip().splitlines()
    assert f"pid {first.pid}" in line
    assert list((data_dir / "inbox" / "leads").iterdir()) == []

    # The first daemon still owns the directory and works: a file dropped in, and one
    # handed over with submit --wait beside it.
    drop_leads(data_dir, "after.csv", 20)
    await first.wait_for_event("file_finished")
    assert result_path(data_dir, "done", "leads", "after.csv").exists()
    handed = await runner.command(
        "submit", str(export), "--route", "leads", "--wait", "--json", "--poll", "0.05"
    )
    assert handed.returncode == 0, handed.stderr()
    assert json.loads(handed.stdout())["status"] == "complete"
    listed = await runner.command("status", "--file", "once.csv", "--json")
    assert len(json.loads(listed.stdout())["files"]) == 1  # only the one handed over

    # kill -9: the kernel drops the lock with the process; the next daemon starts.
    first.kill()
    assert await first.wait() == -9
    third = await runner.daemon()
    await ready(second_url, third)
    assert (data_dir / "daemon.lock").read_text().strip() == str(third.pid)
    third.terminate()
    assert await third.wait() == 0


async def test_run_simulate_takes_the_lock_before_it_starts_its_simulator(
    tmp_path: Path, daemons: MakeRunner
) -> None:
    data_dir = tmp_path / "data"
    settings, base = listening(fast_settings("http://unused.invalid", data_dir, (LEADS,)))
    runner = daemons(settings)
    first = await runner.daemon("--simulate")
    await ready(base, first)
    second = await runner.daemon("--simulate")
    assert await second.wait() == 2
    assert f"pid {first.pid}" in second.stderr()
    assert second.events("status_server") == []
    first.terminate()
    assert await first.wait() == 0


async def test_a_daemon_starts_only_with_data_dirs_lock_held(tmp_path: Path) -> None:
    """Whoever builds a daemon takes the lock (the CLI: `lock_data_dir`) and hands it
    over; while it is held nothing else gets it, and a daemon handed a lock that was let
    go refuses to start before it touches data_dir."""
    settings = fast_settings("http://unused.invalid", tmp_path / "data", (LEADS,))
    with lock_data_dir(settings) as lock:
        assert (settings.data_dir / "daemon.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            dirlock.acquire(settings.layout)
    assert not lock.held
    with pytest.raises(RuntimeError, match="needs data_dir's lock held"):
        await Daemon(settings, once=True, lock=lock).run()
    assert sorted(p.name for p in settings.data_dir.iterdir()) == ["daemon.lock"]


# -- health before recovery ------------------------------------------------------------------


async def test_health_and_readiness_answer_while_recovery_runs(
    sim: Simulator, tmp_path: Path, daemons: MakeRunner
) -> None:
    data_dir = tmp_path / "data"
    settings, base = listening(fast_settings(sim.base_url, data_dir, (LEADS,)))
    runner = daemons(settings)
    # A crash in the middle of splitting leaves work for recovery.
    drop_leads(data_dir, "big.csv", 300)
    crashed = await runner.daemon(env={"ORCHESTRATOR_CRASH_AT": "chunk_added:2"})
    assert await crashed.wait() == -9

    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    daemon = await runner.daemon(env={"ORCHESTRATOR_HOLD_AT": f"recovery:{fifo}"})

    async def health() -> tuple[int, str] | None:
        return await answer(base + "/healthz")

    assert (await wait_until(health, "/healthz", process=daemon))[0] == 200
    status, body = await wait_until(lambda: answer(base + "/readyz"), "/readyz", process=daemon)
    assert (status, json.loads(body)) == (503, {"ready": False, "reason": "recovering"})
    got = await answer(base + "/metrics")
    assert got is not None
    assert got[0] == 200
    got = await answer(base + "/jobs")
    assert got is not None
    assert got[0] == 200
    assert [f["status"] for f in json.loads(got[1])["files"]] == ["splitting"]
    assert not result_path(data_dir, "done", "leads", "big.csv").exists()

    await wait_until(lambda: release(fifo), "the daemon at its hold point", process=daemon)
    await ready(base, daemon)
    await daemon.wait_for_event("file_finished")
    assert result_path(data_dir, "done", "leads", "big.csv").exists()
    started = [e["event"] for e in daemon.events() if e["event"] in ("status_server", "recovering")]
    assert started == ["status_server", "recovering"]
    daemon.terminate()
    assert await daemon.wait() == 0


# -- a rotated client secret ----------------------------------------------------------------

OLD_SECRET = "old-secret-7d1e9a"
NEW_SECRET = "new-secret-42c0bb"


async def test_a_rotated_secret_file_is_read_again_after_a_refusal(
    make_simulator: MakeSimulator, tmp_path: Path, daemons: MakeRunner
) -> None:
    """Marketo already wants the new secret; the file still holds the old one. Once the
    file is rotated, the daemon picks it up at its next refusal, without a restart."""
    sim = await make_simulator(**SIM_KNOBS, client_id=CLIENT_ID, client_secret=NEW_SECRET)
    data_dir = tmp_path / "data"
    settings, base = listening(fast_settings(sim.base_url, data_dir, (LEADS,)))
    settings = with_marketo(settings, client_secret=Secret(""))  # only the file has it
    secret_file = tmp_path / "secrets" / "client_secret"
    secret_file.parent.mkdir()
    secret_file.write_text(OLD_SECRET + "\n", encoding="utf-8")
    drop_leads(data_dir, "people.csv", 40)
    runner = daemons(settings)
    daemon = await runner.daemon(env={"MARKETO_CLIENT_SECRET_FILE": str(secret_file)})

    await daemon.wait_for_event("identity_refused")

    async def refused() -> str | None:
        got = await answer(base + "/readyz")
        if got is None or got[0] != 503:
            return None
        reason = str(json.loads(got[1])["reason"])
        return reason if "refused the client credentials" in reason else None

    await wait_until(refused, "/readyz 503 naming the refused credentials", process=daemon)
    assert not result_path(data_dir, "done", "leads", "people.csv").exists()

    # Rotate as Kubernetes does: a new file renamed over the old one.
    staged = secret_file.with_name(".client_secret.new")
    staged.write_text(NEW_SECRET + "\n", encoding="utf-8")
    staged.replace(secret_file)

    await daemon.wait_for_event("client_secret_reloaded")
    await daemon.wait_for_event("file_finished")
    assert result_path(data_dir, "done", "leads", "people.csv").exists()
    await ready(base, daemon)
    daemon.terminate()
    assert await daemon.wait() == 0
    for path in runner.written():
        text = path.read_text(encoding="utf-8", errors="replace")
        assert OLD_SECRET not in text, path
        assert NEW_SECRET not in text, path


# -- one log format -----------------------------------------------------------------------


@contextlib.contextmanager
def root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        logging.getLogger("watchfiles").setLevel(logging.NOTSET)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def test_standard_library_log_lines_are_json_like_ours() -> None:
    out = io.StringIO()
    with root_logger_restored():
        logs.configure("info", "json", out)
        logs.register_secret("stdlib-secret-91f3")
        logging.getLogger("aiohttp.server").error("Error handling request stdlib-secret-91f3")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        logging.getLogger("asyncio").debug("below the configured level")
        logging.getLogger("watchfiles.main").info("3 changes detected")  # one per change: quiet
        structlog.get_logger("orchestrator.daemon").info("daemon_stopped", files_finished=1)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "Error handling request ***",
        "Task exception was never retrieved",
        "daemon_stopped",
    ]
    server, task, ours = lines
    assert (server["level"], server["logger"]) == ("error", "aiohttp.server")
    assert task["logger"] == "asyncio"
    assert "ValueError: boom" in task["exception"]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])
    assert set(ours) >= {"event", "level", "timestamp"}


# -- run --simulate across a restart ----------------------------------------------------------


async def test_run_simulate_resumes_against_the_same_subscription_after_a_restart(
    tmp_path: Path, daemons: MakeRunner
) -> None:
    """A batch still at the simulator when `run --simulate` is killed is polled by the
    next run, not failed with "Batch id ... not found": the simulator's jobs, batch ids
    and records live in data_dir/simulator.json."""
    data_dir = tmp_path / "data"
    # The first poll of a new batch waits 30 s: the kill comes long before it.
    settings = with_sections(
        fast_settings("http://unused.invalid", data_dir, (LEADS,)),
        polling={"interval": 30.0, "max_interval": 30.0},
    )
    runner = daemons(settings)
    drop_leads(data_dir, "people.csv", 40)
    first = await runner.daemon("--simulate")
    [submitted] = await first.wait_for_event("chunk_submitted")
    first.kill()
    assert await first.wait() == -9
    status = await runner.command("status", "--json")
    [entry] = json.loads(status.stdout())["files"]
    assert [c["status"] for c in entry["chunks"]] == ["submitted"]  # outstanding at the kill
    assert (data_dir / "simulator.json").exists()

    second = await runner.daemon("--simulate")
    await second.wait_for_event("file_finished")
    document = json.loads(result_path(data_dir, "done", "leads", "people.csv").read_text())
    assert document["status"] == "complete"
    assert [c["batch_id"] for c in document["chunks"]] == [submitted["batch_id"]]
    assert document["rows_processed"] == 40
    assert second.events("chunk_submitted") == []  # polled, not sent again
    assert second.events("simulator_state_restored")
    second.terminate()
    assert await second.wait() == 0

    # A third run goes on numbering batches after the ones the subscription knows.
    drop_leads(data_dir, "more.csv", 10, prefix="m")
    third = await runner.daemon("--simulate")
    [again] = await third.wait_for_event("chunk_submitted")
    assert again["batch_id"] > submitted["batch_id"]
    third.terminate()
    assert await third.wait() == 0
