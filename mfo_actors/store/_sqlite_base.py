"""What the SQLite store's table modules share: the store they are a part of, and SQL helpers.

:class:`~mfo_actors.store.SQLiteStore` is put together from one class per table
(``_sqlite_events.py``, ``_sqlite_attempts.py``, ``_sqlite_runs.py``,
``_sqlite_sessions.py``); each writes through the group-commit queue (``_submit``, from
``_engine.py``) and reads through the read connection (``_read``, here). What both
backends do alike (most reads, and the calls that only submit an op) comes from the
``Shared*`` classes of ``_tables.py``, their SQL rendered in this backend's dialect
(:data:`~._tables.SQLITE`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import anyio

from mfo_actors.store._protocol import StoreClosedError, StoreError
from mfo_actors.store._tables import SQLITE, Dialect, SharedTables

__all__ = ["SQLiteTables", "chunks", "marks"]

T = TypeVar("T")

_IN_CHUNK = 500  # ids per "IN (...)" clause, well under SQLite's variable limit


def chunks(items: Sequence[str], size: int = _IN_CHUNK) -> list[Sequence[str]]:
    """*items* in slices small enough for one ``IN (...)`` clause."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def marks(n: int) -> str:
    """``?,?,...`` for *n* parameters."""
    return ",".join("?" * n)


class SQLiteTables(SharedTables):
    """The state every table of the SQLite store uses; :class:`SQLiteStore` sets it."""

    _dialect: ClassVar[Dialect] = SQLITE
    _dedupe_window: float  # seconds within which a (source, dedupe_key) is a provider retry
    _rconn: sqlite3.Connection | None  # the query_only connection
    _read_limiter: anyio.CapacityLimiter  # one reader at a time on it

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(read connection)`` in a worker thread."""
        conn = self._rconn
        if conn is None:
            raise StoreClosedError("the store is closed")
        try:
            return await anyio.to_thread.run_sync(fn, conn, limiter=self._read_limiter)
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc
