"""Durable events, run history and chat sessions behind one protocol (SQLite by default,
PostgreSQL for several daemons as one)."""

from mfo_actors.store._node import cli_node_id as cli_node_id
from mfo_actors.store._node import node_id as node_id
from mfo_actors.store._open import DEFAULT_SQLITE_FILE as DEFAULT_SQLITE_FILE
from mfo_actors.store._open import open_store as open_store
from mfo_actors.store._open import sqlite_path as sqlite_path
from mfo_actors.store._postgres import PostgresStore as PostgresStore
from mfo_actors.store._postgres import open_postgres_store as open_postgres_store
from mfo_actors.store._protocol import AppendResult as AppendResult
from mfo_actors.store._protocol import AttemptOutcome as AttemptOutcome
from mfo_actors.store._protocol import Delivered as Delivered
from mfo_actors.store._protocol import DeliveryAttempt as DeliveryAttempt
from mfo_actors.store._protocol import EventStatus as EventStatus
from mfo_actors.store._protocol import EventStore as EventStore
from mfo_actors.store._protocol import RunRecord as RunRecord
from mfo_actors.store._protocol import RunRequest as RunRequest
from mfo_actors.store._protocol import SessionOpen as SessionOpen
from mfo_actors.store._protocol import SessionRecord as SessionRecord
from mfo_actors.store._protocol import SessionStatus as SessionStatus
from mfo_actors.store._protocol import StoreClosedError as StoreClosedError
from mfo_actors.store._protocol import StoredEvent as StoredEvent
from mfo_actors.store._protocol import StoreError as StoreError
from mfo_actors.store._protocol import StoreFullError as StoreFullError
from mfo_actors.store._protocol import StoreStats as StoreStats
from mfo_actors.store._protocol import TaskRunRecord as TaskRunRecord
from mfo_actors.store._protocol import TaskState as TaskState
from mfo_actors.store._protocol import WriteHealth as WriteHealth
from mfo_actors.store._sqlite import OUTPUT_CAP as OUTPUT_CAP
from mfo_actors.store._sqlite import SQLiteStore as SQLiteStore
from mfo_actors.store._sqlite import SQLiteStoreStatistics as SQLiteStoreStatistics
from mfo_actors.store._sqlite import open_sqlite_store as open_sqlite_store

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "OUTPUT_CAP",
    "AppendResult",
    "AttemptOutcome",
    "Delivered",
    "DeliveryAttempt",
    "EventStatus",
    "EventStore",
    "PostgresStore",
    "RunRecord",
    "RunRequest",
    "SQLiteStore",
    "SQLiteStoreStatistics",
    "SessionOpen",
    "SessionRecord",
    "SessionStatus",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "StoredEvent",
    "TaskRunRecord",
    "TaskState",
    "WriteHealth",
    "cli_node_id",
    "node_id",
    "open_postgres_store",
    "open_sqlite_store",
    "open_store",
    "sqlite_path",
]
