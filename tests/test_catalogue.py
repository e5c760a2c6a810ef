"""The field catalogue: Marketo's describe calls through the real client against the
bundled simulator, the cache on an injected clock, and headers checked against it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchestrator.catalogue import Catalogue, read_header
from orchestrator.config import Route, Secret, Settings
from orchestrator.config.settings import BackoffSettings, MarketoSettings
from orchestrator.errors import FatalError, InputError, TransientError
from orchestrator.marketo import Description, MarketoClient
from orchestrator.models import ObjectType
from orchestrator.simulator import Simulator
from tests.support.settings import CARS, LEADS, MEMBERS

HOUR = 3600.0
ADOBE_CAR_FIELDS = ("createdAt", "marketoGUID", "updatedAt", "color", "make", "model", "vin")


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def no_wait(_seconds: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
async def marketo(simulator: Simulator) -> AsyncIterator[MarketoClient]:
    settings = Settings(
        marketo=MarketoSettings(
            base_url=simulator.base_url, client_id="catalogue", client_secret=Secret("s")
        ),
        backoff=BackoffSettings(initial=0.01, max=0.05),
    )
    async with MarketoClient(settings, sleep=no_wait, max_attempts=2) as client:
        yield client


def describes(simulator: Simulator) -> Counter[str]:
    """Describe calls the simulator answered, by operation id."""
    return Counter(
        str(c["operation"]) for c in simulator.calls() if "describe" in str(c["operation"])
    )


# -- the describe calls ------------------------------------------------------------------


async def test_describe_calls_read_fields_keys_and_lookup_fields(marketo: MarketoClient) -> None:
    leads = await marketo.describe_leads()
    assert {"email", "firstName", "lastName", "id", "note"} <= set(leads.fields)
    assert {"email", "id", "sfdcLeadId"} <= set(leads.searchable)
    assert "firstName" not in leads.searchable

    car = await marketo.describe_custom_object("car_c")  # Adobe's car_c, as its page shows it
    assert car == Description(
        name="car_c",
        fields=ADOBE_CAR_FIELDS,
        dedupe_fields=("vin",),
        id_field="marketoGUID",
        searchable=("vin", "marketoGUID"),
    )

    members = await marketo.describe_program_members()
    assert {"leadId", "programId", "statusName"} <= set(members.fields)
    assert members.dedupe_fields == ("leadId", "programId")

    with pytest.raises(FatalError) as missing:
        await marketo.describe_custom_object("bike_c")
    assert missing.value.code == "1013"


async def test_describe_of_a_compound_key_keeps_every_dedupe_field(
    simulator: Simulator, marketo: MarketoClient
) -> None:
    simulator.set_knobs(
        custom_objects={
            "tyre_c": {"fields": ["vin", "position", "brand"], "dedupeFields": ["vin", "position"]}
        }
    )
    tyre = await marketo.describe_custom_object("tyre_c")
    assert tyre.dedupe_fields == ("vin", "position")
    route = Route(dir="tyres", object=ObjectType.CUSTOM_OBJECT, api_name="tyre_c")
    assert await Catalogue(marketo).key_columns(route) == ("vin", "position")


# -- the cache -------------------------------------------------------------------------


async def test_each_object_is_described_once_an_hour_however_many_files(
    simulator: Simulator, marketo: MarketoClient
) -> None:
    clock = Clock()
    catalogue = Catalogue(marketo, clock=clock)
    other_leads = replace(LEADS, dir="more-leads")
    for _ in range(3):  # three files on each route
        for route in (LEADS, other_leads, CARS, MEMBERS):
            await catalogue.check(route, ["email"])
    assert describes(simulator) == {
        "describeUsingGET_6": 1,  # leads, for both lead routes and the members' lead fields
        "describeUsingGET_1": 1,  # car_c
        "describeProgramMemberUsingGET2": 1,
    }

    clock.now += HOUR - 1
    await catalogue.check(LEADS, ["email"])
    assert describes(simulator)["describeUsingGET_6"] == 1, "still fresh"
    clock.now += 1
    await catalogue.check(LEADS, ["email"])
    await catalogue.check(CARS, ["vin"])
    assert describes(simulator) == {
        "describeUsingGET_6": 2,
        "describeUsingGET_1": 2,
        "describeProgramMemberUsingGET2": 1,
    }


async def test_a_failed_refresh_keeps_the_description_it_had(
    simulator: Simulator, marketo: MarketoClient
) -> None:
    clock = Clock()
    catalogue = Catalogue(marketo, clock=clock)
    assert (await catalogue.check(CARS, ["vin", "colour"])).unknown == ("colour",)
    clock.now += HOUR
    simulator.set_knobs(fault_608=1.0)
    with capture_logs() as logs:
        again = await catalogue.check(CARS, ["vin", "colour"])
    assert again.unknown == ("colour",), "checked against the last answer"
    assert [e["event"] for e in logs if e["log_level"] == "warning"][-1] == (
        "describe_refresh_failed"
    )
    refused = describes(simulator)["describeUsingGET_1"]
    await catalogue.check(CARS, ["vin"])
    assert describes(simulator)["describeUsingGET_1"] == refused, "not asked again at once"

    fresh = Catalogue(marketo, clock=clock)
    with pytest.raises(TransientError):  # nothing to fall back on: the caller decides
        await fresh.check(CARS, ["vin"])


# -- key columns and the check -----------------------------------------------------------


async def test_key_columns_are_the_routes_or_the_objects_own(marketo: MarketoClient) -> None:
    catalogue = Catalogue(marketo)
    assert await catalogue.key_columns(LEADS) == ("email",)
    assert await catalogue.key_columns(replace(LEADS, lookup_field="sfdcLeadId")) == ("sfdcLeadId",)
    assert await catalogue.key_columns(CARS) == ("vin",)
    assert await catalogue.key_columns(MEMBERS) == ("email",)
    assert await catalogue.key_columns(replace(CARS, key_columns=("make", "model"))) == (
        "make",
        "model",
    )


async def test_check_names_each_missing_key_and_each_unknown_column(
    marketo: MarketoClient,
) -> None:
    catalogue = Catalogue(marketo)
    # Adobe's cars, one column misspelt and the dedupe field left out.
    cars = await catalogue.check(CARS, ["color", "make", "modle"])
    assert (cars.missing, cars.unknown, cars.ok) == (("vin",), ("modle",), False)
    assert cars.error == "the header lacks the key column 'vin' of custom object car_c"
    assert cars.problems() == [
        "key column 'vin' of custom object car_c is missing",
        "column 'modle' matches no field of custom object car_c",
    ]
    assert cars.warnings == ("column 'modle' matches no field of custom object car_c",)

    # Trimmed and case-folded: " Email" is the lookup field, FIRSTNAME a lead field.
    leads = await catalogue.check(LEADS, [" Email", "FIRSTNAME", "emial"])
    assert (leads.missing, leads.unknown, leads.ok) == ((), ("emial",), True)
    assert leads.warnings == ("column 'emial' matches no field of leads",)

    strict = await catalogue.check(replace(LEADS, unknown_columns="fail"), ["email", "emial"])
    assert not strict.ok
    assert strict.error == "column 'emial' matches no field of leads (unknown_columns = \"fail\")"
    assert strict.warnings == ()

    # A member file names lead fields and member fields; email is its key.
    members = await catalogue.check(MEMBERS, ["email", "firstName", "statusName"])
    assert (members.missing, members.unknown) == ((), ())
    no_email = await catalogue.check(MEMBERS, ["firstName"])
    assert no_email.error == "the header lacks the key column 'email' of program members"

    # The route's key columns are needed besides Marketo's own.
    keyed = await catalogue.check(replace(LEADS, key_columns=("email", "company")), ["email"])
    assert keyed.missing == ("company",)

    odd = await catalogue.check(replace(LEADS, lookup_field="firstName"), ["firstName"])
    assert odd.ok
    assert odd.notes == (
        "lookup field 'firstName' is not among the fields leads can be looked up by",
    )


# -- the header as the splitter reads it -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fmt", "columns"),
    [
        (b"color,make,model, vin\nred,bmw,2002,W\n", "csv", ("color", "make", "model", "vin")),
        (b"\xef\xbb\xbfemail;firstName\r\na@x;A\r\n", "ssv", ("email", "firstName")),
        (b'"e\nmail",name\n"x",y\n', "csv", ("e\nmail", "name")),  # a quoted line break
        (b"email\tnote", "tsv", ("email", "note")),  # a header-only file with no line end
    ],
)
def test_read_header_reads_the_first_record_trimmed(
    tmp_path: Path, raw: bytes, fmt: str, columns: tuple[str, ...]
) -> None:
    path = tmp_path / f"f.{fmt}"
    rows = b"x" * 70_000 + b"\n" if raw.endswith(b"\n") else b""  # past the first block
    path.write_bytes(raw + rows)
    assert read_header(path, fmt) == columns


def test_read_header_refuses_what_the_splitter_refuses(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_bytes(b"email,email\na,b\n")
    with pytest.raises(InputError, match="duplicates"):
        read_header(path, "csv")
