"""Rows to records and back: the column lists and JSON codecs both SQL backends share.

Both backends store the same columns in the same order, so one decoder per record type turns
a row from either into a :class:`~mfo_actors.store.StoredEvent`, a
:class:`~mfo_actors.store.RunRecord`, a :class:`~mfo_actors.store.TaskRunRecord`, a
:class:`~mfo_actors.store.SessionRecord` or a :class:`~mfo_actors.store.DeliveryAttempt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from mfo_actors.messages import Event
from mfo_actors.store._protocol import (
    DeliveryAttempt,
    RunRecord,
    SessionRecord,
    StoredEvent,
    TaskRunRecord,
)

__all__ = [
    "ATTEMPT_COLS",
    "ATTEMPT_UPSERT",
    "EVENT_COLS",
    "OUTPUT_CAP",
    "RUN_COLS",
    "SESSION_COLS",
    "TASK_COLS",
    "TASK_UPSERT",
    "Send",
    "attempt_record",
    "capped_json",
    "capped_list",
    "json_bytes",
    "load_json",
    "newest_first",
    "run_record",
    "session_record",
    "stored_event",
    "task_params",
    "task_record",
]

OUTPUT_CAP = 64 * 1024  # task/run outputs above this many JSON bytes are replaced by a marker

EVENT_COLS = (
    "id, source, type, received_at, headers, body, content_type, is_json, dedupe_key, "
    "status, attempts, next_attempt_at, last_error, delivered_at, claim_token, attempt_base, "
    "ordering_key"
)
ATTEMPT_COLS = "n, at, outcome, status, error, latency"
RUN_COLS = (
    "run_id, flow, status, trigger, event_id, input, created_at, started_at, finished_at, "
    "error, outputs, interrupted, schedule_key, tick"
)
TASK_COLS = "run_id, task_id, state, attempts, started_at, finished_at, error, output"
SESSION_COLS = (
    "session_id, key, thread_id, status, turns, created_at, last_activity, closed_at, "
    "close_reason, context, metadata"
)
# Insert or replace one task's record, keeping its place in the run's order (an upsert, not a
# delete and insert); ? placeholders, as in ``_tables.py`` (its Dialect gives Postgres's).
TASK_UPSERT = (
    f"INSERT INTO task_runs ({TASK_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, task_id) DO UPDATE SET state = excluded.state, "
    "attempts = excluded.attempts, started_at = excluded.started_at, "
    "finished_at = excluded.finished_at, error = excluded.error, output = excluded.output"
)

# One attempt of the history (re-recording attempt n replaces it); ? placeholders.
ATTEMPT_UPSERT = (
    f"INSERT INTO attempts (event_id, {ATTEMPT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id, n) DO UPDATE SET at = excluded.at, outcome = excluded.outcome, "
    "status = excluded.status, error = excluded.error, latency = excluded.latency"
)

_decode_headers = msgspec.json.Decoder(dict[str, str]).decode


def _enc_fallback(obj: Any) -> Any:
    return str(obj)  # outputs may hold objects JSON cannot say; keep their text


def json_bytes(value: Any) -> bytes:
    """*value* as JSON; objects JSON cannot say are stored as their text."""
    return msgspec.json.encode(value, enc_hook=_enc_fallback)


def capped_json(value: dict[str, Any] | None) -> bytes | None:
    """JSON of *value*, or a ``{"_truncated": true, "size": n}`` marker above OUTPUT_CAP."""
    if value is None:
        return None
    data = json_bytes(value)
    if len(data) > OUTPUT_CAP:
        return json_bytes({"_truncated": True, "size": len(data)})
    return data


@dataclass(frozen=True, slots=True)
class Send:
    """How one send went, for the attempt history."""

    sent_at: float | None
    status: int | None
    latency: float | None

    def params(self, event_id: str, number: int, now: float, outcome: str,
               error: str | None) -> tuple[Any, ...]:
        """:data:`ATTEMPT_UPSERT`'s parameters (started at ``now - latency`` if unknown)."""
        at = self.sent_at if self.sent_at is not None else now - (self.latency or 0.0)
        return (event_id, number, at, outcome, self.status, error, self.latency)


