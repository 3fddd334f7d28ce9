"""The library client as promised: from_config's protections, the GET cache, request
metrics, and the SLOP calls added for conversations (pay, resource create, job cancel/wait,
stream thread and usage). Against the reference server over real sockets, both backends."""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from mfo_actors.client import (
    APIError,
    BaseClient,
    CircuitBreaker,
    CircuitBreakerError,
    MFOClient,
    ResponseCache,
    TokenBucket,
    endpoint_label,
)
from mfo_actors.client._cache import cache_lifetime
from mfo_actors.client._observe import error_kind
from mfo_actors.client.errors import RetryableError, ValidationError
from mfo_actors.config import load_config_text
from mfo_actors.ids import new_id
from mfo_actors.metrics import REGISTRY
from mfo_actors.mock_server import MockMFOServer, MockOptions
from mfo_actors.runtime import FakeClock
from tests.mock_fixtures import running_mock_server

pytestmark = pytest.mark.anyio


def config(base_url: str, instance: str, extra: str = "") -> Any:
    """A config whose instance name is *instance* (tests make it unique: metrics are global)."""
    return load_config_text(f"""
instance: {instance}
client:
  base_url: {base_url}
  timeout: 5s
  retry: {{max_attempts: 1}}
  circuit_breaker: {{failure_threshold: 2, reset_timeout: 1m}}
{extra}
auth: {{mode: none}}
""")


def unique(prefix: str) -> str:
    return f"{prefix}-{new_id()}"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def drive(clock: FakeClock, done: anyio.Event) -> None:
    """Move a fake clock to each sleeper's deadline until *done*."""
    while not done.is_set():
        with anyio.move_on_after(0.05):
            await clock.wait_for_sleepers(1)
        deadline = clock.next_deadline
        if deadline is not None:
            await clock.advance_to(deadline)


class TestFromConfig:
    async def test_rate_limit_of_2_per_second_spaces_6_calls_over_2_5_s(self) -> None:
        """client.rate_limit {requests_per_second: 2}: 6 calls, each 0.5 s after the last."""
        clock = FakeClock()
        async with running_mock_server(MockOptions(require_auth=False)) as srv:
            cfg = config(srv.base_url, "rl", "  rate_limit: {requests_per_second: 2}")
            async with MFOClient.from_config(cfg, clock=clock) as client:
                assert isinstance(client.base.rate_limiter, TokenBucket)
                seen: list[float] = []
                done = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drive, clock, done)
                    for _ in range(6):
                        await client.info()
                        seen.append(clock.monotonic())
                    done.set()
        assert seen[-1] - seen[0] >= 2.5
        assert all(b - a >= 0.5 for a, b in itertools.pairwise(seen))
        assert srv.app.stats.requests == 6

    async def test_breaker_and_retry_come_from_the_config(self) -> None:
        async with running_mock_server(MockOptions(require_auth=False)) as srv:
            br_instance = unique("br")
            cfg = config(srv.base_url, br_instance)
            async with MFOClient.from_config(cfg) as client:
                assert isinstance(client.base.breaker, CircuitBreaker)
                assert client.base.breaker.failure_threshold == 2
                assert client.base.retry_policy is not None
                assert client.base.retry_policy.max_attempts == 1
                assert client.base.cache is None  # off unless client.cache is set
                srv.app.set_faults(fail_next=2)
                for _ in range(2):
                    with pytest.raises(RetryableError):
                        await client.info()
                sent = srv.app.stats.requests
                with pytest.raises(CircuitBreakerError):
                    await client.info()
                assert srv.app.stats.requests == sent  # refused without sending
        assert sample("mfo_upstream_errors_total", instance=br_instance, endpoint="/api/info",
                      kind="circuit_open") == 1
        assert sample("mfo_upstream_errors_total", instance=br_instance, endpoint="/api/info",
                      kind="server_error") == 2


