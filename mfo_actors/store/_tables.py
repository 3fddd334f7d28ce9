"""Table logic both SQL backends share, apart from the SQL itself.

The backends differ in their dialect (placeholders, locking, ``ON CONFLICT``), not in what
they do with the rows: these helpers are that common part.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from mfo_actors.observability import get_logger
from mfo_actors.store._codec import capped_list, json_bytes, load_json
from mfo_actors.store._engine import Delta, GroupCommitStore, Op
from mfo_actors.store._protocol import StoreClosedError, StoreError

__all__ = ["ORPHANED_RUNS", "PRUNE_CHUNK", "PRUNE_SESSIONS", "RENEW_RUNS", "RunLeases",
           "in_seq_order", "prune_in_chunks", "stale_settle", "turn_update"]

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


# This node's active runs, their lease moved on (params: lease_until, node; ? placeholders).
RENEW_RUNS = "UPDATE runs SET lease_until = ? WHERE status = 'active' AND node = ?"
# Other nodes' active runs whose lease ran out (params: node, now). A run without a lease was
# claimed before leases were kept (SQLite before schema 5): nobody renews it, so it is out.
ORPHANED_RUNS = ("status = 'active' AND node IS NOT NULL AND node <> ? "
                 "AND COALESCE(lease_until, 0) < ?")


class RunLeases(GroupCommitStore):
    """This node's hold on its active runs, as both backends keep it.

    A claimed run carries a lease (``lease_until``, wall-clock, the claim's time plus
    ``node_lease``) that a background task renews every third of ``node_lease``
    (:meth:`_renew_runs`); another node reruns (or fails) an active run whose lease ran out
    (``recover_runs(orphaned=True)``). So a node that cannot renew, because the database is
    away, must stop working on its runs before their lease runs out, or they run twice at
    once: :meth:`runs_held_until` tells the scheduler until when a run is surely still its
    own, counted from when the claim or the last renewal that succeeded was *sent* (each sets
    ``lease_until`` to its transaction's time plus the lease, later than that).
    """

    _node: str
    _node_lease: float  # seconds a node's active runs stay its own without renewal
    _renewed_at: float = -1e18  # monotonic: when the last renewal that succeeded was sent

    def runs_held_until(self, claimed_at: float) -> float:
        """Monotonic time until which a run claimed (sent) at monotonic *claimed_at* is
        surely this node's, if its lease is not renewed again."""
        return max(claimed_at, self._renewed_at) + self._node_lease

    def _tx_renew_runs(self, tx: Any, now: float) -> tuple[None, Delta]:  # pragma: no cover
        raise NotImplementedError

    async def _renew_runs(self) -> None:
        """Renew the lease of this node's active runs (raises StoreError if it cannot)."""
        sent = time.monotonic()
        await self._submit(Op(self._tx_renew_runs))
        self._renewed_at = max(self._renewed_at, sent)

    async def _serve_run_leases(self) -> None:
        """Renew every third of the lease; failures (the store away) are logged and tried
        again at the next round, and the scheduler stops runs whose hold ran out."""
        while True:
            await anyio.sleep(self._node_lease / 3)
            try:
                await self._renew_runs()
            except StoreClosedError:
                return
            except StoreError as exc:
                log.warning("store.lease_renewal_failed", node=self._node, error=str(exc))


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
