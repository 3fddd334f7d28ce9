"""``open_store(cfg)``: the one way the daemon and the CLI get an :class:`EventStore`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from mfo_actors.config import InstanceConfig
from mfo_actors.store._node import node_id
from mfo_actors.store._postgres import open_postgres_store
from mfo_actors.store._protocol import EventStore
from mfo_actors.store._sqlite import open_sqlite_store

__all__ = ["DEFAULT_SQLITE_FILE", "open_store", "sqlite_path"]

DEFAULT_SQLITE_FILE = "store.sqlite3"


def sqlite_path(cfg: InstanceConfig) -> Path:
    """Where the SQLite backend keeps *cfg*'s store: ``store.path``, else in the state dir."""
    if cfg.store.path:
        return Path(cfg.store.path)
    return cfg.effective_state_dir / DEFAULT_SQLITE_FILE


@asynccontextmanager
async def open_store(
    cfg: InstanceConfig,
    *,
    must_exist: bool = False,
    clock: Callable[[], float] = time.time,
    node: str | None = None,
) -> AsyncIterator[EventStore]:
    """Open the store *cfg* configures, for the duration of the ``async with`` block.

    Usage::

        async with open_store(cfg) as store:
            result = await store.append(event)

    Safe to use while a daemon has the same store open (the CLI does): SQLite's WAL mode
    lets several processes read and write one file, and any number of daemons share a
    Postgres store. Leaving the block commits the writes still queued, then closes.

    Args:
      cfg: The instance config (``store``, ``state_dir``, ``webhook_listener.dedupe_window``).
      must_exist: Raise StoreError rather than create a store that is not there yet.
      clock: Wall-clock seconds (tests inject a fake one).
      node: This node's id on claims and runs; by default derived from *cfg* and the host
        (``store/_node.py``).

    Raises:
      StoreError: the store cannot be opened (no file, database unreachable, newer schema).
    """
    node = node or node_id(cfg)
    if cfg.store.backend == "postgres":
        assert cfg.store.dsn is not None  # the config check requires it
        async with open_postgres_store(
            cfg.store.dsn,
            schema=cfg.store.schema,
            node=node,
            group_commit_max=cfg.store.group_commit_max,
            max_pending=cfg.store.max_pending,
            max_bytes=int(cfg.store.max_bytes),
            dedupe_window=float(cfg.webhook_listener.dedupe_window),
            node_lease=float(cfg.store.node_lease),
            lock_timeout=float(cfg.store.lock_timeout),
            statement_timeout=float(cfg.store.statement_timeout),
            clock=clock,
            must_exist=must_exist,
        ) as pg_store:
            yield pg_store
        return
    async with open_sqlite_store(
        sqlite_path(cfg),
        group_commit_max=cfg.store.group_commit_max,
        max_pending=cfg.store.max_pending,
        max_bytes=int(cfg.store.max_bytes),
        dedupe_window=float(cfg.webhook_listener.dedupe_window),
        clock=clock,
        must_exist=must_exist,
        node=node,
        node_lease=float(cfg.store.node_lease),
    ) as store:
        yield store
