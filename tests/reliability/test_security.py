"""Security: no secret or token anywhere the daemon writes, none in a URL, symlinks never
followed, and a status server that only reads, on loopback by default.

One full run of the real daemon (a subprocess, debug logging, the status server on an
ephemeral loopback port) against a simulator that checks our credentials, expires
tokens every 0.7 s and refuses 10 % of calls with 601/602, so tokens are
fetched and refreshed many times. Then every byte the run produced is searched for the
client secret and for every token the simulator issued: stdout, stderr, everything
under data_dir (results, failures and warnings files, state.db and its WAL), the
bodies of /healthz /readyz /metrics /jobs, and `status --json`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import aiohttp

from orchestrator.config import HttpSettings, LoggingSettings, load_settings
from orchestrator.simulator import Simulator
from tests.support.data import all_results, drop_leads, write_csv
from tests.support.processes import CliProcess, CliRunner, MakeRunner
from tests.support.reliability import Record
from tests.support.settings import (
    CARS,
    CLIENT_ID,
    CLIENT_SECRET,
    LEADS,
    MEMBERS,
    SIM_KNOBS,
    fast_settings,
)
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until

PATHS = ("/healthz", "/readyz", "/metrics", "/jobs", "/", "/jobs/1", "/admin", "/shutdown")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
RESULTS = 6  # leads, mixed (failures and warnings), latin1, link, cars, members


def drop_inputs(data: Path, outside: Path) -> None:
    drop_leads(data, "leads.csv", 60, prefix="s")
    drop_leads(data, "mixed.csv", 30, prefix="w", bad={3, 7}, warn={5})
    (data / "inbox" / "leads" / "latin1.csv").write_bytes(b"email\ncaf\xe9@example.com\n")
    write_csv(outside, ["email", "firstName"], [[f"outside{i}@example.com", "O"] for i in range(5)])
    (data / "inbox" / "leads" / "link.csv").symlink_to(outside)
    write_csv(data / "inbox" / "cars" / "cars.csv", ["vin"], [[f"V{i}"] for i in range(40)])
    write_csv(
        data / "inbox" / "members" / "members.csv",
        ["email", "firstName"],
        [[f"m{i}@example.com", "M"] for i in range(40)],
    )


def listening_addresses(pid: int) -> set[str]:
    """Local addresses of the TCP sockets `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing (the daemon works meanwhile)
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(cols[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


async def fetch_everything(port: int, out: Path) -> dict[str, int]:
    """GET every endpoint (bodies kept for the leak search) and try every write method."""
    refused: dict[str, int] = {}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        for path in ("/healthz", "/readyz", "/metrics", "/jobs"):
            async with http.get(path) as resp:
                (out / f"http{path.replace('/', '-')}.body").write_bytes(await resp.read())
        async with http.get("/jobs") as resp:
            before = await resp.json()
        for path in PATHS:
            for method in WRITE_METHODS:
                async with http.request(method, path, data=b"{}") as resp:
                    refused[f"{method} {path}"] = resp.status
        async with http.get("/jobs") as resp:
            assert await resp.json() == before, "no request changed the state"
        async with http.get("/healthz") as resp:
            assert resp.status == 200
    return refused


def every_file(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                yield path


def leaks(paths: list[Path], secrets: list[str]) -> list[str]:
    needles = {s for secret in secrets for s in (secret, quote(secret, safe=""))}
    found = []
    for path in paths:
        data = path.read_bytes()
        found += [f"{path.name}: {n[:8]}..." for n in needles if n.encode() in data]
    return found


async def full_run(
    sim: Simulator, daemons: MakeRunner, tmp_path: Path
) -> tuple[CliRunner, CliProcess, Path, dict[str, int], set[str]]:
    data, outside = tmp_path / "data", tmp_path / "outside" / "private.csv"
    settings = fast_settings(sim.base_url, data, (LEADS, CARS, MEMBERS), max_chunk_bytes=300)
    settings = replace(
        settings,
        http=HttpSettings(listen="127.0.0.1:0"),
        logging=LoggingSettings(format="json", level="debug"),
    )
    runner = daemons(settings)
    drop_inputs(data, outside)
    life = await runner.daemon()
    port = await wait_until(life.status_port, "the status server")
    addresses = listening_addresses(life.pid)
    await wait_until(lambda: len(all_results(data)) >= RESULTS, "every result", within=60)
    refused = await fetch_everything(port, runner.workdir)
    status = await runner.command("status", "--json")
    assert status.returncode == 0, status.stderr()
    (runner.workdir / "status.json").write_text(status.stdout() + status.stderr())
    life.terminate()
    assert await life.wait(60) == 0, "SIGTERM: a clean exit 0"
    return runner, life, data, refused, addresses


async def test_no_secret_or_token_in_anything_the_daemon_wrote(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(
        **{**SIM_KNOBS, "job_overhead": 0.2},
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        token_ttl=0.7,
        fault_601=0.1,
        fault_602=0.1,
        fault_500=0.05,
        seed=5,
    )
    runner, _, data, refused, addresses = await full_run(sim, daemons, tmp_path)

    tokens = sim.tokens()
    assert len(tokens) >= 2, "tokens were refreshed during the run"
    secrets = [CLIENT_SECRET, *tokens, *(t.split(":")[0] for t in tokens)]
    written = [*runner.written(), *every_file(data, runner.workdir)]
    assert any(p.name == "state.db" for p in written)
    assert any(p.name.endswith(".failures.csv") for p in written)
    assert any(p.name.endswith(".warnings.csv") for p in written)
    canary = tmp_path / "canary"
    canary.write_text(f"Bearer {tokens[-1]} {quote(CLIENT_SECRET)}")
    assert len(leaks([canary], secrets)) >= 2, "the search finds what it looks for"
    assert leaks(written, secrets) == []

    stats = sim.stats()
    assert stats["violations"] == [], "no token or secret in a URL or a form field"
    for call in sim.calls():
        assert "access_token" not in call["query_keys"]
        assert "access_token" not in call["form_keys"]
        assert "client_secret" not in call["query_keys"]
    assert set(refused.values()) <= {404, 405}, refused
    assert addresses == {"127.0.0.1"}
    figures(
        bytes_searched=sum(p.stat().st_size for p in written),
        files_searched=len(written),
        tokens_issued=len(tokens),
        secrets_found=0,
        violations=stats["violations"],
        write_requests_refused=len(refused),
        listening_on=sorted(addresses),
    )


async def test_symlink_in_the_inbox_is_never_followed(
    make_simulator: MakeSimulator, daemons: MakeRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    outside = tmp_path / "outside" / "private.csv"
    settings = fast_settings(sim.base_url, tmp_path / "data", (LEADS,))
    runner = daemons(settings)
    data = settings.data_dir
    write_csv(outside, ["email", "firstName"], [[f"outside{i}@example.com", "O"] for i in range(5)])
    before = outside.read_bytes()
    (data / "inbox" / "leads").mkdir(parents=True)
    (data / "inbox" / "leads" / "link.csv").symlink_to(outside)
    drop_leads(data, "real.csv", 10, prefix="r")

    assert (await runner.once()).returncode == 1, "the symlink's file failed"
    doc = json.loads((data / "failed" / "leads" / "link.csv.result.json").read_text())
    assert doc["status"] == "failed"
    assert "symbolic link" in doc["error"]
    assert outside.read_bytes() == before, "the target is untouched"
    kept = data / "failed" / "leads" / "link.csv"
    assert not kept.exists() or kept.is_symlink(), "moved as a link, never copied"
    landed = {str(r["email"]) for r in sim.records("leads")}
    assert landed == {f"r{i}@example.com" for i in range(10)}, "nothing of the target uploaded"
    assert [c["operation"] for c in sim.calls() if c["batch_id"]][:1] == ["importLeadUsingPOST"]


def test_status_server_listens_on_loopback_by_default() -> None:
    settings = load_settings(None, {}, require_credentials=False)
    assert settings.http.host_port == ("127.0.0.1", 9400)
