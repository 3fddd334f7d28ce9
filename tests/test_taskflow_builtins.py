"""Built-in task types against a fake MFO client (the client's method names) and a local
HTTP server, on asyncio and trio."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import SocketStream

from mfo_actors.taskflow import (
    Flow,
    FlowExecutor,
    builtin_registry,
    load_flow,
    load_flow_text,
)

pytestmark = pytest.mark.anyio
FLOWS_DIR = Path(__file__).resolve().parent.parent / "flows"


class ChatResponse(msgspec.Struct):
    content: str
    thread_id: str


class MemoryItem(msgspec.Struct):
    key: str
    value: Any


class ToolResult(msgspec.Struct):
    result: Any


class Resource(msgspec.Struct):
    id: str
    name: str
    content: str


class Job(msgspec.Struct):
    id: str
    status: str = "new"


class FakeClient:
    """Records every call; method names as in mfo_actors.client.MFOClient."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.store: dict[str, Any] = {}
        self.chat = self._Chat(self)
        self.events = self._Events(self)
        self.memory = self._Memory(self)
        self.tools = self._Tools(self)
        self.resources = self._Resources(self)
        self.jobs = self._Jobs(self)

    class _Chat:
        def __init__(self, c: FakeClient) -> None:
            self.c = c

        async def send(self, message: str | None = None, *,
                       messages: list[dict[str, Any]] | None = None,
                       thread_id: str | None = None) -> ChatResponse:
            self.c.calls.append(("chat", message, messages, thread_id))
            return ChatResponse(content=f"reply to {message or messages}",
                                thread_id=thread_id or "T1")

    class _Events:
        def __init__(self, c: FakeClient) -> None:
            self.c = c

        async def send(self, body: dict[str, Any], *, idempotency_key: str) -> None:
            self.c.calls.append(("event", body, idempotency_key))

    class _Memory:
        def __init__(self, c: FakeClient) -> None:
            self.c = c

        async def set(self, key: str, value: Any) -> None:
            self.c.store[key] = value

        async def get(self, key: str) -> MemoryItem:
            return MemoryItem(key=key, value=self.c.store[key])

        async def delete(self, key: str) -> None:
            del self.c.store[key]

    class _Tools:
        def __init__(self, c: FakeClient) -> None:
            self.c = c

        async def execute(self, tool_id: str, params: dict[str, Any], *,
                          idempotency_key: str | None = None) -> ToolResult:
            self.c.calls.append(("tool", tool_id, params))
            self.c.calls.append(("tool_key", idempotency_key))
            return ToolResult(result={"sum": sum(params["xs"])})

    class _Resources:
        def __init__(self, c: FakeClient) -> None:
            self.c = c

        async def get(self, id: str) -> Resource:
            return Resource(id=id, name="doc", content="text")

    class _Jobs:
        def __init__(self, c: FakeClient) -> None:
            self.c = c

        async def create(self, type: str, params: dict[str, Any], *,
                         idempotency_key: str | None = None) -> Job:
            self.c.calls.append(("job", type, params))
            self.c.calls.append(("job_key", idempotency_key))
            return Job(id="J42", status="new")


def flow(text: str, file: str = "test.yaml") -> Flow:
    return load_flow_text(textwrap.dedent(text), builtin_registry(), file=file)


async def test_mfo_tasks_use_the_client() -> None:
    f = flow("""
        name: mfo
        outputs: {reply: "${chat.content}", job: "${job.job_id}"}
        tasks:
          - {id: put, type: mfo.memory.set, config: {key: "k:${input.user}", value: {n: 1}}}
          - {id: get, type: mfo.memory.get, dependencies: [put], config: {key: "k:${input.user}"}}
          - {id: drop, type: mfo.memory.delete, dependencies: [get],
             config: {key: "k:${input.user}"}}
          - {id: tool, type: mfo.tool, config: {tool: calc, params: {xs: [1, 2, 3]}}}
          - {id: res, type: mfo.resource.get, config: {id: R1}}
          - {id: job, type: mfo.job.create, config: {type: report, params: {for: "${res.name}"}},
             dependencies: [res]}
          - {id: chat, type: mfo.chat, dependencies: [get],
             config: {message: "n is ${get.value.n}", thread_id: TH}}
          - {id: chat2, type: mfo.chat, config: {messages: [{role: user, content: hi}]}}
          - {id: ev, type: mfo.event, dependencies: [tool],
             config: {type: calc.done, payload: {sum: "${tool.result.sum}"}}}
    """)
    client = FakeClient()
    outcome = await FlowExecutor(client=client).run(f, run_id="RUN1", input={"user": "ada"})
    assert outcome.status == "done", outcome.error
    t = outcome.tasks
    assert t["get"].output == {"value": {"n": 1}}
    assert client.store == {}
    assert t["tool"].output == {"result": {"sum": 6}}
    assert t["res"].output == {"id": "R1", "name": "doc", "content": "text"}
    assert t["job"].output == {"job_id": "J42", "status": "new"}
    assert ("job", "report", {"for": "doc"}) in client.calls
    assert ("job_key", "RUN1.job") in client.calls and ("tool_key", "RUN1.tool") in client.calls
    assert t["chat"].output == {"content": "reply to n is 1", "thread_id": "TH"}
    assert ("chat", None, [{"role": "user", "content": "hi"}], None) in client.calls
    assert t["ev"].output == {"id": "RUN1.ev"}
    assert ("event", {"id": "RUN1.ev", "source": "taskflow", "type": "calc.done",
                      "payload": {"sum": 6}}, "RUN1.ev") in client.calls
    assert outcome.outputs == {"reply": "reply to n is 1", "job": "J42"}


