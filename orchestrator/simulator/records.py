"""The simulated subscription's records: what finished imports leave behind.

Each kind is keyed the way Marketo dedupes it: leads by the job's lookup field
(emails case-insensitively; `lookupField=id` only updates existing leads), with
an index per lookup field kept in step with every update; custom objects by
their declared dedupe fields (all of them: a compound key); program members by
email within their program. Static lists remember which leads an import added to them. A row that
cannot be stored says why, as Marketo's failures file would. The queue that
runs the imports is `simulator.queue`.

Row outcomes follow Marketo's documented examples where there is one, and are
assumptions where there is none:

- Program members: an invalid email address is a warning ("Invalid email
  address"), the member is still stored; a text in an integer field fails the
  row ("Invalid data type in field Lead Score") (program-member import page).
- Custom objects: a file whose header does not name the dedupe field exactly
  (" vin" is not "vin") fails every row with `missing.dedupe.fields`
  (custom-object import page). Header names are used exactly as sent.
- Leads: an empty lookup value fails the row ("Value for lookup field 'email'
  not found", as a Marketo expert's write-up shows it); an invalid email
  address fails it too ("Invalid email address") and so does a text in an
  integer field, as for program members: assumed, the lead page shows no
  example. A program member without an email fails with the lead's words.
  A column that names no lead field is ignored (the row is stored without it).
- Lead partitions (`partitions` knob; not checked without it), per row, with
  the error-code page's words: no partitionName fails the row ("Partition name
  must be specified", 1009), a name the API user has no access to ("Access
  denied to partition 'X'", 1008), a lead that lives in another partition
  ("Partition update not allowed", 1010). A lead remembers the partition it
  was created in; one created without partitions lives in none of them and is
  updated from any.
- Twin records (leads, custom objects; the `twin_window` knob): Adobe's lead pages
  and Marketo's knowledge base say two imports adding one new key at nearly the same
  time can each create a record. A row whose key a record got from another job less
  than `twin_window` seconds ago makes a second record; from then on every row by
  that key fails with 1007 "Multiple leads match the lookup criteria" (custom
  objects: "Multiple records match the dedupe fields", assumed), as later calls by a
  key with twins do at Marketo.

Every row stored is remembered per key (`history`): when (the queue's clock), by
which job, with which values, so a test can tell which row of which job won.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from orchestrator.models import ObjectType

KEY_SEPARATOR = "\x1f"  # between the values of a compound dedupe key


class Warned(str):
    """A row that was stored with a warning: the text is the warning's reason."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a create call asked for."""

    object_type: ObjectType
    fmt: str  # csv | tsv | ssv, whatever case the endpoint wants
    lookup_field: str = "email"
    list_id: int | None = None
    partition: str = ""
    api_name: str = ""
    program_id: str = ""
    member_status: str = ""


# Lead fields of type integer, by name folded to lower case, with the name Marketo shows
# for them in a failure reason (Adobe's program-member example: leadScore).
INTEGER_FIELDS = {"leadscore": "Lead Score"}


def type_problem(values: dict[str, str]) -> str | None:
    """Why a row's values do not fit their fields' types, or None."""
    for name, value in values.items():
        shown = INTEGER_FIELDS.get(name.lower())
        if shown and value.strip() and not value.strip().lstrip("+-").isdigit():
            return f"Invalid data type in field {shown}"
    return None


def partition_problem(spec: JobSpec, partitions: tuple[str, ...]) -> str | None:
    """Why a lead job's rows cannot go to its partition (`partitions`: the API user's)."""
    if not partitions or spec.object_type is not ObjectType.LEADS:
        return None
    if not spec.partition:
        return "Partition name must be specified"
    if spec.partition not in partitions:
        return f"Access denied to partition '{spec.partition}'"
    return None


def column(values: dict[str, str], name: str) -> str:
    """A row's value for `name`, matching the column name case-insensitively."""
    if name in values:
        return values[name]
    wanted = name.lower()
    return next((v for k, v in values.items() if k.lower() == wanted), "")


@dataclass(frozen=True, slots=True)
class Columns:
    """Header names a job's rows are checked by, resolved once per job."""

    key: str  # the lookup (or email) column as the header spells it; "" if absent
    emails: tuple[str, ...]  # columns holding an email address
    ids: tuple[str, ...]  # `id` columns: Marketo assigns lead ids, a file never sets one

    @classmethod
    def of(cls, header: list[str], key: str) -> Columns:
        def named(wanted: str) -> tuple[str, ...]:
            return tuple(name for name in header if name.lower() == wanted.lower())

        return cls((*named(key), "")[0], named("email"), named("id"))

    def email_problem(self, values: dict[str, str]) -> str | None:
        for name in self.emails:
            value = values.get(name)
            if value and "@" not in value:
                return "Invalid email address"
        return None


