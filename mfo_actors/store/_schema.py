"""The SQLite schema and its migrations: one step function per schema version.

The version lives in ``PRAGMA user_version`` (a header field of the database file, so it is
read without a table). :func:`migrate` runs every step above the file's version in one
``BEGIN IMMEDIATE`` transaction, so a crash mid-migration leaves the old schema intact. A new
schema version appends a step to :data:`MIGRATIONS`; steps are never edited once released.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]


def _v1(conn: sqlite3.Connection) -> None:
    """Events (outbox + history), runs and task runs."""
    _run_script(
        conn,
        """
        CREATE TABLE events (
            seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- acceptance order
            id              TEXT    NOT NULL UNIQUE,            -- time-sortable (ids.new_id)
            source          TEXT    NOT NULL,
            type            TEXT    NOT NULL,
            received_at     REAL    NOT NULL,
            headers         BLOB    NOT NULL,                   -- JSON object
            body            BLOB    NOT NULL,
            content_type    TEXT    NOT NULL,
            is_json         INTEGER NOT NULL,
            dedupe_key      TEXT,
            size            INTEGER NOT NULL,                   -- len(body), for max_bytes
            status          TEXT    NOT NULL,                   -- pending|claimed|delivered|dead
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL    NOT NULL,
            last_error      TEXT,
            delivered_at    REAL,
            claim_token     TEXT,
            lease_until     REAL
        );
        -- Claiming (status='pending' in seq order), listing and counting by status.
        CREATE INDEX events_status ON events (status, seq);
        -- The outbox per source: finds each source's oldest undelivered event (its head).
        CREATE INDEX events_outbox ON events (source, seq)
            WHERE status IN ('pending', 'claimed');
        -- Provider-retry dedupe.
        CREATE INDEX events_dedupe ON events (source, dedupe_key)
            WHERE dedupe_key IS NOT NULL;

        CREATE TABLE runs (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id       TEXT    NOT NULL UNIQUE,
            flow         TEXT    NOT NULL,
            status       TEXT    NOT NULL,                      -- new|active|done|error
            trigger      TEXT    NOT NULL,
            event_id     TEXT,
            input        BLOB    NOT NULL,                      -- JSON object
            schedule_key TEXT,
            tick         REAL,
            created_at   REAL    NOT NULL,
            started_at   REAL,
            finished_at  REAL,
            error        TEXT,
            outputs      BLOB,                                  -- JSON object
            interrupted  INTEGER NOT NULL DEFAULT 0
        );
        -- A cron/interval tick fires once, even across restarts.
        CREATE UNIQUE INDEX runs_tick ON runs (flow, schedule_key, tick)
            WHERE schedule_key IS NOT NULL;
        CREATE INDEX runs_status ON runs (status, seq);
        CREATE INDEX runs_flow ON runs (flow, seq);

        CREATE TABLE task_runs (
            run_id      TEXT    NOT NULL,
            task_id     TEXT    NOT NULL,
            state       TEXT    NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            started_at  REAL,
            finished_at REAL,
            error       TEXT,
            output      BLOB,                                   -- JSON object, size-capped
            PRIMARY KEY (run_id, task_id)
        );
        """
    )


def _v2(conn: sqlite3.Connection) -> None:
    """Chat sessions: a key chosen in a flow -> an MFO thread, its turns and recent context."""
    _run_script(
        conn,
        """
        CREATE TABLE sessions (
            seq           INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id    TEXT    NOT NULL UNIQUE,
            key           TEXT    NOT NULL,
            thread_id     TEXT    NOT NULL,
            status        TEXT    NOT NULL,                     -- active|closed
            turns         INTEGER NOT NULL DEFAULT 0,
            created_at    REAL    NOT NULL,
            last_activity REAL    NOT NULL,
            closed_at     REAL,
            close_reason  TEXT,                                 -- expired|evicted|closed
            context       BLOB    NOT NULL,                     -- JSON list of recent messages
            metadata      BLOB    NOT NULL                      -- JSON object
        );
        -- At most one active session per key: what makes two racing opens share a thread.
        CREATE UNIQUE INDEX sessions_active_key ON sessions (key) WHERE status = 'active';
        -- Expiry and eviction (the active session idle the longest first).
        CREATE INDEX sessions_idle ON sessions (status, last_activity);
        CREATE INDEX sessions_key ON sessions (key, seq);
        """
    )


def _v3(conn: sqlite3.Connection) -> None:
    """Per-attempt delivery history; a replay keeps counting attempts (``attempt_base``)."""
    _run_script(
        conn,
        """
        ALTER TABLE events ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE attempts (
            event_id TEXT    NOT NULL,
            n        INTEGER NOT NULL,                          -- 1-based, over replays too
            at       REAL    NOT NULL,                          -- when the send started
            outcome  TEXT    NOT NULL,                          -- delivered|retry|dead
            status   INTEGER,                                   -- HTTP status, if answered
            error    TEXT,
            latency  REAL,                                      -- seconds to the answer
            PRIMARY KEY (event_id, n)
        ) WITHOUT ROWID
        """
    )


def _v4(conn: sqlite3.Connection) -> None:
    """The node that holds a claim or runs a run: start-up recovery takes back only its own."""
    _run_script(
        conn,
        """
        ALTER TABLE events ADD COLUMN claimed_by TEXT;
        ALTER TABLE runs ADD COLUMN node TEXT;
        """
    )


def _v5(conn: sqlite3.Connection) -> None:
    """A run's lease, renewed by its node: another node (sharing the file, or this host after
    its node id changed) takes over an active run only once its lease ran out."""
    _run_script(conn, "ALTER TABLE runs ADD COLUMN lease_until REAL")


def _v6(conn: sqlite3.Connection) -> None:
    """Ordering keys: each event's delivery lane, and one ``lanes`` row per lane.

    ``lane`` is the event's ordering key, else its source (``forwarder.ordering: source`` is
    the lane = source case); delivered rows are never claimed again, so only the others are
    backfilled. ``lanes`` tells an ordered claim which lanes to look at (``ready_at``: when
    next; infinity while idle) and from where (``cursor``: every event of the lane at or
    below it is settled), so a claim costs the lanes it takes, not the backlog or the number
    of idle keys. It replaces the loose index scan over ``events_outbox``, which probed every
    lane with pending events on each claim (one per user id, with user-id keys).
    """
    _run_script(
        conn,
        """
        ALTER TABLE events ADD COLUMN ordering_key TEXT;
        ALTER TABLE events ADD COLUMN lane TEXT;
        UPDATE events SET lane = source WHERE status <> 'delivered';
        DROP INDEX events_outbox;
        -- Each lane's outbox in acceptance order: ordered claims read heads from here.
        CREATE INDEX events_lanes ON events (lane, seq) WHERE status IN ('pending', 'claimed');
        CREATE TABLE lanes (
            lane     TEXT    PRIMARY KEY,
            cursor   INTEGER NOT NULL DEFAULT 0,
            ready_at REAL    NOT NULL
        );
        CREATE INDEX lanes_ready ON lanes (ready_at);
        INSERT INTO lanes (lane, cursor, ready_at)
            SELECT DISTINCT lane, 0, 0 FROM events WHERE status IN ('pending', 'claimed')
        """
    )


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it COMMITs the open transaction first, and migrations must be atomic.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


# MIGRATIONS[i] brings a file from version i to version i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]
SCHEMA_VERSION = len(MIGRATIONS)


class NewerSchemaError(Exception):
    """The file was written by a newer mfo-actors (its schema version is unknown here)."""


class NotAStoreError(Exception):
    """The file is an SQLite database of something else: tables, but no schema version."""


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Bring the schema of *conn* (in autocommit mode) up to :data:`SCHEMA_VERSION`.

    Returns:
      ``(version before, version after)``.

    Raises:
      NewerSchemaError: the file's version is above what this code knows.
      NotAStoreError: the file has tables but no version: another program's database
        (we never write into it).
      sqlite3.Error: the migration failed (it is rolled back).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        (before,) = conn.execute("PRAGMA user_version").fetchone()
        if before > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"schema version {before} is newer than this mfo-actors knows ({SCHEMA_VERSION})"
            )
        if before == 0:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name LIMIT 4")]
            if tables:
                raise NotAStoreError(
                    "an SQLite database of another program (tables: " + ", ".join(tables) + ")")
        for step in MIGRATIONS[before:]:
            step(conn)
        if before != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(before), SCHEMA_VERSION