class TestCache:
    async def test_gets_are_cached_errors_and_no_store_are_not_writes_invalidate(self) -> None:
        async with running_mock_server(MockOptions(require_auth=False)) as srv:
            cache_instance = unique("cache")
            cfg = config(srv.base_url, cache_instance, "  cache: {ttl: 1m, max_entries: 10}")
            async with MFOClient.from_config(cfg) as client:
                stats = srv.app.stats
                await client.tools.list()
                await client.tools.list()
                assert stats.requests == 1
                for _ in range(2):  # an error is never kept
                    with pytest.raises(APIError):
                        await client.memory.get("missing")
                assert stats.requests == 3
                await client.memory.set("k", 1)
                assert (await client.memory.get("k")).value == 1
                assert (await client.memory.get("k")).value == 1
                assert stats.requests == 5
                await client.memory.update("k", 2)  # a write drops /api/memory's answers
                assert (await client.memory.get("k")).value == 2
                job = await client.jobs.create("x")
                before = stats.requests
                for _ in range(2):  # jobs: Cache-Control: no-store
                    await client.base.get(f"/api/jobs/{job.id}")
                assert stats.requests == before + 2
        assert sample("mfo_upstream_cache_total", instance=cache_instance, result="hit") == 2

    async def test_a_get_answered_across_a_write_is_not_kept(self) -> None:
        """A GET in flight when a write to its group starts or ends may carry the state
        before the write: its answer is returned but not cached, so the next GET refetches.
        The order is forced with events, both ways round: the GET's answer arrives after the
        whole write; the GET is sent while the write is in flight."""
        value = {"v": 1}
        gets = 0
        get_sent, release_get = anyio.Event(), anyio.Event()
        put_sent, release_put = anyio.Event(), anyio.Event()
        hold = {"get": False, "put": False}

        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal gets
            if request.method == "GET":
                gets += 1
                seen = dict(value)  # the server reads the state now ...
                if hold["get"]:
                    get_sent.set()
                    await release_get.wait()  # ... and its answer arrives later
                return httpx.Response(200, json=seen)
            if hold["put"]:
                put_sent.set()
                await release_put.wait()
            value.update(msgspec.json.decode(request.content))
            return httpx.Response(200, json=value)

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            base = BaseClient("http://mfo.test", http=http, cache=ResponseCache(60, 10))
            got: list[Any] = []

            async def read() -> None:
                got.append(await base.get("/api/memory/k"))

            # 1. The GET reads v=1, the write of v=2 completes, then the GET's answer comes.
            hold["get"] = True
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await get_sent.wait()
                await base.put("/api/memory/k", json={"v": 2})
                release_get.set()
            hold["get"] = False
            assert got == [{"v": 1}]  # the caller gets what it asked for ...
            assert await base.get("/api/memory/k") == {"v": 2}  # ... the cache did not keep it
            assert gets == 2
            assert await base.get("/api/memory/k") == {"v": 2}
            assert gets == 2  # a GET with no write around it is kept as before

            # 2. The write of v=3 is in flight; a GET sent meanwhile reads v=2 and is answered
            # before the write is; the write's answer then drops it.
            hold["put"] = True
            got.clear()
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(base.put, "/api/memory/k", json={"v": 3}))
                await put_sent.wait()
                await read()
                release_put.set()
            assert got == [{"v": 2}]
            assert await base.get("/api/memory/k") == {"v": 3}

    def test_lifetime_rules_and_lru(self) -> None:
        assert cache_lifetime(None, 60) == 60
        assert cache_lifetime("no-store", 60) == 0
        assert cache_lifetime("private, no-cache", 60) == 0
        assert cache_lifetime("max-age=5", 60) == 5
        assert cache_lifetime("max-age=500", 60) == 60
        assert cache_lifetime("max-age=nonsense", 60) == 0
        now = [0.0]
        cache = ResponseCache(10, 2, monotonic=lambda: now[0])
        assert not cache.put("a", "/api/tools", 500, {}, b"err")
        assert cache.put("a", "/api/tools", 200, {}, b"A")
        assert cache.put("b", "/api/resources", 200, {"cache-control": "max-age=1"}, b"B")
        assert cache.get("a") is not None  # a is now the most recently used
        cache.put("c", "/api/info", 200, {}, b"C")
        assert cache.get("b") is None and len(cache) == 2  # the LRU went
        now[0] = 10.0
        assert cache.get("a") is None  # expired


