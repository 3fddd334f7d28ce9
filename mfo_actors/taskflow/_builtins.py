"""The built-in task types, and :func:`default_registry`.

Config keys follow the flow files (see the package docstring for the table). ``mfo.*``
tasks call the shared MFO client from ``ctx.client`` (so they get its auth, breaker and
rate limit); without one they fail with :class:`ClientUnavailableError`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import anyio
import msgspec

from mfo_actors._yaml import Duration
from mfo_actors.taskflow._context import TaskContext
from mfo_actors.taskflow._errors import (
    ClientUnavailableError,
    JobFailedError,
    SessionsUnavailableError,
    TaskFailure,
)
from mfo_actors.taskflow._registry import TaskFunc, TaskRegistry

__all__ = [
    "ChatConfig",
    "ConditionConfig",
    "EventConfig",
    "HttpRequestConfig",
    "JobCancelConfig",
    "JobCreateConfig",
    "LogConfig",
    "MemoryGetConfig",
    "MemorySetConfig",
    "PayConfig",
    "ResourceCreateConfig",
    "ResourceGetConfig",
    "SetConfig",
    "SleepConfig",
    "SubflowConfig",
    "ToolConfig",
    "builtin_registry",
    "default_registry",
]


class _Cfg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of built-in task configs."""


