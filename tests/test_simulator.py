"""The bundled Marketo simulator, driven over real sockets with a plain aiohttp client."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from orchestrator.errors import ConfigError
from orchestrator.models import ObjectType
from orchestrator.simulator import (
    Simulator,
    SimulatorConfig,
    add_arguments,
    config_from_args,
    serve,
)
from orchestrator.simulator.queue import JobQueue, ParsedFile, parse_upload
from orchestrator.simulator.records import JobSpec
from orchestrator.simulator.state import restore, snapshot
from tests.support.simulators import FAST_KNOBS, MakeSimulator
from tests.support.waiting import wait_until

LEADS_CSV = (
    b"firstName,lastName,email\n"
    b"Able,Baker,able@example.com\n"
    b"Charlie,Dog,charlie@example.com\n"
    b"Easy,Fox,easy@example.com\n"
)
LEADS_PATH = "/bulk/v1/leads.json"
CUSTOM_PATH = "/bulk/v1/customobjects/car_c/import.json"
MEMBERS_PATH = "/bulk/v1/program/1001/members/import.json"


class Client:
    """Talks to the simulator the way a careful client does: bearer header only."""

    def __init__(
        self, session: aiohttp.ClientSession, simulator: Simulator, client_id: str = "client-1"
    ) -> None:
        self.session = session
        self.base = simulator.base_url
        self.client_id = client_id
        self.access_token = ""

    async def token(self, secret: str = "s3cret") -> dict[str, Any]:
        form = {
            "client_id": self.client_id,
            "client_secret": secret,
            "grant_type": "client_credentials",
        }
        async with self.session.post(f"{self.base}/identity/oauth/token", data=form) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
        self.access_token = body["access_token"]
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        async with self.session.get(
            f"{self.base}{path}", params=params, headers=self.headers()
        ) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
        return body

    async def upload(
        self,
        path: str,
        data: bytes,
        params: dict[str, str] | None = None,
        extra_fields: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        for name, value in (extra_fields or {}).items():
            form.add_field(name, value)
        form.add_field("file", io.BytesIO(data), filename="data.csv", content_type="text/csv")
        async with self.session.post(
            f"{self.base}{path}", params=params or {}, data=form, headers=self.headers()
        ) as response:
            await response.read()
        return response

    async def create(self, path: str, data: bytes, **params: str) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(data), filename="data.csv", content_type="text/csv")
        async with self.session.post(
            f"{self.base}{path}", params=params, data=form, headers=self.headers()
        ) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
        return body

    async def batch(self, path: str, data: bytes, **params: str) -> int:
        body = await self.create(path, data, **params)
        assert body["success"], body
        batch_id: int = body["result"][0]["batchId"]
        return batch_id

    async def wait_final(self, status_path: str, within: float = 5.0) -> dict[str, Any]:
        async def final() -> dict[str, Any] | None:
            result: dict[str, Any] = (await self.get(status_path))["result"][0]
            return result if result["status"] in ("Complete", "Failed") else None

        return await wait_until(final, f"{status_path} to be final", within=within)


def error_code(body: dict[str, Any]) -> str | None:
    return None if body["success"] else str(body["errors"][0]["code"])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(session: aiohttp.ClientSession, simulator: Simulator) -> Client:
    client = Client(session, simulator)
    await client.token()
    return client


# -- the plain flow ------------------------------------------------------------


async def test_curl_like_flow_completes_within_two_seconds_with_default_knobs(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator()
    client = Client(session, simulator)
    token = await client.token()
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 3600
    created = await client.create(LEADS_PATH, LEADS_CSV, format="csv")
    assert re.fullmatch(r"[0-9a-f]+#[0-9a-f]+", created["requestId"])
    assert created["success"] is True
    assert created["errors"] == []
    batch_id = created["result"][0]["batchId"]
    assert created["result"] == [
        {"batchId": batch_id, "importId": str(batch_id), "status": "Queued"}
    ]

    status = await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json", within=30.0)

    assert status == {
        "batchId": batch_id,
        "importId": str(batch_id),
        "status": "Complete",
        "numOfLeadsProcessed": 3,
        "numOfRowsFailed": 0,
        "numOfRowsWithWarning": 0,
        "message": "Import succeeded, 3 records imported (3 members)",
    }
    emails = sorted(lead["email"] for lead in simulator.records("leads"))
    assert emails == ["able@example.com", "charlie@example.com", "easy@example.com"]


# -- tokens --------------------------------------------------------------------


async def test_token_is_reused_while_alive_then_replaced_and_the_old_one_expires(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(token_ttl=1.5, **FAST_KNOBS)
    client = Client(session, simulator)
    first = await client.token()
    assert first["expires_in"] == 2

    async def same_token_less_life() -> dict[str, Any] | None:
        again = await client.token()
        return again if again["expires_in"] == 1 else None

    again = await wait_until(same_token_less_life, "the same token, a second older", within=30.0)
    assert again["access_token"] == first["access_token"]

    async def new_token() -> dict[str, Any] | None:
        body = await client.token()
        return body if body["access_token"] != first["access_token"] else None

    second = await wait_until(new_token, "a new token", within=30.0)
    batch_id = await client.batch(LEADS_PATH, LEADS_CSV, format="csv")
    client.access_token = first["access_token"]
    expired = await client.get(f"/bulk/v1/leads/batch/{batch_id}.json")
    assert expired["errors"] == [{"code": "602", "message": "Access token expired"}]
    assert simulator.tokens() == [first["access_token"], second["access_token"]]
    assert simulator.stats()["tokens_issued"] == 2


async def test_missing_or_unknown_token_is_601(
    simulator: Simulator, session: aiohttp.ClientSession
) -> None:
    client = Client(session, simulator)
    assert error_code(await client.get("/bulk/v1/leads/batch/1001.json")) == "601"
    client.access_token = "not-a-token"
    body = await client.get("/bulk/v1/leads/batch/1001.json")
    assert body["errors"] == [{"code": "601", "message": "Access token invalid"}]
    assert body["success"] is False
    assert body["result"] == []


async def test_token_in_query_string_is_refused_and_recorded(
    simulator: Simulator, client: Client
) -> None:
    batch_id = await client.batch(LEADS_PATH, LEADS_CSV, format="csv")
    path = f"/bulk/v1/leads/batch/{batch_id}.json"
    assert error_code(await client.get(path)) is None  # header only: fine

    with_query = await client.get(path, access_token=client.access_token)
    header = client.access_token
    client.access_token = ""
    query_only = await client.get(path, access_token=header)

    assert error_code(with_query) == "601"
    assert error_code(query_only) == "601"
    stats = simulator.stats()
    assert stats["violations"] == ["token_in_url", "token_in_url"]
    assert stats["violation_details"][0]["client_id"] == "client-1"
    log = json.dumps(simulator.calls())
    assert header not in log
    assert simulator.calls()[-1]["query_keys"] == ["access_token"]


async def test_token_in_a_form_field_is_refused_and_recorded(
    simulator: Simulator, client: Client
) -> None:
    response = await client.upload(
        LEADS_PATH, LEADS_CSV, {"format": "csv"}, {"access_token": client.access_token}
    )
    body = json.loads(await response.text())
    assert error_code(body) == "601"
    assert simulator.stats()["violations"] == ["token_in_form"]
    assert simulator.jobs() == []
    assert simulator.calls()[-1]["form_keys"] == ["access_token", "file"]


async def test_identity_checks_credentials_and_counts_toward_no_limit(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(client_id="client-1", client_secret="s3cret", rate_limit=1)
    url = f"{simulator.base_url}/identity/oauth/token"
    good = {"client_id": "client-1", "client_secret": "s3cret", "grant_type": "client_credentials"}

    async with session.post(url, data={**good, "client_secret": "wrong"}) as response:
        assert response.status == 401
        assert await response.json() == {
            "error": "unauthorized",
            "error_description": "Bad client credentials",
        }
    async with session.post(
        url, data={"client_id": "client-1", "client_secret": "s3cret"}
    ) as response:
        assert response.status == 400
    async with session.get(url, params=good) as response:  # accepted, but the secret was in a URL
        token = (await response.json())["access_token"]
    assert simulator.stats()["violations"] == ["secret_in_url"]

    client = Client(session, simulator)
    await client.token()  # a form body: no violation
    assert client.access_token == token
    assert error_code(await client.get("/bulk/v1/leads/batch/1001.json")) == "1003"
    assert simulator.stats()["calls"] == {"identity": 4, "getImportLeadStatusUsingGET": 1}
    assert "s3cret" not in json.dumps(simulator.calls()) + json.dumps(simulator.stats())
    assert "s3cret" not in repr(simulator.config)


# -- the queue -----------------------------------------------------------------


async def test_queue_is_shared_two_importing_ten_outstanding_then_1016(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(job_overhead=60.0)
    client = Client(session, simulator)
    await client.token()
    ids = [await client.batch(LEADS_PATH, LEADS_CSV, format="csv") for _ in range(4)]
    ids += [await client.batch(CUSTOM_PATH, b"vin,color\nV1,red\n", format="csv") for _ in range(3)]
    ids += [
        await client.batch(MEMBERS_PATH, LEADS_CSV, format="CSV", programMemberStatus="Registered")
        for _ in range(3)
    ]
    assert ids == list(range(1001, 1011))

    eleventh = await client.create(CUSTOM_PATH, b"vin\nV2\n", format="csv")

    assert eleventh["errors"] == [{"code": "1016", "message": "Too many imports"}]
    statuses = {job["batch_id"]: job["status"] for job in simulator.jobs()}
    assert [statuses[i] for i in ids] == ["Importing"] * 2 + ["Queued"] * 8
    leads_status = await client.get("/bulk/v1/leads/batch/1003.json")
    assert leads_status["result"][0]["status"] == "Queued"
    assert "message" not in leads_status["result"][0]
    stats = simulator.stats()
    assert stats["max_outstanding"] == {"client-1": 10}
    assert stats["max_importing"] == {"client-1": 2}
    assert stats["errors"] == {"1016": 1}
    assert stats["jobs"] == {"Importing": 2, "Queued": 8}


async def test_jobs_start_in_fifo_order_and_never_more_than_two_import(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(job_overhead=0.1, rows_per_second=1000.0)
    client = Client(session, simulator)
    await client.token()
    big = b"email\n" + b"".join(b"u%d@example.com\n" % i for i in range(200))
    ids = [await client.batch(LEADS_PATH, big, format="csv")]
    ids += [await client.batch(LEADS_PATH, LEADS_CSV, format="csv") for _ in range(5)]

    async def all_done() -> list[dict[str, Any]] | None:
        jobs = simulator.jobs()
        return jobs if all(job["status"] == "Complete" for job in jobs) else None

    jobs = await wait_until(all_done, "every job complete", within=30.0)

    assert [job["batch_id"] for job in jobs] == ids
    starts = [job["started_at"] for job in jobs]
    assert starts == sorted(starts)
    finishes = {job["finished_at"] for job in jobs}
    for job in jobs:  # a job waits only while both slots are busy
        assert job["started_at"] == job["queued_at"] or job["started_at"] in finishes
    events = sorted([(j["started_at"], 1) for j in jobs] + [(j["finished_at"], -1) for j in jobs])
    running, peak = 0, 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    assert peak == 2


async def test_foreign_jobs_hold_queue_and_import_slots(
    simulator: Simulator, client: Client, session: aiohttp.ClientSession
) -> None:
    foreign = simulator.add_foreign_jobs(8, 1.0)
    assert len(foreign) == 8
    first = await client.batch(LEADS_PATH, LEADS_CSV, format="csv")
    second = await client.batch(LEADS_PATH, LEADS_CSV, format="csv")
    third = await client.create(LEADS_PATH, LEADS_CSV, format="csv")
    assert error_code(third) == "1016"
    early = await client.get(f"/bulk/v1/leads/batch/{first}/failures.json")
    assert error_code(early) == "1003"  # not finished: no file yet
    assert error_code(await client.get(f"/bulk/v1/leads/batch/{foreign[0]}.json")) == "1003"

    done = await client.wait_final(f"/bulk/v1/leads/batch/{second}.json")

    assert done["status"] == "Complete"
    jobs = {job["batch_id"]: job for job in simulator.jobs()}
    held_until = jobs[foreign[0]]["queued_at"] + 1.0
    assert jobs[first]["started_at"] >= held_until - 1e-6
    assert all(jobs[i]["finished_at"] == pytest.approx(held_until) for i in foreign)
    assert simulator.stats()["max_outstanding"] == {"foreign": 8, "client-1": 2}
    async with session.post(
        f"{simulator.base_url}/_sim/foreign", json={"count": 20, "seconds": 0.1}
    ) as response:
        assert len((await response.json())["batch_ids"]) == 10  # capped at the free slots


async def test_one_outstanding_import_per_static_list(simulator: Simulator, client: Client) -> None:
    simulator.add_foreign_jobs(2, 60.0)  # both import slots busy: our jobs stay queued
    assert error_code(await client.create(LEADS_PATH, LEADS_CSV, format="csv", listId="7")) is None
    again = await client.create(LEADS_PATH, LEADS_CSV, format="csv", listId="7")
    assert again["errors"] == [{"code": "1019", "message": "Import in progress"}]
    assert error_code(await client.create(LEADS_PATH, LEADS_CSV, format="csv", listId="8")) is None
    assert error_code(await client.create(LEADS_PATH, LEADS_CSV, format="csv")) is None
    bad = await client.create(LEADS_PATH, LEADS_CSV, format="csv", listId="seven")
    assert error_code(bad) == "1003"


async def test_static_list_is_free_again_once_its_import_finished(
    simulator: Simulator, client: Client
) -> None:
    first = await client.batch(LEADS_PATH, LEADS_CSV, format="csv", listId="7")
    await client.wait_final(f"/bulk/v1/leads/batch/{first}.json")
    second = await client.batch(LEADS_PATH, b"email\nzed@example.com\n", format="csv", listId="7")
    await client.wait_final(f"/bulk/v1/leads/batch/{second}.json")
    members = sorted(lead["email"] for lead in simulator.records("lists", list_id=7))
    assert members == [
        "able@example.com",
        "charlie@example.com",
        "easy@example.com",
        "zed@example.com",
    ]


# -- limits --------------------------------------------------------------------


async def test_file_of_ten_megabytes_is_refused_with_413(
    simulator: Simulator, client: Client
) -> None:
    response = await client.upload(LEADS_PATH, b"email\n" + b"a" * 9_999_994, {"format": "csv"})
    assert response.status == 413
    assert simulator.stats()["violations"] == ["oversized_file"]
    assert simulator.jobs() == []


async def test_limit_applies_to_the_whole_request_body_not_the_file_part(
    simulator: Simulator, client: Client
) -> None:
    """Item 6: Marketo limits the request (Content-Length), multipart envelope included:
    a file part under the limit in a request that reaches it is refused."""
    simulator.set_knobs(max_file_bytes=1000)
    fits = await client.upload(LEADS_PATH, b"email\n" + b"a" * 500, {"format": "csv"})
    file_under_request_over = b"email\n" + b"a" * 900  # 906 bytes, the request more than 1000
    too_big = await client.upload(LEADS_PATH, file_under_request_over, {"format": "csv"})
    assert (fits.status, too_big.status) == (200, 413)


async def test_padded_header_fails_every_custom_object_row_as_marketo_does(
    simulator: Simulator, client: Client
) -> None:
    """Item 6: Marketo matches column names exactly; " vin" is not the dedupe field vin
    (custom-object import page: every row fails with missing.dedupe.fields)."""
    simulator.set_knobs(dedupe_field="vin")
    padded = b"color,make,model, vin\nred,bmw,2002,WBA4R7C55HK895912\n"
    batch_id = await client.batch(CUSTOM_PATH, padded, format="csv")
    status = await client.wait_final(f"/bulk/v1/customobjects/car_c/import/{batch_id}/status.json")
    assert (status["numOfObjectsProcessed"], status["numOfRowsFailed"]) == (0, 1)
    async with client.session.get(
        f"{client.base}/bulk/v1/customobjects/car_c/import/{batch_id}/failures.json",
        headers=client.headers(),
    ) as response:
        failures = list(csv.reader(io.StringIO(await response.text())))
    assert failures[1][-1] == "missing.dedupe.fields"
    clean = b"color,make,model,vin\nred,bmw,2002,WBA4R7C55HK895912\n"
    batch_id = await client.batch(CUSTOM_PATH, clean, format="csv")
    status = await client.wait_final(f"/bulk/v1/customobjects/car_c/import/{batch_id}/status.json")
    assert (status["numOfObjectsProcessed"], status["numOfRowsFailed"]) == (1, 0)


ADOBE_CARS = (
    b"color,make,model,vin\n"
    b"red,bmw,2002,WBA4R7C55HK895912\n"
    b"yellow,bmw,320i,WBA4R7C30HK896061\n"
    b"blue,bmw,325i,WBS3U9C52HP970604\n"
)


async def test_adobes_padded_vin_example_fails_all_three_rows_as_adobe_shows(
    simulator: Simulator, client: Client
) -> None:
    """Issue 19 item 4: car_c dedupes on vin, its declared dedupe field (no knob needed).
    Adobe's " vin" file fails every row with missing.dedupe.fields; deduping on the first
    column, as the simulator did, imported all three."""
    padded = ADOBE_CARS.replace(b",vin\n", b", vin\n", 1)
    batch_id = await client.batch(CUSTOM_PATH, padded, format="csv")
    base = f"/bulk/v1/customobjects/car_c/import/{batch_id}"
    status = await client.wait_final(f"{base}/status.json")
    assert (status["numOfObjectsProcessed"], status["numOfRowsFailed"]) == (0, 3)
    async with client.session.get(
        f"{client.base}{base}/failures.json", headers=client.headers()
    ) as response:
        failures = await response.text()
    assert failures == (  # Adobe's failures file, as its page shows it
        "color,make,model, vin,Import Failure Reason\n"
        "red,bmw,2002,WBA4R7C55HK895912,missing.dedupe.fields\n"
        "yellow,bmw,320i,WBA4R7C30HK896061,missing.dedupe.fields\n"
        "blue,bmw,325i,WBS3U9C52HP970604,missing.dedupe.fields\n"
    )
    assert simulator.records("customobject", api_name="car_c") == []


async def test_adobes_cars_dedupe_on_vin_not_on_the_first_column(
    simulator: Simulator, client: Client
) -> None:
    """Two red cars with different VINs are two records (the first column, color, once
    made them one); a VIN sent again updates its record."""
    two_red = ADOBE_CARS.replace(b"yellow", b"red")
    batch_id = await client.batch(CUSTOM_PATH, two_red, format="csv")
    await client.wait_final(f"/bulk/v1/customobjects/car_c/import/{batch_id}/status.json")
    assert len(simulator.records("customobject", api_name="car_c")) == 3
    again = b"color,make,model,vin\ngreen,bmw,2002,WBA4R7C55HK895912\n"
    batch_id = await client.batch(CUSTOM_PATH, again, format="csv")
    await client.wait_final(f"/bulk/v1/customobjects/car_c/import/{batch_id}/status.json")
    cars = {r["vin"]: r["color"] for r in simulator.records("customobject", api_name="car_c")}
    assert cars == {
        "WBA4R7C55HK895912": "green",
        "WBA4R7C30HK896061": "red",
        "WBS3U9C52HP970604": "blue",
    }


async def test_a_compound_dedupe_key_needs_every_field(
    simulator: Simulator, client: Client, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{simulator.base_url}/_sim/faults",
        json={
            "custom_objects": {
                "tyre_c": {
                    "fields": ["vin", "position", "brand"],
                    "dedupeFields": ["vin", "position"],
                }
            }
        },
    ) as response:
        assert response.status == 200
        assert (await response.json())["custom_objects"]["tyre_c"]["dedupeFields"] == [
            "vin",
            "position",
        ]
    path = "/bulk/v1/customobjects/tyre_c/import.json"
    tyres = b"vin,position,brand\nV1,FL,a\nV1,FR,b\nV1,FL,c\n"
    batch_id = await client.batch(path, tyres, format="csv")
    await client.wait_final(f"/bulk/v1/customobjects/tyre_c/import/{batch_id}/status.json")
    stored = simulator.records("customobject", api_name="tyre_c")
    assert sorted((r["position"], r["brand"]) for r in stored) == [("FL", "c"), ("FR", "b")]
    batch_id = await client.batch(path, b"vin,brand\nV2,a\n", format="csv")
    status = await client.wait_final(f"/bulk/v1/customobjects/tyre_c/import/{batch_id}/status.json")
    assert status["numOfRowsFailed"] == 1
    cars = await client.create(CUSTOM_PATH, b"vin\nV9\n", format="csv")
    assert error_code(cars) == "1013", "car_c is no longer declared: not found"


async def test_describe_endpoints_answer_from_the_subscriptions_field_lists(
    simulator: Simulator, client: Client
) -> None:
    leads = await client.get("/rest/v1/leads/describe2.json")
    (lead,) = leads["result"]
    assert lead["name"] == "API Lead"
    names = [f["name"] for f in lead["fields"]]
    assert {"email", "firstName", "lastName", "company", "note"} <= set(names)
    assert ["email"] in lead["searchableFields"]
    fields = {f["name"]: f for f in lead["fields"]}  # swagger's LeadAttribute2Fields
    assert fields["firstName"] == {
        "name": "firstName",
        "displayName": "firstName",
        "dataType": "string",
        "length": 255,
        "updateable": True,
        "crmManaged": False,
    }
    assert (fields["id"]["dataType"], fields["id"]["updateable"]) == ("integer", False)

    (car,) = (await client.get("/rest/v1/customobjects/car_c/describe.json"))["result"]
    assert (car["name"], car["idField"], car["dedupeFields"]) == ("car_c", "marketoGUID", ["vin"])
    assert [f["name"] for f in car["fields"]] == [
        "createdAt", "marketoGUID", "updatedAt", "color", "make", "model", "vin"
    ]  # fmt: skip
    assert car["searchableFields"] == [["vin"], ["marketoGUID"]]

    (member,) = (await client.get("/rest/v1/programs/members/describe.json"))["result"]
    assert member["dedupeFields"] == ["leadId", "programId"]
    assert "statusName" in [f["name"] for f in member["fields"]]

    missing = await client.get("/rest/v1/customobjects/bike_c/describe.json")
    assert (error_code(missing), missing["errors"][0]["message"]) == ("1013", "Object not found")
    assert [c["operation"] for c in simulator.calls() if c["path"].startswith("/rest/")] == [
        "describeUsingGET_6",
        "describeUsingGET_1",
        "describeProgramMemberUsingGET2",
        "describeUsingGET_1",
    ]

    simulator.set_knobs(lead_fields=["email", "firstName"], program_member_fields=["leadId"])
    (lead,) = (await client.get("/rest/v1/leads/describe2.json"))["result"]
    assert [f["name"] for f in lead["fields"]] == ["email", "firstName"]
    assert lead["searchableFields"] == [["email"]]


async def test_a_lead_column_marketo_does_not_know_is_ignored(
    simulator: Simulator, client: Client
) -> None:
    """Marketo drops such a column without a word: the row is stored, without it."""
    body = b"email,firstName,favouriteColour\nada@example.com,Ada,green\n"
    batch_id = await client.batch(LEADS_PATH, body, format="csv")
    status = await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json")
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (1, 0)
    assert status["numOfRowsWithWarning"] == 0
    (lead,) = simulator.records("leads")
    assert (lead["email"], lead["firstName"]) == ("ada@example.com", "Ada")
    assert "favouriteColour" not in lead


async def test_program_member_with_invalid_email_is_a_warning_as_documented(
    simulator: Simulator, client: Client
) -> None:
    """Item 6: the program-member import page shows an invalid email as a warning."""
    data = b"firstName,email\nAerys,INVALID_EMAIL\nOk,ok@example.com\n"
    batch_id = await client.batch(
        MEMBERS_PATH, data, format="CSV", programMemberStatus="Registered"
    )
    status = await client.wait_final(f"/bulk/v1/program/members/import/{batch_id}/status.json")
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (2, 0)
    assert status["numOfRowsWithWarning"] == 1
    async with client.session.get(
        f"{client.base}/bulk/v1/program/members/import/{batch_id}/warnings.json",
        headers=client.headers(),
    ) as response:
        warnings = list(csv.reader(io.StringIO(await response.text())))
    assert warnings[1] == ["Aerys", "INVALID_EMAIL", "Invalid email address"]


async def test_another_integrations_calls_take_their_share_of_both_limits(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    """Item 4: Marketo's limits are the subscription's; someone else's calls count."""
    simulator = await make_simulator(rate_limit=10, foreign_calls_per_window=8)
    client = Client(session, simulator)
    await client.token()
    path = "/bulk/v1/leads/batch/1001.json"
    codes = [error_code(await client.get(path)) for _ in range(3)]
    assert codes == ["1003", "1003", "606"]
    simulator.set_knobs(foreign_calls_per_window=0, rate_limit=100, foreign_in_flight=10)
    assert error_code(await client.get(path)) == "615"


