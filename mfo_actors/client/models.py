"""Request and response bodies of the MFO (SLOP) API, as msgspec Structs.

Shapes follow SLOP's spec.md and README examples (github.com/agnt-gg/slop) under the ``/api``
prefix; where SLOP says nothing (events, jobs, notifications, login) the shapes are ours and
are documented on each class. Response models ignore unknown fields (servers add fields),
and optional fields have defaults, so a body that lacks a required field or has a wrong type
raises :class:`~mfo_actors.client.errors.ValidationError` naming the field. Request models
omit ``None`` fields on the wire.

Endpoint map (method, path -> request -> response):

=========================================  ======================  ==========================
``POST /auth/login`` (auth_base_url)       :class:`LoginRequest`   :class:`LoginResponse`
``POST /api/chat``                         :class:`ChatRequest`    :class:`ChatResponse`
``GET  /api/chat``                                                 :class:`ChatList`
``GET  /api/chat/{id}``                                            :class:`Chat`
``GET  /api/chat/{thread_id}`` (thread_*)                          :class:`Thread`
``POST /api/chat/stream`` (SSE)            :class:`ChatRequest`    ``data: {"content"}`` ...
``GET  /api/tools``                                                :class:`ToolList`
``GET  /api/tools/{id}``                                           :class:`Tool`
``POST /api/tools/{id}``                   params object           :class:`ToolResult`
``POST /api/memory``                       :class:`MemoryWrite`    :class:`MemoryStatus`
``GET  /api/memory``                                               :class:`MemoryList`
``GET  /api/memory/{key}``                                         :class:`MemoryItem`
``PUT  /api/memory/{key}``                 :class:`MemoryUpdate`   :class:`MemoryStatus`
``DELETE /api/memory/{key}``                                       :class:`MemoryStatus`
``POST /api/memory/query``                 :class:`MemoryQuery`    :class:`MemoryQueryResults`
``GET  /api/resources``                                            :class:`ResourceList`
``GET  /api/resources/{id}``                                       :class:`Resource`
``GET  /api/resources/search?q=``                                  :class:`ResourceSearchResults`
``POST /api/resources``                    :class:`ResourceCreate`  :class:`Resource`
``POST /api/pay`` + Idempotency-Key        :class:`PaymentCreate`  :class:`Payment`
``GET  /api/pay/{transaction_id}``                                 :class:`Payment`
``POST /api/events`` + Idempotency-Key     event object            :class:`EventAck`
``POST /api/jobs``                         :class:`JobCreate`      :class:`Job`
``GET  /api/jobs`` / ``/api/jobs/{id}``                            :class:`JobList` / `Job`
``POST /api/jobs/{id}/cancel``                                     :class:`Job`
``GET  /api/notifications``                                        :class:`NotificationList`
``POST /api/notifications``                :class:`NotificationCreate`  :class:`Notification`
``GET  /api/info``                                                 :class:`Info`
=========================================  ======================  ==========================

Errors everywhere: ``{"error": {"code": str, "message": str, "status": int}}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "Chat",
    "ChatList",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "ChatSummary",
    "ErrorBody",
    "ErrorDetail",
    "EventAck",
    "Info",
    "InfoEndpoint",
    "Job",
    "JobCreate",
    "JobList",
    "LoginRequest",
    "LoginResponse",
    "MemoryItem",
    "MemoryKey",
    "MemoryList",
    "MemoryQuery",
    "MemoryQueryResult",
    "MemoryQueryResults",
    "MemoryStatus",
    "MemoryUpdate",
    "MemoryWrite",
    "Notification",
    "NotificationCreate",
    "NotificationList",
    "Payment",
    "PaymentCreate",
    "Resource",
    "ResourceCreate",
    "ResourceList",
    "ResourceSearchResults",
    "ResourceSummary",
    "StreamChunk",
    "Thread",
    "Tool",
    "ToolList",
    "ToolResult",
]


class _Response(msgspec.Struct, frozen=True, kw_only=True):
    """Base of response bodies: unknown fields are ignored (servers may add more)."""


class _Request(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of request bodies: fields left at their default are not sent."""