class ChatConfig(_Cfg, frozen=True, kw_only=True):
    """``mfo.chat``: one of ``message``, ``messages`` or ``prompt_file`` (a Markdown template
    beside the flow file, its ``${...}`` rendered like any config value).

    ``session: KEY`` continues the chat session of KEY (``${event.payload.user.id}``, say):
    the same thread until it has been idle ``sessions.ttl``. ``stream: true`` reads the
    answer as it is produced (SSE) and records ``chunks`` and ``first_token_seconds``.
    """

    template_files: ClassVar[tuple[str, ...]] = ("prompt_file",)

    message: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_file: str | None = None  # at run time: the rendered contents of the file
    thread_id: str | None = None
    session: str | None = None
    stream: bool = False
    model: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("message", "messages", "prompt_file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("mfo.chat needs exactly one of message, messages, prompt_file")
        if self.session is not None and self.thread_id is not None:
            raise ValueError("mfo.chat takes session or thread_id, not both "
                             "(a session chooses its thread)")
        if self.session is not None and not self.session.strip():
            raise ValueError("session must not be empty (it names whose conversation this is)")


class EventConfig(_Cfg, frozen=True, kw_only=True):
    type: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    source: str = "taskflow"


class MemorySetConfig(_Cfg, frozen=True, kw_only=True):
    key: str
    value: Any = None


class MemoryGetConfig(_Cfg, frozen=True, kw_only=True):
    key: str


class ToolConfig(_Cfg, frozen=True, kw_only=True):
    tool: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class ResourceGetConfig(_Cfg, frozen=True, kw_only=True):
    id: str


class JobCreateConfig(_Cfg, frozen=True, kw_only=True):
    """``mfo.job.create``; with ``wait: true`` the task ends with the job (its result, or
    its error), polling every ``poll_interval`` for at most ``timeout`` (then the job is
    cancelled unless ``cancel_on_timeout: false``)."""

    type: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    wait: bool = False
    poll_interval: Duration = Duration(1.0)
    timeout: Duration | None = None
    cancel_on_timeout: bool = True

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be greater than 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be greater than 0")


class JobCancelConfig(_Cfg, frozen=True, kw_only=True):
    job_id: str


class ResourceCreateConfig(_Cfg, frozen=True, kw_only=True):
    title: str
    content: Any = None
    type: str = "document"
    metadata: dict[str, Any] | None = None
    id: str | None = None


class PayConfig(_Cfg, frozen=True, kw_only=True):
    """``mfo.pay`` (SLOP's ``/pay``): sent with a key stable across retries and reruns of
    the run, so a payment is made once."""

    amount: float
    currency: str
    description: str | None = None

    def __post_init__(self) -> None:
        if not self.amount > 0:
            raise ValueError("amount must be greater than 0")


class HttpRequestConfig(_Cfg, frozen=True, kw_only=True):
    """``http.request``; a status >= 400 fails the task unless ``raise_for_status: false``.

    ``url`` may use ``${...}`` only after its scheme, host and port, and the values are
    percent-encoded (``_template.compile_url``): event data cannot steer the request.
    """

    url_fields: ClassVar[tuple[str, ...]] = ("url",)

    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    json: Any = None
    body: str | None = None
    timeout: Duration = Duration(30.0)
    raise_for_status: bool = True

    def __post_init__(self) -> None:
        if self.json is not None and self.body is not None:
            raise ValueError("http.request takes json or body, not both")
        if not self.url.startswith(("http://", "https://", "${")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")


class SetConfig(_Cfg, frozen=True, kw_only=True):
    values: dict[str, Any] = msgspec.field(default_factory=dict)


class LogConfig(_Cfg, frozen=True, kw_only=True):
    message: Any
    level: Literal["debug", "info", "warning", "error"] = "info"


class SleepConfig(_Cfg, frozen=True, kw_only=True):
    duration: Duration


class SubflowConfig(_Cfg, frozen=True, kw_only=True):
    flow: str
    input: dict[str, Any] = msgspec.field(default_factory=dict)


class ConditionConfig(_Cfg, frozen=True, kw_only=True):
    """``branches``: expression -> successor id(s), first true wins; else ``default``."""

    branches: dict[str, list[str] | str] = msgspec.field(default_factory=dict)
    default: list[str] | str | None = None


def _client(ctx: TaskContext) -> Any:
    client = ctx.client
    if client is None:
        raise ClientUnavailableError(ctx.task_type)
    return client


def _chat(cfg: ChatConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        client = _client(ctx)
        message = cfg.message if cfg.message is not None else cfg.prompt_file
        thread_id = cfg.thread_id
        session: Mapping[str, Any] | None = None
        keeper = ctx.sessions
        if cfg.session is not None:
            if keeper is None:
                raise SessionsUnavailableError()
            session = await keeper.open(cfg.session, flow=ctx.flow, run_id=ctx.run_id)
            thread_id = session["thread_id"]
        if cfg.stream:
            out = await _streamed_reply(client, message, cfg.messages, thread_id, cfg.model)
        else:
            extra = {"model": cfg.model} if cfg.model is not None else {}
            reply = await client.chat.send(message, messages=cfg.messages, thread_id=thread_id,
                                           **extra)
            out = {"content": reply.content, "thread_id": reply.thread_id or thread_id}
            if getattr(reply, "usage", None):
                out["usage"] = reply.usage
        if session is not None and keeper is not None:
            session = await keeper.record_turn(
                session, thread_id=out["thread_id"] or session["thread_id"],
                sent=message if message is not None else _last_user(cfg.messages),
                reply=out["content"])
            ctx.set_session(session)
            out["session"] = session["key"]
            out["turns"] = session["turns"]
        return out

    return run


async def _streamed_reply(client: Any, message: str | None,
                          messages: list[dict[str, Any]] | None, thread_id: str | None,
                          model: str | None) -> dict[str, Any]:
    """Read a streamed answer whole; cancelling closes the HTTP stream (``async with``)."""
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    async with client.chat.stream(message, messages=messages, thread_id=thread_id,
                                  model=model) as chunks:
        async for text in chunks:
            if first is None:
                first = time.perf_counter() - started
            parts.append(text)
        out: dict[str, Any] = {
            "content": "".join(parts), "thread_id": chunks.thread_id, "chunks": len(parts),
            "first_token_seconds": None if first is None else round(first, 6),
            "stream_seconds": round(time.perf_counter() - started, 6),
        }  # fmt: skip
        if chunks.usage:
            out["usage"] = chunks.usage
    return out


def _last_user(messages: list[dict[str, Any]] | None) -> str | None:
    for msg in reversed(messages or []):
        if msg.get("role") == "user" and isinstance(msg.get("content"), str):
            return str(msg["content"])
    return None


def _event(cfg: EventConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        # Stable across retries and reruns of this run, so the server can drop duplicates.
        key = f"{ctx.run_id}.{ctx.task_id}"
        body = {"id": key, "source": cfg.source, "type": cfg.type, "payload": cfg.payload}
        await _client(ctx).events.send(body, idempotency_key=key)
        return {"id": key}

    return run


def _memory_set(cfg: MemorySetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        await _client(ctx).memory.set(cfg.key, cfg.value)
        return {}

    return run


def _memory_get(cfg: MemoryGetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        item = await _client(ctx).memory.get(cfg.key)
        return {"value": item.value}

    return run


def _memory_delete(cfg: MemoryGetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        await _client(ctx).memory.delete(cfg.key)
        return {}

    return run


def _tool(cfg: ToolConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        # A key stable across attempts lets the client retry a tool call safely.
        result = await _client(ctx).tools.execute(cfg.tool, cfg.params,
                                                  idempotency_key=f"{ctx.run_id}.{ctx.task_id}")
        return {"result": result.result}

    return run


def _resource_get(cfg: ResourceGetConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        resource = await _client(ctx).resources.get(cfg.id)
        out = msgspec.to_builtins(resource)
        return out if isinstance(out, dict) else {"value": out}

    return run


def _job_create(cfg: JobCreateConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        client = _client(ctx)
        job = await client.jobs.create(cfg.type, cfg.params,
                                       idempotency_key=f"{ctx.run_id}.{ctx.task_id}")
        if not cfg.wait:
            return {"job_id": job.id, "status": job.status}
        states = [{"state": job.status, "at": time.time()}]
        out: dict[str, Any] = {"job_id": job.id, "states": states}

        def seen(now: Any) -> None:
            if now.status != states[-1]["state"]:
                states.append({"state": now.status, "at": time.time()})
                ctx.log.info("taskflow.job_state", job_id=job.id, state=now.status)

        try:
            final = await client.jobs.wait(job.id, poll_interval=cfg.poll_interval,
                                           timeout=cfg.timeout, on_status=seen)
        except TimeoutError:
            out["status"] = states[-1]["state"]
            if cfg.cancel_on_timeout:
                out["cancelled"] = await _cancel_quietly(ctx, client, job.id)
            raise TaskFailure(f"job {job.id} did not finish within {cfg.timeout:g}s "
                              f"(still {states[-1]['state']})", output=out) from None
        out["status"] = final.status
        if final.status == "done":
            out["result"] = final.result
            return out
        out["error"] = final.error
        raise JobFailedError(f"job {job.id} ended in {final.status}: "
                             f"{final.error or 'the server gave no reason'}", output=out)

    return run


async def _cancel_quietly(ctx: TaskContext, client: Any, job_id: str) -> bool:
    """Best effort: the task fails either way, with whether the server took the cancel."""
    try:
        await client.jobs.cancel(job_id)
    except Exception as exc:  # reported in the log; the timeout is the task's error
        ctx.log.warning("taskflow.job_cancel_failed", job_id=job_id, error=str(exc))
        return False
    return True


def _job_cancel(cfg: JobCancelConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        job = await _client(ctx).jobs.cancel(cfg.job_id)
        return {"job_id": job.id, "status": job.status, "error": job.error}

    return run


def _resource_create(cfg: ResourceCreateConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        resource = await _client(ctx).resources.create(
            cfg.title, cfg.content, type=cfg.type, metadata=cfg.metadata, resource_id=cfg.id,
            idempotency_key=f"{ctx.run_id}.{ctx.task_id}")
        out = msgspec.to_builtins(resource)
        return out if isinstance(out, dict) else {"value": out}

    return run


def _pay(cfg: PayConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        payment = await _client(ctx).pay.create(cfg.amount, cfg.currency, cfg.description,
                                                idempotency_key=f"{ctx.run_id}.{ctx.task_id}")
        return {"transaction_id": payment.transaction_id, "status": payment.status}

    return run


def _http_request(cfg: HttpRequestConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        import httpx  # here, not at the top: ``check`` loads this module and sends nothing

        kwargs: dict[str, Any] = {"headers": cfg.headers}
        if cfg.json is not None:
            kwargs["json"] = cfg.json
        elif cfg.body is not None:
            kwargs["content"] = cfg.body.encode()
        async with httpx.AsyncClient(timeout=cfg.timeout) as http:
            response = await http.request(cfg.method, cfg.url, **kwargs)
        if cfg.raise_for_status and response.status_code >= 400:
            raise RuntimeError(f"{cfg.method} {cfg.url} answered {response.status_code}")
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = None
        return {"status": response.status_code, "json": data, "text": response.text}

    return run


def _set(cfg: SetConfig) -> TaskFunc:
    values = dict(cfg.values)

    async def run(ctx: TaskContext) -> dict[str, Any]:
        return values

    return run


def _log(cfg: LogConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        getattr(ctx.log, cfg.level)("taskflow.log", message=cfg.message)
        return {}

    return run


def _sleep(cfg: SleepConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        await anyio.sleep(cfg.duration)
        return {}

    return run


def _subflow(cfg: SubflowConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:
        return await ctx.run_subflow(cfg.flow, cfg.input)

    return run


def _condition(cfg: ConditionConfig) -> TaskFunc:
    async def run(ctx: TaskContext) -> dict[str, Any]:  # the executor evaluates conditions
        raise RuntimeError("condition tasks are evaluated by the executor")

    return run


def builtin_registry() -> TaskRegistry:
    """A registry with only the built-in types (no plugins)."""
    registry = TaskRegistry()
    registry.register("mfo.chat", _chat, config=ChatConfig)
    registry.register("mfo.event", _event, config=EventConfig)
    registry.register("mfo.memory.set", _memory_set, config=MemorySetConfig)
    registry.register("mfo.memory.get", _memory_get, config=MemoryGetConfig)
    registry.register("mfo.memory.delete", _memory_delete, config=MemoryGetConfig)
    registry.register("mfo.tool", _tool, config=ToolConfig)
    registry.register("mfo.resource.get", _resource_get, config=ResourceGetConfig)
    registry.register("mfo.job.create", _job_create, config=JobCreateConfig)
    registry.register("mfo.job.cancel", _job_cancel, config=JobCancelConfig)
    registry.register("mfo.resource.create", _resource_create, config=ResourceCreateConfig)
    registry.register("mfo.pay", _pay, config=PayConfig)
    registry.register("http.request", _http_request, config=HttpRequestConfig)
    registry.register("set", _set, config=SetConfig)
    registry.register("log", _log, config=LogConfig)
    registry.register("sleep", _sleep, config=SleepConfig)
    registry.register("subflow", _subflow, config=SubflowConfig)
    registry.register("condition", _condition, config=ConditionConfig)
    return registry


def default_registry(*, entry_points: bool = True) -> TaskRegistry:
    """The built-ins plus every installed ``mfo_actors.tasks`` plugin (a fresh registry)."""
    registry = builtin_registry()
    if entry_points:
        registry.load_entry_points()
    return registry
