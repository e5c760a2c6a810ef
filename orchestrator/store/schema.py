"""The state store's schema: its tables, and the migrations that bring a database to them.

The schema version lives in `PRAGMA user_version`; `_MIGRATIONS[n]` takes a
database from version n to n + 1, each in one transaction. A database newer than
this program knows is refused untouched.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from orchestrator.errors import StoreError
from orchestrator.store.connection import RECOVER_HINT, transaction

# Statements per migration; frozen text, never generated from the enums (v1 must stay v1).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            route TEXT NOT NULL,
            name TEXT NOT NULL,
            source_path TEXT NOT NULL,
            work_path TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('claiming', 'claimed', 'splitting', 'split',
                                                   'finishing', 'complete', 'failed')),
            max_chunk_bytes INTEGER NOT NULL,
            claimed_at TEXT NOT NULL,
            rows INTEGER,
            chunks_total INTEGER,
            error TEXT,
            result_path TEXT UNIQUE,
            finished_at TEXT
        )""",
        "CREATE INDEX files_by_status ON files (status)",
        "CREATE INDEX files_by_claim ON files (claimed_at, id)",
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            file_id INTEGER NOT NULL REFERENCES files (id),
            idx INTEGER NOT NULL,
            path TEXT NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            first_line INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'submitting', 'submitted',
                                                   'complete', 'failed')),
            batch_id INTEGER,
            submit_attempts INTEGER NOT NULL DEFAULT 0,
            marketo_status TEXT,
            rows_processed INTEGER NOT NULL DEFAULT 0,
            rows_failed INTEGER NOT NULL DEFAULT 0,
            rows_with_warning INTEGER NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT '',
            failures_path TEXT,
            warnings_path TEXT,
            submitted_at TEXT,
            finished_at TEXT,
            UNIQUE (file_id, idx)
        )""",
        "CREATE INDEX chunks_by_status ON chunks (status)",
        """CREATE TABLE rejects (
            file_id INTEGER NOT NULL REFERENCES files (id),
            line INTEGER NOT NULL,
            "offset" INTEGER NOT NULL,
            size INTEGER NOT NULL,
            reason TEXT NOT NULL,
            UNIQUE (file_id, line)
        )""",
        "CREATE TABLE api_calls (day TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    ),
    # v2: the hand-over id of each file (orchestrator.tickets); files claimed before it
    # get one made of their claim second and their row id.
    (
        "ALTER TABLE files ADD COLUMN job_id TEXT",
        """UPDATE files SET job_id = strftime('%Y%m%dT%H%M%SZ', claimed_at)
            || '-' || printf('%04x', id % 65536)""",
        "CREATE INDEX files_by_job_id ON files (job_id)",
    ),
    # v3, retention: finished files are pruned by finished_at, and counts of files
    # and chunks by status (and rows processed) are kept by triggers as rows change,
    # so /metrics and status read a few rows instead of scanning the history.
    (
        "CREATE INDEX files_by_finished ON files (finished_at)",
        "CREATE TABLE tallies (name TEXT PRIMARY KEY, n INTEGER NOT NULL)",
        """INSERT INTO tallies (name, n) VALUES
            ('files:claiming', 0), ('files:claimed', 0), ('files:splitting', 0),
            ('files:split', 0), ('files:finishing', 0), ('files:complete', 0),
            ('files:failed', 0), ('chunks:pending', 0), ('chunks:submitting', 0),
            ('chunks:submitted', 0), ('chunks:complete', 0), ('chunks:failed', 0),
            ('rows:processed', 0)""",
        """UPDATE tallies SET n = (SELECT count(*) FROM files AS f
            WHERE 'files:' || f.status = tallies.name) WHERE tallies.name LIKE 'files:%'""",
        """UPDATE tallies SET n = (SELECT count(*) FROM chunks AS c
            WHERE 'chunks:' || c.status = tallies.name) WHERE tallies.name LIKE 'chunks:%'""",
        """UPDATE tallies SET n = (SELECT coalesce(sum(rows_processed), 0) FROM chunks)
            WHERE name = 'rows:processed'""",
        """CREATE TRIGGER files_tally_insert AFTER INSERT ON files BEGIN
            UPDATE tallies SET n = n + 1 WHERE name = 'files:' || NEW.status;
        END""",
        """CREATE TRIGGER files_tally_delete AFTER DELETE ON files BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'files:' || OLD.status;
        END""",
        """CREATE TRIGGER files_tally_update AFTER UPDATE OF status ON files
            WHEN OLD.status <> NEW.status BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'files:' || OLD.status;
            UPDATE tallies SET n = n + 1 WHERE name = 'files:' || NEW.status;
        END""",
        """CREATE TRIGGER chunks_tally_insert AFTER INSERT ON chunks BEGIN
            UPDATE tallies SET n = n + 1 WHERE name = 'chunks:' || NEW.status;
            UPDATE tallies SET n = n + NEW.rows_processed WHERE name = 'rows:processed';
        END""",
        """CREATE TRIGGER chunks_tally_delete AFTER DELETE ON chunks BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'chunks:' || OLD.status;
            UPDATE tallies SET n = n - OLD.rows_processed WHERE name = 'rows:processed';
        END""",
        """CREATE TRIGGER chunks_tally_status AFTER UPDATE OF status ON chunks
            WHEN OLD.status <> NEW.status BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'chunks:' || OLD.status;
            UPDATE tallies SET n = n + 1 WHERE name = 'chunks:' || NEW.status;
        END""",
        """CREATE TRIGGER chunks_tally_rows AFTER UPDATE OF rows_processed ON chunks
            WHEN OLD.rows_processed <> NEW.rows_processed BEGIN
            UPDATE tallies SET n = n + NEW.rows_processed - OLD.rows_processed
                WHERE name = 'rows:processed';
        END""",
    ),
    # v4: creates whose outcome is unknown (timeout, drop or 5xx after the body went out,
    # or a kill while SUBMITTING): each may have left a job at Marketo.
    ("ALTER TABLE chunks ADD COLUMN unknown_outcomes INTEGER NOT NULL DEFAULT 0",),
    # v5, packing: a chunk holds the records of one or more files. `pieces` says which
    # (seq 1 is the chunk's owner, its oldest file, whose id chunks.file_id keeps), with
    # each file's share of the counters once failures are matched back (`attributed`).
    # A pack still taking files is a PENDING chunk with sealed = 0, never submitted.
    (
        """CREATE TABLE pieces (
            chunk_id INTEGER NOT NULL REFERENCES chunks (id),
            file_id INTEGER NOT NULL REFERENCES files (id),
            seq INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            first_row INTEGER NOT NULL,
            first_line INTEGER NOT NULL,
            rows_processed INTEGER NOT NULL DEFAULT 0,
            rows_failed INTEGER NOT NULL DEFAULT 0,
            rows_with_warning INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (chunk_id, seq),
            UNIQUE (file_id, chunk_id)
        )""",
        "ALTER TABLE chunks ADD COLUMN files INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE chunks ADD COLUMN sealed INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE chunks ADD COLUMN attributed INTEGER NOT NULL DEFAULT 0",
        """INSERT INTO pieces (chunk_id, file_id, seq, rows, bytes, first_row, first_line)
            SELECT id, file_id, 1, rows, bytes, 0, first_line FROM chunks""",
    ),
    # v6: a file's hand-over id is its ticket ("job" names a Marketo import job only).
    (
        "DROP INDEX files_by_job_id",
        "ALTER TABLE files RENAME COLUMN job_id TO ticket",
        "CREATE INDEX files_by_ticket ON files (ticket)",
    ),
    # v7: rows of Marketo's failures and warnings files that matched no record of the
    # chunk (a shared chunk's are in every file's share and files).
    ("ALTER TABLE chunks ADD COLUMN unmatched_rows INTEGER NOT NULL DEFAULT 0",),
    # v8: a chunk whose outcome is unknown (Marketo refused its status call for good)
    # ends 'unknown', a final status of its own, tallied like the others. SQLite cannot
    # alter a CHECK, and rebuilding `chunks` would drop columns a later migration adds,
    # so the table's stored definition gains the value in place, as SQLite's ALTER TABLE
    # page allows for a change that leaves every stored row valid (writable_schema);
    # RESET reloads this connection's schema, and re-creating an index moves the schema
    # cookie, so that every other connection reloads it too.
    (
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET sql = replace(sql,"
        " '''complete'', ''failed'')', '''complete'', ''failed'', ''unknown'')')"
        " WHERE type = 'table' AND name = 'chunks'",
        "PRAGMA writable_schema = RESET",
        "DROP INDEX chunks_by_status",
        "CREATE INDEX chunks_by_status ON chunks (status)",
        "INSERT INTO tallies (name, n) VALUES ('chunks:unknown', 0)",
    ),
    # v9: what Marketo refuses the daemon for a reason of configuration (refused
    # credentials, 603), as the daemon last learnt it, for `submit --wait` to read.
    (
        """CREATE TABLE refusals (
            what TEXT PRIMARY KEY,
            code TEXT NOT NULL,
            message TEXT NOT NULL,
            since TEXT NOT NULL,
            last TEXT NOT NULL
        )""",
    ),
    # v10: the subscription's daily quota as the daemon last reckoned it (one row), so
    # `status` says why no new job is created and when the quota resets.
    (
        """CREATE TABLE quota (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            as_of TEXT NOT NULL,
            daily_quota INTEGER NOT NULL,
            daily_reserve INTEGER NOT NULL,
            resets_at TEXT NOT NULL,
            marketo_count INTEGER,
            read_at TEXT,
            next_read_at TEXT,
            ours_since INTEGER NOT NULL,
            ours_today INTEGER NOT NULL,
            paused_until TEXT
        )""",
    ),
    # v11: what a file's header check warned of (a JSON array of sentences; NULL: none).
    ("ALTER TABLE files ADD COLUMN warnings TEXT",),
    # v12, the key rule (issue 20; see store.conflicts): a chunk recorded whole takes a place
    # (`seq`) in `key_order`, unchecked until its conflicts with earlier chunks are known,
    # and stays there while it holds its keys (until it is done). A conflict (earlier,
    # later): later waits while earlier is in `key_order`. Chunks recorded before this
    # migration have no place: no keys were kept for them.
    (
        """CREATE TABLE key_order (
            chunk_id INTEGER PRIMARY KEY REFERENCES chunks (id),
            seq INTEGER NOT NULL,
            checked INTEGER NOT NULL DEFAULT 0
        )""",
        # Columns in the key's order: SQLite 3.40's quick_check misreads a WITHOUT ROWID
        # table whose columns are declared in another order than its primary key.
        """CREATE TABLE conflicts (
            later INTEGER NOT NULL REFERENCES chunks (id),
            earlier INTEGER NOT NULL REFERENCES chunks (id),
            PRIMARY KEY (later, earlier)
        ) WITHOUT ROWID""",
        "CREATE INDEX conflicts_by_earlier ON conflicts (earlier)",
    ),
)
# A new migration is appended (the next is v13); a released one is never renumbered.
LATEST_VERSION = len(_MIGRATIONS)


def read_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def check_version(path: Path, version: int) -> None:
    """Refuse a database from a newer release: its schema is not ours to read or change."""
    if version > LATEST_VERSION:
        raise StoreError(
            path,
            f"schema version {version} is newer than this program knows ({LATEST_VERSION}): "
            f"run a newer marketo-orchestrator, or {RECOVER_HINT}",
        )


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to LATEST_VERSION, one migration per transaction."""
    # Most opens find nothing to do: they learn it without the write lock, so a reader
    # opening beside a busy daemon does not queue behind its commits.
    with transaction(conn, write=False):
        if read_version(conn) == LATEST_VERSION:
            return
    while True:
        with transaction(conn):
            # Read under the write lock: another process may have migrated meanwhile.
            version = read_version(conn)
            check_version(path, version)
            if version == LATEST_VERSION:
                return
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
