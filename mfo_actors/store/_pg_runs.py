"""The Postgres ``runs`` and ``task_runs`` tables: the scheduler's durable mailbox and history,
shared by every node.

A run is created ``new`` (by an append that triggers flows, or by a schedule), claimed
``active`` by one node (``FOR UPDATE SKIP LOCKED``: others skip it) under a lease that node
renews, and settled ``done`` or ``error``. Start-up recovery takes back this node's runs, and
the runs of nodes whose lease ran out (*orphaned*).
"""

from __future__ import annotations

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
from mfo_actors.store._pg_base import Conn, PostgresTables, Tx, locked
from mfo_actors.store._protocol import RunRecord, RunRequest, TaskRunRecord
from mfo_actors.store._tables import ORPHANED_RUNS, POSTGRES, SharedRuns, in_seq_order

__all__ = ["PostgresRuns", "insert_runs"]

log = get_logger("mfo_actors.store.postgres")

_TASK_UPSERT = POSTGRES.sql(TASK_UPSERT).encode()
_ORPHANED_RUNS = POSTGRES.sql(ORPHANED_RUNS)


def insert_runs(conn: Conn, runs: Sequence[RunRequest], now: float, *,
                node: str | None = None, lease_until: float | None = None) -> list[str]:
    """Insert *runs* as ``new``, or ``active`` and owned by *node* (its lease running to
    *lease_until*) when one is given; skip ids and ticks seen, by any node."""
    created = []
    status, started = ("active", now) if node else ("new", None)
    for run in runs:
        row = conn.execute(
            "INSERT INTO runs (run_id, flow, status, trigger, event_id, input, schedule_key, "
            "tick, created_at, started_at, node, lease_until) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING run_id",
            (run.run_id, run.flow, status, run.trigger, run.event_id, json_bytes(run.input),
             run.schedule_key, run.tick, now, started, node, lease_until),
        ).fetchone()
        if row is not None:
            created.append(run.run_id)
    return created


class PostgresRuns(PostgresTables, SharedRuns):
    """Runs and their tasks' records: the writes (the calls and reads are SharedRuns')."""

    def _tx_create_runs(self, runs: Sequence[RunRequest], claim: bool, tx: Tx, now: float
                        ) -> tuple[list[str], Delta]:
        if claim:
            created = insert_runs(tx.conn, runs, now, node=self._node,
                                  lease_until=now + self._node_lease)
        else:
            created = insert_runs(tx.conn, runs, now)
        return created, Delta(wake_runs=bool(created) and not claim)

    def _tx_claim_runs(self, limit: int, tx: Tx, now: float) -> tuple[list[RunRecord], Delta]:
        seqs = locked(tx.conn, "SELECT seq FROM runs WHERE status = 'new' ORDER BY seq "
                      "LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
        rows = tx.conn.execute(
            f"UPDATE runs SET status = 'active', started_at = %s, node = %s, lease_until = %s "
            f"WHERE seq = ANY(%s) RETURNING seq, {RUN_COLS}",
            (now, self._node, now + self._node_lease, seqs)).fetchall() if seqs else []
        return in_seq_order(rows, run_record), NO_CHANGE

    def _tx_record_task(self, r: TaskRunRecord, tx: Tx, now: float) -> tuple[None, Delta]:
        tx.conn.execute(_TASK_UPSERT, task_params(r))
        return None, NO_CHANGE

    def _tx_finish_run(
        self, run_id: str, status: str, error: str | None, outputs: dict[str, Any] | None,
        tx: Tx, now: float,
    ) -> tuple[None, Delta]:
        found = tx.conn.execute(
            "UPDATE runs SET status = %s, finished_at = %s, error = %s, outputs = %s, "
            "started_at = COALESCE(started_at, %s), lease_until = NULL WHERE run_id = %s "
            "AND (status = 'new' OR (status = 'active' AND node = %s)) RETURNING seq",
            (status, now, error, capped_json(outputs), now, run_id, self._node)).fetchone()
        if found is None:
            log.warning("store.finish_run_ignored", run_id=run_id, status=status)
        return None, NO_CHANGE

    async def recover_runs(
        self, *, rerun_flows: Sequence[str], orphaned: bool = False,
        run_ids: Sequence[str] | None = None,
    ) -> list[RunRecord]:
        """This node's runs left ``active`` by a crash (or, with *orphaned*, other nodes'
        whose lease ran out): ``interrupted += 1``, then ``new`` (flows in *rerun_flows*) or
        ``error`` "interrupted" with their unfinished tasks ``cancelled``; with *run_ids*,
        only those of this node's."""
        return await self._submit(Op(partial(
            self._tx_recover_runs, list(rerun_flows), orphaned,
            None if run_ids is None else list(run_ids))))

    def _tx_recover_runs(self, rerun: list[str], orphaned: bool, run_ids: list[str] | None,
                         tx: Tx, now: float) -> tuple[list[RunRecord], Delta]:
        conn = tx.conn
        if orphaned:
            seqs = locked(conn, f"SELECT seq FROM runs WHERE {_ORPHANED_RUNS} "
                          f"FOR UPDATE SKIP LOCKED", (self._node, now))
        elif run_ids is not None:
            seqs = locked(conn, "SELECT seq FROM runs WHERE status = 'active' AND node = %s "
                          "AND run_id = ANY(%s) FOR UPDATE", (self._node, run_ids))
        else:
            seqs = locked(conn, "SELECT seq FROM runs WHERE status = 'active' AND node = %s "
                          "FOR UPDATE", (self._node,))
        if not seqs:
            return [], NO_CHANGE
        rows = conn.execute(
            f"UPDATE runs SET interrupted = interrupted + 1, node = NULL, lease_until = NULL, "
            f"status = CASE WHEN flow = ANY(%s) THEN 'new' ELSE 'error' END, "
            f"started_at = CASE WHEN flow = ANY(%s) THEN NULL ELSE started_at END, "
            f"error = CASE WHEN flow = ANY(%s) THEN error ELSE 'interrupted' END, "
            f"finished_at = CASE WHEN flow = ANY(%s) THEN finished_at ELSE %s END "
            f"WHERE seq = ANY(%s) RETURNING seq, {RUN_COLS}",
            (rerun, rerun, rerun, rerun, now, seqs)).fetchall()
        out = in_seq_order(rows, run_record)
        failed = [r.run_id for r in out if r.status == "error"]
        if failed:
            conn.execute(
                "UPDATE task_runs SET state = 'cancelled', error = 'interrupted', "
                "finished_at = %s WHERE run_id = ANY(%s) AND state IN ('pending', 'running')",
                (now, failed))
        if out:
            log.info("store.runs_recovered", count=len(out), orphaned=orphaned,
                     rerun=len(out) - len(failed))
        return out, Delta(wake_runs=len(failed) < len(out))
