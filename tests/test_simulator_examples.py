"""Issue 19, item 6: Adobe's own examples, sent to the bundled simulator as the pages show
them, get the answers the pages show.

Each request is built as its page writes it: the path and query of the HTTP example with
the multipart body shown under it (part `file`, the file name, `text/csv`), or the curl
example's form fields (`-F format=csv -F file=@...`). The one change: the token travels
in the Authorization header, since Adobe removed the `access_token` parameter the curl
examples still show. The answers are compared with the pages' JSON and files.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.simulator import Simulator, SimulatorConfig
from tests.support.processes import CliRunner
from tests.support.simulators import FAST_KNOBS, MakeSimulator
from tests.support.waiting import wait_until

# bulk-lead-import.md, "Creating a Job": the boundary the body's delimiter lines show.
BOUNDARY = "----WebKitFormBoundaryBQACkJZyaiIAXogC"
LEADS_CSV = (
    "firstName,lastName,email,company\n"
    "Able,Baker,ablebaker@marketo.com,Marketo\n"
    "Charlie,Dog,charliedog@marketo.com,Marketo\n"
    "Easy,Fox,easyfox@marketo.com,Marketo\n"
)
# bulk-custom-object-import.md, "Import File".
CARS_CSV = (
    "color,make,model,vin\n"
    "red,bmw,2002,WBA4R7C55HK895912\n"
    "yellow,bmw,320i,WBA4R7C30HK896061\n"
    "blue,bmw,325i,WBS3U9C52HP970604\n"
)
# bulk-program-member-import.md, "Creating a Job".
LANNISTERS = "firstName,lastName,email,title,company,leadScore\n" + "".join(
    f"{name},Lannister,{name}@Lannister.com,Lannister,House Lannister,0\n"
    for name in ("Joanna", "Tywin", "Cersei", "Jamie", "Tyrion", "Kevan", "Dorna", "Lancel")
)
MEMBER_HEADER = "firstName,lastName,email,title,company,leadScore"


class Example:
    """A client that sends requests exactly as Adobe's pages show them (bearer token only)."""

    def __init__(self, session: aiohttp.ClientSession, simulator: Simulator) -> None:
        self.session = session
        self.base = simulator.base_url
        self.headers: dict[str, str] = {}

    async def token(self) -> None:
        form = {"client_id": "example", "client_secret": "x", "grant_type": "client_credentials"}
        async with self.session.post(f"{self.base}/identity/oauth/token", data=form) as resp:
            self.headers = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}

    async def http_example(self, path_and_query: str, filename: str, text: str) -> Any:
        """The HTTP example: POST path?query with the multipart body the page shows."""
        body = (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: text/csv\r\n"
            "\r\n"
            f"{text}\r\n"
            f"--{BOUNDARY}--\r\n"
        ).encode()
        headers = {**self.headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        async with self.session.post(
            f"{self.base}{path_and_query}", data=body, headers=headers
        ) as resp:
            assert resp.status == 200
            return await resp.json()

    async def curl_example(
        self, path: str, fields_: dict[str, str], filename: str, text: str
    ) -> Any:
        """The curl example: `-F name=value ... -F file=@filename`, in the page's order."""
        form = aiohttp.FormData()
        for name, value in fields_.items():
            form.add_field(name, value)
        form.add_field("file", text.encode(), filename=filename, content_type="text/csv")
        async with self.session.post(f"{self.base}{path}", data=form, headers=self.headers) as resp:
            assert resp.status == 200
            return await resp.json()

    async def get(self, path: str) -> Any:
        async with self.session.get(f"{self.base}{path}", headers=self.headers) as resp:
            assert resp.status == 200
            return await resp.json()

    async def file(self, path: str) -> list[list[str]]:
        async with self.session.get(f"{self.base}{path}", headers=self.headers) as resp:
            assert resp.status == 200
            return list(csv.reader(io.StringIO(await resp.text())))

    async def final(self, path: str) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            item: dict[str, Any] = (await self.get(path))["result"][0]
            return item if item["status"] in ("Complete", "Failed") else None

        return await wait_until(done, f"{path} to be final", within=30.0)


@pytest.fixture
async def example(make_simulator: MakeSimulator) -> AsyncIterator[Example]:
    simulator = await make_simulator(**FAST_KNOBS)
    async with aiohttp.ClientSession() as session:
        client = Example(session, simulator)
        await client.token()
        yield client


def created(answer: dict[str, Any]) -> dict[str, Any]:
    """The one result item of a create, after checking the envelope around it."""
    assert answer["success"] is True
    assert answer["errors"] == []
    assert isinstance(answer["requestId"], str)
    (item,) = answer["result"]
    assert isinstance(item["batchId"], int)
    return dict(item)


# -- leads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["http", "curl"])
async def test_lead_import_example(example: Example, shape: str) -> None:
    """bulk-lead-import.md and bulk-import.md: `POST /bulk/v1/leads.json?format=csv` with
    the file part, and `curl -i -F format=csv -F file=@lead_data.csv ...`."""
    if shape == "http":
        answer = await example.http_example(
            "/bulk/v1/leads.json?format=csv", "leads.csv", LEADS_CSV
        )
    else:
        answer = await example.curl_example(
            "/bulk/v1/leads.json", {"format": "csv"}, "lead_data.csv", LEADS_CSV
        )
    item = created(answer)
    batch_id = item["batchId"]
    assert item == {"batchId": batch_id, "importId": str(batch_id), "status": "Queued"}

    status = await example.final(f"/bulk/v1/leads/batch/{batch_id}.json")
    assert status == {
        "batchId": batch_id,
        "importId": str(batch_id),
        "status": "Complete",
        "numOfLeadsProcessed": 3,
        "numOfRowsFailed": 0,
        "numOfRowsWithWarning": 0,
        "message": "Import succeeded, 3 records imported (3 members)",
    }


async def test_lead_import_without_format_is_csv(example: Example) -> None:
    """bulk-import.md, "Common Parameters": "The format defaults to CSV"."""
    item = created(await example.http_example("/bulk/v1/leads.json", "leads.csv", LEADS_CSV))
    status = await example.final(f"/bulk/v1/leads/batch/{item['batchId']}.json")
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (3, 0)


async def test_lead_failure_reason_and_status_message_follow_adobes_words(
    example: Example,
) -> None:
    """bulk-lead-import.md: "Import completed with errors, 2 records imported (2 members),
    1 failed"; a Marketo expert's write-up: "Value for lookup field 'email' not found"."""
    text = "firstName,lastName,email\nAble,Baker,ablebaker@marketo.com\nBenji,Nordstrom,\n"
    text += "Easy,Fox,easyfox@marketo.com\n"
    item = created(await example.http_example("/bulk/v1/leads.json?format=csv", "l.csv", text))
    base = f"/bulk/v1/leads/batch/{item['batchId']}"
    status = await example.final(f"{base}.json")
    assert status["message"] == (
        "Import completed with errors, 2 records imported (2 members), 1 failed"
    )
    rows = await example.file(f"{base}/failures.json")
    assert rows[-1][0] == "Benji"
    assert rows[-1][-1] == "Value for lookup field 'email' not found"


# -- custom objects ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["http", "curl"])
async def test_custom_object_import_example(example: Example, shape: str) -> None:
    """bulk-custom-object-import.md: the car_c job, as HTTP and as
    `curl -X POST -i -F format='csv' -F file='@custom_object_import.csv' ...`."""
    path = "/bulk/v1/customobjects/car_c/import.json"
    if shape == "http":
        answer = await example.http_example(
            f"{path}?format=csv", "custom_object_import.csv", CARS_CSV
        )
    else:
        answer = await example.curl_example(
            path, {"format": "csv"}, "custom_object_import.csv", CARS_CSV
        )
    item = created(answer)
    batch_id = item["batchId"]
    assert item == {"batchId": batch_id, "status": "Queued", "objectApiName": "car_c"}

    status = await example.final(f"/bulk/v1/customobjects/car_c/import/{batch_id}/status.json")
    assert status.pop("importTime").endswith(" second(s)")
    assert status == {
        "batchId": batch_id,
        "operation": "import",
        "status": "Complete",
        "objectApiName": "car_c",
        "numOfObjectsProcessed": 3,
        "numOfRowsFailed": 0,
        "numOfRowsWithWarning": 0,
        "message": "Import succeeded, 3 records imported (3 members)",
    }


async def test_custom_object_padded_header_example(make_simulator: MakeSimulator) -> None:
    """bulk-custom-object-import.md, "Failures": ` vin` fails all three rows with
    missing.dedupe.fields, "Import completed with errors, 0 records imported (0 members),
    3 failed", and the failures file as the page shows it."""
    padded = CARS_CSV.replace("model,vin", "model, vin")
    sim = await make_simulator(**FAST_KNOBS, dedupe_field="vin")  # car_c dedupes on vin
    async with aiohttp.ClientSession() as session:
        client = Example(session, sim)
        await client.token()
        path = "/bulk/v1/customobjects/car_c/import"
        item = created(await client.http_example(f"{path}.json?format=csv", "c.csv", padded))
        status = await client.final(f"{path}/{item['batchId']}/status.json")
        failures = await client.file(f"{path}/{item['batchId']}/failures.json")
    assert (status["numOfObjectsProcessed"], status["numOfRowsFailed"]) == (0, 3)
    assert status["message"] == (
        "Import completed with errors, 0 records imported (0 members), 3 failed"
    )
    assert failures == [
        ["color", "make", "model", " vin", "Import Failure Reason"],
        ["red", "bmw", "2002", "WBA4R7C55HK895912", "missing.dedupe.fields"],
        ["yellow", "bmw", "320i", "WBA4R7C30HK896061", "missing.dedupe.fields"],
        ["blue", "bmw", "325i", "WBS3U9C52HP970604", "missing.dedupe.fields"],
    ]


# -- program members -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["http", "curl"])
async def test_program_member_import_example(example: Example, shape: str) -> None:
    """bulk-program-member-import.md: `?format=csv&programMemberStatus=On List` with
    Lead-House-Lannister.csv, and `curl -i -F format='csv' -F programMemberStatus='On List'
    -F file='@Lead-House-Lannister.csv' ...` (lower-case `format` where the list says CSV)."""
    path = "/bulk/v1/program/1001/members/import.json"
    if shape == "http":
        answer = await example.http_example(
            f"{path}?format=csv&programMemberStatus=On List", "Lead-House-Lannister.csv", LANNISTERS
        )
    else:
        answer = await example.curl_example(
            path,
            {"format": "csv", "programMemberStatus": "On List"},
            "Lead-House-Lannister.csv",
            LANNISTERS,
        )
    item = created(answer)
    batch_id = item["batchId"]
    assert item == {"batchId": batch_id, "importId": str(batch_id), "status": "Queued"}

    status = await example.final(f"/bulk/v1/program/members/import/{batch_id}/status.json")
    assert status == {
        "batchId": batch_id,
        "importId": str(batch_id),
        "status": "Complete",
        "numOfLeadsProcessed": 8,
        "numOfRowsFailed": 0,
        "numOfRowsWithWarning": 0,
        "message": "Import succeeded, 8 records imported (8 members)",
    }


@pytest.mark.parametrize(
    ("row", "kind", "counters", "message", "reason"),
    [
        (
            "Aerys,Targaryen,Aerys@Targaryen.com,Targaryen,House Targaryen,"
            "TEXT_VALUE_IN_INTEGER_FIELD",
            "failures",
            (0, 1, 0),
            "Import completed with errors, 0 records imported (0 members), 1 failed",
            "Invalid data type in field Lead Score",
        ),
        (
            "Aerys,Targaryen,INVALID_EMAIL,Targaryen,House Targaryen,0",
            "warnings",
            (1, 0, 1),
            "Import succeeded, 1 records imported (1 members), 1 warning.",
            "Invalid email address",
        ),
    ],
    ids=["failure", "warning"],
)
async def test_program_member_failure_and_warning_examples(
    example: Example,
    row: str,
    kind: str,
    counters: tuple[int, int, int],
    message: str,
    reason: str,
) -> None:
    """bulk-program-member-import.md, "Failures" and "Warnings": the counters, the
    message and the file, as the page shows them."""
    create = "/bulk/v1/program/1001/members/import.json?format=csv&programMemberStatus=On List"
    text = f"{MEMBER_HEADER}\n{row}\n"
    item = created(await example.http_example(create, "aerys.csv", text))
    base = f"/bulk/v1/program/members/import/{item['batchId']}"  # no program id here
    status = await example.final(f"{base}/status.json")
    seen = (
        status["numOfLeadsProcessed"],
        status["numOfRowsFailed"],
        status["numOfRowsWithWarning"],
    )
    assert seen == counters
    assert status["message"] == message
    reason_column = "Import Failure Reason" if kind == "failures" else "Import Warning Reason"
    assert await example.file(f"{base}/{kind}.json") == [
        [*MEMBER_HEADER.split(","), reason_column],
        [*row.split(","), reason],
    ]


# -- partitions ------------------------------------------------------------------------------


async def test_partition_name_is_checked_1008_1009_1010(make_simulator: MakeSimulator) -> None:
    """Item 6: with partitions set up, a lead import names one the API user may use (else
    1009 "Partition name must be specified", 1008 "Access denied to partition"), and a lead
    that lives in another partition is not moved (1010 "Partition update not allowed")."""
    sim = await make_simulator(**FAST_KNOBS, partitions="Default,Europe")
    async with aiohttp.ClientSession() as session:
        client = Example(session, sim)
        await client.token()

        async def reasons(query: str, text: str) -> tuple[int, list[str]]:
            item = created(
                await client.http_example(f"/bulk/v1/leads.json?format=csv{query}", "p.csv", text)
            )
            base = f"/bulk/v1/leads/batch/{item['batchId']}"
            status = await client.final(f"{base}.json")
            if not status["numOfRowsFailed"]:
                return status["numOfLeadsProcessed"], []
            return status["numOfLeadsProcessed"], [
                r[-1] for r in (await client.file(f"{base}/failures.json"))[1:]
            ]

        anna = "email,firstName\nanna@example.eu,Anna\n"
        assert await reasons("", anna) == (0, ["Partition name must be specified"])
        assert await reasons("&partitionName=Asia", anna) == (
            0,
            ["Access denied to partition 'Asia'"],
        )
        assert await reasons("&partitionName=Europe", anna) == (1, [])
        moved = "email,firstName\nanna@example.eu,Annie\nbob@example.com,Bob\n"
        assert await reasons("&partitionName=Default", moved) == (
            1,
            ["Partition update not allowed"],
        )
        assert await reasons("&partitionName=Europe", "email,firstName\nanna@example.eu,Ann\n") == (
            1,
            [],
        )
    leads = {lead["email"]: lead["firstName"] for lead in sim.records("leads")}
    assert leads == {"anna@example.eu": "Ann", "bob@example.com": "Bob"}


async def test_without_partitions_set_up_partition_name_is_not_checked(
    example: Example,
) -> None:
    query = "?format=csv&partitionName=Anything"
    item = created(await example.http_example(f"/bulk/v1/leads.json{query}", "l.csv", LEADS_CSV))
    status = await example.final(f"/bulk/v1/leads/batch/{item['batchId']}.json")
    assert (status["numOfLeadsProcessed"], status["numOfRowsFailed"]) == (3, 0)


# -- the simulator's help ------------------------------------------------------------------


async def test_simulator_help_lists_every_knob_and_the_choices(tmp_path: Path) -> None:
    """Item 6: `marketo-orchestrator simulator --help` names a flag for every knob, and
    ends with what the simulator assumes where Marketo's documentation is silent."""
    runner = CliRunner(tmp_path)
    try:
        proc = await runner.run("simulator", "--help")
    finally:
        await runner.close()
    assert proc.returncode == 0, proc.stderr()
    text = " ".join(proc.stdout().split())
    flags = set(re.findall(r"--[a-z0-9-]+", text))
    missing = [
        f.name for f in fields(SimulatorConfig) if f"--{f.name.replace('_', '-')}" not in flags
    ]
    assert missing == []
    assert "Choices where Marketo's documentation is silent" in text
    assert "Partition name must be specified" in text  # records.py's assumptions
    assert "1003" in text  # operations.py's choices