class TestMetrics:
    async def test_requests_latency_sizes_errors_and_tokens(self) -> None:
        async with running_mock_server(MockOptions(require_auth=False)) as srv:
            metrics_instance = unique("metrics")
            async with MFOClient.from_config(config(srv.base_url, metrics_instance)) as client:
                reply = await client.chat.send("one two three")
                assert reply.usage == {"prompt_tokens": 3, "completion_tokens": 5,
                                       "total_tokens": 8}
                with pytest.raises(APIError):
                    await client.memory.get("user-42")
                async with client.chat.stream("four five") as chunks:
                    text = "".join([c async for c in chunks])
                assert text == "You said: four five" and chunks.thread_id is not None
                assert chunks.usage is not None and chunks.usage["completion_tokens"] == 4
        labels = {"instance": metrics_instance}
        assert sample("mfo_upstream_requests_total", endpoint="/api/chat", status="200",
                      **labels) == 1
        assert sample("mfo_upstream_requests_total", endpoint="/api/memory/{id}",
                      status="404", **labels) == 1
        assert sample("mfo_upstream_requests_total", endpoint="/api/chat/stream",
                      status="200", **labels) == 1
        assert sample("mfo_upstream_errors_total", endpoint="/api/memory/{id}",
                      kind="client_error", **labels) == 1
        assert sample("mfo_upstream_request_seconds_count", endpoint="/api/chat", **labels) == 1
        assert sample("mfo_upstream_response_bytes_sum", endpoint="/api/chat", **labels) > 50
        assert sample("mfo_upstream_tokens_total", kind="prompt", **labels) == 5
        assert sample("mfo_upstream_tokens_total", kind="completion", **labels) == 9

    def test_endpoint_labels_and_error_kinds(self) -> None:
        assert endpoint_label("/api/memory/user-42") == "/api/memory/{id}"
        assert endpoint_label("/api/jobs/j1/cancel") == "/api/jobs/{id}/cancel"
        assert endpoint_label("/api/resources/search?q=x") == "/api/resources/search"
        assert endpoint_label("/api/chat/stream") == "/api/chat/stream"
        assert error_kind(RetryableError("x", status=429)) == "rate_limited"
        assert error_kind(RetryableError("x", status=None)) == "network"
        assert error_kind(APIError(401, "unauthorized", "no")) == "client_error"
        assert error_kind(ValidationError("bad", field="x")) == "validation"


class TestSlopCalls:
    async def test_resources_pay_and_jobs(self) -> None:
        clock_now = [1_700_000_000.0]
        app = MockMFOServer(MockOptions(require_auth=False, job_duration=2.0),
                            clock=lambda: clock_now[0])  # job states follow this clock
        async with running_mock_server(app) as srv:
            async with MFOClient.from_config(config(srv.base_url, "slop")) as client:
                made = await client.resources.create("Notes", "text", metadata={"a": 1},
                                                     resource_id="notes-1")
                assert (await client.resources.get("notes-1")).content == "text"
                assert made.metadata == {"a": 1}
                with pytest.raises(APIError) as conflict:
                    await client.resources.create("Notes", resource_id="notes-1")
                assert conflict.value.status == 409
                paid = await client.pay.create(5.0, "USD", "usage", idempotency_key="p-1")
                again = await client.pay.create(5.0, "USD", "usage", idempotency_key="p-1")
                assert again.transaction_id == paid.transaction_id
                assert srv.app.stats.payments == 1
                assert (await client.pay.get(paid.transaction_id)).amount == 5.0

                job = await client.jobs.create("report")
                statuses: list[str] = []

                async def advance() -> None:
                    while clock_now[0] < 1_700_000_003.0:
                        await anyio.sleep(0.005)
                        clock_now[0] += 0.25

                async with anyio.create_task_group() as tg:
                    tg.start_soon(advance)
                    final = await client.jobs.wait(job.id, poll_interval=0.002,
                                                   on_status=lambda j: statuses.append(j.status))
                assert statuses == ["new", "active", "done"]
                assert final.result == {"type": "report", "params": {}}
                other = await client.jobs.create("slow")
                with pytest.raises(TimeoutError):
                    await client.jobs.wait(other.id, poll_interval=0.01, timeout=0.05)
                cancelled = await client.jobs.cancel(other.id)
                assert (cancelled.status, cancelled.error) == ("error", "cancelled")
                assert (await client.jobs.cancel(other.id)).status == "error"  # twice is once
                with pytest.raises(APIError) as done_already:
                    await client.jobs.cancel(job.id)
                assert done_already.value.status == 409
