"""The endpoint groups of the MFO API (``client.chat``, ``client.tools`` ...), one class each.

Each is a thin typed layer over :class:`BaseClient`: it builds the request model, picks the
path and the response model. Path segments taken from callers are percent-encoded.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import msgspec

from mfo_actors.client._base import BaseClient
from mfo_actors.client._sse import iter_sse
from mfo_actors.client.errors import APIError
from mfo_actors.client.models import (
    Chat,
    ChatList,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ChatSummary,
    EventAck,
    Job,
    JobCreate,
    JobList,
    MemoryItem,
    MemoryKey,
    MemoryList,
    MemoryQuery,
    MemoryQueryResult,
    MemoryQueryResults,
    MemoryStatus,
    MemoryUpdate,
    MemoryWrite,
    Notification,
    NotificationCreate,
    NotificationList,
    Resource,
    ResourceList,
    ResourceSearchResults,
    ResourceSummary,
    Thread,
    Tool,
    ToolList,
    ToolResult,
)

__all__ = [
    "ChatAPI",
    "ChatStream",
    "EventsAPI",
    "JobsAPI",
    "MemoryAPI",
    "NotificationsAPI",
    "ResourcesAPI",
    "ToolsAPI",
]

DONE = "[DONE]"  # SLOP's end-of-stream sentinel


def _seg(value: str) -> str:
    return quote(value, safe="")


class _Group:
    def __init__(self, base: BaseClient) -> None:
        self._base = base


class ChatStream:
    """The chunks of one streamed reply, in order, until ``[DONE]`` (or the end of the body).

    Iterate it directly (it closes itself at the end), or use ``async with`` to be sure the
    connection is released when you stop early::

        async with client.chat.stream("hello") as chunks:
            async for text in chunks:
                ...
    """

    def __init__(self, base: BaseClient, request: ChatRequest) -> None:
        self._gen = self._run(base, request)

    @staticmethod
    async def _run(base: BaseClient, request: ChatRequest) -> AsyncIterator[str]:
        async with base.stream("POST", "/api/chat/stream", json=request) as response:
            async for event in iter_sse(response.aiter_bytes()):
                data = event.data
                if data.strip() == DONE:
                    return
                try:
                    obj = msgspec.json.decode(data)
                except msgspec.DecodeError:
                    yield data  # a server that streams plain text
                    continue
                if isinstance(obj, dict):
                    err = obj.get("error")
                    if isinstance(err, dict):
                        raise APIError(int(err.get("status") or 500),
                                       str(err.get("code") or "stream_error"),
                                       str(err.get("message") or ""))
                    content = obj.get("content")
                    if isinstance(content, str):
                        yield content
                elif isinstance(obj, str):
                    yield obj

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


class ChatAPI(_Group):
    """``/api/chat``: send messages, read chats and threads, stream replies."""

    @staticmethod
    def _request(message: str | None, messages: list[dict[str, Any]] | None,
                 thread_id: str | None, model: str | None) -> ChatRequest:
        msgs: list[ChatMessage] = []
        if messages:
            msgs.extend(msgspec.convert(messages, list[ChatMessage]))
        if message is not None:
            msgs.append(ChatMessage(role="user", content=message))
        if not msgs:
            raise ValueError("chat needs a message or messages")
        return ChatRequest(messages=msgs, thread_id=thread_id, model=model)

    async def send(
        self,
        message: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        thread_id: str | None = None,
        model: str | None = None,
    ) -> ChatResponse:
        """Send a user *message* (and/or full *messages*), optionally within *thread_id*.

        Not retried (a POST without an idempotency key could be answered twice).
        """
        request = self._request(message, messages, thread_id, model)
        return await self._base.post("/api/chat", json=request, response_type=ChatResponse)

    def stream(self, message: str | None = None, *, messages: list[dict[str, Any]] | None = None,
               thread_id: str | None = None, model: str | None = None) -> ChatStream:
        """Stream the reply as text chunks (SSE on ``POST /api/chat/stream``)."""
        return ChatStream(self._base, self._request(message, messages, thread_id, model))

    async def get(self, chat_id: str) -> Chat:
        return await self._base.get(f"/api/chat/{_seg(chat_id)}", response_type=Chat)

    async def thread(self, thread_id: str) -> Thread:
        """All messages of a thread (SLOP: ``GET /chat/thread_<id>``)."""
        return await self._base.get(f"/api/chat/{_seg(thread_id)}", response_type=Thread)

    async def list(self) -> list[ChatSummary]:
        return (await self._base.get("/api/chat", response_type=ChatList)).chats


class ToolsAPI(_Group):
    """``/api/tools``: discover and execute tools."""

    async def list(self) -> list[Tool]:
        return (await self._base.get("/api/tools", response_type=ToolList)).tools

    async def get(self, tool_id: str) -> Tool:
        return await self._base.get(f"/api/tools/{_seg(tool_id)}", response_type=Tool)

    async def execute(self, tool_id: str, params: dict[str, Any] | None = None, *,
                      idempotency_key: str | None = None) -> ToolResult:
        """Run a tool; retried only with an *idempotency_key* (tools may have effects)."""
        return await self._base.post(f"/api/tools/{_seg(tool_id)}", json=params or {},
                                     idempotency_key=idempotency_key, response_type=ToolResult)


class MemoryAPI(_Group):
    """``/api/memory``: key-value storage on the server."""

    async def set(self, key: str, value: Any) -> MemoryStatus:
        """Store *value* under *key*. SLOP's POST here is an upsert (storing again gives the
        same state), so it is retried like a PUT, without an Idempotency-Key that a server
        could use to drop a later write of a new value."""
        return await self._base.post("/api/memory", json=MemoryWrite(key=key, value=value),
                                     idempotent=True, response_type=MemoryStatus)

    async def get(self, key: str) -> MemoryItem:
        return await self._base.get(f"/api/memory/{_seg(key)}", response_type=MemoryItem)

    async def update(self, key: str, value: Any) -> MemoryStatus:
        """Replace the value of an existing key; the answer holds ``previous_value``."""
        return await self._base.put(f"/api/memory/{_seg(key)}", json=MemoryUpdate(value=value),
                                    response_type=MemoryStatus)

    async def delete(self, key: str) -> MemoryStatus:
        return await self._base.delete(f"/api/memory/{_seg(key)}", response_type=MemoryStatus)

    async def list(self) -> builtins.list[MemoryKey]:
        return (await self._base.get("/api/memory", response_type=MemoryList)).keys

    async def query(self, query: str, *, limit: int | None = None,
                    key_prefix: str | None = None) -> builtins.list[MemoryQueryResult]:
        """Search stored values (a read: retried like a GET)."""
        body = MemoryQuery(query=query, limit=limit,
                           filter={"key_prefix": key_prefix} if key_prefix else None)
        return (await self._base.post("/api/memory/query", json=body, idempotent=True,
                                      response_type=MemoryQueryResults)).results


class ResourcesAPI(_Group):
    """``/api/resources``: documents and data the server exposes."""

    async def list(self) -> list[ResourceSummary]:
        return (await self._base.get("/api/resources", response_type=ResourceList)).resources

    async def get(self, resource_id: str) -> Resource:
        return await self._base.get(f"/api/resources/{_seg(resource_id)}",
                                    response_type=Resource)

    async def search(self, query: str) -> builtins.list[ResourceSummary]:
        return (await self._base.get("/api/resources/search", params={"q": query},
                                     response_type=ResourceSearchResults)).results


class EventsAPI(_Group):
    """``POST /api/events``: forward an event; the server dedupes by ``Idempotency-Key``."""

    async def send(self, body: dict[str, Any] | bytes, *, idempotency_key: str,
                   retry: bool = True) -> EventAck:
        """Send *body* (a dict, or already-encoded JSON bytes) with its idempotency key."""
        if isinstance(body, bytes | bytearray | memoryview):
            return await self._base.post("/api/events", content=bytes(body),
                                         idempotency_key=idempotency_key, retry=retry,
                                         response_type=EventAck)
        return await self._base.post("/api/events", json=body, idempotency_key=idempotency_key,
                                     retry=retry, response_type=EventAck)


class JobsAPI(_Group):
    """``/api/jobs``: long-running work on the server (states new, active, done, error)."""

    async def create(self, type: str, params: dict[str, Any] | None = None, *,
                     idempotency_key: str | None = None) -> Job:
        return await self._base.post("/api/jobs", json=JobCreate(type=type, params=params or {}),
                                     idempotency_key=idempotency_key, response_type=Job)

    async def get(self, job_id: str) -> Job:
        return await self._base.get(f"/api/jobs/{_seg(job_id)}", response_type=Job)

    async def list(self) -> list[Job]:
        return (await self._base.get("/api/jobs", response_type=JobList)).jobs


class NotificationsAPI(_Group):
    """``/api/notifications``: messages for the humans behind the server."""

    async def list(self) -> list[Notification]:
        return (await self._base.get("/api/notifications",
                                     response_type=NotificationList)).notifications

    async def send(self, title: str, body: str = "", *, level: str = "info",
                   channel: str | None = None,
                   idempotency_key: str | None = None) -> Notification:
        request = NotificationCreate(title=title, body=body, level=level, channel=channel)
        return await self._base.post("/api/notifications", json=request,
                                     idempotency_key=idempotency_key,
                                     response_type=Notification)
