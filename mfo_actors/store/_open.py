"""``open_store(cfg)``: the one way the daemon and the CLI get an :class:`EventStore`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from mfo_actors.config import InstanceConfig
from mfo_actors.store._protocol import EventStore, StoreError
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
) -> AsyncIterator[EventStore]:
    """Open the store *cfg* configures, for the duration of the ``async with`` block.

    Usage::

        async with open_store(cfg) as store:
            result = await store.append(event)

    Safe to use while a daemon has the same store open (the CLI does): SQLite's WAL mode
    lets several processes read and write one file. Leaving the block commits the writes
    still queued, then closes.

    Args:
      cfg: The instance config (``store``, ``state_dir``, ``webhook_listener.dedupe_window``).
      must_exist: Raise StoreError rather than create a store that is not there yet.
      clock: Wall-clock seconds (tests inject a fake one).

    Raises:
      StoreError: the store cannot be opened; for ``backend: redis``, not implemented yet.
    """
    if cfg.store.backend == "redis":
        raise StoreError("redis backend not implemented yet")
    async with open_sqlite_store(
        sqlite_path(cfg),
        group_commit_max=cfg.store.group_commit_max,
        max_pending=cfg.store.max_pending,
        max_bytes=int(cfg.store.max_bytes),
        dedupe_window=float(cfg.webhook_listener.dedupe_window),
        clock=clock,
        must_exist=must_exist,
    ) as store:
        yield store
