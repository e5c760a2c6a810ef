"""The Marketo client against the bundled simulator over real loopback HTTP.

Time is scaled through knobs (short backoff, short windows, short token lives)
and the client's injected sleep and clocks, never by waiting it out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

import orchestrator
from orchestrator import constants, delimited
from orchestrator.backoff import Backoff
from orchestrator.config import (
    BackoffSettings,
    LimitSettings,
    MarketoSettings,
    Route,
    Secret,
    Settings,
)
from orchestrator.errors import (
    AccessDeniedError,
    ChunkTooLargeError,
    CredentialsError,
    FatalError,
    ImportInProgressError,
    QueueFullError,
    TransientError,
    UnknownOutcomeError,
)
from orchestrator.marketo import MarketoClient
from orchestrator.marketo.auth import Token, TokenSource
from orchestrator.marketo.wire import Grant
from orchestrator.models import BatchStatus, ObjectType
from orchestrator.simulator import Simulator, SimulatorConfig
from tests.support.settings import free_port
from tests.support.waiting import wait_until

SECRET = "s3cr3t-value-never-shown"
CLIENT_ID = "client-under-test"
FAST = {"job_overhead": 0.05, "rows_per_second": 100_000.0}
BACKOFF = BackoffSettings(initial=0.01, max=0.05)

LEADS = Route(dir="leads", object=ObjectType.LEADS)
CARS = Route(dir="cars", object=ObjectType.CUSTOM_OBJECT, api_name="car_c")
MEMBERS = Route(
    dir="members",
    object=ObjectType.PROGRAM_MEMBERS,
    program_id=1234,
    program_member_status="Registered",
)

# Per route: format, a file with one good row, one failing row and one warned row.
SAMPLES = {
    "leads": (
        "csv",
        "email,firstName\na@example.com,Ann\nnot-an-email,Bob\nc@example.com,__WARN__\n",
    ),
    "cars": ("tsv", "vin\tcolor\nV1\tred\n\tblue\nV3\t__WARN__\n"),
    "members": (  # an invalid email only warns for program members: a missing one fails
        "ssv",
        "email;firstName\nm@example.com;Max\n;Mo\nn@example.com;__WARN__\n",
    ),
}
GOOD_LEADS = "email,firstName\nx@example.com,Xena\ny@example.com,Yuri\n"


class Recorder:
    """The client's observer and sleep in one: records what it reports and asks to wait.

    `on_sleep(n, seconds)` runs before the n-th wait returns, so a test can change
    the simulator "during" the wait (clear a fault, reset the quota); `on_error(code)`
    runs when the client reports a Marketo error.
    """

    def __init__(
        self,
        on_sleep: Callable[[int, float], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.on_sleep = on_sleep
        self.on_error = on_error
        self.sleeps: list[float] = []
        self.api_calls: list[str] = []
        self.errors: list[str] = []
        self.backoffs: list[tuple[str, float]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps), seconds)
        await asyncio.sleep(0)

    def api_call(self, operation: str) -> None:
        self.api_calls.append(operation)

    def marketo_error(self, code: str) -> None:
        self.errors.append(code)
        if self.on_error is not None:
            self.on_error(code)

    def backoff(self, reason: str, seconds: float) -> None:
        self.backoffs.append((reason, seconds))


def make_settings(
    sim: Simulator, *, secret: str = SECRET, timeout: float = 10.0, **limits: Any
) -> Settings:
    return Settings(
        marketo=MarketoSettings(
            base_url=sim.base_url,
            client_id=CLIENT_ID,
            client_secret=Secret(secret),
            request_timeout=timeout,
        ),
        limits=LimitSettings(**limits),
        backoff=BACKOFF,
    )


CLIENT_KW = {"clock", "wall_clock", "max_attempts", "calls_today", "session", "socket_factory"}


def make_client(sim: Simulator, rec: Recorder | None = None, **kw: Any) -> MarketoClient:
    settings_kw = {k: kw.pop(k) for k in list(kw) if k not in CLIENT_KW}
    rec = rec or Recorder()
    return MarketoClient(make_settings(sim, **settings_kw), observer=rec, sleep=rec.sleep, **kw)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def part_files(directory: Path) -> list[Path]:
    """Leftover partial downloads."""
    return sorted(directory.glob("*.part"))


def identity_calls(sim: Simulator) -> int:
    return sum(1 for c in sim.calls() if c["operation"] == "identity")


async def wait_final(client: MarketoClient, route: Route, batch_id: int) -> BatchStatus:
    """Poll until Marketo reports a final status, with a deadline."""

    async def final() -> BatchStatus | None:
        batch = await client.status(route, batch_id)
        return batch if batch.status in constants.FINAL_STATUSES else None

    return await wait_until(final, f"batch {batch_id} to be final", within=60.0, poll=0.05)


async def submitted(client: MarketoClient, sim: Simulator, tmp_path: Path) -> int:
    """A finished leads job to poll against."""
    batch = await client.submit(LEADS, write(tmp_path, "good.csv", GOOD_LEADS), "csv")
    await wait_final(client, LEADS, batch.batch_id)
    return batch.batch_id


def assert_backoff(delays: list[float]) -> None:
    """Each wait lies in [50 %, 100 %] of its doubling, capped ceiling."""
    policy = Backoff(BACKOFF.initial, BACKOFF.max)
    for attempt, delay in enumerate(delays, start=1):
        ceiling = policy.ceiling(attempt)
        assert ceiling / 2 <= delay <= ceiling, (attempt, delay, ceiling)
    assert policy.ceiling(2) == 2 * policy.ceiling(1)


# -- The twelve operations -----------------------------------------------------


@pytest.mark.parametrize("route", [LEADS, CARS, MEMBERS], ids=lambda r: r.dir)
async def test_round_trip_for_each_object_type(
    make_simulator: Any, tmp_path: Path, route: Route
) -> None:
    sim = await make_simulator(**FAST)
    fmt, text = SAMPLES[route.dir]
    async with make_client(sim) as client:
        created = await client.submit(route, write(tmp_path, f"in.{fmt}", text), fmt)
        assert created.status == constants.STATUS_QUEUED
        assert created.batch_id > 0
        final = await wait_final(client, route, created.batch_id)
        assert (final.status, final.rows_processed, final.rows_failed) == ("Complete", 2, 1)
        assert final.rows_with_warning == 1
        assert "1 failed" in final.message

        failures, warnings = tmp_path / "failures.out", tmp_path / "warnings.out"
        assert await client.download_failures(route, created.batch_id, failures)
        assert await client.download_warnings(route, created.batch_id, warnings)
        delimiter = delimited.DELIMITERS[fmt]
        failed_lines = failures.read_text(encoding="utf-8").splitlines()
        assert failed_lines[0].endswith(delimiter + constants.FAILURE_REASON_COLUMN)
        assert len(failed_lines) == 2
        warned_lines = warnings.read_text(encoding="utf-8").splitlines()
        assert warned_lines[0].endswith(delimiter + constants.WARNING_REASON_COLUMN)
        assert "__WARN__" in warned_lines[1]
        assert part_files(tmp_path) == []

    calls = sim.calls()
    create = next(c for c in calls if c["operation"].startswith("import"))
    assert "file" in create["form_keys"]
    assert all("access_token" not in c["query_keys"] + c["form_keys"] for c in calls)
    assert sim.stats()["violations"] == []
    assert not sim.stats()["errors"]


async def test_records_land_and_route_parameters_are_sent(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = await make_simulator(**FAST)
    route = Route(dir="leads", object=ObjectType.LEADS, list_id=77, lookup_field="email")
    async with make_client(sim) as client:
        batch = await client.submit(route, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
        await wait_final(client, route, batch.batch_id)
        members = await client.submit(MEMBERS, write(tmp_path, "m.csv", GOOD_LEADS), "csv")
        await wait_final(client, MEMBERS, members.batch_id)
    emails = {r["email"] for r in sim.records("lists", list_id=77)}
    assert emails == {"x@example.com", "y@example.com"}
    stored = sim.records("programmembers", program_id=1234)
    assert {m["programMemberStatus"] for m in stored} == {"Registered"}
    keys = {c["operation"]: c["query_keys"] for c in sim.calls()}
    assert keys["importLeadUsingPOST"] == ["format", "listId", "lookupField"]
    assert keys["importProgramMemberUsingPOST"] == ["format", "programMemberStatus"]


async def test_no_file_is_false_and_unfinished_job_is_an_error_not_a_file(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = await make_simulator(job_overhead=30.0)
    async with make_client(sim) as client:
        busy = await client.submit(LEADS, write(tmp_path, "busy.csv", GOOD_LEADS), "csv")
        dest = tmp_path / "busy.failures"
        with pytest.raises(FatalError) as caught:
            await client.download_failures(LEADS, busy.batch_id, dest)
        assert caught.value.code == "1003"
        assert not dest.exists()
        assert part_files(tmp_path) == []

        sim.set_knobs(job_overhead=0.05)
        done = await client.submit(LEADS, write(tmp_path, "done.csv", GOOD_LEADS), "csv")
        assert (await wait_final(client, LEADS, done.batch_id)).rows_failed == 0
        assert await client.download_failures(LEADS, done.batch_id, dest) is False
        assert await client.download_warnings(LEADS, done.batch_id, dest) is False
        assert not dest.exists()
        assert client.calls_by_operation["getImportLeadFailuresUsingGET"] == 2


# -- Tokens ----------------------------------------------------------------------


async def test_token_in_header_only_and_cached(make_simulator: Any, tmp_path: Path) -> None:
    sim = await make_simulator(**FAST)
    async with make_client(sim) as client:
        had_token = client.has_token
        await client.ensure_token()
        assert (had_token, client.has_token) == (False, True)
        batch_id = await submitted(client, sim, tmp_path)
        for _ in range(3):
            await client.status(LEADS, batch_id)
    assert identity_calls(sim) == 1
    identity = next(c for c in sim.calls() if c["operation"] == "identity")
    assert identity["method"] == "POST"
    assert identity["query_keys"] == []
    assert identity["form_keys"] == ["client_id", "client_secret", "grant_type"]
    assert sim.stats()["violations"] == []


async def test_expired_token_is_replaced(make_simulator: Any, tmp_path: Path) -> None:
    sim = await make_simulator(token_ttl=0.5, **FAST)
    async with MarketoClient(make_settings(sim)) as client:
        batch_id = await submitted(client, sim, tmp_path)
        # Call on through three token lives, however long this machine takes for them.
        deadline = time.monotonic() + 60
        while len(set(sim.tokens())) < 3 and time.monotonic() < deadline:
            assert (await client.status(LEADS, batch_id)).batch_id == batch_id
            await asyncio.sleep(0.05)  # pacing, not synchronisation
    assert len(set(sim.tokens())) >= 3
    assert sim.stats()["errors"].get("601", 0) == 0, "no call went out with an expired token"


@pytest.mark.parametrize("code", ["601", "602"])
async def test_refused_token_is_refreshed_and_call_retried(
    make_simulator: Any, tmp_path: Path, code: str
) -> None:
    sim = await make_simulator(**FAST)
    rec = Recorder(on_error=lambda _code: sim.set_knobs(**{f"fault_{code}": 0.0}))
    async with make_client(sim, rec) as client:
        batch_id = await submitted(client, sim, tmp_path)
        sim.set_knobs(**{f"fault_{code}": 1.0})
        batch = await client.status(LEADS, batch_id)
    assert batch.status == "Complete"
    assert rec.errors == [code]
    assert rec.sleeps == []
    assert identity_calls(sim) == 2


async def test_ten_calls_meeting_an_expired_token_cause_one_refresh(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = await make_simulator(token_ttl=0.6, **FAST)
    frozen = 0.0  # the client's clock stands still: it believes its token is fresh
    async with make_client(sim, clock=lambda: frozen) as client:
        batch_id = await submitted(client, sim, tmp_path)
        issued_before = time.monotonic()
        refreshes_before = identity_calls(sim)
        # Let the token's life run out on the simulator's clock (only there: ours is frozen).
        await asyncio.sleep(max(0.0, issued_before + 0.7 - time.monotonic()))
        results = await asyncio.gather(*(client.status(LEADS, batch_id) for _ in range(10)))
    assert {r.batch_id for r in results} == {batch_id}
    assert identity_calls(sim) == refreshes_before + 1
    assert sim.stats()["errors"]["602"] == 10


async def test_wrong_secret_is_fatal_and_never_shown(make_simulator: Any) -> None:
    sim = await make_simulator(client_id=CLIENT_ID, client_secret="the-right-one")
    rec = Recorder()
    with structlog.testing.capture_logs() as logs:
        async with make_client(sim, rec) as client:
            with pytest.raises(FatalError) as caught:
                await client.status(LEADS, 1001)
    assert caught.value.code == "http-401"
    assert "client_secret" in str(caught.value)
    assert SECRET not in str(caught.value) + repr(caught.value) + repr(client)
    assert SECRET not in repr(logs)
    assert rec.sleeps == []
    assert identity_calls(sim) == 1


async def test_token_source_waits_out_a_nearly_expired_token() -> None:
    now = [0.0]
    answers = [Grant("tok-a", 3600), Grant("tok-a", 20), Grant("tok-b", 3600)]
    waits: list[float] = []

    async def fetch() -> Grant:
        return answers.pop(0)

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    source = TokenSource(fetch, clock=lambda: now[0], sleep=sleep)
    first = await source.get()
    now[0] = 3580.0  # 20 s left: too little, ask again; Marketo repeats the same token
    second = await source.get()
    assert (first.value, second.value) == ("tok-a", "tok-b")
    assert len(waits) == 1
    assert 20 <= waits[0] <= 21
    assert second.generation == first.generation + 1
    assert "tok-" not in repr(source) + repr(second)


# -- Retries -------------------------------------------------------------------


RETRYABLE = [
    ({"fault_500": 1.0}, "http-500"),
    ({"fault_503": 1.0}, "http-503"),
    ({"fault_608": 1.0}, "608"),
    ({"fault_611": 1.0}, "611"),
    ({"fault_615": 1.0}, "615"),
    ({"fault_envelope_500": 1.0}, "500"),
    ({"fault_envelope_502": 1.0}, "502"),
    ({"drop_fraction": 1.0}, "network"),
    ({"slow_fraction": 1.0, "slow_seconds": 1.0}, "timeout"),
]


@pytest.mark.parametrize(("knobs", "code"), RETRYABLE, ids=[c for _, c in RETRYABLE])
async def test_retryable_errors_back_off_then_succeed(
    make_simulator: Any, tmp_path: Path, knobs: dict[str, float], code: str
) -> None:
    sim = await make_simulator(**FAST)
    cleared = {k: 0.0 for k in knobs}

    def clear_after_three(n: int, _seconds: float) -> None:
        if n == 3:
            sim.set_knobs(**cleared)

    rec = Recorder(clear_after_three)
    async with make_client(sim, rec, timeout=0.3) as client:
        batch_id = await submitted(client, sim, tmp_path)
        sim.set_knobs(**knobs)
        batch = await client.status(LEADS, batch_id)
    assert batch.status == "Complete"
    assert len(rec.sleeps) == 3
    assert_backoff(rec.sleeps)
    assert rec.errors == [code] * 3
    assert [reason for reason, _ in rec.backoffs] == [code] * 3


async def test_upload_retried_with_the_file_reopened(make_simulator: Any, tmp_path: Path) -> None:
    """An error envelope means Marketo did not execute the create: retried here."""
    sim = await make_simulator(**FAST)
    rec = Recorder(lambda n, _s: sim.set_knobs(fault_608=0.0) if n == 2 else None)
    async with make_client(sim, rec) as client:
        sim.set_knobs(fault_608=1.0)
        batch = await client.submit(LEADS, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
        final = await wait_final(client, LEADS, batch.batch_id)
    assert final.rows_processed == 2
    assert client.calls_by_operation["importLeadUsingPOST"] == 3
    assert len(sim.jobs()) == 1


# -- Creating a job is not idempotent (issue 10, item 1) ----------------------------


@pytest.mark.parametrize(
    ("knobs", "code"),
    [
        ({"fault_503": 1.0}, "http-503"),
        ({"fault_500": 1.0}, "http-500"),
        ({"drop_reply_fraction": 1.0}, "network"),
        ({"late_reply_fraction": 1.0, "late_reply_seconds": 1.0}, "timeout"),
    ],
    ids=["http-503", "http-500", "dropped-reply", "late-reply"],
)
async def test_create_with_unknown_outcome_is_not_retried_by_the_client(
    make_simulator: Any, tmp_path: Path, knobs: dict[str, float], code: str
) -> None:
    """Item 1: once the body went out, a 5xx, a drop or a read timeout may hide a job
    Marketo made; the client raises UnknownOutcomeError after ONE create."""
    sim = await make_simulator(**FAST)
    rec = Recorder()
    async with make_client(sim, rec, timeout=0.3) as client:
        await client.ensure_token()
        sim.set_knobs(**knobs)
        with pytest.raises(UnknownOutcomeError) as caught:
            await client.submit(LEADS, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
    assert caught.value.code == code
    assert "outcome is unknown" in str(caught.value)
    assert client.calls_by_operation["importLeadUsingPOST"] == 1
    assert rec.sleeps == []


@pytest.mark.parametrize(
    ("knobs", "code", "jobs"),
    [
        ({"fault_502_after_create": 1.0}, "502", 1),
        ({"fault_envelope_502": 1.0}, "502", 0),
        ({"fault_envelope_500": 1.0}, "500", 0),
    ],
    ids=["502-after-the-job", "502", "500"],
)
async def test_500_or_502_envelope_on_a_create_is_an_unknown_outcome(
    make_simulator: Any, tmp_path: Path, knobs: dict[str, float], code: str, jobs: int
) -> None:
    """Issue 19, item 2: Adobe documents only 6xx codes as "not executed", and 502 as
    "likely a timeout"; a create answered 500 or 502 inside the envelope may have made
    its job (the simulator's first case did), so the client raises UnknownOutcomeError
    after ONE create, Marketo's request id kept. Status calls still retry them (see
    test_retryable_errors_back_off_then_succeed)."""
    sim = await make_simulator(**FAST)
    rec = Recorder()
    async with make_client(sim, rec) as client:
        await client.ensure_token()
        sim.set_knobs(**knobs)
        with pytest.raises(UnknownOutcomeError) as caught:
            await client.submit(LEADS, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
    assert caught.value.code == code
    assert caught.value.request_id
    assert "outcome is unknown" in str(caught.value)
    assert client.calls_by_operation["importLeadUsingPOST"] == 1
    assert rec.sleeps == []
    assert len(sim.jobs()) == jobs


async def test_create_answered_failed_is_returned_as_failed(
    make_simulator: Any, tmp_path: Path
) -> None:
    """Issue 19, item 2: a create answered `Failed` comes back as such, with Marketo's
    message, for the scheduler to end its chunk; the simulator made no job of it."""
    sim = await make_simulator(**FAST, create_failed_fraction=1.0)
    async with make_client(sim) as client:
        batch = await client.submit(LEADS, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
        again = await client.status(LEADS, batch.batch_id)
    assert batch.status == again.status == "Failed"
    assert batch.message.startswith("Import failed")
    assert client.calls_by_operation["importLeadUsingPOST"] == 1
    assert [(j["status"], j["started_at"]) for j in sim.jobs()] == [("Failed", None)]


async def test_603_is_kept_per_permission_until_a_call_needing_it_succeeds(
    make_simulator: Any, tmp_path: Path
) -> None:
    """Issue 19, item 4: 603 raises AccessDeniedError (a CredentialsError: work waits);
    the client remembers which permission was refused, and forgets it only when a
    call needing that permission succeeds, not when another object's call does."""
    sim = await make_simulator(**FAST, permissions="leads")
    cars = write(tmp_path, "cars.csv", "vin,color\nV1,red\n")
    async with make_client(sim) as client:
        with pytest.raises(AccessDeniedError) as caught:
            await client.submit(CARS, cars, "csv")
        assert isinstance(caught.value, CredentialsError)
        [refusal] = client.access.refusals
        assert (refusal.what, refusal.code) == ("Read-Write Custom Object", "603")
        assert "Read-Write Custom Object" in (client.access.problem or "")
        assert "allow-list" in refusal.message

        await submitted(client, sim, tmp_path)  # leads are granted
        assert [r.what for r in client.access.refusals] == ["Read-Write Custom Object"]
        with pytest.raises(AccessDeniedError):
            await client.status(CARS, 1)
        [again] = client.access.refusals
        assert (again.what, again.since) == (refusal.what, refusal.since), "learnt then"
        assert "getImportCustomObjectStatusUsingGET" in again.message

        sim.set_knobs(permissions="leads,customobjects")
        await client.submit(CARS, cars, "csv")
        assert client.access.refusals == []
        assert client.access.problem is None