async def test_prompt_file_is_rendered_into_the_chat(tmp_path: Path) -> None:
    (tmp_path / "p.md").write_text("# Task\nGreet ${input.name} (${flow.name}).\n")
    (tmp_path / "f.yaml").write_text(textwrap.dedent("""
        name: prompted
        tasks:
          - {id: chat, type: mfo.chat, config: {prompt_file: p.md}}
    """))
    f = load_flow(tmp_path / "f.yaml", builtin_registry())
    client = FakeClient()
    outcome = await FlowExecutor(client=client).run(f, input={"name": "Ada"})
    assert outcome.status == "done"
    assert client.calls[0][1] == "# Task\nGreet Ada (prompted).\n"


async def test_mfo_task_without_client_fails_clearly() -> None:
    f = flow("name: nc\ntasks: [{id: t, type: mfo.tool, config: {tool: x}}]\n")
    outcome = await FlowExecutor().run(f)
    assert outcome.status == "error"
    assert "mfo.tool needs an MFO client" in (outcome.tasks["t"].error or "")


async def test_set_log_sleep() -> None:
    f = flow("""
        name: misc
        tasks:
          - {id: s, type: set, config: {values: {a: 1, b: [1, 2]}}}
          - {id: l, type: log, dependencies: [s], config: {message: "a=${s.a}", level: debug}}
          - {id: z, type: sleep, dependencies: [l], config: {duration: "${input.d}"}}
    """)
    outcome = await FlowExecutor().run(f, input={"d": "1ms"})
    assert outcome.status == "done", outcome.error
    assert outcome.tasks["s"].output == {"a": 1, "b": [1, 2]}
    bad = await FlowExecutor().run(f, input={"d": "soon"})
    assert bad.status == "error" and "config after templating" in (bad.tasks["z"].error or "")


async def _serve_once(stream: SocketStream, status: int, body: bytes,
                      seen: list[bytes]) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += await stream.receive()
        seen.append(head + b"\r\n\r\n" + rest)
        reason = b"OK" if status < 400 else b"Error"
        await stream.send(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                          % (status, reason, len(body), body))


async def test_http_request() -> None:
    seen: list[bytes] = []
    replies = [(200, b'{"ok": true}'), (503, b'{"ok": false}')]
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener: Any = multi.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve() -> None:
        for status, body in replies:
            stream = await listener.accept()
            await _serve_once(stream, status, body, seen)

    f = flow("""
        name: http
        on_failure: continue
        tasks:
          - id: post
            type: http.request
            config:
              method: POST
              url: "http://127.0.0.1:PORT/hook"
              headers: {X-Test: "yes"}
              json: {n: "${input.n}"}
          - id: fail
            type: http.request
            dependencies: [post]
            config: {url: "http://127.0.0.1:PORT/${input.down}"}
    """.replace("PORT", str(port)))
    async with multi, anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(10):
            outcome = await FlowExecutor().run(f, input={"down": "down", "n": 7})
    assert outcome.tasks["post"].output == {"status": 200, "json": {"ok": True},
                                            "text": '{"ok": true}'}
    assert seen[0].startswith(b"POST /hook HTTP/1.1")
    assert b"x-test: yes" in seen[0].lower() and seen[0].endswith(b'{"n":7}')
    assert outcome.tasks["fail"].state == "error"
    assert "answered 503" in (outcome.tasks["fail"].error or "")


async def test_example_flows_run_with_a_client() -> None:
    from mfo_actors.taskflow import default_registry, load_flows

    flows = load_flows(FLOWS_DIR, default_registry())
    client = FakeClient()
    executor = FlowExecutor(flows, client=client)
    event = {"id": "E1", "source": "webhook", "type": "user.signup", "received_at": 1.0,
             "headers": {}, "payload": {"email": "a@b.c", "email_verified": True}}
    assert flows["UserSignupFlow"].matches_event(event)
    outcome = await executor.run("UserSignupFlow", event=event)
    assert outcome.status == "done", outcome.error
    assert outcome.states()["ask_verification"] == "skipped"
    assert outcome.outputs == {"thread_id": "T1"}
    assert "- E-mail: a@b.c" in client.calls[0][1]
    unverified = await executor.run("UserSignupFlow", event={**event, "payload": {}})
    assert unverified.status == "done" and unverified.states()["welcome"] == "skipped"
    assert unverified.outputs == {"thread_id": None}

    ticket = {"source": "desk", "type": "ticket.created",
              "payload": {"priority": "urgent", "title": "down", "status": "open"}}
    assert flows["TicketTriage"].matches_event(ticket)
    outcome = await executor.run("TicketTriage", event=ticket)
    assert outcome.status == "done", outcome.error
    assert outcome.states() == {"classify": "done", "route": "done", "escalate": "done",
                                "summarise": "skipped", "notify": "done"}
    notified = outcome.tasks["notify"].output
    assert notified is not None and str(notified["notified"]).endswith(".post")
    assert ("job", "ticket.escalation", {"title": "down", "priority": "urgent"}) in client.calls
