"""The PostgreSQL schema and its migrations: one step per version, run under an advisory lock.

Several daemons may start at once against one database. :func:`migrate` takes a transaction-
scoped advisory lock named after the schema first, so one of them migrates and the others
wait, then find the schema current. The version lives in ``meta`` (``schema_version``); every
step above it runs in that same transaction, so a crash mid-migration leaves the old schema
intact. A new version appends a step to :data:`MIGRATIONS`; released steps are never edited.

Why the tables look as they do (see ``_postgres.py`` for the queries):

- ``events.seq`` comes from an identity column and is the acceptance order. An append locks
  its lane's ``lanes`` row before inserting, so within a lane, seq order is commit order
  (a later commit never slips below a claimer's cursor). ``events.lane`` is the delivery
  lane: the ordering key (``forwarder.ordering: key``), else the source.
- ``lanes`` (``sources`` before version 2) has one row per lane: ``ready_at`` is when a
  claimer should look at it next (infinity while it has nothing to do) and ``cursor`` the seq
  below which all its events are settled, so an ordered claim reads a lane's head straight
  from ``events_lanes`` without walking entries of delivered rows. Claimers lock these rows
  with ``FOR UPDATE SKIP LOCKED``. Idle rows are pruned (one per user id, with user-id keys);
  every write that needs one upserts it.
- ``dedupe`` holds one row per (source, dedupe key): ``INSERT ... ON CONFLICT`` decides, under
  concurrency, which delivery is the first.
- ``counts`` holds one row of counters per node, changed in the node's own transactions: their
  sum is the cluster's outbox, and no row is written by two nodes (no hot row).
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "NewerSchemaError", "migrate"]


_V1 = """
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE events (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- acceptance order
    id              text    NOT NULL UNIQUE,
    source          text    NOT NULL,
    type            text    NOT NULL,
    received_at     float8  NOT NULL,
    headers         bytea   NOT NULL,                                 -- JSON object
    body            bytea   NOT NULL,
    content_type    text    NOT NULL,
    is_json         boolean NOT NULL,
    dedupe_key      text,
    size            integer NOT NULL,
    status          text    NOT NULL,                    -- pending|claimed|delivered|dead
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at float8  NOT NULL,
    last_error      text,
    delivered_at    float8,
    claim_token     text,
    claimed_by      text,                                 -- the node holding the claim
    lease_until     float8,
    attempt_base    integer NOT NULL DEFAULT 0            -- attempts before the last replay
);
-- Each source's outbox in acceptance order: ordered claims read heads from here.
CREATE INDEX events_outbox ON events (source, seq) WHERE status IN ('pending', 'claimed');
-- Unordered claims: pending events in acceptance order.
CREATE INDEX events_pending ON events (seq) WHERE status = 'pending';
-- Lease expiry and start-up recovery.
CREATE INDEX events_claimed ON events (claimed_by, lease_until) WHERE status = 'claimed';
-- Listing by status, and pruning delivered events oldest first.
CREATE INDEX events_status ON events (status, seq);
-- Per-attempt delivery history (events show).
CREATE TABLE attempts (
    event_id text    NOT NULL,
    n        integer NOT NULL,                            -- 1-based, over replays too
    at       float8  NOT NULL,                            -- when the send started
    outcome  text    NOT NULL,                            -- delivered|retry|dead
    status   integer,                                     -- HTTP status, if answered
    error    text,
    latency  float8,                                      -- seconds to the answer
    PRIMARY KEY (event_id, n)
);
CREATE TABLE sources (
    source   text   PRIMARY KEY,
    cursor   bigint NOT NULL DEFAULT 0,
    ready_at float8 NOT NULL
);
CREATE INDEX sources_ready ON sources (ready_at);
CREATE TABLE dedupe (
    source      text   NOT NULL,
    dedupe_key  text   NOT NULL,
    event_id    text   NOT NULL,
    received_at float8 NOT NULL,
    PRIMARY KEY (source, dedupe_key)
);
CREATE INDEX dedupe_age ON dedupe (received_at);
CREATE TABLE counts (
    node          text   PRIMARY KEY,
    pending       bigint NOT NULL DEFAULT 0,
    pending_bytes bigint NOT NULL DEFAULT 0,
    delivered     bigint NOT NULL DEFAULT 0,
    dead          bigint NOT NULL DEFAULT 0
);
CREATE TABLE runs (
    seq          bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       text    NOT NULL UNIQUE,
    flow         text    NOT NULL,
    status       text    NOT NULL,                       -- new|active|done|error
    trigger      text    NOT NULL,
    event_id     text,
    input        bytea   NOT NULL,                       -- JSON object
    schedule_key text,
    tick         float8,
    created_at   float8  NOT NULL,
    started_at   float8,
    finished_at  float8,
    error        text,
    outputs      bytea,                                  -- JSON object
    interrupted  integer NOT NULL DEFAULT 0,
    node         text,                                   -- the node running an active run
    lease_until  float8                                  -- renewed by that node while alive
);
-- A cron/interval tick fires once across every node and restart.
CREATE UNIQUE INDEX runs_tick ON runs (flow, schedule_key, tick) WHERE schedule_key IS NOT NULL;
CREATE INDEX runs_status ON runs (status, seq);
CREATE INDEX runs_flow ON runs (flow, seq);
CREATE INDEX runs_active ON runs (node, lease_until) WHERE status = 'active';
-- Chat sessions: a key chosen in a flow -> an MFO thread, its turns and recent context.
CREATE TABLE sessions (
    seq           bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id    text    NOT NULL UNIQUE,
    key           text    NOT NULL,
    thread_id     text    NOT NULL,
    status        text    NOT NULL,                      -- active|closed
    turns         integer NOT NULL DEFAULT 0,
    created_at    float8  NOT NULL,
    last_activity float8  NOT NULL,
    closed_at     float8,
    close_reason  text,                                  -- expired|evicted|closed
    context       bytea   NOT NULL,                      -- JSON list of recent messages
    metadata      bytea   NOT NULL                       -- JSON object
);
-- At most one active session per key, across nodes: two racing opens share one thread.
CREATE UNIQUE INDEX sessions_active_key ON sessions (key) WHERE status = 'active';
CREATE INDEX sessions_idle ON sessions (status, last_activity);
CREATE INDEX sessions_key ON sessions (key, seq);
CREATE TABLE task_runs (
    seq         bigint  GENERATED ALWAYS AS IDENTITY,    -- the order tasks are shown in
    run_id      text    NOT NULL,
    task_id     text    NOT NULL,
    state       text    NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    started_at  float8,
    finished_at float8,
    error       text,
    output      bytea,                                   -- JSON object, size-capped
    PRIMARY KEY (run_id, task_id)
)
"""


def _v1(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Events (outbox + history + attempts), sources, dedupe keys, counters, runs, task runs
    and chat sessions."""
    _run_script(conn, _V1)


