"""Delimited files as Marketo reads them: the three formats, the format of a file, and
the csv module made ready for Marketo-sized fields.

Importing this module raises the csv module's field limit for the process, once: a
record Marketo accepts (or one the splitter sets aside) can hold fields far above its
128 KiB default. Every module that reads records with the csv module imports it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

if TYPE_CHECKING:
    from _csv import Writer

# The three formats Bulk Import accepts, and their delimiters.
DELIMITERS: Final = {"csv": ",", "tsv": "\t", "ssv": ";"}
FORMATS: Final = tuple(DELIMITERS)

csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))


def format_of(filename: str, configured: str = "") -> str:
    """`configured` (a route's format) when set, else the one the file's extension names:
    .tsv, .ssv, anything else csv."""
    if configured:
        return configured
    suffix = Path(filename).suffix.lower().lstrip(".")
    return suffix if suffix in ("tsv", "ssv") else "csv"


def write_row(writer: Writer, fh: IO[str], row: list[str], delimiter: str) -> None:
    """One row through `writer` (which writes to `fh`); with every field quoted when one
    holds a lone CR, which csv.writer leaves unquoted under an LF line ending (a reader
    would end the line there)."""
    if "\r" in "\0".join(row):
        csv.writer(fh, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_ALL).writerow(
            row
        )
    else:
        writer.writerow(row)