async def test_late_create_answer_made_a_job_the_client_did_not_repeat(
    make_simulator: Any, tmp_path: Path
) -> None:
    """Item 1: the simulator made the job, then answered past the read timeout."""
    sim = await make_simulator(**FAST, late_reply_fraction=1.0, late_reply_seconds=1.0)
    async with make_client(sim, timeout=0.3) as client:
        with pytest.raises(UnknownOutcomeError):
            await client.submit(LEADS, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
    assert [j["owner"] for j in sim.jobs()] == [CLIENT_ID]


async def test_create_that_never_connected_is_retried(tmp_path: Path) -> None:
    """Item 1: no connection, no job: the create is retried like any other call."""
    port = free_port()  # nothing listens there
    settings = Settings(
        marketo=MarketoSettings(
            base_url=f"http://127.0.0.1:{port}",
            identity_url="",
            client_id=CLIENT_ID,
            client_secret=Secret(SECRET),
            request_timeout=1.0,
        ),
        backoff=BACKOFF,
    )
    rec = Recorder()
    client = MarketoClient(settings, observer=rec, sleep=rec.sleep, max_attempts=3)
    client._tokens._token = Token("t", time.monotonic() + 3600, 1)  # skip identity
    async with client:
        with pytest.raises(TransientError) as caught:
            await client.submit(LEADS, write(tmp_path, "a.csv", GOOD_LEADS), "csv")
    assert not isinstance(caught.value, UnknownOutcomeError)
    assert caught.value.code == "network"
    assert client.calls_by_operation["importLeadUsingPOST"] == 3


def small_send_buffer(addr_info: Any) -> socket.socket:
    """A client socket whose send buffer cannot hide a slow reader (loopback's is 4 MB)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536)
    return sock


async def test_upload_that_keeps_progressing_is_not_cut_off_by_request_timeout(
    tmp_path: Path,
) -> None:
    """Item 1: request_timeout bounds silence, not the length of an upload. The
    simulator reads the body at 500 kB/s (a slow uplink; small socket buffers on both
    ends so the pace is felt at once): 3 MB take about 6 s, twice request_timeout,
    and the upload is neither cut off nor sent twice. A total timeout (the old
    client) gives up half way. Once the body is out, the answer must still come
    within request_timeout: the buffers' tail (about 1 s at this pace) and the
    simulator reading the job's rows. The rows are long and few (6,000) so that on a
    busy machine the second stays small; 120,000 short ones took longer than that."""
    sim = Simulator(SimulatorConfig(**FAST, read_bytes_per_second=500_000.0))
    await sim.start(receive_buffer=65_536)
    try:
        title = "t" * 480
        rows = "".join(f"slow{i:07d}@example.com,{title}\n" for i in range(6_000))
        big = write(tmp_path, "big.csv", "email,title\n" + rows)  # about 3 MB
        async with make_client(sim, timeout=3.0, socket_factory=small_send_buffer) as client:
            batch = await client.submit(LEADS, big, "csv")
        assert batch.batch_id > 0
        create = next(c for c in sim.calls() if c["operation"] == "importLeadUsingPOST")
        assert create["duration"] > 3.0, "the upload took longer than request_timeout"
        assert client.calls_by_operation["importLeadUsingPOST"] == 1
        assert len(sim.jobs()) == 1
    finally:
        await sim.stop()


async def test_stalled_upload_is_cut_off_and_retried_as_not_executed(tmp_path: Path) -> None:
    """Item 1: an upload that makes no progress for request_timeout is cut off; its body
    never got through, so Marketo cannot have made the job: a plain retry, no unknown
    outcome, no job."""
    sim = Simulator(SimulatorConfig(**FAST, read_bytes_per_second=1.0))  # reads all but stop
    await sim.start(receive_buffer=65_536)
    try:
        rows = "".join(f"stall{i:07d}@example.com\n" for i in range(120_000))
        big = write(tmp_path, "big.csv", "email\n" + rows)  # about 3 MB: far more than buffers
        rec = Recorder()
        async with make_client(
            sim, rec, timeout=0.5, max_attempts=2, socket_factory=small_send_buffer
        ) as client:
            with pytest.raises(TransientError) as caught:
                await client.submit(LEADS, big, "csv")
        assert not isinstance(caught.value, UnknownOutcomeError)
        assert caught.value.code == "timeout"
        assert client.calls_by_operation["importLeadUsingPOST"] == 2
        assert len(rec.sleeps) == 1
        assert sim.jobs() == []
    finally:
        await sim.stop()


async def test_retries_give_up_after_max_attempts(make_simulator: Any, tmp_path: Path) -> None:
    sim = await make_simulator(**FAST)
    rec = Recorder()
    async with make_client(sim, rec, max_attempts=3) as client:
        batch_id = await submitted(client, sim, tmp_path)
        sim.set_knobs(fault_500=1.0)
        with pytest.raises(TransientError) as caught:
            await client.status(LEADS, batch_id)
    assert caught.value.code == "http-500"
    assert len(rec.sleeps) == 2
    assert_backoff(rec.sleeps)


# -- Errors raised at once --------------------------------------------------------


async def test_fatal_errors_surface_with_their_code(make_simulator: Any, tmp_path: Path) -> None:
    sim = await make_simulator(**FAST)
    rec = Recorder()
    async with make_client(sim, rec) as client:
        with pytest.raises(FatalError) as bad_format:
            await client.import_leads(write(tmp_path, "a.csv", GOOD_LEADS), "xml")
        cars = await client.submit(CARS, write(tmp_path, "c.csv", "vin\nV9\n"), "csv")
        with pytest.raises(FatalError) as wrong_name:
            await client.custom_object_import_status("boat_c", cars.batch_id)
    assert (bad_format.value.code, wrong_name.value.code) == ("1003", "1003")
    assert bad_format.value.operation == "importLeadUsingPOST"
    assert rec.sleeps == []


async def test_queue_full_and_import_in_progress_are_not_retried(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = await make_simulator(job_overhead=30.0)
    rec = Recorder()
    file = write(tmp_path, "a.csv", GOOD_LEADS)
    async with make_client(sim, rec) as client:
        await client.import_leads(file, "csv", list_id=5)
        with pytest.raises(ImportInProgressError) as in_progress:
            await client.import_leads(file, "csv", list_id=5)
        sim.add_foreign_jobs(10, 60.0)
        with pytest.raises(QueueFullError) as full:
            await client.import_leads(file, "csv")
    assert (in_progress.value.code, full.value.code) == ("1019", "1016")
    assert rec.sleeps == []
    assert client.calls_by_operation["importLeadUsingPOST"] == 3


async def test_too_large_chunk_is_reported_as_our_bug(make_simulator: Any, tmp_path: Path) -> None:
    sim = await make_simulator(max_file_bytes=1000)
    rec = Recorder()
    big = write(tmp_path, "big.csv", "email\n" + "z@example.com\n" * 100)
    async with make_client(sim, rec) as client:
        with pytest.raises(ChunkTooLargeError) as caught:
            await client.submit(LEADS, big, "csv")
    assert caught.value.code == "http-413"
    assert "a bug in the splitter" in str(caught.value)
    assert rec.sleeps == []


# -- Limits ----------------------------------------------------------------------


class SendOrder(Recorder):
    """A Recorder that also lists, in order, each request the limiter let go ("sent"),
    beside the events a test adds to the same list. Its sleeps never end: a call that
    waits for the window waits for good (the test cancels it)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def api_call(self, operation: str) -> None:
        super().api_call(operation)
        self.events.append("sent")

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.Event().wait()


async def test_limiter_holds_window_and_in_flight_cap(make_simulator: Any, tmp_path: Path) -> None:
    """Five calls per window and three at once, told by counts and order, never by how
    fast the calls went: of eight status calls, three go out before any is answered, no
    fourth goes beside them, five go in all, and three wait for a window that outlasts
    the test."""
    sim = await make_simulator(**FAST)
    async with make_client(sim) as setup:
        batch_id = await submitted(setup, sim, tmp_path)
    rec = SendOrder()
    async with make_client(
        sim, rec, api_calls_per_window=5, api_window_seconds=3600.0, concurrent_api_calls=3
    ) as client:
        await client.ensure_token()  # identity calls stay out of the window
        rec.events.clear()
        first = len(sim.calls())

        async def status() -> BatchStatus:
            batch = await client.status(LEADS, batch_id)
            rec.events.append("answered")  # before the limiter's next call can go
            return batch

        calls = [asyncio.create_task(status()) for _ in range(8)]
        try:
            await wait_until(lambda: rec.events.count("answered") >= 5, "five answers")
            answered = [call.result() for call in calls if call.done()]
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
    assert [batch.batch_id for batch in answered] == [batch_id] * 5
    assert rec.events.count("sent") == len(sim.calls()[first:]) == 5  # three still wait
    assert rec.events[:3] == ["sent"] * 3
    in_flight = list(accumulate(1 if event == "sent" else -1 for event in rec.events))
    assert max(in_flight) == 3, rec.events
    assert sim.stats()["max_in_flight"] <= 3


@pytest.mark.parametrize(
    ("now", "to_midnight"),
    [
        (dt.datetime(2026, 11, 23, 20, 0, tzinfo=dt.UTC), 10 * 3600),  # 14:00 CST
        # 15:00 CDT: Chicago midnight is 05:00 UTC, "12:00AM CST" read as UTC-6 is
        # 06:00 UTC; the pause ends at the later of the two.
        (dt.datetime(2026, 7, 1, 20, 0, tzinfo=dt.UTC), 10 * 3600),
    ],
)
async def test_quota_607_pauses_until_midnight_in_chicago(
    make_simulator: Any, tmp_path: Path, now: dt.datetime, to_midnight: int
) -> None:
    sim = await make_simulator(**FAST)
    rec = Recorder(lambda _n, _s: sim.set_knobs(daily_quota=constants.DAILY_QUOTA))
    async with make_client(sim, rec, wall_clock=lambda: now) as client:
        batch_id = await submitted(client, sim, tmp_path)
        sim.set_knobs(daily_quota=len(sim.calls()) - identity_calls(sim))  # spent
        batch = await client.status(LEADS, batch_id)
        assert client.calls_today == 1  # the new quota day began with this call
    assert batch.batch_id == batch_id
    assert rec.sleeps == [to_midnight]
    assert rec.errors == ["607"]
    assert rec.backoffs == [("quota", to_midnight)]


class WallClock:
    """A wall clock shared by the client and the simulator, moved by the client's sleeps."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def sleep(self, _n: int, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("reset_utc", "sleeps"),
    [
        ("05:00", [10 * 3600]),  # the quota resets at Chicago midnight (CDT)
        ("06:00", [10 * 3600]),  # the quota resets at midnight UTC-6 ("CST" all year)
        ("06:10", [10 * 3600, 300, 300]),  # later than both: probe every five minutes
    ],
    ids=["chicago-midnight", "fixed-cst", "late-reset-probed"],
)
async def test_quota_607_resumes_at_the_later_reading_and_probes_if_607_comes_back(
    make_simulator: Any, tmp_path: Path, reset_utc: str, sleeps: list[float]
) -> None:
    """Item 3: a 607 on a summer afternoon pauses until 06:00 UTC, whichever clock the
    subscription's quota follows; if 607 comes back, the client probes every few
    minutes instead of pausing another day."""
    clock = WallClock(dt.datetime(2026, 7, 1, 20, 0, tzinfo=dt.UTC))  # 15:00 CDT
    sim = await make_simulator(**FAST, quota_reset_utc=reset_utc)
    sim.wall_clock = clock
    rec = Recorder(clock.sleep)
    async with make_client(sim, rec, wall_clock=clock) as client:
        batch_id = await submitted(client, sim, tmp_path)
        sim.set_knobs(daily_quota=len(sim.calls()) - identity_calls(sim))  # spent today
        batch = await client.status(LEADS, batch_id)
    assert batch.batch_id == batch_id
    assert rec.sleeps == sleeps
    assert rec.errors == ["607"] * len(sleeps)


# -- Shared limits (item 4) ----------------------------------------------------------


async def test_606_from_another_integration_holds_every_call_for_a_full_window(
    make_simulator: Any, tmp_path: Path
) -> None:
    """Item 4: another integration filled the subscription's window; after the 606
    nothing is sent until a whole api_window_seconds has passed, not after a backoff
    of milliseconds that would meet 606 again."""
    sim = await make_simulator(**FAST, rate_window=2.0)
    now = [0.0]  # the client's clock: only its own sleeps move it

    def slept(_n: int, seconds: float) -> None:
        now[0] += seconds
        sim.set_knobs(foreign_calls_per_window=0)

    rec = Recorder(slept)
    async with make_client(sim, rec, api_window_seconds=2.0, clock=lambda: now[0]) as client:
        batch_id = await submitted(client, sim, tmp_path)
        sim.set_knobs(foreign_calls_per_window=sim.config.rate_limit)  # someone else's calls
        await asyncio.gather(*(client.status(LEADS, batch_id) for _ in range(3)))
    assert "606" in rec.errors
    assert rec.sleeps
    assert rec.sleeps == [2.0] * len(rec.sleeps)  # a whole window, not a backoff
    assert [reason for reason, _ in rec.backoffs] == ["606"] * len(rec.backoffs)


# -- Tokens for uploads (item 5) -------------------------------------------------------


async def test_fresh_start_waits_out_a_token_with_thirty_seconds_left() -> None:
    """Item 5: a token is used only with at least a minute of life left, also on the
    first request of a fresh process (no earlier answer to compare with)."""
    now = [0.0]
    answers = [Grant("tok-old", 30), Grant("tok-new", 3600)]
    waits: list[float] = []

    async def fetch() -> Grant:
        return answers.pop(0)

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    source = TokenSource(fetch, clock=lambda: now[0], sleep=sleep)
    token = await source.get()
    assert token.value == "tok-new"
    assert len(waits) == 1
    assert 30 <= waits[0] <= 31


async def test_upload_needs_a_token_that_outlives_its_expected_time() -> None:
    """Item 5: the minimum life is max(60 s, the upload's expected time)."""
    now = [0.0]
    answers = [Grant("tok-a", 100), Grant("tok-b", 3600)]

    async def fetch() -> Grant:
        return answers.pop(0)

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    source = TokenSource(fetch, clock=lambda: now[0], sleep=sleep)
    assert (await source.get()).value == "tok-a"  # 100 s left: enough for a status call
    assert (await source.get(min_life=120.0)).value == "tok-b"  # not for a 120 s upload


# -- Envelopes and headers (item 2) ------------------------------------------------------


async def test_request_id_on_errors_and_user_agent_on_requests(
    make_simulator: Any, tmp_path: Path
) -> None:
    """Item 2: Marketo's requestId travels with every error (Adobe support asks for it);
    every request says who we are."""
    sim = await make_simulator(**FAST)
    seen: list[str] = []

    @web.middleware
    async def agent(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.headers.get("User-Agent", ""))
        response: web.StreamResponse = await handler(request)
        return response

    app = sim.make_app()
    app.middlewares.append(agent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        settings = replace(
            make_settings(sim),
            marketo=replace(make_settings(sim).marketo, base_url=f"http://127.0.0.1:{port}"),
        )
        async with MarketoClient(settings, sleep=Recorder().sleep) as client:
            with pytest.raises(FatalError) as caught:
                await client.import_leads(write(tmp_path, "a.csv", GOOD_LEADS), "xml")
    finally:
        await runner.cleanup()
    assert caught.value.request_id
    assert f"request id {caught.value.request_id}" in str(caught.value)
    assert seen
    assert set(seen) == {f"marketo-orchestrator/{orchestrator.__version__}"}


# -- Secrets -----------------------------------------------------------------------


async def test_secret_and_tokens_never_in_logs_or_errors(
    make_simulator: Any, tmp_path: Path
) -> None:
    sim = await make_simulator(**FAST)
    rec = Recorder(
        on_sleep=lambda _n, _s: sim.set_knobs(fault_611=0.0),
        on_error=lambda _code: sim.set_knobs(fault_602=0.0),
    )
    messages: list[str] = []
    with structlog.testing.capture_logs() as logs:
        async with make_client(sim, rec) as client:
            batch_id = await submitted(client, sim, tmp_path)
            sim.set_knobs(fault_602=1.0)
            await client.status(LEADS, batch_id)
            sim.set_knobs(fault_611=1.0)
            await client.status(LEADS, batch_id)
            with pytest.raises(FatalError) as caught:
                await client.custom_object_import_status("car_c", batch_id)
            messages.append(str(caught.value) + repr(caught.value) + repr(client))
    text = repr(logs) + "".join(messages)
    assert logs, "expected log lines to search"
    assert any(entry["log_level"] == "warning" for entry in logs)
    for secret in [SECRET, *sim.tokens()]:
        assert secret not in text