# A record's key as history and twins know it: (object, scope, value as matched), the
# scope being the lookup field (leads), the object's API name, or the program id.
Key = tuple[str, str, str]
# One row stored: the queue's clock reading, the job's batch id, the values.
Applied = tuple[float, int, dict[str, str]]
TWINS = "1007 Multiple leads match the lookup criteria"
CUSTOM_TWINS = "1007 Multiple records match the dedupe fields"


class RecordStore:
    """Records the imports left behind, each kind keyed the way Marketo dedupes it."""

    def __init__(self) -> None:
        self.leads: dict[int, dict[str, str]] = {}
        self.lists: dict[int, dict[int, None]] = {}  # listId -> lead ids, in order added
        self.custom: dict[str, dict[str, dict[str, str]]] = {}  # apiName -> dedupe value -> row
        self.members: dict[str, dict[str, dict[str, str]]] = {}  # programId -> email -> row
        self.partitions: dict[int, str] = {}  # lead id -> the partition it was created in
        self._indexes: dict[str, dict[str, int]] = {}  # lookup field -> value -> lead id
        self.next_lead_id = 1
        self.history: dict[Key, list[Applied]] = {}
        self.created: dict[Key, tuple[float, int]] = {}  # when and by which job, per key
        self.twinned: set[Key] = set()  # keys with twin records: rows by them fail
        self.custom_twins: dict[str, list[dict[str, str]]] = {}  # apiName -> twin records
        self.now, self.batch_id, self.twin_window = 0.0, 0, 0.0

    def moment(self, now: float, batch_id: int, twin_window: float = 0.0) -> None:
        """The next row is applied at `now` by job `batch_id` (history, twins)."""
        self.now, self.batch_id, self.twin_window = now, batch_id, twin_window

    def applied(self, key: Key, values: dict[str, str]) -> None:
        self.history.setdefault(key, []).append((self.now, self.batch_id, dict(values)))

    def added(self, key: Key) -> None:
        self.created.setdefault(key, (self.now, self.batch_id))

    def twin(self, key: Key) -> bool:
        """Whether a row adding `key` now makes a twin: another job added it just before."""
        made = self.created.get(key)
        return (
            made is not None and made[1] != self.batch_id and self.now - made[0] < self.twin_window
        )

    def importer(
        self,
        spec: JobSpec,
        header: list[str],
        dedupe: tuple[str, ...] = (),
        lead_fields: tuple[str, ...] = (),
        *,
        partitioned: bool = False,
    ) -> Callable[[dict[str, str]], str | None]:
        """The function that stores one row of this job, or says why it fails (a `Warned`
        answer: stored, with a warning). `dedupe`: a custom object's dedupe fields (none:
        its first column); `lead_fields`: the lead fields a row may set (none: any);
        `partitioned`: the subscription has partitions."""
        if spec.object_type is ObjectType.LEADS:
            cols = Columns.of(header, spec.lookup_field)
            known = frozenset(name.lower() for name in lead_fields)
            return partial(
                self.import_lead, spec=spec, cols=cols, known=known, partitioned=partitioned
            )
        if spec.object_type is ObjectType.CUSTOM_OBJECT:
            dedupe = dedupe or (header[0].strip(),)
            return partial(self.import_custom, api_name=spec.api_name, dedupe=dedupe)
        return partial(self.import_member, spec=spec, cols=Columns.of(header, "email"))

    def import_lead(
        self,
        values: dict[str, str],
        *,
        spec: JobSpec,
        cols: Columns,
        known: frozenset[str] = frozenset(),
        partitioned: bool = False,
    ) -> str | None:
        lookup = spec.lookup_field
        key = values.get(cols.key, "")
        if not key:
            return f"Value for lookup field '{lookup}' not found"
        problem = cols.email_problem(values) or type_problem(values)
        if problem:
            return problem
        if lookup.lower() == "id":  # Marketo: lookupField=id updates only
            lead_id = int(key) if key.isdigit() else None
            if lead_id not in self.leads:
                return "1004 Lead not found"
        else:
            lead_id = self._index(lookup).get(normalise(lookup, key))
        found: Key = (ObjectType.LEADS.value, lookup.lower(), normalise(lookup, key))
        if found in self.twinned:
            return TWINS
        if lead_id is not None and self.twin(found):
            self.twinned.add(found)
            lead_id = None  # Marketo did not see the other job's record yet: a twin
        if lead_id is None:
            lead_id = self.next_lead_id
            self.next_lead_id += 1
            self.leads[lead_id] = {}
            if partitioned:
                self.partitions[lead_id] = spec.partition
            self.added(found)
        elif partitioned and self.partitions.get(lead_id, spec.partition) != spec.partition:
            return "Partition update not allowed"
        for name in cols.ids:
            values.pop(name, None)
        if known:  # Marketo drops a column that names no lead field, without a word
            values = {k: v for k, v in values.items() if k.lower() in known}
        self._update_lead(lead_id, values)
        if spec.list_id is not None:
            self.lists.setdefault(spec.list_id, {})[lead_id] = None
        self.applied(found, values)
        return None

    def import_custom(
        self, values: dict[str, str], *, api_name: str, dedupe: tuple[str, ...]
    ) -> str | None:
        if any(name not in values for name in dedupe):  # names as sent: " vin" is not vin
            return "missing.dedupe.fields"
        empty = next((name for name in dedupe if not values[name]), None)
        if empty is not None:
            return f"1003 Value for dedupe field '{empty}' is missing"
        key = KEY_SEPARATOR.join(values[name] for name in dedupe)
        found: Key = (ObjectType.CUSTOM_OBJECT.value, api_name, key)
        if found in self.twinned:
            return CUSTOM_TWINS
        records = self.custom.setdefault(api_name, {})
        if key in records and self.twin(found):
            self.twinned.add(found)
            self.custom_twins.setdefault(api_name, []).append(dict(values))
        else:
            if key not in records:
                self.added(found)
            records.setdefault(key, {}).update(values)
        self.applied(found, values)
        return None

    def import_member(self, values: dict[str, str], *, spec: JobSpec, cols: Columns) -> str | None:
        email = values.get(cols.key, "")
        if not email:
            return "Value for lookup field 'email' not found"
        problem = type_problem(values)
        if problem:
            return problem
        member = self.members.setdefault(spec.program_id, {}).setdefault(email.lower(), {})
        member.update(values)
        member["programMemberStatus"] = spec.member_status
        self.applied((ObjectType.PROGRAM_MEMBERS.value, spec.program_id, email.lower()), values)
        if cols.email_problem(values):
            return Warned("Invalid email address")
        return None

    def records(
        self,
        kind: str,
        *,
        api_name: str | None = None,
        program_id: str | int | None = None,
        list_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Stored records: kind is leads, customobject (api_name), programmembers
        (program_id) or lists (list_id: the leads in that static list)."""
        if kind == ObjectType.LEADS:
            return [{"id": lead_id, **lead} for lead_id, lead in self.leads.items()]
        if kind == ObjectType.CUSTOM_OBJECT:
            rows = [*self.custom.get(api_name or "", {}).values()]
            return [dict(row) for row in rows + self.custom_twins.get(api_name or "", [])]
        if kind == ObjectType.PROGRAM_MEMBERS:
            members = self.members.get(str(program_id or ""), {})
            return [{"programId": str(program_id), **m} for m in members.values()]
        if kind == "lists":
            ids = self.lists.get(list_id or 0, {})
            return [{"id": lead_id, **self.leads[lead_id]} for lead_id in ids]
        raise ValueError(f"unknown object {kind!r}")

    def history_of(
        self,
        kind: str,
        key: str,
        *,
        lookup_field: str = "email",
        api_name: str | None = None,
        program_id: str | int | None = None,
    ) -> list[Applied]:
        """Every row stored under one record key, in the order applied: a lead by its
        lookup field's value (email by default), a custom object's record by its dedupe
        value (api_name), a program member by email (program_id)."""
        if kind == ObjectType.LEADS:
            found = (kind, lookup_field.lower(), normalise(lookup_field, key))
        elif kind == ObjectType.CUSTOM_OBJECT:
            found = (kind, api_name or "", key)
        elif kind == ObjectType.PROGRAM_MEMBERS:
            found = (kind, str(program_id or ""), key.lower())
        else:
            raise ValueError(f"unknown object {kind!r}")
        return list(self.history.get(found, []))

    def _index(self, lookup: str) -> dict[str, int]:
        name = lookup.lower()
        if name not in self._indexes:
            self._indexes[name] = {
                normalise(name, value): lead_id
                for lead_id, lead in self.leads.items()
                if (value := column(lead, name))
            }
        return self._indexes[name]

    def _update_lead(self, lead_id: int, values: dict[str, str]) -> None:
        lead = self.leads[lead_id]
        for name, index in self._indexes.items():
            old, new = column(lead, name), column(values, name)
            if new and new != old:
                if old and index.get(normalise(name, old)) == lead_id:
                    del index[normalise(name, old)]
                index[normalise(name, new)] = lead_id
        lead.update(values)


def normalise(field_name: str, value: str) -> str:
    """Emails match case-insensitively; other lookup fields exactly."""
    return value.strip().lower() if field_name.lower() == "email" else value