# --- auth -------------------------------------------------------------------------------------


class LoginRequest(_Request, frozen=True):
    """``POST {auth_base_url}/login`` (the seed's login)."""

    email: str
    password: str

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"LoginRequest(email={self.email!r}, password='***')"


class LoginResponse(_Response, frozen=True):
    """A bearer token and, optionally, its lifetime in seconds."""

    token: str
    expires_in: float | None = None

    def __repr__(self) -> str:
        return f"LoginResponse(token='***', expires_in={self.expires_in!r})"


# --- chat -------------------------------------------------------------------------------------


class ChatMessage(_Response, frozen=True, omit_defaults=True):
    """One message of a chat; ``id`` and ``created_at`` are set by the server in threads."""

    role: str
    content: str
    id: str | None = None
    created_at: str | None = None


class ChatRequest(_Request, frozen=True):
    """``POST /api/chat`` and ``/api/chat/stream``: the messages to send, optionally in a thread."""

    messages: list[ChatMessage]
    thread_id: str | None = None
    model: str | None = None


class ChatResponse(_Response, frozen=True):
    """The assistant's reply.

    SLOP sends ``message`` (role, content) and ``thread_id``; ``content`` and ``message_id``
    are filled from ``message`` when the server does not send them, so callers can write
    ``resp.content``.
    """

    message: ChatMessage
    thread_id: str | None = None
    id: str | None = None  # the chat id (GET /api/chat/{id})
    message_id: str | None = None
    content: str = ""
    model: str | None = None
    usage: dict[str, Any] | None = None  # tokens, when the server reports them (OpenAI's names)

    def __post_init__(self) -> None:
        if not self.content:
            msgspec.structs.force_setattr(self, "content", self.message.content)
        if self.message_id is None and self.message.id is not None:
            msgspec.structs.force_setattr(self, "message_id", self.message.id)


class Chat(_Response, frozen=True):
    """``GET /api/chat/{id}``: one chat and its messages."""

    id: str
    messages: list[ChatMessage]
    thread_id: str | None = None
    model: str | None = None
    created_at: str | None = None


class Thread(_Response, frozen=True):
    """``GET /api/chat/{thread_id}``: every message of a thread."""

    thread_id: str
    messages: list[ChatMessage]
    title: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class ChatSummary(_Response, frozen=True):
    """An entry of ``GET /api/chat``."""

    id: str
    snippet: str = ""
    created_at: str | None = None


class ChatList(_Response, frozen=True):
    chats: list[ChatSummary]


class StreamChunk(_Response, frozen=True):
    """One SSE ``data:`` object of ``POST /api/chat/stream``."""

    content: str = ""


# --- tools ------------------------------------------------------------------------------------


class Tool(_Response, frozen=True):
    """A tool the server offers; ``parameters`` maps a name to its JSON-schema-like spec."""

    id: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    example: Any = None


class ToolList(_Response, frozen=True):
    tools: list[Tool]


class ToolResult(_Response, frozen=True):
    """``POST /api/tools/{id}``: whatever the tool returned, under ``result``."""

    result: Any


# --- memory -----------------------------------------------------------------------------------


class MemoryWrite(_Request, frozen=True):
    """``POST /api/memory``."""

    key: str
    value: Any


class MemoryUpdate(_Request, frozen=True):
    """``PUT /api/memory/{key}``."""

    value: Any


class MemoryStatus(_Response, frozen=True):
    """``stored`` / ``updated`` (with the ``previous_value``) / ``deleted``."""

    status: str
    previous_value: Any = None


class MemoryItem(_Response, frozen=True):
    """``GET /api/memory/{key}``."""

    key: str
    value: Any
    created_at: str | None = None
    updated_at: str | None = None


class MemoryKey(_Response, frozen=True):
    key: str
    created_at: str | None = None


class MemoryList(_Response, frozen=True):
    """``GET /api/memory``: the keys (SLOP lists keys, not values)."""

    keys: list[MemoryKey]


