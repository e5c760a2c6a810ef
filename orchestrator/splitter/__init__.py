"""The splitter: source files into chunks under Marketo's size limit.

`cutter` cuts byte-exact, quote-aware chunks and sets aside records too large
for any chunk; `scan` finds where records end and what makes a file unreadable.
"""

from orchestrator.splitter.cutter import (
    Chunk,
    Rejected,
    SplitDone,
    SplitEvent,
    split_file,
    split_file_async,
)
from orchestrator.splitter.scan import iter_records, parse_header

__all__ = [
    "Chunk",
    "Rejected",
    "SplitDone",
    "SplitEvent",
    "iter_records",
    "parse_header",
    "split_file",
    "split_file_async",
]
