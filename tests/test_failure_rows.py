"""Marketo's failures and warnings files as they come, end to end (issue 19, item 1).

Marketo leaves empty values, and their columns, out of failure rows, and Adobe's
OpenAPI declares application/json for the CSV files of failures and warnings. The
daemon runs in-process against the simulator on loopback with the knobs that make it
answer so (`omit_empty_values`, `files_content_type`); the client alone against the
simulator's app with a middleware that serves chosen bodies.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from orchestrator import constants
from orchestrator.client import Result
from orchestrator.daemon import Daemon
from orchestrator.errors import FatalError
from orchestrator.marketo import MarketoClient
from orchestrator.simulator import Simulator
from tests.support.daemons import LockedDaemon
from tests.support.data import drop_leads, result, result_path, write_csv
from tests.support.settings import LEADS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator, imports

HEADER = ["email", "firstName", "lastName", "phone"]
# Issue 19's pack of two. A's three rows import (its Benji has an email); B's second row
# has no email and fails, and Marketo sends it back without the email column.
A_ROWS = [
    ["a1@example.com", "Ann", "Lee", "212-555-0001"],
    ["benji@example.com", "Benji", "Nordstrom", "212-555-2323"],
    ["a3@example.com", "Abe", "Cole", ""],
]
B_ROWS = [
    ["b1@example.com", "Bea", "Moss", "212-555-1111"],
    ["", "Benji", "Nordstrom", "212-555-2323"],
]


async def run_once(daemon: Daemon) -> int:
    async with asyncio.timeout(60):
        return await daemon.run()


def read_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


async def test_the_pack_of_two_counts_the_row_failed_for_an_empty_email_in_the_file_that_sent_it(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    """A and B share one job; Marketo's failures file has B's row without its empty email
    column. B is told of 1 failed row on its line 3 (and `--max-failed-rows 0` fails it);
    A of none."""
    sim = await make_simulator(**SIM_KNOBS, omit_empty_values=True)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    inbox = tmp_path / "inbox" / "leads"
    write_csv(inbox / "a.csv", HEADER, A_ROWS, mtime=1_000_000)
    write_csv(inbox / "b.csv", HEADER, B_ROWS, mtime=1_000_001)

    assert await run_once(LockedDaemon(settings, once=True)) == 0

    assert len(imports(sim)) == 1, "A and B share one job"
    (job,) = sim.jobs()
    assert job["failed"] == 1
    docs = {name: result(tmp_path, "done", "leads", name) for name in ("a.csv", "b.csv")}
    failed = {name: doc["rows_failed"] for name, doc in docs.items()}
    print(f"\nper-file failed rows: {failed}")  # the closing note's figure
    assert failed == {"a.csv": 0, "b.csv": 1}
    assert (docs["a.csv"]["rows_processed"], docs["b.csv"]["rows_processed"]) == (3, 1)
    assert docs["a.csv"]["failures_file"] is None
    rows = read_rows(tmp_path / "done" / "leads" / docs["b.csv"]["failures_file"])
    assert rows[0] == [*HEADER, constants.FAILURE_REASON_COLUMN, constants.SOURCE_LINE_COLUMN]
    assert [(row[:4], row[-1]) for row in rows[1:]] == [(B_ROWS[1], "3")]
    assert [doc["chunks"][0]["unmatched_rows"] for doc in docs.values()] == [0, 0]
    path = result_path(tmp_path, "done", "leads", "b.csv")
    assert Result(docs["b.csv"], path).exit_code(max_failed_rows=0) == 1
    assert Result(docs["a.csv"], path).exit_code(max_failed_rows=0) == 0


async def test_failures_served_as_application_json_are_downloaded_and_matched(
    make_simulator: MakeSimulator, tmp_path: Path
) -> None:
    """The failures and warnings bodies are CSV labelled application/json, as Adobe's
    OpenAPI declares them: they are files, downloaded and matched to their lines."""
    sim = await make_simulator(**SIM_KNOBS, files_content_type="application/json")
    settings = fast_settings(sim.base_url, tmp_path, (LEADS,))
    drop_leads(tmp_path, "mixed.csv", 6, prefix="m", bad=(2,), warn=(4,))

    assert await run_once(LockedDaemon(settings, once=True)) == 0

    doc = result(tmp_path, "done", "leads", "mixed.csv")
    assert (doc["rows_failed"], doc["rows_with_warning"]) == (1, 1)
    assert "could not be fetched" not in (doc["chunks"][0]["message"] or "")
    done = tmp_path / "done" / "leads"
    failures = read_rows(done / doc["failures_file"])
    warnings = read_rows(done / doc["warnings_file"])
    # Line 2 holds row 0, whose note spans two lines: row 2 starts on line 5, row 4 on 7.
    assert [(row[0], row[-1]) for row in failures[1:]] == [("m2.example.com", "5")]
    assert [(row[0], row[-1]) for row in warnings[1:]] == [("m4@example.com", "7")]


# -- the client alone: bodies judged by content ------------------------------------------


Serve = dict[str, tuple[bytes, str]]  # body and content type for the failures file


@pytest.fixture
async def served(make_simulator: MakeSimulator) -> AsyncIterator[tuple[Simulator, str, Serve]]:
    """The simulator's app behind a middleware answering failures.json with the body and
    content type the test puts in `serve["failures"]`; (simulator, base URL, serve)."""
    sim = await make_simulator(**SIM_KNOBS)
    serve: Serve = {}

    @web.middleware
    async def failures(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/failures.json") and "failures" in serve:
            body, content_type = serve["failures"]
            return web.Response(body=body, content_type=content_type)
        response: web.StreamResponse = await handler(request)
        return response

    app = sim.make_app()
    app.middlewares.append(failures)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield sim, f"http://127.0.0.1:{runner.addresses[0][1]}", serve
    finally:
        await runner.cleanup()


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


ENVELOPE = b'{"requestId":"e1#1","success":false,"errors":[{"code":"1003","message":"not yet"}]}'
BRACED = b"{weird},Import Failure Reason\nx,1003 Invalid\n"


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (b"email,Import Failure Reason\nx,1003 Invalid\n", "application/json", None),
        (BRACED, "application/json", None),  # starts with "{", is no envelope
        (ENVELOPE, "text/csv", "1003"),  # an envelope, whatever its label
        (b'{"success":true,"result":[]}', "text/csv", "invalid-response"),
    ],
    ids=["csv-as-json", "braced-csv", "envelope-as-csv", "success-envelope"],
)
async def test_a_failures_body_is_judged_by_its_content_not_its_content_type(
    served: tuple[Simulator, str, Serve],
    tmp_path: Path,
    body: bytes,
    content_type: str,
    error: str | None,
) -> None:
    _, base_url, serve = served
    serve["failures"] = (body, content_type)
    settings = fast_settings(base_url, tmp_path, (LEADS,))
    dest = tmp_path / "failures.csv"
    async with MarketoClient(settings, sleep=no_sleep) as client:
        if error is None:
            assert await client.download_failures(LEADS, 1001, dest)
            assert dest.read_bytes() == body
        else:
            with pytest.raises(FatalError) as caught:
                await client.download_failures(LEADS, 1001, dest)
            assert caught.value.code == error
            assert not dest.exists()
    assert partial_downloads(tmp_path) == []


def partial_downloads(directory: Path) -> list[Path]:
    return list(directory.glob("*.part"))
