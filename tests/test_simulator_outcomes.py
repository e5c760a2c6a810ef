"""The simulator's creates, status calls and permissions where Marketo's docs say they
are hard (issue 19, items 2 and 3): a 502 after the job was made, a create answered
`Failed`, a batch id forgotten, and an API role without the permission a call needs.

Raw HTTP against the simulator on loopback, the way a careful client talks to it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from orchestrator.simulator import Simulator, SimulatorConfig
from tests.support.simulators import FAST_KNOBS, MakeSimulator
from tests.support.waiting import wait_until

LEADS_CSV = b"email,firstName\na@example.com,Ann\nb@example.com,Bob\n"
CARS_CSV = b"vin,color\nV1,red\n"
MEMBERS_CSV = b"email,firstName\nm@example.com,Max\n"
LEADS = "/bulk/v1/leads.json"
CARS = "/bulk/v1/customobjects/car_c/import.json"
MEMBERS = "/bulk/v1/program/1001/members/import.json"


class Client:
    """Bearer token in the header, nothing else: enough to read the simulator's answers."""

    def __init__(self, session: aiohttp.ClientSession, sim: Simulator) -> None:
        self.session = session
        self.base = sim.base_url
        self.headers: dict[str, str] = {}

    async def token(self) -> None:
        form = {"client_id": "c", "client_secret": "s", "grant_type": "client_credentials"}
        async with self.session.post(f"{self.base}/identity/oauth/token", data=form) as resp:
            self.headers = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}

    async def create(self, path: str, data: bytes, fmt: str = "csv", **params: str) -> Any:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(data), filename="data.csv", content_type="text/csv")
        params = {"format": fmt, **params}
        async with self.session.post(
            f"{self.base}{path}", params=params, data=form, headers=self.headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def get(self, path: str) -> Any:
        async with self.session.get(f"{self.base}{path}", headers=self.headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


def code_of(body: dict[str, Any]) -> str | None:
    return None if body["success"] else str(body["errors"][0]["code"])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def connect(make_simulator: MakeSimulator, session: Any, **knobs: Any) -> tuple[Any, Client]:
    sim = await make_simulator(**FAST_KNOBS, **knobs)
    client = Client(session, sim)
    await client.token()
    return sim, client


async def test_502_after_create_makes_the_job_and_hides_it(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    sim, client = await connect(make_simulator, session, fault_502_after_create=1.0)
    body = await client.create(LEADS, LEADS_CSV)
    assert code_of(body) == "502"
    assert body["errors"][0]["message"] == "Bad gateway"
    [job] = sim.jobs()
    [create] = [c for c in sim.calls() if c["operation"] == "importLeadUsingPOST"]
    assert (create["code"], create["batch_id"]) == ("502", job["batch_id"])
    assert create["digest"] == hashlib.sha256(LEADS_CSV).hexdigest()
    final = await wait_until(
        lambda: sim.jobs()[0]["status"] == "Complete", "the hidden job to import", within=10
    )
    assert final
    assert len(sim.records("leads")) == 2, "its rows landed"


@pytest.mark.parametrize(
    ("path", "data", "fmt", "message"),
    [
        (LEADS, LEADS_CSV, "csv", True),
        (CARS, CARS_CSV, "csv", True),
        (MEMBERS, MEMBERS_CSV, "CSV", False),  # Adobe's create answer has no message
    ],
    ids=["leads", "customobject", "programmembers"],
)
async def test_create_answered_failed_makes_no_job(
    make_simulator: MakeSimulator,
    session: aiohttp.ClientSession,
    path: str,
    data: bytes,
    fmt: str,
    message: bool,
) -> None:
    params = {"programMemberStatus": "Registered"} if path == MEMBERS else {}
    sim, client = await connect(make_simulator, session, create_failed_fraction=1.0, max_queued=1)
    body = await client.create(path, data, fmt, **params)
    [result] = body["result"]
    assert result["status"] == "Failed"
    assert ("message" in result) is message
    status_path = {
        LEADS: f"/bulk/v1/leads/batch/{result['batchId']}.json",
        CARS: f"/bulk/v1/customobjects/car_c/import/{result['batchId']}/status.json",
        MEMBERS: f"/bulk/v1/program/members/import/{result['batchId']}/status.json",
    }[path]
    status = (await client.get(status_path))["result"][0]
    assert status["status"] == "Failed"
    assert [(j["status"], j["started_at"]) for j in sim.jobs()] == [("Failed", None)]
    # It took no queue slot: with room for one job, the next create still queues.
    sim.set_knobs(create_failed_fraction=0.0)
    assert (await client.create(path, data, fmt, **params))["result"][0]["status"] == "Queued"


async def test_a_forgotten_batch_answers_610_for_status_and_files(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    """Marketo keeps a batch id seven days; the knob forgets it after seconds."""
    sim, client = await connect(make_simulator, session)
    batch_id = (await client.create(LEADS, b"email\nnot-an-email\n"))["result"][0]["batchId"]
    status = f"/bulk/v1/leads/batch/{batch_id}.json"

    async def complete() -> bool:
        return bool((await client.get(status))["result"][0]["status"] == "Complete")

    await wait_until(complete, "the job to complete", within=10)
    sim.set_knobs(forget_batches_after=0.001)
    for path in (status, f"/bulk/v1/leads/batch/{batch_id}/failures.json"):
        body = await client.get(path)
        assert code_of(body) == "610"
        assert body["errors"][0]["message"] == "Requested resource not found"
    assert code_of(await client.get("/bulk/v1/leads/batch/99999.json")) == "1003"


@pytest.mark.parametrize(
    ("permissions", "allowed"),
    [
        ("leads,customobjects", {"leads", "cars", "members"}),
        ("leads", {"leads", "members"}),  # program members need Read-Write Lead
        ("customobjects", {"cars"}),
        ("leads:read,customobjects:read", set()),  # Read-Only imports nothing
        ("", set()),  # as an IP allow-list that refuses the caller
    ],
)
async def test_bulk_calls_need_the_read_write_permission_of_their_object(
    make_simulator: MakeSimulator,
    session: aiohttp.ClientSession,
    permissions: str,
    allowed: set[str],
) -> None:
    sim, client = await connect(make_simulator, session, permissions=permissions)
    calls = {
        "leads": (client.create(LEADS, LEADS_CSV), "/bulk/v1/leads/batch/1.json"),
        "cars": (
            client.create(CARS, CARS_CSV),
            "/bulk/v1/customobjects/car_c/import/1/status.json",
        ),
        "members": (
            client.create(MEMBERS, MEMBERS_CSV, "CSV", programMemberStatus="Registered"),
            "/bulk/v1/program/members/import/1/status.json",
        ),
    }
    for name, (create, status_path) in calls.items():
        created, status = await create, await client.get(status_path)
        if name in allowed:
            assert code_of(created) is None, (name, created)
            assert code_of(status) == "1003", "past the permission: batch 1 is not found"
        else:
            assert (code_of(created), code_of(status)) == ("603", "603"), name
            assert created["errors"][0]["message"] == "Access denied"
    assert sum(1 for j in sim.jobs()) == len(allowed)


def test_permissions_knob_names_only_known_grants() -> None:
    assert SimulatorConfig().grants == {"leads", "customobjects"}
    assert SimulatorConfig(permissions=" leads , leads:read").grants == {"leads", "leads:read"}
    with pytest.raises(ValueError, match="'permissions' grants opportunities"):
        SimulatorConfig().with_knobs(permissions="leads,opportunities")
    with pytest.raises(ValueError, match="fraction"):
        SimulatorConfig().with_knobs(fault_502_after_create=2.0)
    with pytest.raises(ValueError, match="negative"):
        SimulatorConfig().with_knobs(forget_batches_after=-1.0)
