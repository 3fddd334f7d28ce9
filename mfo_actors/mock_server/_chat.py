"""Chat routes: threads, chats and the SSE stream (``/api/chat``).

A ``thread_id`` the server has not seen starts that thread (SLOP's reference implementations
echo the client's id), so a client may choose it. Answers carry ``usage`` (words counted as
tokens). ``POST /api/chat/stream`` sends one SSE chunk per word, ``stream_delay`` seconds
apart, the first naming the thread, the last the usage; a client that goes away mid-stream is
counted in ``streams_disconnected``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.ids import new_id
from mfo_actors.mock_server._base import (
    HTTPError,
    MockPart,
    allow,
    decode_typed,
    encode,
    iso,
    json_response,
)
from mfo_actors.observability import get_logger

__all__ = ["ChatRoutes"]

log = get_logger("mfo_actors.mock_server")


@dataclass(slots=True)
class _Thread:
    id: str
    created_at: str
    updated_at: str
    messages: list[m.ChatMessage] = field(default_factory=list)
    title: str | None = None


def _usage(said: str, reply: str) -> dict[str, int]:
    """Token counts as a model server reports them (here: words)."""
    prompt, completion = len(said.split()), len(reply.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class ChatRoutes(MockPart):
    """``/api/chat``: the threads and chats seen so far."""

    def _start_chat(self) -> None:
        self._threads: dict[str, _Thread] = {}
        self._chats: dict[str, m.Chat] = {}

    @property
    def threads(self) -> dict[str, dict[str, int]]:
        """Per thread: how many messages, and how many from the user (for tests)."""
        return {t.id: {"messages": len(t.messages),
                       "user_messages": sum(1 for msg in t.messages if msg.role == "user")}
                for t in self._threads.values()}

    def _reply_to(self, chat: m.ChatRequest) -> tuple[_Thread, str, m.ChatMessage, str]:
        if not chat.messages:
            raise HTTPError(400, "invalid_request", "Missing required field: messages")
        now = self._clock()
        stamp = iso(now)
        if chat.thread_id:
            thread = self._threads.get(chat.thread_id)
            if thread is None:
                thread = self._threads[chat.thread_id] = _Thread(chat.thread_id, stamp, stamp)
        else:
            tid = f"thread_{new_id()}"
            thread = self._threads[tid] = _Thread(tid, stamp, stamp)
        users = [msg for msg in chat.messages if msg.role == "user"]
        said = users[-1].content if users else chat.messages[-1].content
        if thread.title is None:
            thread.title = said[:40]
        for msg in chat.messages:
            thread.messages.append(m.ChatMessage(role=msg.role, content=msg.content,
                                                 id=f"msg_{new_id()}", created_at=stamp))
        reply = m.ChatMessage(role="assistant", content=f"You said: {said}",
                              id=f"msg_{new_id()}", created_at=stamp)
        thread.messages.append(reply)
        thread.updated_at = stamp
        chat_id = f"chat_{new_id()}"
        self._chats[chat_id] = m.Chat(id=chat_id, messages=[*chat.messages, reply],
                                      thread_id=thread.id, model=chat.model or "echo",
                                      created_at=stamp)
        return thread, chat_id, reply, said

    async def _api_chat(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            if method == "GET":
                chats = [m.ChatSummary(id=c.id, snippet=c.messages[0].content[:80],
                                       created_at=c.created_at) for c in self._chats.values()]
                return json_response(m.ChatList(chats=chats[::-1]))
            allow(method, "POST")
            chat = decode_typed(request, m.ChatRequest)
            thread, chat_id, reply, said = self._reply_to(chat)
            return json_response({"id": chat_id, "message": reply, "thread_id": thread.id,
                                  "message_id": reply.id, "model": chat.model or "echo",
                                  "usage": _usage(said, reply.content)})
        if rest == ["stream"]:
            allow(method, "POST")
            chat = decode_typed(request, m.ChatRequest)
            thread, _, reply, said = self._reply_to(chat)
            return Response(200, [("content-type", "text/event-stream"),
                                  ("cache-control", "no-cache")],
                            stream=self._sse(reply.content, thread.id,
                                             _usage(said, reply.content)))
        if len(rest) == 1:
            allow(method, "GET")
            key = rest[0]
            if key.startswith("thread_"):
                t = self._threads.get(key)
                if t is None:
                    raise HTTPError(404, "not_found", f"no thread {key}")
                return json_response(m.Thread(thread_id=t.id, messages=t.messages, title=t.title,
                                              created_at=t.created_at, updated_at=t.updated_at))
            found = self._chats.get(key)
            if found is None:
                raise HTTPError(404, "not_found", f"no chat {key}")
            return json_response(found)
        raise HTTPError(404, "not_found", "no such chat endpoint")

    async def _sse(self, text: str, thread_id: str, usage: dict[str, int]
                   ) -> AsyncIterator[bytes]:
        delay = self.faults.stream_delay
        self.stats.streams_started += 1
        finished = False
        try:
            yield b": mfo-mock stream\n\n"  # a comment, as keep-alives are sent
            words = text.split(" ")
            for i, word in enumerate(words):
                chunk: dict[str, Any] = {"content": word if i == 0 else " " + word}
                if i == 0:
                    chunk["thread_id"] = thread_id
                yield b"event: message\ndata: " + encode(chunk) + b"\n\n"
                if delay:
                    await anyio.sleep(delay)
            yield b"data: " + encode({"usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            # The HTTP core closes this generator early when the client goes away.
            if finished:
                self.stats.streams_completed += 1
            else:
                self.stats.streams_disconnected += 1
                log.info("mock.stream_disconnected", thread_id=thread_id)
