"""Columns: Marketo's rows placed under the source's columns, by name.

Marketo leaves empty values, and their columns, out of the rows of its failures and
warnings files (a row that failed for an empty email comes back as
`firstName,lastName,phone,Import Failure Reason`); two chunks of one file may so come
back with different headers. Matching compares, and the part and merged files hold,
every row in the source's column layout: each source column takes the value of
Marketo's column of the same name (names trimmed, as Marketo matches them), and a
column Marketo left out is empty.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placing:
    """Marketo's rows under the chunk's columns, by name.

    Each chunk column takes the value of Marketo's column of the same name (both
    trimmed, as Marketo matches names), or "" when Marketo's header left it out: an
    omitted column matches an empty source value only. A column of Marketo's that the
    chunk has not is neither compared nor kept (`unknown`). When Marketo's header is
    the chunk's, rows are taken as they are (`places` None), so matching compares
    them as sent."""

    header: list[str]  # the chunk's columns (trimmed), then Marketo's reason column
    places: tuple[int, ...] | None  # per chunk column, its place in Marketo's row; -1: none
    unknown: tuple[str, ...] = ()

    @classmethod
    def of(cls, marketo: list[str], columns: list[str]) -> Placing:
        """From Marketo's header (its reason column last) and the chunk's columns."""
        reason = marketo[-1:]
        if not columns:  # no chunk to read a header from: Marketo's layout, as it is
            return cls([name.strip() for name in marketo[:-1]] + reason, None)
        places = places_of(marketo[:-1], columns)
        known = {name.strip() for name in columns}
        unknown = tuple(name for name in marketo[:-1] if name.strip() not in known)
        return cls([name.strip() for name in columns] + reason, places, unknown)

    def place(self, row: list[str]) -> list[str]:
        """A row of Marketo's, its reason dropped, under the chunk's columns."""
        return placed(row[:-1], self.places)


def places_of(names: list[str], columns: list[str]) -> tuple[int, ...] | None:
    """Where each of `columns` is among `names`, by trimmed name (-1: not there; the
    first of a repeated name); None when they are the same columns in the same order."""
    trimmed = [name.strip() for name in names]
    wanted = [name.strip() for name in columns]
    if trimmed == wanted:
        return None
    where: dict[str, int] = {}
    for k, name in enumerate(trimmed):
        where.setdefault(name, k)
    return tuple(where.get(name, -1) for name in wanted)


def placed(fields: list[str], places: tuple[int, ...] | None) -> list[str]:
    """`fields` rearranged by `places_of`'s answer: "" where a column has no place."""
    if places is None:
        return fields
    n = len(fields)
    return [fields[k] if 0 <= k < n else "" for k in places]
