"""The splitter: source files into chunks under Marketo's size limit.

`cutter` cuts byte-exact, quote-aware chunks and hands each record to `placing`,
which fills chunks and sets aside records too large for any chunk; for a route with
key columns `repeats` places them instead, moving a record whose key was seen nearby
to the file's `tail` (what it remembers of keys is `recent`; how a record's key is
read and hashed, `keyed`); `writer` writes each chunk file whole (temp name, then
rename) with its key set beside it; `scan` finds where records end and what makes a
file unreadable.
"""

from orchestrator.splitter.cutter import (
    SplitDone,
    SplitEvent,
    split_file,
    split_file_async,
)
from orchestrator.splitter.keyed import (
    KeyCollector,
    KeyRule,
    file_keys,
    meets,
    namespace_for,
    rule_for,
)
from orchestrator.splitter.placing import Rejected
from orchestrator.splitter.scan import iter_records, parse_header
from orchestrator.splitter.writer import (
    Chunk,
    gaps_path,
    lines_path,
    make_durable,
    read_numbers,
)

__all__ = [
    "Chunk",
    "KeyCollector",
    "KeyRule",
    "Rejected",
    "SplitDone",
    "SplitEvent",
    "file_keys",
    "gaps_path",
    "iter_records",
    "lines_path",
    "make_durable",
    "meets",
    "namespace_for",
    "parse_header",
    "read_numbers",
    "rule_for",
    "split_file",
    "split_file_async",
]