def task_params(r: TaskRunRecord) -> tuple[Any, ...]:
    """The parameters of :data:`TASK_UPSERT` for *r* (its output size-capped)."""
    return (r.run_id, r.task_id, r.state, r.attempts, r.started_at, r.finished_at, r.error,
            capped_json(r.output))


def capped_list(messages: list[dict[str, Any]]) -> bytes:
    """JSON of a session's context; the oldest messages go first past OUTPUT_CAP."""
    data = json_bytes(messages)
    while len(data) > OUTPUT_CAP and messages:
        messages = messages[max(1, len(messages) // 4):]
        data = json_bytes(messages)
    return data


def load_json(data: bytes | None) -> Any:
    """The value of stored JSON, or None for NULL."""
    return None if data is None else msgspec.json.decode(data)


def stored_event(row: Sequence[Any]) -> StoredEvent:
    """A row of :data:`EVENT_COLS` as a StoredEvent."""
    event = Event(
        id=row[0], source=row[1], type=row[2], received_at=row[3],
        headers=_decode_headers(row[4]), body=bytes(row[5]), content_type=row[6],
        is_json=bool(row[7]), dedupe_key=row[8], ordering_key=row[16],
    )
    return StoredEvent(
        event=event, status=row[9], attempts=row[10], next_attempt_at=row[11],
        last_error=row[12], delivered_at=row[13], claim_token=row[14], attempt_base=row[15],
    )


def run_record(row: Sequence[Any]) -> RunRecord:
    """A row of :data:`RUN_COLS` as a RunRecord."""
    return RunRecord(
        run_id=row[0], flow=row[1], status=row[2], trigger=row[3], event_id=row[4],
        input=load_json(row[5]) or {}, created_at=row[6], started_at=row[7],
        finished_at=row[8], error=row[9], outputs=load_json(row[10]), interrupted=row[11],
        schedule_key=row[12], tick=row[13],
    )


def task_record(row: Sequence[Any]) -> TaskRunRecord:
    """A row of :data:`TASK_COLS` as a TaskRunRecord."""
    return TaskRunRecord(
        run_id=row[0], task_id=row[1], state=row[2], attempts=row[3], started_at=row[4],
        finished_at=row[5], error=row[6], output=load_json(row[7]),
    )


def session_record(row: Sequence[Any]) -> SessionRecord:
    """A row of :data:`SESSION_COLS` as a SessionRecord."""
    return SessionRecord(
        session_id=row[0], key=row[1], thread_id=row[2], status=row[3], turns=row[4],
        created_at=row[5], last_activity=row[6], closed_at=row[7], close_reason=row[8],
        context=load_json(row[9]) or [], metadata=load_json(row[10]) or {},
    )


def attempt_record(row: Sequence[Any]) -> DeliveryAttempt:
    """A row of :data:`ATTEMPT_COLS` as a DeliveryAttempt."""
    return DeliveryAttempt(number=row[0], at=row[1], outcome=row[2], status=row[3],
                           error=row[4], latency=row[5])


def newest_first(cols: str, table: str, limit: int, mark: str = "?", *,
                 order: str = "seq DESC", **equal: str | None
                 ) -> tuple[str, tuple[str | int, ...]]:
    """``SELECT cols FROM table WHERE k = ? ... ORDER BY order LIMIT ?`` and its parameters
    (*mark* is the driver's placeholder). Each keyword given a value is one ``k = ?`` filter."""
    given = {column: value for column, value in equal.items() if value is not None}
    query = f"SELECT {cols} FROM {table}"
    if given:
        query += " WHERE " + " AND ".join(f"{column} = {mark}" for column in given)
    return f"{query} ORDER BY {order} LIMIT {mark}", (*given.values(), max(0, limit))
