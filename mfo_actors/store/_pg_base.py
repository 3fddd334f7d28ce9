"""What the Postgres store's table modules share: the store they are a part of, a batch's
transaction as its ops see it, and row locking.

:class:`~mfo_actors.store.PostgresStore` is put together from one class per table
(``_pg_events.py``, ``_pg_attempts.py``, ``_pg_runs.py``, ``_pg_sessions.py``); each writes
through the group-commit queue (``_submit``, from ``_engine.py``) with ops that take a
:class:`Tx`, and reads through ``_read``. What both backends do alike (most reads, and the
calls that only submit an op) comes from the ``Shared*`` classes of ``_tables.py``, their
SQL rendered in this backend's dialect (:data:`~._tables.POSTGRES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import psycopg

from mfo_actors.store._tables import POSTGRES, Dialect, SharedTables

__all__ = ["Conn", "PostgresTables", "Tx", "locked"]

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]


class Tx:
    """One batch's transaction as an op sees it: the connection, and the lanes to wake."""

    __slots__ = ("conn", "cursors", "ready")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.ready: dict[str, float] = {}
        self.cursors: dict[str, int] = {}

    def touch(self, lane: str, ready_at: float, cursor: int | None = None) -> None:
        """Have claimers look at *lane* from *ready_at* on (and from *cursor*, if lower)."""
        self.ready[lane] = min(self.ready.get(lane, math.inf), ready_at)
        if cursor is not None:
            self.cursors[lane] = min(self.cursors.get(lane, cursor), cursor)

    def flush(self) -> None:
        """Write the wake-ups so far to ``lanes`` (upserts: an idle lane's row may have been
        pruned; one statement for lanes whose cursor moves down, one for the others): at the
        end of the batch, and before a claim in it, which must see them."""
        if not self.ready:
            return
        names = sorted(self.ready)
        plain = [n for n in names if n not in self.cursors]
        below = [n for n in names if n in self.cursors]
        if plain:
            self.conn.execute(
                "INSERT INTO lanes AS l (lane, cursor, ready_at) "
                "SELECT u.s, 0, u.r FROM unnest(%s::text[], %s::float8[]) AS u(s, r) "
                "ORDER BY u.s ON CONFLICT (lane) "
                "DO UPDATE SET ready_at = LEAST(l.ready_at, EXCLUDED.ready_at)",
                (plain, [self.ready[n] for n in plain]))
        if below:
            self.conn.execute(
                "INSERT INTO lanes AS l (lane, cursor, ready_at) "
                "SELECT u.s, u.c, u.r FROM unnest(%s::text[], %s::float8[], %s::int8[]) "
                "AS u(s, r, c) ORDER BY u.s ON CONFLICT (lane) "
                "DO UPDATE SET ready_at = LEAST(l.ready_at, EXCLUDED.ready_at), "
                "cursor = LEAST(l.cursor, EXCLUDED.cursor)",
                (below, [self.ready[n] for n in below], [self.cursors[n] for n in below]))
        self.ready.clear()
        self.cursors.clear()


def locked(conn: Conn, query: str, params: tuple[Any, ...]) -> list[int]:
    """The seqs a ``SELECT seq ... FOR UPDATE [SKIP LOCKED]`` locked, for a separate UPDATE.

    Never ``UPDATE ... WHERE seq IN (SELECT ... LIMIT n FOR UPDATE)``: when the planner
    rescans that subquery, its row locks skip the rows the UPDATE already changed, and the
    LIMIT then lets further rows through (seen here: two sessions evicted instead of one).
    """
    return [int(r[0]) for r in conn.execute(query.encode(), params)]


class PostgresTables(SharedTables):
    """The state every table of the Postgres store uses; :class:`PostgresStore` sets it."""

    _dialect: ClassVar[Dialect] = POSTGRES
    _dedupe_window: float  # seconds within which a (source, dedupe_key) is a provider retry

    async def _read(self, fn: Callable[[Conn], T]) -> T:  # pragma: no cover (abstract)
        """``fn(connection)`` in a worker thread (:class:`PostgresStore` implements it)."""
        raise NotImplementedError
