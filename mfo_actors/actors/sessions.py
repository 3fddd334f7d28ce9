"""Chat sessions kept in the store: the keeper flows talk through, and the cleanup actor.

A session maps a key chosen in a flow (``session: "${event.payload.user.id}"``) to an MFO
chat thread, with its turns, its last activity and its recent messages (seed 003's session
manager, made durable). :class:`StoreSessions` is what ``mfo.chat`` calls
(:class:`~mfo_actors.taskflow.ChatSessions`):

* ``open(key)`` asks the store for the key's active session, or a new one. The thread id of a
  new session is chosen here (``thread_<id>``) and the store decides, in one transaction,
  whether it is used: two runs of the same new user at once get one session, so one thread.
  A SLOP server starts a thread for a ``thread_id`` it has not seen (its reference
  implementations echo the client's); if the server answers in another thread, the session
  follows the server's (``record_turn``).
* A session idle for ``sessions.ttl`` is closed (``expired``) when its key next talks, and a
  new thread starts; past ``sessions.max_active`` the one idle the longest is closed
  (``evicted``).

:class:`SessionsActor` closes expired sessions every ``sessions.cleanup_interval`` and keeps
``mfo_sessions_active`` true to the store (other processes, ``sessions close`` say, change it
too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio

from mfo_actors.actors._stop import cancel_on
from mfo_actors.config import InstanceConfig, SessionsConfig
from mfo_actors.ids import new_id
from mfo_actors.metrics import SESSIONS_ACTIVE, SESSIONS_CLOSED, SESSIONS_CREATED
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Clock, ReadySignal, RestartPolicy, SystemClock
from mfo_actors.store import EventStore, SessionRecord, StoreError

__all__ = ["SessionsActor", "StoreSessions", "count_closed", "session_view"]

log = get_logger(__name__)


def session_view(record: SessionRecord) -> dict[str, Any]:
    """The ``${session.…}`` view of a stored session."""
    return {
        "key": record.key, "id": record.session_id, "thread_id": record.thread_id,
        "turns": record.turns, "created_at": record.created_at,
        "last_activity": record.last_activity, "context": list(record.context),
    }  # fmt: skip


class StoreSessions:
    """The store-backed :class:`~mfo_actors.taskflow.ChatSessions` of one instance.

    Args:
      store: Where sessions live.
      cfg: ``sessions.ttl``, ``sessions.max_active``, ``sessions.context_messages``.
      instance: The ``instance`` label of the session metrics.
    """

    def __init__(self, store: EventStore, cfg: SessionsConfig, *, instance: str = "default"
                 ) -> None:
        self._store = store
        self._cfg = cfg
        self._instance = instance

    async def open(self, key: str, *, flow: str = "", run_id: str = "") -> dict[str, Any]:
        """The active session of *key*, or a new one in a new thread."""
        opened = await self._store.open_session(
            key, thread_id=f"thread_{new_id()}", ttl=float(self._cfg.ttl),
            max_active=self._cfg.max_active,
            metadata={"flow": flow, "run_id": run_id} if flow or run_id else None)
        for gone in opened.closed:
            count_closed(gone, self._instance)
        if opened.created:
            SESSIONS_CREATED.labels(self._instance).inc()
            SESSIONS_ACTIVE.labels(self._instance).inc()
            log.info("sessions.created", key=key, thread_id=opened.session.thread_id,
                     flow=flow or None, run_id=run_id or None,
                     replaced=[s.close_reason for s in opened.closed] or None)
        return session_view(opened.session)

    async def record_turn(self, session: Mapping[str, Any], *, thread_id: str,
                          sent: str | None, reply: str, metadata: dict[str, Any] | None = None
                          ) -> dict[str, Any]:
        """Count one exchange of *session* and keep its two messages as recent context."""
        messages: list[dict[str, Any]] = []
        if sent is not None:
            messages.append({"role": "user", "content": sent})
        messages.append({"role": "assistant", "content": reply})
        record = await self._store.record_turn(
            str(session["id"]), thread_id=thread_id, messages=messages,
            context_limit=self._cfg.context_messages, metadata=metadata)
        if record is None:  # removed under us (cannot happen today: sessions are never deleted)
            return {**session, "thread_id": thread_id, "turns": int(session["turns"]) + 1}
        return session_view(record)


def count_closed(record: SessionRecord, instance: str) -> None:
    SESSIONS_CLOSED.labels(instance, record.close_reason or "closed").inc()
    SESSIONS_ACTIVE.labels(instance).dec()
    log.info("sessions.closed", key=record.key, thread_id=record.thread_id,
             reason=record.close_reason, turns=record.turns)


class SessionsActor:
    """Closes sessions idle past ``sessions.ttl`` every ``sessions.cleanup_interval``."""

    name = "sessions"
    restart = RestartPolicy("permanent")

    def __init__(self, cfg: InstanceConfig, store: EventStore, *, clock: Clock | None = None
                 ) -> None:
        self._cfg = cfg.sessions
        self._instance = cfg.instance
        self._store = store
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._stop = anyio.Event()
        self.expired = 0

    async def run(self, ready: ReadySignal) -> None:
        ready.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
            while True:
                await self.cleanup()
                await self._clock.sleep(float(self._cfg.cleanup_interval))

    async def cleanup(self) -> None:
        """Close expired sessions, then set ``mfo_sessions_active`` from the store."""
        try:
            closed = await self._store.expire_sessions(ttl=float(self._cfg.ttl))
            for record in closed:
                count_closed(record, self._instance)
            self.expired += len(closed)
            SESSIONS_ACTIVE.labels(self._instance).set(await self._store.count_sessions())
        except StoreError as exc:  # try again next interval; an idle session can wait
            log.error("sessions.cleanup_failed", error=str(exc))

    def request_stop(self) -> None:
        self._stop.set()
