"""The splitter: source files into chunks under Marketo's size limit.

`cutter` cuts byte-exact, quote-aware chunks and sets aside records too large
for any chunk; `writer` writes each chunk file whole (temp name, then rename);
`scan` finds where records end and what makes a file unreadable.
"""

from orchestrator.splitter.cutter import (
    Rejected,
    SplitDone,
    SplitEvent,
    split_file,
    split_file_async,
)
from orchestrator.splitter.scan import iter_records, parse_header
from orchestrator.splitter.writer import Chunk

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
