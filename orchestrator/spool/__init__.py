"""The watched inbox: entries dropped into inbox/<route>/ become claimed files.

`inbox` holds the `Spool` (what to claim and when: the settle rule);
`claims` claims entries (intent recorded first, then the move, then done;
recovery of claims a crash cut short); `watcher` decides when to scan
(inotify as a hint, settle times, rescans as the truth); `fs` holds the
blocking filesystem helpers.
"""

from orchestrator.spool.fs import make_dir
from orchestrator.spool.inbox import Spool

__all__ = ["Spool", "make_dir"]
