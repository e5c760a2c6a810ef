"""The watched inbox: entries dropped into inbox/<route>/ become claimed files.

`inbox` holds the `Spool` (settle rule, claims recorded intent-first, inotify
as a hint and rescans as the truth); `fs` its blocking filesystem helpers.
"""

from orchestrator.spool.fs import make_dir
from orchestrator.spool.inbox import Spool

__all__ = ["Spool", "make_dir"]
