"""The SQLite ``runs`` and ``task_runs`` tables: the scheduler's durable mailbox and history.

A run is created ``new`` (by an append that triggers flows, or by a schedule), claimed
``active`` by the scheduler (recording this node and a lease it renews), and settled ``done``
or ``error``; its tasks' records are upserted as they go. Usually one node uses a file, but
not always: ``flows run`` in the CLI runs its run as a node of its own, two daemons may share
a ``store.path``, and a node's id changes with the host's boot id. So, as on Postgres,
start-up recovery takes back only this node's runs, and other nodes' come back once their
lease ran out (*orphaned*); a run is settled only by the node that holds it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import partial
from typing import Any

from mfo_actors.observability import get_logger
from mfo_actors.store._codec import (
    RUN_COLS,
    TASK_UPSERT,
    capped_json,
    json_bytes,
    run_record,
    task_params,
)
from mfo_actors.store._engine import NO_CHANGE, Delta, Op
from mfo_actors.store._protocol import RunRecord, RunRequest, TaskRunRecord
from mfo_actors.store._sqlite_base import SQLiteTables, marks
from mfo_actors.store._tables import ORPHANED_RUNS, RENEW_RUNS, SharedRuns, in_seq_order

__all__ = ["SQLiteRuns", "insert_runs"]

log = get_logger("mfo_actors.store.sqlite")


def insert_runs(conn: sqlite3.Connection, runs: Sequence[RunRequest], now: float,
                *, node: str | None = None, lease_until: float | None = None) -> list[str]:
    """Insert *runs* as ``new``, or ``active`` and owned by *node* (its lease running to
    *lease_until*) when one is given."""
    created = []
    status, started_at = ("active", now) if node else ("new", None)
    for run in runs:
        cur = conn.execute(
            "INSERT OR IGNORE INTO runs (run_id, flow, status, trigger, event_id, input, "
            "schedule_key, tick, created_at, started_at, node, lease_until) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.flow, status, run.trigger, run.event_id, json_bytes(run.input),
             run.schedule_key, run.tick, now, started_at, node, lease_until),
        )
        if cur.rowcount == 1:
            created.append(run.run_id)
    return created


class SQLiteRuns(SQLiteTables, SharedRuns):
    """Runs and their tasks' records: the writes (the calls and reads are SharedRuns')."""

    def _tx_create_runs(
        self, runs: Sequence[RunRequest], claim: bool, conn: sqlite3.Connection, now: float
    ) -> tuple[list[str], Delta]:
        if claim:
            created = insert_runs(conn, runs, now, node=self._node,
                                  lease_until=now + self._node_lease)
        else:
            created = insert_runs(conn, runs, now)
        return created, Delta(wake_runs=bool(created) and not claim)

    def _tx_claim_runs(
        self, limit: int, conn: sqlite3.Connection, now: float
    ) -> tuple[list[RunRecord], Delta]:
        rows = conn.execute(
            f"UPDATE runs SET status = 'active', started_at = ?, node = ?, lease_until = ? "
            f"WHERE seq IN (SELECT seq FROM runs WHERE status = 'new' ORDER BY seq LIMIT ?) "
            f"RETURNING seq, {RUN_COLS}",
            (now, self._node, now + self._node_lease, limit),
        ).fetchall()
        return in_seq_order(rows, run_record), NO_CHANGE

    def _tx_record_task(
        self, r: TaskRunRecord, conn: sqlite3.Connection, now: float
    ) -> tuple[None, Delta]:
        conn.execute(TASK_UPSERT, task_params(r))
        return None, NO_CHANGE

    def _tx_finish_run(
        self, run_id: str, status: str, error: str | None, outputs: dict[str, Any] | None,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[None, Delta]:
        n = conn.execute(
            "UPDATE runs SET status = ?, finished_at = ?, error = ?, outputs = ?, "
            "started_at = COALESCE(started_at, ?), lease_until = NULL WHERE run_id = ? "
            "AND (status = 'new' OR (status = 'active' AND (node = ? OR node IS NULL)))",
            (status, now, error, capped_json(outputs), now, run_id, self._node),
        ).rowcount
        if not n:
            log.warning("store.finish_run_ignored", run_id=run_id, status=status)
        return None, NO_CHANGE

    async def recover_runs(
        self, *, rerun_flows: Sequence[str], orphaned: bool = False,
        run_ids: Sequence[str] | None = None,
    ) -> list[RunRecord]:
        """This node's runs left ``active`` by a crash (or, with *orphaned*, other nodes'
        whose lease ran out): ``interrupted += 1``, then ``new`` again (flows in
        *rerun_flows*) or ``error`` "interrupted" with their unfinished tasks ``cancelled``;
        with *run_ids*, only those of this node's."""
        return await self._submit(Op(partial(
            self._tx_recover_runs, frozenset(rerun_flows), orphaned,
            None if run_ids is None else tuple(run_ids))))

    def _tx_recover_runs(
        self, rerun: frozenset[str], orphaned: bool, run_ids: Sequence[str] | None,
        conn: sqlite3.Connection, now: float,
    ) -> tuple[list[RunRecord], Delta]:
        params: tuple[Any, ...]
        if orphaned:
            where, params = ORPHANED_RUNS, (self._node, now)
        elif run_ids is not None:
            where = f"status = 'active' AND node = ? AND run_id IN ({marks(len(run_ids))})"
            params = (self._node, *run_ids)
        else:  # a run without node: claimed before nodes were recorded (schema 4)
            where, params = "status = 'active' AND (node = ? OR node IS NULL)", (self._node,)
        found = conn.execute(
            f"SELECT run_id, flow FROM runs WHERE {where} ORDER BY seq", params).fetchall()
        out: list[RunRecord] = []
        for run_id, flow in found:
            if flow in rerun:
                conn.execute(
                    "UPDATE runs SET status = 'new', started_at = NULL, node = NULL, "
                    "lease_until = NULL, interrupted = interrupted + 1 WHERE run_id = ?",
                    (run_id,))
            else:
                conn.execute(
                    "UPDATE runs SET status = 'error', error = 'interrupted', finished_at = ?, "
                    "node = NULL, lease_until = NULL, interrupted = interrupted + 1 "
                    "WHERE run_id = ?", (now, run_id))
                conn.execute(
                    "UPDATE task_runs SET state = 'cancelled', error = 'interrupted', "
                    "finished_at = ? WHERE run_id = ? AND state IN ('pending', 'running')",
                    (now, run_id))
            row = conn.execute(f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?",
                               (run_id,)).fetchone()
            out.append(run_record(row))
        if out:
            log.info("store.runs_recovered", count=len(out), orphaned=orphaned,
                     rerun=sum(1 for r in out if r.status == "new"))
        return out, Delta(wake_runs=any(r.status == "new" for r in out))

    def _tx_renew_runs(self, conn: sqlite3.Connection, now: float) -> tuple[None, Delta]:
        conn.execute(RENEW_RUNS, (now + self._node_lease, self._node))
        return None, NO_CHANGE
