"""The simulated subscription's objects and their fields, as its describe calls answer.

Three describe answers, shaped as swagger-mapi.json's response schemas: leads
(`LeadAttribute2`, Describe Lead2), a custom object (`ObjectMetaData`, with its
dedupe fields and id field, as Adobe's car_c example shows it) and program members
(`ProgramMemberAttribute2`). The field lists are knobs (`lead_fields`,
`custom_objects`, `program_member_fields`); the defaults here cover Marketo's
standard lead fields, Adobe's `car_c` (color, make, model, vin; dedupe field vin)
and the program member fields, plus the one custom lead field the tests and the
README's examples import, `note`.

Assumed where the docs are silent: display names are the API names; data types are
`string` but for a few well-known fields; a custom object that is not declared is
answered (describe and import alike) with 1013 "Object not found", Marketo's code
for an object that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# Marketo's standard lead fields (REST API names), and `note`, a custom field.
LEAD_FIELDS: Final = (
    "id", "email", "firstName", "middleName", "lastName", "salutation", "title",
    "company", "department", "phone", "mobilePhone", "fax", "address", "city",
    "state", "postalCode", "country", "website", "industry", "annualRevenue",
    "numberOfEmployees", "rating", "leadSource", "leadStatus", "leadScore", "leadRole",
    "dateOfBirth", "unsubscribed", "unsubscribedReason", "doNotCall", "doNotCallReason",
    "marketingSuspended", "emailInvalid", "emailInvalidCause", "cookies", "twitterId",
    "facebookId", "linkedInId", "sfdcAccountId", "sfdcContactId", "sfdcLeadId",
    "sfdcLeadOwnerId", "sfdcOpptyId", "externalCompanyId", "externalSalesPersonId",
    "createdAt", "updatedAt", "note",
)  # fmt: skip
# The fields a bulk lead import may dedupe by (swagger: importLeadUsingPOST's lookupField).
LEAD_LOOKUP_FIELDS: Final = (
    "id", "cookies", "email", "twitterId", "facebookId", "linkedInId", "sfdcAccountId",
    "sfdcContactId", "sfdcLeadId", "sfdcLeadOwnerId", "sfdcOpptyId",
)  # fmt: skip
PROGRAM_MEMBER_FIELDS: Final = (
    "leadId", "programId", "statusName", "membershipDate", "reachedSuccess",
    "reachedSuccessDate", "acquiredBy", "isExhausted", "nurtureCadence", "nurtureTrack",
    "attendanceLikelihood", "registrationLikelihood", "waitlistPriority", "webinarUrl",
    "createdAt", "updatedAt",
)  # fmt: skip
PROGRAM_MEMBER_DEDUPE: Final = ("leadId", "programId")
# Every custom object has these besides its own fields (Adobe's car_c describe).
CUSTOM_OBJECT_SYSTEM_FIELDS: Final = ("createdAt", "marketoGUID", "updatedAt")
CUSTOM_OBJECT_ID_FIELD: Final = "marketoGUID"
DESCRIBED_AT: Final = "2017-02-22T19:55:51Z"  # createdAt/updatedAt of every object
NOT_FOUND: Final = ("1013", "Object not found")
_TYPES: Final = {
    "id": "integer", "email": "email", "leadScore": "integer", "annualRevenue": "currency",
    "numberOfEmployees": "integer", "dateOfBirth": "date", "unsubscribed": "boolean",
    "doNotCall": "boolean", "emailInvalid": "boolean", "createdAt": "datetime",
    "updatedAt": "datetime", "leadId": "integer", "programId": "integer",
    "membershipDate": "datetime", "reachedSuccess": "boolean", "isExhausted": "boolean",
}  # fmt: skip
_READ_ONLY: Final = frozenset({"id", "createdAt", "updatedAt", "marketoGUID", "leadId"})


@dataclass(frozen=True, slots=True)
class CustomObject:
    """A custom object of the simulated subscription: its API name, its own fields and
    the fields that name a record (several: a compound key)."""

    name: str
    fields: tuple[str, ...]
    dedupe_fields: tuple[str, ...]

    def public(self) -> dict[str, Any]:
        return {"fields": list(self.fields), "dedupeFields": list(self.dedupe_fields)}


# Adobe's example (bulk custom object import page): VIN is the dedupe field.
CAR: Final = CustomObject("car_c", ("color", "make", "model", "vin"), ("vin",))


def custom_objects_knob(value: Any) -> tuple[CustomObject, ...]:
    """The `custom_objects` knob from what a test or /_sim/faults gives: CustomObjects,
    or a JSON object `{"car_c": {"fields": [...], "dedupeFields": [...]}}`."""
    if isinstance(value, tuple | list) and all(isinstance(v, CustomObject) for v in value):
        return tuple(value)
    if not isinstance(value, Mapping):
        raise ValueError(
            'knob \'custom_objects\' must map API names to {"fields": [...], "dedupeFields": [...]}'
        )
    objects = []
    for name, spec in value.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"knob 'custom_objects': {name!r} must be an object")
        fields, dedupe = spec.get("fields", []), spec.get("dedupeFields", [])
        if not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in (fields, dedupe)
        ):
            raise ValueError(f"knob 'custom_objects': {name!r} needs lists of field names")
        if not dedupe or not set(dedupe) <= set(fields):
            raise ValueError(f"knob 'custom_objects': {name!r} dedupes on fields of its own")
        objects.append(CustomObject(str(name), tuple(fields), tuple(dedupe)))
    return tuple(objects)


def field_entries(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each field as describe lists it (swagger: LeadAttribute2Fields, ObjectField)."""
    entries = []
    for name in names:
        kind = _TYPES.get(name, "string")
        entry: dict[str, Any] = {"name": name, "displayName": name, "dataType": kind}
        if kind == "string":
            entry["length"] = 36 if name == CUSTOM_OBJECT_ID_FIELD else 255
        entry |= {"updateable": name not in _READ_ONLY, "crmManaged": False}
        entries.append(entry)
    return entries


def lead_description(fields: tuple[str, ...]) -> dict[str, Any]:
    """Describe Lead2's one result: the lead fields, searchable by the lookup fields."""
    searchable = [[name] for name in LEAD_LOOKUP_FIELDS if name in fields]
    return {"name": "API Lead", "searchableFields": searchable, "fields": field_entries(fields)}


def custom_object_description(obj: CustomObject) -> dict[str, Any]:
    """A custom object's describe result, as Adobe's car_c example has it."""
    fields = (*CUSTOM_OBJECT_SYSTEM_FIELDS, *obj.fields)
    return {
        "name": obj.name,
        "displayName": obj.name,
        "description": obj.name,
        "createdAt": DESCRIBED_AT,
        "updatedAt": DESCRIBED_AT,
        "idField": CUSTOM_OBJECT_ID_FIELD,
        "dedupeFields": list(obj.dedupe_fields),
        "searchableFields": [list(obj.dedupe_fields), [CUSTOM_OBJECT_ID_FIELD]],
        "fields": field_entries(fields),
    }


def member_description(fields: tuple[str, ...]) -> dict[str, Any]:
    """The program member describe result (a member file may name lead fields too)."""
    return {
        "name": "API Program Member",
        "description": "API Program Member Map",
        "createdAt": DESCRIBED_AT,
        "updatedAt": DESCRIBED_AT,
        "dedupeFields": list(PROGRAM_MEMBER_DEDUPE),
        "searchableFields": [[name] for name in PROGRAM_MEMBER_DEDUPE],
        "fields": field_entries(fields),
    }
