"""The state store: SQLite in WAL mode, the truth that directories mirror.

`store` holds the `Store` and how it opens; the `Store` is made of `reads` (the
queries), `transitions` (a file's way from claim to result), `submissions` (a
chunk's way through Marketo), `refusals` (what Marketo refuses the daemon) and
`conflicts` (the key rule's conflicts), all run by `connection` (the connection, its
thread, the one transaction wrapper, SQLite's errors as ours). `schema` holds the tables
and their migrations; `rows` turns rows into records and keeps the transition rules.
"""

from orchestrator.store.store import LATEST_VERSION, Claim, Hold, Keyed, Recovery, Store

__all__ = ["LATEST_VERSION", "Claim", "Hold", "Keyed", "Recovery", "Store"]