async def test_envelope_error_codes_500_and_502(simulator: Simulator, client: Client) -> None:
    """Item 2: Marketo can put 500 or 502 in errors[] of an HTTP 200 answer."""
    path = "/bulk/v1/leads/batch/1001.json"
    simulator.set_knobs(fault_envelope_502=1.0)
    assert error_code(await client.get(path)) == "502"
    simulator.set_knobs(fault_envelope_502=0.0, fault_envelope_500=1.0)
    assert error_code(await client.get(path)) == "500"


async def test_quota_resets_at_the_configured_moment(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    """Item 3: the daily quota resets at quota_reset_utc on the simulator's wall clock."""
    simulator = await make_simulator(daily_quota=1, quota_reset_utc="06:00")
    now = [dt.datetime(2026, 7, 1, 20, 0, tzinfo=dt.UTC)]
    simulator.wall_clock = lambda: now[0]
    client = Client(session, simulator)
    await client.token()
    path = "/bulk/v1/leads/batch/1001.json"
    assert error_code(await client.get(path)) == "1003"
    assert error_code(await client.get(path)) == "607"
    now[0] = dt.datetime(2026, 7, 2, 5, 59, tzinfo=dt.UTC)  # Chicago midnight passed
    assert error_code(await client.get(path)) == "607"
    now[0] = dt.datetime(2026, 7, 2, 6, 0, tzinfo=dt.UTC)
    assert error_code(await client.get(path)) == "1003"


async def test_rate_limit_606_in_a_scaled_window(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(rate_limit=3, rate_window=0.5)
    client = Client(session, simulator)
    await client.token()
    path = "/bulk/v1/leads/batch/1001.json"
    codes = [error_code(await client.get(path)) for _ in range(4)]
    assert codes == ["1003", "1003", "1003", "606"]
    refused = await client.get(path)
    assert refused["errors"][0]["message"] == "Max rate limit '3' exceeded with in '0.5' secs"

    async def admitted() -> bool:
        return error_code(await client.get(path)) != "606"

    await wait_until(admitted, "a call admitted again", within=30.0)
    assert simulator.stats()["max_calls_in_window"] == 3


async def test_concurrency_limit_615(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(concurrency=2, slow_fraction=1.0, slow_seconds=0.5)
    client = Client(session, simulator)
    await client.token()
    bodies = await asyncio.gather(*(client.get("/bulk/v1/leads/batch/1001.json") for _ in range(4)))
    assert sorted(str(error_code(body)) for body in bodies) == ["1003", "1003", "615", "615"]
    assert simulator.stats()["max_in_flight"] in (3, 4)  # refused calls leave at once


async def test_daily_quota_607(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(daily_quota=2)
    client = Client(session, simulator)
    await client.token()
    codes = [error_code(await client.get("/bulk/v1/leads/batch/1001.json")) for _ in range(3)]
    assert codes == ["1003", "1003", "607"]


# -- rows, files and records ---------------------------------------------------


async def test_failed_and_warned_rows_go_to_files_with_reason_columns(
    simulator: Simulator, client: Client
) -> None:
    tsv = (
        b"firstName\temail\n"
        b"Ok\tok@example.com\n"
        b"Bad\tbob-at-example.com\n"
        b"Empty\t\n"
        b"__WARN__\twarn@example.com\n"
    )
    batch_id = await client.batch(LEADS_PATH, tsv, format="tsv")
    base = f"/bulk/v1/leads/batch/{batch_id}"

    status = await client.wait_final(f"{base}.json")

    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (2, 2)
    assert status["numOfRowsWithWarning"] == 1
    assert status["message"] == (
        "Import completed with errors, 2 records imported (2 members), 2 failed, 1 warning."
    )
    async with client.session.get(
        f"{client.base}{base}/failures.json", headers=client.headers()
    ) as response:
        assert response.content_type == "text/csv"
        failures = list(csv.reader(io.StringIO(await response.text()), delimiter="\t"))
    assert failures == [
        ["firstName", "email", "Import Failure Reason"],
        ["Bad", "bob-at-example.com", "Invalid email address"],
        # A Marketo expert's write-up of a lead import shows this reason for an empty email.
        ["Empty", "", "Value for lookup field 'email' not found"],
    ]
    async with client.session.get(
        f"{client.base}{base}/warnings.json", headers=client.headers()
    ) as response:
        warnings = list(csv.reader(io.StringIO(await response.text()), delimiter="\t"))
    assert warnings[0] == ["firstName", "email", "Import Warning Reason"]
    assert warnings[1][:2] == ["__WARN__", "warn@example.com"]
    assert "firstName" in warnings[1][2]
    stored = {lead["email"]: lead for lead in simulator.records("leads")}
    assert set(stored) == {"ok@example.com", "warn@example.com"}
    assert "firstName" not in stored["warn@example.com"]  # the warned value was ignored


async def test_without_keeping_records_rows_are_still_checked(
    simulator: Simulator, client: Client
) -> None:
    simulator.set_knobs(keep_records=False)
    csv_data = b"email,firstName\nok@example.com,Ok\nbob-at-example.com,Bad\n"
    batch_id = await client.batch(LEADS_PATH, csv_data, format="csv")
    base = f"/bulk/v1/leads/batch/{batch_id}"

    status = await client.wait_final(f"{base}.json")

    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (1, 1)
    assert simulator.records("leads") == []  # checked, then forgotten


async def test_no_failures_or_warnings_file_is_404(simulator: Simulator, client: Client) -> None:
    ssv = b"vin;color\nV1;red\n"
    batch_id = await client.batch(CUSTOM_PATH, ssv, format="ssv")
    base = f"/bulk/v1/customobjects/car_c/import/{batch_id}"
    status = await client.wait_final(f"{base}/status.json")
    assert status["numOfObjectsProcessed"] == 1
    for kind in ("failures", "warnings"):
        async with client.session.get(
            f"{client.base}{base}/{kind}.json", headers=client.headers()
        ) as response:
            assert response.status == 404


async def test_custom_object_failures_use_the_jobs_delimiter(
    simulator: Simulator, client: Client
) -> None:
    batch_id = await client.batch(CUSTOM_PATH, b"vin;color\n;red\nV2;blue\n", format="ssv")
    base = f"/bulk/v1/customobjects/car_c/import/{batch_id}"
    await client.wait_final(f"{base}/status.json")
    async with client.session.get(
        f"{client.base}{base}/failures.json", headers=client.headers()
    ) as response:
        text = await response.text()
    assert (
        text
        == "vin;color;Import Failure Reason\n;red;1003 Value for dedupe field 'vin' is missing\n"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "Import failed: file has no header row"),
        (b"\xff\xfe\x00bad", "Import failed: file is not valid UTF-8 (byte 0)"),
        (b"firstName\nAda\n", "Import failed: field 'email' is not a column of the file"),
    ],
)
async def test_unreadable_file_fails_the_job(
    simulator: Simulator, client: Client, body: bytes, message: str
) -> None:
    batch_id = await client.batch(LEADS_PATH, body, format="csv")
    status = await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json")
    assert (status["status"], status["message"]) == ("Failed", message)
    async with client.session.get(
        f"{client.base}/bulk/v1/leads/batch/{batch_id}/failures.json", headers=client.headers()
    ) as response:
        assert response.status == 404


async def test_records_are_inserted_or_updated_for_all_three_objects(
    simulator: Simulator, client: Client, session: aiohttp.ClientSession
) -> None:
    lead_ids = [
        await client.batch(LEADS_PATH, b"email,firstName\na@x.com,A\nb@x.com,B\n", format="csv"),
        await client.batch(LEADS_PATH, b"email,firstName\nA@X.COM,Z\n", format="csv"),
    ]
    car_ids = [
        await client.batch(CUSTOM_PATH, b"vin,color\nV1,red\nV2,blue\n", format="csv"),
        await client.batch(CUSTOM_PATH, b"vin,color\nV1,green\n", format="csv"),
    ]
    member_path = "/bulk/v1/program/members/import/{}/status.json"
    member_ids = [
        await client.batch(MEMBERS_PATH, b"email\na@x.com\n", format="CSV", programMemberStatus="Registered"),
        await client.batch(MEMBERS_PATH, b"email\nA@x.com\nc@x.com\n", format="CSV", programMemberStatus="Attended"),
    ]  # fmt: skip
    for batch_id in lead_ids:
        await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json")
    for batch_id in car_ids:
        await client.wait_final(f"/bulk/v1/customobjects/car_c/import/{batch_id}/status.json")
    for batch_id in member_ids:
        member_status = await client.wait_final(member_path.format(batch_id))
    assert set(member_status) >= {"batchId", "importId", "status", "numOfLeadsProcessed"}

    leads = simulator.records("leads")
    assert len(leads) == 2
    assert {lead["firstName"] for lead in leads} == {"Z", "B"}
    async with session.get(
        f"{simulator.base_url}/_sim/records", params={"object": "customobject", "api_name": "car_c"}
    ) as response:
        cars = {car["vin"]: car["color"] for car in await response.json()}
    assert cars == {"V1": "green", "V2": "blue"}
    members = simulator.records("programmembers", program_id=1001)
    assert {m["email"].lower(): m["programMemberStatus"] for m in members} == {
        "a@x.com": "Attended",
        "c@x.com": "Attended",
    }
    assert simulator.records("programmembers", program_id=1002) == []


async def test_lookup_field_id_only_updates(simulator: Simulator, client: Client) -> None:
    first = await client.batch(LEADS_PATH, b"email\na@x.com\n", format="csv")
    await client.wait_final(f"/bulk/v1/leads/batch/{first}.json")
    lead_id = simulator.records("leads")[0]["id"]
    body = f"id,firstName\n{lead_id},Ann\n999,Nobody\n".encode()
    second = await client.batch(LEADS_PATH, body, format="csv", lookupField="id")
    status = await client.wait_final(f"/bulk/v1/leads/batch/{second}.json")
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (1, 1)
    assert simulator.records("leads") == [{"id": lead_id, "email": "a@x.com", "firstName": "Ann"}]


# -- parameters and paths ------------------------------------------------------


async def test_format_case_and_required_parameters(simulator: Simulator, client: Client) -> None:
    """Item 6: `format` is taken in either case and defaults to CSV ("Accepts one of: CSV,
    SSV, TSV. The format defaults to CSV"); the lead page writes it in lower case, the
    program-member example `format=csv` where its list says `CSV`."""
    simulator.set_knobs(max_queued=20)  # twelve jobs: none must meet 1016
    member = {"programMemberStatus": "Registered"}
    for path, extra in ((LEADS_PATH, {}), (CUSTOM_PATH, {}), (MEMBERS_PATH, member)):
        for fmt in ("csv", "CSV", "Csv", None):
            params = {**extra, **({"format": fmt} if fmt else {})}
            assert error_code(await client.create(path, LEADS_CSV, **params)) is None, (path, fmt)
        assert error_code(await client.create(path, LEADS_CSV, format="xml", **extra)) == "1003"
    assert error_code(await client.create(MEMBERS_PATH, LEADS_CSV, format="CSV")) == "1003"
    assert len(simulator.jobs()) == 12
    async with client.session.post(
        f"{client.base}{LEADS_PATH}", params={"format": "csv"}, headers=client.headers()
    ) as response:
        no_file = await response.json()
    assert no_file["errors"] == [
        {"code": "1003", "message": "Required parameter 'file' is missing"}
    ]


async def test_status_paths_check_object_type(simulator: Simulator, client: Client) -> None:
    lead = await client.batch(LEADS_PATH, LEADS_CSV, format="csv")
    car = await client.batch(CUSTOM_PATH, b"vin\nV1\n", format="csv")
    assert (
        error_code(await client.get(f"/bulk/v1/program/members/import/{lead}/status.json"))
        == "1003"
    )
    assert (
        error_code(await client.get(f"/bulk/v1/customobjects/bike_c/import/{car}/status.json"))
        == "1003"
    )
    assert error_code(await client.get("/bulk/v1/leads/batch/99999.json")) == "1003"
    status = await client.wait_final(f"/bulk/v1/customobjects/car_c/import/{car}/status.json")
    assert status["objectApiName"] == "car_c"
    assert status["operation"] == "import"
    assert status["importTime"].endswith("second(s)")


# -- faults and the test API ---------------------------------------------------


async def test_fault_knobs_answer_5xx_error_codes_or_drop_the_connection(
    simulator: Simulator, client: Client, session: aiohttp.ClientSession
) -> None:
    path = f"{client.base}/bulk/v1/leads/batch/1001.json"
    simulator.set_knobs(fault_500=1.0)
    async with session.get(path, headers=client.headers()) as response:
        assert response.status == 500
    async with session.post(
        f"{simulator.base_url}/_sim/faults", json={"fault_500": 0, "fault_608": 1}
    ) as response:
        assert (await response.json())["fault_608"] == 1.0
    assert error_code(await client.get("/bulk/v1/leads/batch/1001.json")) == "608"
    simulator.set_knobs(fault_608=0.0, drop_fraction=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(path, headers=client.headers()) as response:
            await response.read()
    assert simulator.calls()[-1]["status"] is None
    assert simulator.calls()[-1]["dropped"] is True
    stats = simulator.stats()
    # aiohttp retries an idempotent request once when a reused connection drops.
    assert stats["dropped"] in (1, 2)
    assert (stats["http_errors"], stats["errors"]) == ({"500": 1}, {"608": 1})
    async with session.post(
        f"{simulator.base_url}/_sim/faults", json={"no_such_knob": 1}
    ) as response:
        assert response.status == 400


async def test_drop_reply_queues_the_job_but_loses_the_answer(
    simulator: Simulator, client: Client
) -> None:
    simulator.set_knobs(drop_reply_fraction=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.create(LEADS_PATH, LEADS_CSV, format="csv")
    simulator.set_knobs(drop_reply_fraction=0.0)
    assert [job["batch_id"] for job in simulator.jobs()] == [1001]
    assert simulator.calls()[-1]["batch_id"] == 1001
    assert simulator.calls()[-1]["dropped"] is True


async def test_call_log_names_operations_and_reset_clears_it(
    simulator: Simulator, client: Client, session: aiohttp.ClientSession
) -> None:
    batch_id = await client.batch(LEADS_PATH, LEADS_CSV, format="csv")
    await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json")
    async with session.get(f"{simulator.base_url}/_sim/calls") as response:
        calls = await response.json()
    assert calls[0]["operation"] == "identity"
    assert calls[0]["client_id"] == "client-1"
    create = calls[1]
    assert (create["operation"], create["batch_id"], create["status"]) == (
        "importLeadUsingPOST",
        batch_id,
        200,
    )
    assert create["query_keys"] == ["format"]
    assert create["client_id"] == "client-1"
    assert {c["operation"] for c in calls[2:]} == {"getImportLeadStatusUsingGET"}
    async with session.get(f"{simulator.base_url}/_sim/config") as response:
        assert (await response.json())["job_overhead"] == FAST_KNOBS["job_overhead"]
    async with session.post(f"{simulator.base_url}/_sim/reset") as response:
        assert response.status == 200
    assert simulator.calls() == []
    assert simulator.jobs() == []
    assert simulator.records("leads") == []
    assert error_code(await client.get(f"/bulk/v1/leads/batch/{batch_id}.json")) == "1003"


async def test_omit_empty_leaves_empty_arrays_out(
    make_simulator: MakeSimulator, session: aiohttp.ClientSession
) -> None:
    simulator = await make_simulator(omit_empty=True, **FAST_KNOBS)
    client = Client(session, simulator)
    await client.token()
    created = await client.create(LEADS_PATH, LEADS_CSV, format="csv")
    assert set(created) == {"requestId", "success", "result"}
    refused = await client.get("/bulk/v1/leads/batch/1.json")
    assert set(refused) == {"requestId", "success", "errors"}


def test_knobs_are_checked() -> None:
    config = SimulatorConfig()
    assert config.with_knobs(rate_window=2).rate_window == 2.0
    with pytest.raises(ValueError, match="unknown knob"):
        config.with_knobs(nonsense=1)
    with pytest.raises(ValueError, match="fraction"):
        config.with_knobs(fault_500=1.5)
    with pytest.raises(ValueError, match="must be int"):
        config.with_knobs(rate_limit="many")
    secret = SimulatorConfig(client_secret="hunter2")
    assert "hunter2" not in repr(secret)
    assert secret.public()["client_secret"] == "***"


async def test_cli_arguments_and_serve_until_stopped(session: aiohttp.ClientSession) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--token-ttl", "5", "--rate-limit", "7"])
    config = config_from_args(args)
    assert (args.host, config.token_ttl, config.rate_limit, config.job_overhead) == (
        "127.0.0.1",
        5.0,
        7,
        0.5,
    )
    with pytest.raises(ConfigError, match="--job-overhead"):
        config_from_args(parser.parse_args(["--job-overhead", "-1"]))

    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(serve(config, "127.0.0.1", 0, stop))
        started = await wait_until(
            lambda: [e for e in logs if "url" in e], "the start line", within=30.0
        )
        url = started[0]["url"]
        async with session.get(
            f"{url}/identity/oauth/token",
            params={"grant_type": "client_credentials", "client_id": "a", "client_secret": "b"},
        ) as response:
            assert (await response.json())["expires_in"] == 5
        stop.set()
        await asyncio.wait_for(task, timeout=5.0)
    assert "nothing goes to a real Marketo" in started[0]["event"]


# -- state across a restart (run --simulate) ------------------------------------------------


async def test_state_file_keeps_jobs_batch_ids_and_records_across_a_restart(
    tmp_path: Path,
) -> None:
    config = SimulatorConfig(job_overhead=10.0)
    queue = JobQueue(config)
    spec = JobSpec(ObjectType.LEADS, "csv")
    done = queue.submit(spec, ParsedFile(["email"], [["a@example.com"]]), "c", now=0.0)
    queue.advance(20.0)
    assert done.status == "Complete"
    later = queue.submit(spec, ParsedFile(["email"], [["b@example.com"]]), "c", now=20.0)
    assert later.status == "Importing"
    data = json.loads(json.dumps(snapshot(queue, now=25.0, wall=1000.0)))

    # Another process: its clock reads differently; 3 s passed while it was down.
    fresh = JobQueue(config)
    restore(fresh, data, now=500.0, wall=1003.0)
    assert fresh.jobs[later.batch_id].status == "Importing"
    fresh.advance(500.0 + 1.9)  # 5 s ran before the stop, 3 s while down: 2 s are left
    assert fresh.jobs[later.batch_id].status == "Importing"
    fresh.advance(500.0 + 2.1)
    assert fresh.jobs[later.batch_id].status == "Complete"
    emails = sorted(r["email"] for r in fresh.store.records("leads"))
    assert emails == ["a@example.com", "b@example.com"]
    nxt = fresh.submit(spec, ParsedFile(["email"], [["c@example.com"]]), "c", now=510.0)
    assert nxt.batch_id == later.batch_id + 1


async def test_an_unusable_state_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "simulator.json"
    path.write_text("{not json", encoding="utf-8")
    sim = Simulator(state_path=path)
    await sim.start()
    try:
        assert sim.jobs() == []
    finally:
        await sim.stop()
    assert (tmp_path / "simulator.json.bad").read_text(encoding="utf-8") == "{not json"
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1  # saved at stop


async def test_a_restart_keeps_headers_as_sent_and_warned_members(tmp_path: Path) -> None:
    """Issue 10's simulator behaviour survives run --simulate's restart: an outstanding
    job keeps its header exactly as sent (" vin" still fails every row under the
    dedupe_field knob, which the restarted process sets again: knobs are not state), and
    a finished program-member job keeps its warnings file and the warned member."""
    config = SimulatorConfig(job_overhead=10.0, max_importing=1, dedupe_field="vin")
    queue = JobQueue(config)
    members = JobSpec(ObjectType.PROGRAM_MEMBERS, "csv", program_id="1001", member_status="x")
    warned = queue.submit(
        members, ParsedFile(["email"], [["INVALID_EMAIL"], ["ok@example.com"]]), "c", now=0.0
    )
    cars = JobSpec(ObjectType.CUSTOM_OBJECT, "csv", api_name="car_c")
    padded = parse_upload(b"make, vin\nbmw,WBA4R7C55HK895912\n", ",")
    assert padded.header == ["make", " vin"]
    waiting = queue.submit(cars, padded, "c", now=0.0)
    queue.advance(10.5)
    assert (warned.status, waiting.status) == ("Complete", "Importing")
    data = json.loads(json.dumps(snapshot(queue, now=11.0, wall=1000.0)))

    fresh = JobQueue(config)
    restore(fresh, data, now=100.0, wall=1000.0)
    assert fresh.jobs[warned.batch_id].outcome == warned.outcome
    assert fresh.jobs[warned.batch_id].outcome.warned == 1
    assert len(fresh.store.records("programmembers", program_id="1001")) == 2
    fresh.advance(100.0 + 10.0)
    car_job = fresh.jobs[waiting.batch_id]
    assert (car_job.status, car_job.outcome.processed, car_job.outcome.failed) == (
        "Complete",
        0,
        1,
    )
    assert car_job.outcome.failures is not None
    assert b"missing.dedupe.fields" in car_job.outcome.failures


# -- failures and warnings files without empty values (issue 19) ------------------------------


async def test_failure_and_warning_rows_leave_out_empty_values_with_the_knob(
    simulator: Simulator, client: Client
) -> None:
    """The shape of a Marketo expert's example: a row that failed for an empty email comes
    back without the email column. A column with a value in any row of the file stays."""
    simulator.set_knobs(omit_empty_values=True)
    data = (
        b"firstName,lastName,email,phone\n"
        b"Able,Baker,able@example.com,\n"
        b"Benji,Nordstrom,,212-555-2323\n"
        b"__WARN__,Cole,cole@example.com,\n"
        b"__WARN__,,dee@example.com,\n"
    )
    batch_id = await client.batch(LEADS_PATH, data, format="csv")
    base = f"{client.base}/bulk/v1/leads/batch/{batch_id}"
    status = await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json")
    assert (status["numOfRowsFailed"], status["numOfRowsWithWarning"]) == (1, 2)

    files = {}
    for kind in ("failures", "warnings"):
        async with client.session.get(f"{base}/{kind}.json", headers=client.headers()) as resp:
            files[kind] = list(csv.reader(io.StringIO(await resp.text())))

    (header, row) = files["failures"]
    assert header == ["firstName", "lastName", "phone", "Import Failure Reason"]
    assert row[:3] == ["Benji", "Nordstrom", "212-555-2323"]
    assert "email" in row[3]
    header, *warned = files["warnings"]
    assert header == ["firstName", "lastName", "email", "Import Warning Reason"]
    assert [w[:3] for w in warned] == [
        ["__WARN__", "Cole", "cole@example.com"],
        ["__WARN__", "", "dee@example.com"],
    ]


async def test_failures_are_served_with_the_content_type_knob(
    simulator: Simulator, client: Client
) -> None:
    """Adobe's OpenAPI declares application/json for the failures and warnings endpoints;
    the body is the same CSV file."""
    simulator.set_knobs(files_content_type="application/json")
    batch_id = await client.batch(LEADS_PATH, b"email\nnot-an-email\n", format="csv")
    await client.wait_final(f"/bulk/v1/leads/batch/{batch_id}.json")
    url = f"{client.base}/bulk/v1/leads/batch/{batch_id}/failures.json"
    async with client.session.get(url, headers=client.headers()) as response:
        assert response.content_type == "application/json"
        text = await response.text()
    assert text.startswith("email,Import Failure Reason\nnot-an-email,")
    assert SimulatorConfig().files_content_type == "text/csv"
    assert SimulatorConfig().omit_empty_values is False


# -- rows applied as a job imports; reverse order; twin records (issue 20, item 5) -------------

LEAD = JobSpec(ObjectType.LEADS, "csv")


def leads(*rows: tuple[str, str]) -> ParsedFile:
    return ParsedFile(["email", "title"], [list(row) for row in rows])  # title: a lead field


def history(queue: JobQueue, email: str) -> list[tuple[float, int, str]]:
    return [(round(t, 6), b, v["title"]) for t, b, v in queue.store.history_of("leads", email)]


def value_of(queue: JobQueue, email: str) -> list[str]:
    return [r["title"] for r in queue.store.records("leads") if r["email"].lower() == email.lower()]


async def test_two_jobs_importing_at_once_interleave_their_rows() -> None:
    """Rows are applied as a job imports (10 a second here), so two jobs that import
    together touch records in turns: the later job's row for s lands first, and the
    older job's row, applied after it, wins."""
    queue = JobQueue(SimulatorConfig(job_overhead=0.0, rows_per_second=10.0))
    first = queue.submit(
        LEAD, leads(("a@x.com", "1"), ("b@x.com", "1"), ("s@x.com", "old")), "c", now=0.0
    )
    second = queue.submit(
        LEAD, leads(("S@x.com", "new"), ("c@x.com", "2"), ("d@x.com", "2")), "c", now=0.05
    )
    queue.advance(0.2)
    assert (first.status, second.status) == ("Importing", "Importing")
    assert value_of(queue, "a@x.com") == value_of(queue, "b@x.com") == ["1"]
    assert value_of(queue, "S@x.com") == ["new"], "applied while both jobs import"
    assert value_of(queue, "d@x.com") == []

    queue.advance(1.0)
    assert (first.status, second.status) == ("Complete", "Complete")
    assert history(queue, "s@x.com") == [
        (0.15, second.batch_id, "new"),
        (0.3, first.batch_id, "old"),
    ]
    assert value_of(queue, "S@x.com") == ["old"]
    applied = sorted((t, b) for rows in queue.store.history.values() for t, b, _ in rows)
    assert [b for _, b in applied] == [first.batch_id, second.batch_id] * 3
    assert first.outcome.processed == second.outcome.processed == 3


async def test_the_reverse_knob_applies_a_jobs_rows_last_first() -> None:
    rows = leads(("s@x.com", "1"), ("t@x.com", "1"), ("s@x.com", "2"), ("bad", "x"))
    for reverse, won in ((False, "2"), (True, "1")):
        queue = JobQueue(SimulatorConfig(job_overhead=0.0, rows_per_second=10.0))
        queue.reconfigure(queue.config.with_knobs(reverse_rows=reverse), now=0.0)
        job = queue.submit(LEAD, rows, "c", now=0.0)
        queue.advance(1.0)
        assert value_of(queue, "s@x.com") == [won]
        order = [v for _, _, v in history(queue, "s@x.com")]
        assert order == (["2", "1"] if reverse else ["1", "2"])
        # The failures file keeps the file's order whatever order the rows went in.
        assert job.outcome.failed == 1
        assert job.outcome.failures is not None
        assert job.outcome.failures.splitlines()[1].startswith(b"bad,x,Invalid email address")


async def test_two_jobs_adding_one_new_key_within_the_window_make_twins_then_1007() -> None:
    """Marketo makes twin records when two imports add the same new key at nearly the
    same time; every later row by that key fails with 1007."""
    queue = JobQueue(SimulatorConfig(job_overhead=0.0, rows_per_second=10.0, twin_window=1.0))
    queue.submit(LEAD, leads(("n@x.com", "a"), ("o@x.com", "a")), "c", now=0.0)
    queue.submit(
        LEAD,
        leads(
            ("N@x.com", "b"),
        ),
        "c",
        now=0.05,
    )
    queue.advance(1.0)
    assert sorted(value_of(queue, "n@x.com")) == ["a", "b"]
    assert len(queue.store.leads) == 3

    later = queue.submit(LEAD, leads(("n@x.com", "c"), ("o@x.com", "c")), "c", now=5.0)
    queue.advance(10.0)
    assert (later.outcome.processed, later.outcome.failed) == (1, 1)
    assert later.outcome.failures is not None
    assert b"1007 Multiple leads match the lookup criteria" in later.outcome.failures
    assert value_of(queue, "o@x.com") == ["c"]

    # Custom objects: the same idea, by the dedupe field.
    cars = JobSpec(ObjectType.CUSTOM_OBJECT, "csv", api_name="car_c")
    queue.submit(cars, ParsedFile(["vin", "color"], [["V1", "red"]]), "c", now=20.0)
    queue.submit(cars, ParsedFile(["vin", "color"], [["V1", "blue"]]), "c", now=20.0)
    queue.advance(21.0)
    assert sorted(r["color"] for r in queue.store.records("customobject", api_name="car_c")) == [
        "blue",
        "red",
    ]
    again = queue.submit(cars, ParsedFile(["vin", "color"], [["V1", "green"]]), "c", now=30.0)
    queue.advance(31.0)
    assert again.outcome.failures is not None
    assert b"1007" in again.outcome.failures


async def test_no_twins_outside_the_window_or_without_the_knob() -> None:
    for window, second_at in ((1.0, 2.0), (0.0, 0.05)):
        queue = JobQueue(
            SimulatorConfig(job_overhead=0.0, rows_per_second=10.0, twin_window=window)
        )
        queue.submit(
            LEAD,
            leads(
                ("n@x.com", "a"),
            ),
            "c",
            now=0.0,
        )
        second = queue.submit(
            LEAD,
            leads(
                ("n@x.com", "b"),
            ),
            "c",
            now=second_at,
        )
        queue.advance(5.0)
        assert value_of(queue, "n@x.com") == ["b"], (window, second_at)
        assert second.outcome.failed == 0
        assert len(queue.store.leads) == 1


async def test_history_under_sim_and_in_process(simulator: Simulator, client: Client) -> None:
    first = await client.batch(LEADS_PATH, b"email,firstName\nann@x.com,Ann\n", format="csv")
    await client.wait_final(f"/bulk/v1/leads/batch/{first}.json")
    second = await client.batch(LEADS_PATH, b"email,firstName\nANN@x.com,Anna\n", format="csv")
    await client.wait_final(f"/bulk/v1/leads/batch/{second}.json")

    applied = simulator.history("leads", "ann@x.com")
    assert [(h["batch_id"], h["values"]["firstName"]) for h in applied] == [
        (first, "Ann"),
        (second, "Anna"),
    ]
    assert applied[0]["t"] < applied[1]["t"]
    async with client.session.get(
        f"{client.base}/_sim/history", params={"object": "leads", "key": "Ann@X.com"}
    ) as response:
        assert response.status == 200
        assert await response.json() == applied
    async with client.session.get(
        f"{client.base}/_sim/history", params={"object": "nothing", "key": "x"}
    ) as response:
        assert response.status == 400


async def test_a_restart_goes_on_with_a_partly_applied_job() -> None:
    """run --simulate's state file keeps how far an importing job got: the rows applied
    before the stop are not applied again, those after go on, in the order it began."""
    config = SimulatorConfig(job_overhead=0.0, rows_per_second=10.0, reverse_rows=True)
    queue = JobQueue(config)
    rows = leads(("a@x.com", "1"), ("bad", "x"), ("c@x.com", "1"), ("a@x.com", "2"))
    job = queue.submit(LEAD, rows, "c", now=0.0)
    queue.advance(0.25)  # two of four applied: a=2, then c
    assert job.status == "Importing"
    data = json.loads(json.dumps(snapshot(queue, now=0.25, wall=1000.0)))

    fresh = JobQueue(config.with_knobs(reverse_rows=False))  # the job keeps its own order
    restore(fresh, data, now=50.0, wall=1000.0)
    assert history(fresh, "a@x.com") == [(round(50.0 - 0.25 + 0.1, 6), job.batch_id, "2")]
    fresh.advance(50.0 + 1.0)
    done = fresh.jobs[job.batch_id]
    assert (done.status, done.outcome.processed, done.outcome.failed) == ("Complete", 3, 1)
    assert [v for _, _, v in history(fresh, "a@x.com")] == ["2", "1"]
    assert value_of(fresh, "a@x.com") == ["1"]
    assert len(fresh.store.history_of("leads", "c@x.com")) == 1
