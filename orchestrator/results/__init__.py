"""Results: what happens when a chunk finishes, and what a finished file leaves behind.

`stage` holds the `Results` stage (a chunk went final: attribute it, finish its
files); `attribution` gives a final chunk's failed and warned rows back to its
files (part files), using `matching`, the forward walk that finds each row's
record and source line, and `columns`, which places Marketo's rows under the
source's columns by name; `finish` writes a finished file's result.json and moves
its source, with `merge` writing its merged failures and warnings files.
"""

from orchestrator.results.attribution import attribute_chunk
from orchestrator.results.finish import RESULT_SUFFIX, Outcome, finish_file, outcome
from orchestrator.results.stage import Results

__all__ = ["RESULT_SUFFIX", "Outcome", "Results", "attribute_chunk", "finish_file", "outcome"]
