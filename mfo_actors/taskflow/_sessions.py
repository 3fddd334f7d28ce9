"""What ``mfo.chat`` with ``session:`` needs from its host: :class:`ChatSessions`.

The engine knows no store. The daemon (and ``mfo-actors chat``) hand the executor a keeper
backed by the store (``mfo_actors.actors.sessions.StoreSessions``); a library user may pass
their own. A session is seen as a plain mapping, the ``${session.…}`` view of a run::

    {"key", "id", "thread_id", "turns", "created_at", "last_activity", "context"}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["SESSION_FIELDS", "ChatSessions"]

# What ``${session.…}`` may name (checked when a flow loads).
SESSION_FIELDS = frozenset({"key", "id", "thread_id", "turns", "created_at", "last_activity",
                            "context"})


class ChatSessions(Protocol):
    """Chat sessions by key: which thread a key talks in, and its turns."""

    async def open(self, key: str, *, flow: str, run_id: str) -> Mapping[str, Any]:
        """The session of *key*: the active one, or a new one (with a new thread id)."""
        ...

    async def record_turn(self, session: Mapping[str, Any], *, thread_id: str,
                          sent: str | None, reply: str) -> Mapping[str, Any]:
        """One exchange of *session* happened in *thread_id*; the session after it."""
        ...
