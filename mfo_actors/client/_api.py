"""The endpoint groups of the MFO API (``client.chat``, ``client.tools`` ...), one class each.

Each is a thin typed layer over :class:`BaseClient`: it builds the request model, picks the
path and the response model. Path segments taken from callers are percent-encoded.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from types import TracebackType
from typing import Any
from urllib.parse import quote

import anyio
import msgspec

from mfo_actors.client._base import BaseClient
from mfo_actors.client._sse import iter_sse
from mfo_actors.client._transport import body_chunks
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
    Payment,
    PaymentCreate,
    Resource,
    ResourceCreate,
    ResourceList,
    ResourceSearchResults,
    ResourceSummary,
    Thread,
    Tool,
    ToolList,
    ToolResult,
)

__all__ = [
    "PENDING_JOB_STATES",
    "ChatAPI",
    "ChatStream",
    "EventsAPI",
    "JobsAPI",
    "MemoryAPI",
    "NotificationsAPI",
    "PayAPI",
    "ResourcesAPI",
    "ToolsAPI",
]

DONE = "[DONE]"  # SLOP's end-of-stream sentinel
PENDING_JOB_STATES = frozenset({"new", "active"})  # seed 001: a job not yet done or error


def _seg(value: str) -> str:
    return quote(value, safe="")


class _Group:
    def __init__(self, base: BaseClient) -> None:
        self._base = base


class ChatStream:
    """The chunks of one streamed reply, in order, until ``[DONE]`` (or the end of the body).

    Iterate it directly (it closes itself at the end), or use ``async with`` to be sure the
    connection is released when you stop early (or are cancelled: the HTTP stream is closed,
    which the server sees as the client going away)::

        async with client.chat.stream("hello") as chunks:
            async for text in chunks:
                ...

    Attributes:
      thread_id: The thread, once a chunk named it (else the request's ``thread_id``).
      usage: The token counts, if the server sent them in a chunk (counted in metrics).
    """

    def __init__(self, base: BaseClient, request: ChatRequest) -> None:
        self.thread_id: str | None = request.thread_id
        self.usage: dict[str, Any] | None = None
        self._base = base
        self._gen = self._run(request)

    async def _run(self, request: ChatRequest) -> AsyncIterator[str]:
        base = self._base
        async with base.stream("POST", "/api/chat/stream", json=request) as response, \
                body_chunks(response) as body, aclosing(iter_sse(body)) as events:
            async for event in events:
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
                    thread_id = obj.get("thread_id")
                    if isinstance(thread_id, str) and thread_id:
                        self.thread_id = thread_id
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        self.usage = usage
                        base.metrics.tokens(usage)
                    content = obj.get("content")
                    if isinstance(content, str) and content:
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
        reply: ChatResponse = await self._base.post("/api/chat", json=request,
                                                    response_type=ChatResponse)
        if reply.usage:
            self._base.metrics.tokens(reply.usage)
        return reply

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

    async def create(self, title: str, content: Any = None, *, type: str = "document",
                     metadata: dict[str, Any] | None = None, resource_id: str | None = None,
                     idempotency_key: str | None = None) -> Resource:
        """Create a resource (``POST /api/resources``); retried only with a key."""
        body = ResourceCreate(title=title, content=content, type=type, metadata=metadata,
                              id=resource_id)
        return await self._base.post("/api/resources", json=body,
                                     idempotency_key=idempotency_key, response_type=Resource)


class PayAPI(_Group):
    """``/api/pay`` (SLOP 4.5): payments. A payment is never sent twice: it is retried only
    with an *idempotency_key*, which the server must use to recognise the repeat."""

    async def create(self, amount: float, currency: str, description: str | None = None, *,
                     idempotency_key: str | None = None) -> Payment:
        body = PaymentCreate(amount=amount, currency=currency, description=description)
        return await self._base.post("/api/pay", json=body, idempotency_key=idempotency_key,
                                     response_type=Payment)

    async def get(self, transaction_id: str) -> Payment:
        return await self._base.get(f"/api/pay/{_seg(transaction_id)}", response_type=Payment)


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
        """The job now (never from the response cache: a job changes on its own)."""
        return await self._base.get(f"/api/jobs/{_seg(job_id)}", response_type=Job,
                                    cache=False)

    async def list(self) -> builtins.list[Job]:
        return (await self._base.get("/api/jobs", response_type=JobList, cache=False)).jobs

    async def cancel(self, job_id: str) -> Job:
        """Ask the server to stop a job (``POST /api/jobs/{id}/cancel``); the job as it is
        after. Cancelling twice is the same as once, so the call is retried like a PUT."""
        return await self._base.post(f"/api/jobs/{_seg(job_id)}/cancel", idempotent=True,
                                     response_type=Job)

    async def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,  # noqa: ASYNC109 (a wait limit that cancels the polls)
        on_status: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll the job until it leaves ``new``/``active``; return it as it ended.

        A job that ends in ``error`` is returned, not raised: the caller decides.

        Args:
          poll_interval: Seconds between two polls.
          timeout: Give up after this many seconds (``TimeoutError``); None: never.
          on_status: Called with the job at every status seen, the first included.

        Raises:
          TimeoutError: still unfinished after *timeout* seconds.
        """
        last: str | None = None
        with anyio.fail_after(timeout):
            while True:
                job = await self.get(job_id)
                if job.status != last:
                    last = job.status
                    if on_status is not None:
                        on_status(job)
                if job.status not in PENDING_JOB_STATES:
                    return job
                await anyio.sleep(poll_interval)


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
