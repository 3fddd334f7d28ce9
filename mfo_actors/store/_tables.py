"""Table logic both SQL backends share, apart from the SQL itself.

The backends differ in their dialect (placeholders, locking, ``ON CONFLICT``), not in what
they do with the rows: these helpers are that common part.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from mfo_actors.observability import get_logger
from mfo_actors.store._codec import capped_list, json_bytes, load_json

__all__ = ["PRUNE_CHUNK", "PRUNE_SESSIONS", "in_seq_order", "prune_in_chunks", "stale_settle",
           "turn_update"]

log = get_logger("mfo_actors.store")

R = TypeVar("R")

PRUNE_CHUNK = 5_000  # rows deleted per transaction, so appends interleave with a big prune

# One chunk of closed sessions closed before a cutoff (params: cutoff, cutoff, chunk; ?
# placeholders; RETURNING, as a pipelined psycopg cursor has no rowcount). A session closes
# after its last activity, so ``last_activity < cutoff`` holds for each of them and lets the
# (status, last_activity) index find them.
PRUNE_SESSIONS = (
    "DELETE FROM sessions WHERE seq IN (SELECT seq FROM sessions WHERE status = 'closed' "
    "AND last_activity < ? AND closed_at < ? LIMIT ?) RETURNING seq"
)


def in_seq_order(rows: Sequence[Sequence[Any]], decode: Callable[[Sequence[Any]], R]) -> list[R]:
    """Rows of ``... RETURNING seq, <cols>`` decoded in seq order (RETURNING has no order)."""
    return [decode(row[1:]) for row in sorted(rows, key=lambda row: row[0])]


def turn_update(context: bytes | None, metadata: bytes | None,
                messages: Sequence[dict[str, Any]], limit: int,
                more: dict[str, Any] | None) -> tuple[bytes, bytes]:
    """A session's stored context and metadata after one turn: *messages* appended, the
    context cut to its last *limit* messages (and to the size cap), *more* merged in."""
    turns = [*(load_json(context) or []), *messages]
    turns = turns[len(turns) - limit:] if limit > 0 else []
    merged = {**(load_json(metadata) or {}), **(more or {})}
    return capped_list(turns), json_bytes(merged)


def stale_settle(event_id: str, outcome: str) -> None:
    """Log a settle whose claim token no longer holds (the lease ran out, another claim won).

    *outcome* is the attempt's outcome (``delivered``, ``retry``, ``dead``); the log names the
    store call that came too late."""
    action = {"retry": "reschedule", "dead": "dead_letter"}.get(outcome, outcome)
    log.warning("store.stale_settle", event_id=event_id, action=action)


async def prune_in_chunks(chunk: Callable[[], Awaitable[int]], *, what: str = "events"
                          ) -> int:
    """Run *chunk* (one transaction deleting at most PRUNE_CHUNK rows) until a short one;
    return how many rows went. Appends are committed between the chunks."""
    total = 0
    while True:
        n = await chunk()
        total += n
        if n < PRUNE_CHUNK:
            break
    if total:
        log.info("store.pruned", table=what, count=total)
    return total
