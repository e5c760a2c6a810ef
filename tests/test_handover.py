"""Handing a file over and getting a truthful answer, through the real CLI in subprocesses
and through the Python API: `submit`, `check`, `status` filters, exit codes, no tracebacks.

Daemons run as subprocesses against the bundled simulator on loopback (in this
process); every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator import client
from orchestrator.config import Settings
from orchestrator.errors import UsageError
from orchestrator.simulator import Simulator
from orchestrator.store import Store
from tests.support.data import LEAD_HEADER, drop_leads, lead_rows, result, write_csv
from tests.support.faults import release
from tests.support.http import http_get
from tests.support.processes import COMMAND, CliProcess, CliRunner, clean_env, on_terminal
from tests.support.settings import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEADS,
    SIM_KNOBS,
    fast_settings,
    free_port,
    with_sections,
    write_settings,
)
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until

GENERATED_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{4}")
POLL = ("--poll", "0.05")


@pytest.fixture
async def sim(make_simulator: MakeSimulator) -> Simulator:
    return await make_simulator(**SIM_KNOBS)


@pytest.fixture
def settings(sim: Simulator, tmp_path: Path) -> Settings:
    return fast_settings(sim.base_url, tmp_path / "data", (LEADS,))


def source(tmp_path: Path, name: str, n: int, **kw: Any) -> Path:
    """A leads file outside the data directory, as a pipeline has it before the hand-over."""
    return write_csv(tmp_path / "exports" / name, LEAD_HEADER, lead_rows(n, **kw))


def one_line(proc: CliProcess) -> str:
    """The single stderr line of a refused command (no traceback, nothing else)."""
    err = proc.stderr()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def running(runner: CliRunner) -> CliProcess:
    """A long-running daemon that has created its state store and inbox."""
    daemon = await runner.daemon()
    await daemon.wait_for_event("spool_started")
    return daemon


# -- submit against a running daemon ------------------------------------------------------


async def test_submit_wait_hands_a_file_to_a_running_daemon_and_prints_its_result(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    runner = daemons(with_sections(settings, http={"listen": f"127.0.0.1:{port}"}))
    daemon = await running(runner)
    export = source(tmp_path, "nightly.csv", 30, bad={4})

    proc = await runner.command(
        "submit", str(export), "--route", "leads", "--wait", "--json", "--id", "nightly-1", *POLL
    )
    assert proc.returncode == 0, proc.stderr()
    assert "Traceback" not in proc.stderr()
    doc = json.loads(proc.stdout())
    assert (doc["id"], doc["file"], doc["status"]) == ("nightly-1", "nightly.csv", "complete")
    assert (doc["rows"], doc["rows_processed"], doc["rows_failed"]) == (30, 29, 1)
    assert result(settings.data_dir, "done", "leads", "nightly.csv") == doc
    assert export.is_file(), "the caller's file stays where it was"
    inbox = settings.data_dir / "inbox" / "leads"
    assert sorted(p.name for p in inbox.iterdir()) == [], "no ticket or .part left behind"

    # The same name again, without --id: a fresh id, printed; its own result.
    again = await runner.command("submit", str(export), "--route", "leads")
    assert again.returncode == 0
    second_id = again.stdout().strip()
    assert GENERATED_ID.fullmatch(second_id)
    line = await runner.command("submit", str(export), "--route", "leads", "--wait", *POLL)
    assert line.returncode == 0
    [summary] = line.stdout().splitlines()
    assert summary.startswith("complete  nightly.csv  id ")
    assert "rows 30: 29 processed, 1 failed" in summary

    status = await runner.command("status", "--id", second_id, "--json")
    assert status.returncode == 0
    [entry] = json.loads(status.stdout())["files"]
    assert (entry["id"], entry["file"]) == (second_id, "nightly.csv")

    async with aiohttp.ClientSession() as http:
        code, body = await http_get(http, f"http://127.0.0.1:{port}/jobs/nightly-1")
        assert code == 200
        job = json.loads(body)
        assert (job["id"], job["state"]) == ("nightly-1", "complete")
        assert job["result"] == "done/leads/nightly.csv.result.json"
        code, body = await http_get(http, f"http://127.0.0.1:{port}/jobs?limit=1")
        assert len(json.loads(body)["files"]) == 1
        code, _ = await http_get(http, f"http://127.0.0.1:{port}/jobs/unknown-id")
        assert code == 404
    daemon.terminate()
    assert await daemon.wait() == 0


async def test_python_api_hands_a_file_to_a_running_daemon(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    daemon = await running(runner)
    export = source(tmp_path, "api.csv", 12)

    handle = client.submit(export, "leads", data_dir=settings.data_dir, id="dag-run-7")
    assert (handle.id, handle.name) == ("dag-run-7", "api.csv")
    outcome = await handle.result(timeout=60, poll=0.05)
    assert (outcome.id, outcome.status, outcome.rows_failed) == ("dag-run-7", "complete", 0)
    assert outcome.path == settings.data_dir / "done" / "leads" / "api.csv.result.json"
    assert outcome.raise_for_status() is outcome
    assert outcome.exit_code() == 0

    # The synchronous form, as an Airflow task would call it (no event loop of its own).
    other = client.submit(export, "leads", data_dir=settings.data_dir)
    synced = await asyncio.to_thread(other.wait, 60, poll=0.05)
    assert synced.id == other.id != handle.id
    assert synced.path.name == "api.2.csv.result.json"

    with pytest.raises(UsageError, match="already used"):
        client.submit(export, "leads", data_dir=settings.data_dir, id="dag-run-7")
    with pytest.raises(UsageError, match="no such file"):
        client.submit(tmp_path / "missing.csv", "leads", data_dir=settings.data_dir)
    with pytest.raises(UsageError, match="not a directory"):
        client.submit(export, "nope", data_dir=settings.data_dir)
    daemon.terminate()
    assert await daemon.wait() == 0


async def test_failed_file_and_too_many_failed_rows_exit_1(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    await running(runner)
    broken = tmp_path / "exports" / "dup.csv"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("email,email\na@example.com,b@example.com\n", encoding="utf-8")
    proc = await runner.command("submit", str(broken), "--route", "leads", "--wait", *POLL)
    assert proc.returncode == 1
    assert proc.stdout().startswith("failed  dup.csv  id ")
    assert "error:" in proc.stdout()

    rejects = source(tmp_path, "rejects.csv", 10, bad={1, 2})
    lenient = await runner.command("submit", str(rejects), "--route", "leads", "--wait", *POLL)
    assert lenient.returncode == 0, "row-level failures are reported, not fatal"
    strict = await runner.command(
        "submit", str(rejects), "--route", "leads", "--wait", "--max-failed-rows", "1", *POLL
    )
    assert strict.returncode == 1
    within = await runner.command(
        "submit", str(rejects), "--route", "leads", "--wait", "--max-failed-rows", "2", *POLL
    )
    assert within.returncode == 0


async def test_failed_file_is_logged_at_error_level(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    inbox = settings.data_dir / "inbox" / "leads"
    inbox.mkdir(parents=True)
    (inbox / "dup.csv").write_text("email,email\na@example.com,b@example.com\n")
    drop_leads(settings.data_dir, "fine.csv", 3)
    proc = await runner.once()
    assert proc.returncode == 1
    levels = {e["file"]: e["level"] for e in proc.events("file_finished")}
    assert levels == {"dup.csv": "error", "fine.csv": "info"}
    # A file dropped by hand gets an id at its claim, in its result too.
    assert GENERATED_ID.fullmatch(result(settings.data_dir, "done", "leads", "fine.csv")["id"])


# -- timeouts and interruptions: 4, nothing lost ----------------------------------------------


async def test_submit_wait_without_a_daemon_times_out_with_4_and_says_where_the_file_waits(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    (settings.data_dir / "inbox" / "leads").mkdir(parents=True)
    export = source(tmp_path, "late.csv", 5)
    proc = await runner.command(
        "submit", str(export), "--route", "leads", "--wait", "--timeout", "0.3", "--id", "late-1"
    )
    assert proc.returncode == 4
    line = one_line(proc)
    waiting = settings.data_dir / "inbox" / "leads" / "late-1-late.csv"
    assert f"it waits unclaimed at {waiting}" in line
    assert waiting.is_file()

    # A daemon started later finishes it; the id came along with the file.
    once = await runner.once()
    assert once.returncode == 0
    assert result(settings.data_dir, "done", "leads", "late.csv")["id"] == "late-1"


async def test_submit_wait_interrupted_exits_4(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    (settings.data_dir / "inbox" / "leads").mkdir(parents=True)
    export = source(tmp_path, "cut.csv", 5)
    proc = await runner.start(
        "submit", "--config", str(runner.config), str(export), "--route", "leads", "--wait"
    )
    await wait_until(
        lambda: any(p.name.endswith("-cut.csv") for p in export.parent.parent.rglob("*")),
        "the hand-over",
        process=proc,
    )
    proc.terminate()
    assert await proc.wait() == 4
    assert "interrupted" in one_line(proc)


async def test_submit_wait_interrupted_right_after_the_hand_over_exits_4(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    """A signal between the hand-over and the wait's own signal handlers is still
    "interrupted" (exit 4), not a death by the signal."""
    runner = daemons(settings)
    (settings.data_dir / "inbox" / "leads").mkdir(parents=True)
    export = source(tmp_path, "cut.csv", 5)
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    proc = await runner.start(
        "submit",
        "--config",
        str(runner.config),
        str(export),
        "--route",
        "leads",
        "--wait",
        env={"ORCHESTRATOR_HOLD_AT": f"handed_over:{fifo}"},
    )
    inbox = settings.data_dir / "inbox" / "leads"
    await wait_until(lambda: list(inbox.glob("*-cut.csv")), "the hand-over", process=proc)
    proc.terminate()  # it cannot pass the hold point before the release below
    await wait_until(lambda: release(fifo), "the release", process=proc)
    assert await proc.wait() == 4
    assert "interrupted" in one_line(proc)


async def test_run_once_interrupted_with_jobs_at_marketo_exits_4_nothing_lost(
    make_simulator: MakeSimulator, daemons: Any, tmp_path: Path
) -> None:
    """A scheduler that kills `run --once` on timeout must not see success."""
    slow = await make_simulator(**{**SIM_KNOBS, "job_overhead": 3600.0})
    settings = fast_settings(slow.base_url, tmp_path / "data", (LEADS,))
    runner = daemons(settings)
    drop_leads(settings.data_dir, "slow.csv", 5)
    proc = await runner.daemon("--once")
    await proc.wait_for_event("chunk_submitted")
    proc.terminate()
    assert await proc.wait() == 4
    err = proc.stderr()
    assert "interrupted with 1 file(s) outstanding" in err
    assert "nothing is lost" in err
    assert "Traceback" not in err
    status = await runner.command("status", "--active", "--json")
    [left] = json.loads(status.stdout())["files"]
    assert left["state"] in ("queued", "importing"), "at Marketo, not lost"


# -- submit --once: no daemon running --------------------------------------------------------


async def test_submit_once_runs_a_daemon_here_until_the_result(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    export = source(tmp_path, "self.csv", 8)
    proc = await runner.command("submit", str(export), "--route", "leads", "--once", "--json")
    assert proc.returncode == 0, proc.stderr()
    doc = json.loads(proc.stdout())  # log lines went to stderr
    assert (doc["file"], doc["status"], doc["rows_processed"]) == ("self.csv", "complete", 8)


async def test_submit_once_refused_credentials_exit_3(
    make_simulator: MakeSimulator, daemons: Any, tmp_path: Path
) -> None:
    strict = await make_simulator(**SIM_KNOBS, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    settings = fast_settings(strict.base_url, tmp_path / "data", (LEADS,))
    runner = daemons(settings)
    export = source(tmp_path, "x.csv", 2)
    proc = await runner.run(
        "submit",
        "--config",
        str(runner.config),
        str(export),
        "--route",
        "leads",
        "--once",
        env={"MARKETO_CLIENT_SECRET": "wrong-secret"},
    )
    assert proc.returncode == 3
    assert "refused the client credentials" in proc.stderr()
    assert "Traceback" not in proc.stderr()


# -- status ----------------------------------------------------------------------------------


async def test_status_filters_and_wide_names(
    daemons: Any, settings: Settings, tmp_path: Path
) -> None:
    runner = daemons(settings)
    long_name = "customer-export-for-the-spring-campaign-2026-11-23.csv"
    for name, file_id in ((long_name, "spring-1"), ("short.csv", "short-1")):
        export = source(tmp_path, name, 3)
        (settings.data_dir / "inbox" / "leads").mkdir(parents=True, exist_ok=True)
        client.submit(export, "leads", data_dir=settings.data_dir, id=file_id)
    assert (await runner.once()).returncode == 0

    table = await runner.command("status")
    assert table.returncode == 0
    lines = table.stdout().splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert long_name not in table.stdout(), "wrapped in its column"
    at = next(i for i, line in enumerate(lines) if "customer-export" in line)
    pieces = [line[12:32].strip() for line in lines[at : at + 3]]
    assert "".join(pieces) == long_name, "whole, never cut"
    wide = await runner.command("status", "--wide")
    assert any(long_name in line and "spring-1" in line for line in wide.stdout().splitlines())

    by_id = await runner.command("status", "--id", "short-1", "--json")
    assert [f["file"] for f in json.loads(by_id.stdout())["files"]] == ["short.csv"]
    by_name = await runner.command("status", "--file", "customer-*", "--json")
    assert [f["id"] for f in json.loads(by_name.stdout())["files"]] == ["spring-1"]
    active = await runner.command("status", "--active")
    assert active.returncode == 1
    assert one_line(active).endswith("no file matches")
    missing = await runner.command("status", "--id", "nope")
    assert missing.returncode == 1


async def test_status_json_into_a_closed_pipe_has_no_traceback(
    settings: Settings, tmp_path: Path
) -> None:
    db = settings.data_dir / "state.db"
    async with await Store.open(db) as store:
        for n in range(3):
            await store.begin_claim(
                route="leads",
                name=f"f{n}.csv",
                source_path="s",
                work_path=f"w{n}",
                max_chunk_bytes=1000,
                claimed_at="2026-11-23T14:03:11Z",
            )
    config = tmp_path / "pipe.toml"
    config.write_text(f'data_dir = "{settings.data_dir}"\n', encoding="utf-8")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: `status --json | head -0`
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [*COMMAND, "status", "--config", str(config), "--json"],
            stdout=write,
            stderr=subprocess.PIPE,
            env=clean_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141
    assert proc.stderr == b""


# -- check -----------------------------------------------------------------------------------


async def test_check_validates_config_data_dir_and_credentials(
    make_simulator: MakeSimulator, daemons: Any, tmp_path: Path
) -> None:
    strict = await make_simulator(**SIM_KNOBS, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    settings = fast_settings(strict.base_url, tmp_path / "data", (LEADS,))
    runner = daemons(settings)
    ok = await runner.command("check", "--credentials")
    assert ok.returncode == 0, ok.stderr()
    assert [line.split(":")[0] for line in ok.stdout().splitlines()] == [
        "configuration",
        "data_dir",
        "credentials",
        "permissions",
    ]
    assert not settings.data_dir.exists(), "check creates nothing"

    wrong = await runner.run(
        "check",
        "--config",
        str(runner.config),
        "--credentials",
        env={"MARKETO_CLIENT_SECRET": "wrong-secret"},
    )
    assert wrong.returncode == 3
    assert "refused the client credentials" in one_line(wrong)

    settings.data_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.data_dir.write_text("not a directory")
    blocked = await runner.command("check")
    assert blocked.returncode == 2
    assert f"{settings.data_dir} exists and is not a directory" in blocked.stderr()


# -- user mistakes: one line, exit 2, never a traceback ---------------------------------------


async def test_split_mistakes_are_one_line_and_create_nothing(tmp_path: Path) -> None:
    runner = CliRunner(tmp_path / "cli")
    runner.workdir.mkdir()
    export = source(tmp_path, "s.csv", 40)
    out = tmp_path / "chunks"
    cases = [
        (("split", str(tmp_path / "nope.csv"), "--out", str(out)), "no such file"),
        (("split", str(tmp_path), "--out", str(out)), "is not a regular file"),
        (("split", str(export), "--out", str(out), "--max-bytes", "0"), "at least 256 bytes"),
        # One maximum for split and limits.max_chunk_bytes: a request body under 10 MB.
        (("split", str(export), "--out", str(out), "--max-bytes", "9995905"), "10,000,000"),
        (("split", str(export), "--out", str(export)), "is not a directory"),
        (("submit", str(tmp_path / "nope.csv"), "--route", "leads"), "no such file"),
        (("submit", str(export), "--route", "leads", "--id", "no spaces"), "not a usable id"),
        (("submit", str(export), "--route", "leads", "--timeout", "soon"), "not a duration"),
        (("status", "--limit", "0"), "must be at least 1"),
    ]
    try:
        for args, expected in cases:
            proc = await runner.run(*args, env={"ORCHESTRATOR_DATA_DIR": str(tmp_path / "d")})
            assert proc.returncode == 2, args
            assert expected in one_line(proc), args
        assert not out.exists()
        assert not (tmp_path / "d").exists()
    finally:
        await runner.close()


async def test_split_refuses_old_chunks_unless_forced(tmp_path: Path) -> None:
    runner = CliRunner(tmp_path / "cli")
    runner.workdir.mkdir()
    export = source(tmp_path, "s.csv", 40)
    out = tmp_path / "chunks"
    try:
        first = await runner.run("split", str(export), "--out", str(out), "--max-bytes", "600")
        assert first.returncode == 0
        many = sorted(p.name for p in out.iterdir())
        assert len(many) > 1
        again = await runner.run("split", str(export), "--out", str(out))
        assert again.returncode == 2
        assert "--force" in one_line(again)
        assert sorted(p.name for p in out.iterdir()) == many
        forced = await runner.run("split", str(export), "--out", str(out), "--force")
        assert forced.returncode == 0
        assert sorted(p.name for p in out.iterdir()) == ["chunk-00001.csv"], "no stale chunk"
        (out / "notes.txt").write_text("mine")
        kept = await runner.run("split", str(export), "--out", str(out), "--force")
        assert kept.returncode == 2
        assert "not chunks" in one_line(kept)
        assert (out / "notes.txt").read_text() == "mine"
    finally:
        await runner.close()


async def test_misspelt_variable_is_named_and_env_errors_name_the_variable(
    daemons: Any, settings: Settings
) -> None:
    runner = daemons(settings)
    typo = await runner.run(
        "check", "--config", str(runner.config), env={"ORCHESTRATOR_LIMIT_QUEUED_JOBS": "5"}
    )
    assert typo.returncode == 0
    warning = one_line(typo)
    assert "ORCHESTRATOR_LIMIT_QUEUED_JOBS" in warning
    assert "did you mean ORCHESTRATOR_LIMITS_QUEUED_JOBS" in warning
    k8s = await runner.run(
        "check", "--config", str(runner.config), env={"ORCHESTRATOR_PORT": "tcp://10.0.0.1:80"}
    )
    assert (k8s.returncode, k8s.stderr()) == (0, "")

    for var, value in (("ORCHESTRATOR_POLLING_INTERVAL", "0"), ("ORCHESTRATOR_BACKOFF_MAX", "nan")):
        bad = await runner.run("check", "--config", str(runner.config), env={var: value})
        assert bad.returncode == 2
        assert one_line(bad).startswith(f"marketo-orchestrator: configuration error: {var} (sets ")


async def test_run_once_on_a_terminal_never_puts_a_log_line_beside_the_progress_line(
    settings: Settings, tmp_path: Path
) -> None:
    """stdout (console logs) and stderr (progress) on one terminal, as a person runs it."""
    config = tmp_path / "tty.toml"
    write_settings(config, settings, logging={"format": "console", "level": "info"})
    drop_leads(settings.data_dir, "tty.csv", 50)
    screen = await on_terminal(
        [*COMMAND, "run", "--config", str(config), "--once"],
        clean_env(MARKETO_CLIENT_SECRET=CLIENT_SECRET),
    )
    lines = rendered(screen)
    assert any("file_finished" in line for line in lines)
    assert any(line.startswith("files 1/1  chunks 1/1  rows 50") for line in lines)
    for line in lines:
        assert not ("files " in line and ("[info" in line or "[warn" in line)), line


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def rendered(screen: str) -> list[str]:
    """The lines a terminal shows after `screen`: \\r returns to column 0, ESC[2K erases
    the line, other escape sequences (colours) are dropped."""
    lines: list[str] = [""]
    col = 0
    i = 0
    while i < len(screen):
        if screen.startswith("\x1b[2K", i):
            lines[-1] = ""
            i += 4
            continue
        match = ANSI.match(screen, i)
        if match:
            i = match.end()
            continue
        ch = screen[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            line = lines[-1].ljust(col)
            lines[-1] = line[:col] + ch + line[col + 1 :]
            col += 1
    return [line.rstrip() for line in lines if line.strip()]


def test_submit_links_the_file_or_copies_it_when_it_cannot_and_writes_the_ticket_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "data" / "inbox" / "leads"
    inbox.mkdir(parents=True)
    export = source(tmp_path, "linked.csv", 3)
    linked = client.submit(export, "leads", data_dir=tmp_path / "data", id="a-1")
    placed = inbox / linked.inbox_name
    assert placed.name == "a-1-linked.csv"
    assert placed.stat().st_ino == export.stat().st_ino, "a hard link: no copy on one volume"
    ticket = json.loads((inbox / ".a-1-linked.csv.ticket").read_text())
    assert ticket == {"id": "a-1", "file": "linked.csv"}

    def cross_device(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # as if the export lived on another volume
    copied = client.submit(export, "leads", data_dir=tmp_path / "data", id="b-2")
    placed = inbox / copied.inbox_name
    assert placed.stat().st_ino != export.stat().st_ino
    assert placed.read_bytes() == export.read_bytes()
    assert sorted(p.name for p in inbox.iterdir()) == [
        ".a-1-linked.csv.ticket",
        ".b-2-linked.csv.ticket",
        "a-1-linked.csv",
        "b-2-linked.csv",
    ], "no .part or .tmp left behind"