_V2 = """
ALTER TABLE events ADD COLUMN ordering_key text;
ALTER TABLE events ADD COLUMN lane text;
UPDATE events SET lane = source WHERE status <> 'delivered';
DROP INDEX events_outbox;
CREATE INDEX events_lanes ON events (lane, seq) WHERE status IN ('pending', 'claimed');
ALTER TABLE sources RENAME TO lanes;
ALTER TABLE lanes RENAME COLUMN source TO lane;
ALTER INDEX sources_ready RENAME TO lanes_ready
"""


def _v2(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Ordering keys: each event's delivery lane (its ordering key, else its source), and
    ``sources`` generalised to ``lanes`` (a source's row becomes its lane's: same cursor)."""
    _run_script(conn, _V2)


def _run_script(conn: psycopg.Connection[tuple[object, ...]], script: str) -> None:
    """Each ``;``-separated statement of *script*, in the caller's transaction."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement.encode())


# MIGRATIONS[i] brings a schema from version i to version i + 1.
MIGRATIONS: list[Callable[[psycopg.Connection[tuple[object, ...]]], None]] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


class NewerSchemaError(Exception):
    """The schema was written by a newer mfo-actors (its version is unknown here)."""


def migrate(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> tuple[int, int]:
    """Create *schema* if needed and bring it up to :data:`SCHEMA_VERSION` (autocommit *conn*).

    Returns:
      ``(version before, version after)``.

    Raises:
      NewerSchemaError: the schema's version is above what this code knows.
      psycopg.Error: the migration failed (it is rolled back).
    """
    with conn.transaction():
        # hashtext() of a fixed prefix + the schema: one lock per schema, in any database.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                     (f"mfo_actors.migrate:{schema}",))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        row = conn.execute(
            "SELECT to_regclass('meta') IS NOT NULL"
        ).fetchone()
        before = 0
        if row is not None and row[0]:
            found = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            before = int(str(found[0])) if found is not None else 0
        if before > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"schema version {before} is newer than this mfo-actors knows ({SCHEMA_VERSION})"
            )
        for step in MIGRATIONS[before:]:
            step(conn)
        if before != SCHEMA_VERSION:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (str(SCHEMA_VERSION),),
            )
    return before, SCHEMA_VERSION
