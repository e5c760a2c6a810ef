"""The state store: SQLite in WAL mode, the truth that directories mirror.

`store` holds the `Store` (one method per state transition); `schema` the
tables, migrations and the mapping of rows to records.
"""

from orchestrator.store.store import LATEST_VERSION, Claim, Recovery, Store

__all__ = ["LATEST_VERSION", "Claim", "Recovery", "Store"]
