"""The coordination database's schema: what daemons sharing a Marketo subscription share.

Everything lives in one PostgreSQL schema, `marketo_orchestrator`, so the database
can hold other things too. Its version is a row of `meta`; `MIGRATIONS[n]` takes the
schema from version n to n + 1. Whichever daemons start first create or migrate it:
each migration runs under a transaction-level advisory lock, and the version is read
again once the lock is held, so two daemons starting at once never apply one twice.

The tables, per subscription (a Marketo instance, named by its REST host):
- `subscriptions`: one row, the shared model of Marketo's queue (slots others hold,
  jobs a lost create may have made and nobody can see, the 1016 backoff), the 606
  hold, the 607 pause and the last reading of Marketo's own usage count. Admission
  locks this row in a statement of its own, so admissions take turns.
- `daemons`: one row per daemon, its lease and epoch (raised when it is taken as
  dead, so a late write of its old epoch is refused) and the limits it runs with (the
  strictest of all live daemons' apply).
- `chunks`: every chunk any daemon registered, in the order they were registered (the
  id; its file's claim time from the database's clock breaks ties of FIFO order), with
  its state, its queue slot while it is outstanding (a partial unique index refuses a
  second job in one slot), its batch id, and what another daemon needs to poll it.
- `keys` and `edges`: the record keys of unfinished chunks, and which chunk waits for
  which (the key rule across daemons).
- `calls`: every Marketo call any daemon makes, stamped by the database's clock: the
  call window, the calls in flight and the day's count are counted here.
"""

from __future__ import annotations

from typing import Final, LiteralString

SCHEMA: Final = "marketo_orchestrator"
LOCK_KEY: Final = 0x6D6F5F736368656D  # advisory lock taken while the schema changes

MIGRATIONS: Final[tuple[tuple[LiteralString, ...], ...]] = (
    (
        "CREATE SCHEMA IF NOT EXISTS marketo_orchestrator",
        "CREATE TABLE IF NOT EXISTS marketo_orchestrator.meta (version integer NOT NULL)",
        "INSERT INTO marketo_orchestrator.meta (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM marketo_orchestrator.meta)",
        """CREATE TABLE marketo_orchestrator.subscriptions (
            id text PRIMARY KEY,
            foreign_slots integer NOT NULL DEFAULT 0,
            orphans integer NOT NULL DEFAULT 0,
            backoff_attempts integer NOT NULL DEFAULT 0,
            backoff_until timestamptz,
            backoff_reason text NOT NULL DEFAULT '',
            hold_until timestamptz,
            paused_until timestamptz,
            usage_day date,
            usage_total integer,
            usage_read_at timestamptz,
            finished_jobs bigint NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE marketo_orchestrator.daemons (
            subscription text NOT NULL REFERENCES marketo_orchestrator.subscriptions (id),
            instance text NOT NULL,
            epoch bigint NOT NULL,
            alive boolean NOT NULL,
            lease_until timestamptz NOT NULL,
            started_at timestamptz NOT NULL,
            queued_jobs integer NOT NULL,
            calls_per_window integer NOT NULL,
            window_seconds double precision NOT NULL,
            calls_in_flight integer NOT NULL,
            paused_reason text NOT NULL DEFAULT '',
            daily_quota integer NOT NULL,
            daily_reserve integer NOT NULL,
            PRIMARY KEY (subscription, instance)
        )""",
        """CREATE TABLE marketo_orchestrator.files (
            subscription text NOT NULL REFERENCES marketo_orchestrator.subscriptions (id),
            instance text NOT NULL,
            file_ref bigint NOT NULL,
            claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (subscription, instance, file_ref)
        )""",
        """CREATE TABLE marketo_orchestrator.chunks (
            id bigserial PRIMARY KEY,
            subscription text NOT NULL REFERENCES marketo_orchestrator.subscriptions (id),
            instance text NOT NULL,
            file_ref bigint NOT NULL,
            chunk_ref bigint NOT NULL,
            idx integer NOT NULL,
            claimed_at timestamptz NOT NULL,
            list_id bigint NOT NULL DEFAULT 0,
            object text NOT NULL,
            api_name text NOT NULL DEFAULT '',
            state text NOT NULL CHECK (state IN
                ('pending', 'creating', 'submitted', 'done', 'dropped')),
            slot integer,
            epoch bigint,
            batch_id bigint,
            unknown_outcomes integer NOT NULL DEFAULT 0,
            blocks_until_finished bigint NOT NULL DEFAULT 0,
            registered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            finished_at timestamptz,
            UNIQUE (subscription, instance, chunk_ref),
            CHECK ((state IN ('creating', 'submitted')) = (slot IS NOT NULL))
        )""",
        # The database itself refuses an 11th outstanding job: one row per slot.
        """CREATE UNIQUE INDEX chunks_one_job_a_slot ON marketo_orchestrator.chunks (subscription, slot)
            WHERE state IN ('creating', 'submitted')""",
        """CREATE INDEX chunks_unfinished ON marketo_orchestrator.chunks (subscription, state, id)
            WHERE state IN ('pending', 'creating', 'submitted')""",
        """CREATE TABLE marketo_orchestrator.keys (
            chunk bigint NOT NULL REFERENCES marketo_orchestrator.chunks (id) ON DELETE CASCADE,
            key bigint NOT NULL
        )""",
        "CREATE INDEX keys_by_key ON marketo_orchestrator.keys (key)",
        "CREATE INDEX keys_by_chunk ON marketo_orchestrator.keys (chunk)",
        """CREATE TABLE marketo_orchestrator.edges (
            held bigint NOT NULL REFERENCES marketo_orchestrator.chunks (id) ON DELETE CASCADE,
            blocker bigint NOT NULL REFERENCES marketo_orchestrator.chunks (id) ON DELETE CASCADE,
            PRIMARY KEY (held, blocker)
        )""",
        """CREATE TABLE marketo_orchestrator.calls (
            id bigserial PRIMARY KEY,
            subscription text NOT NULL,
            instance text NOT NULL,
            operation text NOT NULL,
            counted boolean NOT NULL,
            at timestamptz NOT NULL,
            done_at timestamptz
        )""",
        "CREATE INDEX calls_by_time ON marketo_orchestrator.calls (subscription, at)",
    ),
)
LATEST_VERSION: Final = len(MIGRATIONS)