class MemoryQuery(_Request, frozen=True):
    """``POST /api/memory/query``: ``filter`` may hold ``key_prefix``."""

    query: str
    limit: int | None = None
    filter: dict[str, Any] | None = None


class MemoryQueryResult(_Response, frozen=True):
    key: str
    value: Any
    score: float = 0.0


class MemoryQueryResults(_Response, frozen=True):
    results: list[MemoryQueryResult]


# --- resources --------------------------------------------------------------------------------


class ResourceSummary(_Response, frozen=True):
    """An entry of ``GET /api/resources`` or of a search (then with a ``score``)."""

    id: str
    title: str | None = None
    name: str | None = None
    type: str | None = None
    score: float | None = None


class ResourceList(_Response, frozen=True):
    resources: list[ResourceSummary]


class ResourceSearchResults(_Response, frozen=True):
    results: list[ResourceSummary]


class ResourceCreate(_Request, frozen=True):
    """``POST /api/resources`` (the seed's ``CreateResource``); the server picks the id unless
    one is given."""

    title: str
    content: Any = None
    type: str = "document"
    metadata: dict[str, Any] | None = None
    id: str | None = None


class Resource(_Response, frozen=True):
    """``GET /api/resources/{id}``."""

    id: str
    title: str | None = None
    type: str | None = None
    content: Any = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: str | None = None


# --- pay (SLOP 4.5) ---------------------------------------------------------------------------


class PaymentCreate(_Request, frozen=True):
    """``POST /api/pay``."""

    amount: float
    currency: str
    description: str | None = None


class Payment(_Response, frozen=True):
    """``POST /api/pay`` and ``GET /api/pay/{transaction_id}``."""

    transaction_id: str
    status: str
    amount: float | None = None
    currency: str | None = None
    description: str | None = None
    created_at: str | None = None


# --- events (ours) ----------------------------------------------------------------------------


class EventAck(_Response, frozen=True):
    """``POST /api/events``: the event id, and whether the server had already seen its key.

    Ours (SLOP has no events endpoint): ``202 {"id", "status": "accepted"}`` the first time,
    ``200 {"id", "status": "duplicate", "duplicate": true}`` for a repeated Idempotency-Key.
    """

    id: str
    status: str = "accepted"
    duplicate: bool = False


# --- jobs (ours; states as in the HeroAgent job system: new, active, done, error) -------------


class JobCreate(_Request, frozen=True):
    """``POST /api/jobs``."""

    type: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class Job(_Response, frozen=True):
    """A job; ``new`` and ``active`` are the states of one not yet finished."""

    id: str
    type: str
    status: str  # new | active | done | error
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    result: Any = None
    error: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class JobList(_Response, frozen=True):
    jobs: list[Job]


# --- notifications (ours) ---------------------------------------------------------------------


class NotificationCreate(_Request, frozen=True):
    """``POST /api/notifications``."""

    title: str
    body: str = ""
    level: str = "info"  # info | warning | error
    channel: str | None = None


class Notification(_Response, frozen=True):
    id: str
    title: str
    body: str = ""
    level: str = "info"
    channel: str | None = None
    read: bool = False
    created_at: str | None = None


class NotificationList(_Response, frozen=True):
    notifications: list[Notification]


# --- info -------------------------------------------------------------------------------------


class InfoEndpoint(_Response, frozen=True):
    path: str
    methods: list[str] = msgspec.field(default_factory=list)
    description: str = ""


class Info(_Response, frozen=True):
    """``GET /api/info``: SLOP's self-description."""

    name: str
    version: str = ""
    description: str = ""
    endpoints: list[InfoEndpoint] = msgspec.field(default_factory=list)
    capabilities: dict[str, Any] = msgspec.field(default_factory=dict)
    creator: dict[str, Any] = msgspec.field(default_factory=dict)
    links: dict[str, Any] = msgspec.field(default_factory=dict)


# --- errors -----------------------------------------------------------------------------------


class ErrorDetail(_Response, frozen=True, omit_defaults=True):
    code: str
    message: str
    status: int
    details: dict[str, Any] | None = None


class ErrorBody(_Response, frozen=True):
    """SLOP's error envelope."""

    error: ErrorDetail
