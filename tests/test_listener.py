"""The listener actor over real sockets: routes, signatures, JSON, dedupe, backpressure, stop.

The store is the real SQLite store (``mfo_actors.store.open_store``) when it exists, so that
dedupe and the store bound are checked end to end; a small in-memory fake stands in for the
tests that are about the listener alone (failure injection, call recording).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog.testing
from standardwebhooks import Webhook

import mfo_actors.store as store_pkg
from mfo_actors.actors.listener import MISSING_KEY_LOG_EVERY, ListenerActor, _Route
from mfo_actors.config import InstanceConfig, RouteConfig, load_config_text
from mfo_actors.messages import Event
from mfo_actors.metrics import EVENTS_RECEIVED, EVENTS_REJECTED, ORDERING_KEY_MISSING
from mfo_actors.runtime import ReadySignal
from mfo_actors.store import (
    AppendResult,
    RunRequest,
    StoreClosedError,
    StoreError,
    StoreFullError,
)

pytestmark = pytest.mark.anyio

SW_SECRET = "whsec_" + base64.b64encode(b"listener test secret, 32 bytes!!").decode()
GH_SECRET = "gh-secret"
HMAC_SECRET = "hmac-secret"

CONFIG = """
instance: {instance}
state_dir: {state_dir}
webhook_listener:
  host: 127.0.0.1
  port: 0
  max_body_size: 4096
  retry_after: 7s
  routes:
    - {{path: /hooks/plain, source: plain}}
    - {{path: /hooks/raw, source: rawsrc, body: raw}}
    - {{path: /hooks/sw, source: sw, verify: {{scheme: standard-webhooks, secret: "{sw}"}}}}
    - {{path: /hooks/github, source: github, verify: {{scheme: github, secret: "{gh}"}}}}
    - path: /hooks/hmac
      source: custom
      verify: {{scheme: hmac-sha256, secret: "{hm}", header: X-Sig, encoding: base64}}
    - {{path: /hooks/typed, source: typed, type_from: "json:/event/kind"}}
    - {{path: /hooks/typedh, source: typedh, type_from: "header:X-Kind",
        dedupe_header: X-Delivery}}
store:
  max_pending: {max_pending}
"""


def make_config(tmp_path: Path, *, max_pending: int = 1000, instance: str = "ltest"
                ) -> InstanceConfig:
    text = CONFIG.format(instance=instance, state_dir=tmp_path / "state", sw=SW_SECRET,
                         gh=GH_SECRET, hm=HMAC_SECRET, max_pending=max_pending)
    return load_config_text(text)


class FakeStore:
    """In-memory stand-in for the methods of EventStore the listener calls."""

    def __init__(self, *, max_pending: int = 1000) -> None:
        self.events: list[Event] = []
        self.runs: list[RunRequest] = []
        self.max_pending = max_pending
        self.fail: StoreError | None = None
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()
        self._keys: dict[tuple[str, str], str] = {}

    async def append(self, event: Event, *, runs: Sequence[RunRequest] = ()) -> AppendResult:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if event.dedupe_key is not None and (event.source, event.dedupe_key) in self._keys:
            return AppendResult(self._keys[(event.source, event.dedupe_key)], duplicate=True)
        if len(self.events) >= self.max_pending:
            raise StoreFullError("full")
        self.events.append(event)
        self.runs.extend(runs)
        if event.dedupe_key is not None:
            self._keys[(event.source, event.dedupe_key)] = event.id
        return AppendResult(event.id)


def real_store_available() -> bool:
    return hasattr(store_pkg, "open_store")


@asynccontextmanager
async def open_test_store(cfg: InstanceConfig) -> AsyncIterator[Any]:
    async with store_pkg.open_store(cfg) as store:  # type: ignore[attr-defined]
        yield store


class Harness:
    def __init__(self, actor: ListenerActor, store: Any, client: httpx.AsyncClient,
                 notified: list[str]) -> None:
        self.actor = actor
        self.store = store
        self.client = client
        self.notified = notified

    async def post(self, path: str, body: bytes | str = b"{}", **headers: str) -> httpx.Response:
        content = body.encode() if isinstance(body, str) else body
        hdrs = {"content-type": "application/json"}
        hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
        response = await self.client.post(path, content=content, headers=hdrs)
        if response.status_code == 202:  # stored as a new event
            self.notified.append(response.json()["id"])
        return response

    async def stored(self, event_id: str) -> Event | None:
        if isinstance(self.store, FakeStore):
            return next((e for e in self.store.events if e.id == event_id), None)
        found = await self.store.get_event(event_id)
        return None if found is None else found.event


@asynccontextmanager
async def running_listener(
    tmp_path: Path, *, store: Any = None, real: bool = False, max_pending: int = 1000,
    match_runs: Any = None, cfg: InstanceConfig | None = None,
) -> AsyncIterator[Harness]:
    cfg = cfg if cfg is not None else make_config(tmp_path, max_pending=max_pending)
    async with AsyncExitStack() as stack:
        if store is None:
            if real:
                store = await stack.enter_async_context(open_test_store(cfg))
            else:
                store = FakeStore(max_pending=max_pending)
        notified: list[str] = []  # ids answered 202 through Harness.post
        actor = ListenerActor(cfg, store, match_runs=match_runs)
        async with anyio.create_task_group() as tg:
            ready = ReadySignal()
            tg.start_soon(actor.run, ready)
            with anyio.fail_after(5):
                await ready.wait()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{actor.port}") as client:
                yield Harness(actor, store, client, notified)
            actor.request_stop()


def sw_sign(body: bytes, *, secret: str = SW_SECRET, ts: float | None = None,
            msg_id: str = "msg_abc") -> dict[str, str]:
    ts = time.time() if ts is None else ts
    sig = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode())
    return {"webhook_id": msg_id, "webhook_timestamp": str(int(ts)), "webhook_signature": sig}


def gh_sign(body: bytes, secret: str = GH_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"x_hub_signature_256": f"sha256={digest}", "x_github_event": "push"}


def hmac_sign(body: bytes, secret: str = HMAC_SECRET) -> dict[str, str]:
    return {"x_sig": base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
            .decode()}


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


class TestAccept:
    async def test_accepts_and_stores(self, tmp_path: Path) -> None:
        """202 {"id"} once stored; the raw body, type, headers and dedupe key are kept."""
        before = counter(EVENTS_RECEIVED, "ltest", "plain")
        async with running_listener(tmp_path) as h:
            body = b'{"type": "order.created",  "n": 1}'
            r = await h.post("/hooks/plain", body, webhook_id="dlv-1", x_custom="yes")
            assert r.status_code == 202
            event_id = r.json()["id"]
            event = await h.stored(event_id)
            assert event is not None
            assert event.body == body  # not re-encoded
            assert event.source == "plain" and event.type == "order.created"
            assert event.dedupe_key == "dlv-1"
            assert event.headers["x-custom"] == "yes"
            assert "content-length" not in event.headers
            assert h.notified == [event_id]
        assert counter(EVENTS_RECEIVED, "ltest", "plain") == before + 1

    async def test_raw_route_takes_any_content_type(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            r = await h.post("/hooks/raw", b"a=1&b=2", content_type="text/plain")
            assert r.status_code == 202
            event = await h.stored(r.json()["id"])
            assert event is not None and event.body == b"a=1&b=2" and not event.is_json
            assert event.type == "unknown"

    async def test_type_from_json_pointer_and_header(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            r = await h.post("/hooks/typed", '{"event": {"kind": "a.b"}}')
            assert (await h.stored(r.json()["id"])).type == "a.b"  # type: ignore[union-attr]
            r = await h.post("/hooks/typed", '{"event": {}}')
            assert (await h.stored(r.json()["id"])).type == "unknown"  # type: ignore[union-attr]
            r = await h.post("/hooks/typedh", "[1]", x_kind="k1", x_delivery="d9")
            event = await h.stored(r.json()["id"])
            assert event is not None and event.type == "k1" and event.dedupe_key == "d9"

    async def test_default_type(self, tmp_path: Path) -> None:
        """X-Event-Type, then X-GitHub-Event, then the JSON "type" field, else "unknown"."""
        async with running_listener(tmp_path) as h:
            cases = [
                ('{"type": "a"}', {"x_event_type": "hdr", "x_github_event": "gh"}, "hdr"),
                ('{"type": "a"}', {"x_github_event": "gh"}, "gh"),
                ('{"type": "a", "x": [1, {"type": "b"}]}', {}, "a"),
                ('{"type": 5}', {}, "5"),
                ('[{"type": "a"}]', {}, "unknown"),
                ('{"kind": "a"}', {}, "unknown"),
            ]
            for body, headers, expected in cases:
                r = await h.post("/hooks/plain", body, **headers)
                assert r.status_code == 202, body
                event = await h.stored(r.json()["id"])
                assert event is not None and event.type == expected, body
                assert event.body == body.encode()

    async def test_match_runs_go_to_the_store(self, tmp_path: Path) -> None:
        store = FakeStore()

        def match(event: Event) -> list[RunRequest]:
            return [RunRequest(run_id="r-" + event.id, flow="f", trigger="event",
                               event_id=event.id)]

        async with running_listener(tmp_path, store=store, match_runs=match) as h:
            r = await h.post("/hooks/plain", "{}")
            assert store.runs == [RunRequest(run_id="r-" + r.json()["id"], flow="f",
                                             trigger="event", event_id=r.json()["id"])]


class TestRefuse:
    async def test_unknown_path_404_and_wrong_method_405(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            assert (await h.post("/nope")).status_code == 404
            r = await h.client.get("/hooks/plain")
            assert r.status_code == 405 and r.headers["allow"] == "POST"

    async def test_non_json_content_type_415(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            r = await h.post("/hooks/plain", "x=1",
                             content_type="application/x-www-form-urlencoded")
            assert r.status_code == 415
            assert (await h.post("/hooks/plain", "{}",
                                 content_type="application/vnd.api+json")).status_code == 202

    async def test_bad_json_400_names_the_problem(self, tmp_path: Path) -> None:
        before = counter(EVENTS_REJECTED, "ltest", "plain", "json")
        async with running_listener(tmp_path) as h:
            r = await h.post("/hooks/plain", '{"a": 1,}')
            assert r.status_code == 400
            # deep inside a field the listener does not otherwise look at
            assert (await h.post("/hooks/plain", '{"a": [1, {"b": tru}]}')).status_code == 400
            assert (await h.post("/hooks/plain", '[1, 2')).status_code == 400
            assert (await h.post("/hooks/plain", '')).status_code == 400
            assert "invalid JSON" in r.json()["error"] and "byte" in r.json()["error"]
            assert h.notified == []
        assert counter(EVENTS_REJECTED, "ltest", "plain", "json") == before + 4

    @pytest.mark.parametrize("route", ["/hooks/plain", "/hooks/typed"])
    async def test_deeply_nested_json_400_not_500(self, tmp_path: Path, route: str) -> None:
        """JSON nested past the decoder's depth is refused as the sender's problem (400), not
        a 500 with a traceback logged for every such request."""
        body = '{"event": ' + "[" * 1500 + "]" * 1500 + "}"
        async with running_listener(tmp_path) as h:
            r = await h.post(route, body)
            assert r.status_code == 400
            assert "invalid JSON" in r.json()["error"]
            assert isinstance(h.store, FakeStore) and h.store.events == []

    async def test_too_large_413(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            big = json.dumps({"x": "a" * 5000})
            assert (await h.post("/hooks/plain", big)).status_code == 413

            async def chunks() -> AsyncIterator[bytes]:
                yield big[:3000].encode()
                yield big[3000:].encode()

            r = await h.client.post("/hooks/plain", content=chunks(),
                                    headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert h.notified == []


class TestSignatures:
    async def test_standard_webhooks(self, tmp_path: Path) -> None:
        """Valid (standardwebhooks signer) 202; tampered, wrong secret, stale: 401, unstored."""
        before = counter(EVENTS_REJECTED, "ltest", "sw", "signature")
        async with running_listener(tmp_path) as h:
            body = b'{"type": "invoice.paid"}'
            r = await h.post("/hooks/sw", body, **sw_sign(body))
            assert r.status_code == 202, r.text
            assert (await h.post("/hooks/sw", body + b" ", **sw_sign(body, msg_id="m2"))
                    ).status_code == 401
            other = "whsec_" + base64.b64encode(b"x" * 32).decode()
            assert (await h.post("/hooks/sw", body, **sw_sign(body, secret=other, msg_id="m3"))
                    ).status_code == 401
            r = await h.post("/hooks/sw", body, **sw_sign(body, ts=time.time() - 600,
                                                              msg_id="m4"))
            assert r.status_code == 401 and "too old" in r.json()["error"]
            assert len(h.notified) == 1
        assert counter(EVENTS_REJECTED, "ltest", "sw", "signature") == before + 3

    async def test_github(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            body = b'{"ref": "refs/heads/main"}'
            r = await h.post("/hooks/github", body, **gh_sign(body))
            assert r.status_code == 202
            assert (await h.stored(r.json()["id"])).type == "push"  # type: ignore[union-attr]
            assert (await h.post("/hooks/github", body + b"x", **gh_sign(body))).status_code == 401
            assert (await h.post("/hooks/github", body, **gh_sign(body, "bad"))).status_code == 401
            assert len(h.notified) == 1

    async def test_generic_hmac(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path) as h:
            body = b'{"k": 1}'
            assert (await h.post("/hooks/hmac", body, **hmac_sign(body))).status_code == 202
            assert (await h.post("/hooks/hmac", b'{"k": 2}', **hmac_sign(body))).status_code == 401
            assert (await h.post("/hooks/hmac", body, **hmac_sign(body, "no"))).status_code == 401
            assert len(h.notified) == 1


class TestStoreOutcomes:
    async def test_dedupe_returns_first_id(self, tmp_path: Path) -> None:
        """A provider retry (same webhook-id) gets 200 with the first id; nothing new stored."""
        async with running_listener(tmp_path, real=real_store_available()) as h:
            body = b'{"type": "a"}'
            first = await h.post("/hooks/sw", body, **sw_sign(body, msg_id="dup-1"))
            assert first.status_code == 202
            again = await h.post("/hooks/sw", body, **sw_sign(body, msg_id="dup-1"))
            assert again.status_code == 200
            assert again.json() == {"id": first.json()["id"], "duplicate": True}
            other = await h.post("/hooks/sw", body, **sw_sign(body, msg_id="dup-2"))
            assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
            assert len(h.notified) == 2

    async def test_full_store_503_with_retry_after(self, tmp_path: Path) -> None:
        async with running_listener(tmp_path, real=real_store_available(), max_pending=2) as h:
            for i in range(2):
                assert (await h.post("/hooks/plain", f'{{"i": {i}}}')).status_code == 202
            r = await h.post("/hooks/plain", '{"i": 3}')
            assert r.status_code == 503
            assert r.headers["retry-after"] == "7"
            assert len(h.notified) == 2

    @pytest.mark.parametrize("error", [StoreClosedError("closing"), StoreError("disk I/O")])
    async def test_store_errors_503(self, tmp_path: Path, error: StoreError) -> None:
        store = FakeStore()
        store.fail = error
        async with running_listener(tmp_path, store=store) as h:
            r = await h.post("/hooks/plain", "{}")
            assert r.status_code == 503 and r.headers["retry-after"] == "7"


class TestStop:
    async def test_request_stop_drains_and_refuses(self, tmp_path: Path) -> None:
        """In-flight appends finish with 202; new requests on open connections get 503."""
        store = FakeStore()
        store.gate = anyio.Event()
        cfg = make_config(tmp_path)
        actor = ListenerActor(cfg, store)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            ready = ReadySignal()
            done = anyio.Event()

            async def run() -> None:
                await actor.run(ready)
                done.set()

            tg.start_soon(run)
            await ready.wait()
            base = f"http://127.0.0.1:{actor.port}"
            async with httpx.AsyncClient(base_url=base) as busy, \
                    httpx.AsyncClient(base_url=base) as other:
                # open a keep-alive connection for `other` before the stop
                assert (await other.get("/hooks/plain")).status_code == 405
                results: list[httpx.Response] = []

                async def inflight() -> None:
                    results.append(await busy.post("/hooks/plain", content=b"{}",
                                                   headers={"content-type": "application/json"}))

                tg.start_soon(inflight)
                with anyio.fail_after(5):
                    await store.entered.wait()
                actor.request_stop()
                with pytest.raises(httpx.TransportError):
                    await other.post("/hooks/plain", content=b"{}")
                store.gate.set()
                with anyio.fail_after(10):
                    await done.wait()
                assert results[0].status_code == 202
                assert results[0].headers["connection"] == "close"
                assert len(store.events) == 1

    async def test_stop_answers_503_on_open_connection(self, tmp_path: Path) -> None:
        """A request whose head arrives on an open connection after stop gets 503 + close."""
        async with running_listener(tmp_path) as h:
            stream = await anyio.connect_tcp("127.0.0.1", h.actor.port)
            async with stream:
                await stream.send(b"POST /hooks/plain HTTP/1.1\r\nHost: t\r\n")
                with anyio.fail_after(5):
                    while h.actor._server is None or not h.actor._server.active_connections:  # noqa: ASYNC110
                        await anyio.sleep(0.01)  # polling with a deadline
                h.actor.request_stop()
                await stream.send(b"Content-Type: application/json\r\nContent-Length: 2"
                                  b"\r\n\r\n{}")
                reply = b""
                with anyio.fail_after(5):
                    try:
                        while True:
                            reply += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        pass
            head = reply.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 503")
            assert b"retry-after: 7" in head and b"connection: close" in head
            assert h.notified == []


def test_listener_satisfies_actor_protocol(tmp_path: Path) -> None:
    from mfo_actors.runtime import Actor

    actor = ListenerActor(make_config(tmp_path), FakeStore())  # type: ignore[arg-type]
    assert isinstance(actor, Actor)
    assert actor.name == "listener"


KEYED_CONFIG = """
instance: ktest
state_dir: {state_dir}
forwarder: {{ordering: key, ordering_key: "json:/account"}}
webhook_listener:
  host: 127.0.0.1
  port: 0
  routes:
    - {{path: /hooks/user, source: users, ordering_key: "json:/user/id"}}
    - {{path: /hooks/tenant, source: tenants, ordering_key: "header:X-Tenant"}}
    - {{path: /hooks/default, source: defaults}}
    - {{path: /hooks/raw, source: raws, body: raw}}
"""


@asynccontextmanager
async def keyed_listener(tmp_path: Path, ordering: str = "key") -> AsyncIterator[Harness]:
    text = KEYED_CONFIG.format(state_dir=tmp_path / "state")
    cfg = load_config_text(text.replace("ordering: key", f"ordering: {ordering}"))
    async with running_listener(tmp_path, cfg=cfg) as h:
        yield h


class TestOrderingKey:
    """forwarder.ordering: key: the listener reads each event's key once, at acceptance."""

    async def key_of(self, h: Harness, path: str, body: str, **headers: str) -> str | None:
        r = await h.post(path, body, **headers)
        assert r.status_code == 202, r.text
        event = await h.stored(r.json()["id"])
        assert event is not None
        return event.ordering_key

    async def test_json_pointer_header_and_default(self, tmp_path: Path) -> None:
        async with keyed_listener(tmp_path) as h:
            assert await self.key_of(h, "/hooks/user", '{"user": {"id": "u-1"}}') == "u-1"
            assert await self.key_of(h, "/hooks/user", '{"user": {"id": 42}}') == "42"
            assert await self.key_of(h, "/hooks/tenant", "{}", x_tenant="acme") == "acme"
            assert await self.key_of(h, "/hooks/default", '{"account": "ac-9"}') == "ac-9"
            # A raw route cannot read the json: default: ordered by its source.
            assert await self.key_of(h, "/hooks/raw", "a=1", content_type="text/plain") is None

    async def test_missing_key_falls_back_to_the_source_and_is_counted(
        self, tmp_path: Path
    ) -> None:
        """No value (missing, empty, an object, a body that is not an object): the event is
        stored without a key, so it is ordered with its source; counted per source."""
        before = counter(ORDERING_KEY_MISSING, "ktest", "users")
        async with keyed_listener(tmp_path) as h:
            for body in ('{"user": {}}', '{"user": {"id": ""}}', '{"user": {"id": {}}}',
                         "[1, 2]", '"text"'):
                assert await self.key_of(h, "/hooks/user", body) is None, body
            assert await self.key_of(h, "/hooks/tenant", "{}") is None
            event = h.store.events[0]
            assert event.lane == "users"
        assert counter(ORDERING_KEY_MISSING, "ktest", "users") == before + 5

    def test_missing_keys_are_logged_first_then_every_1000th_across_reloads(self) -> None:
        """The log promised for missing keys: the 1st, then every 1000th per route, the count
        kept when a reload rebuilds the route."""
        cfg = RouteConfig(path="/hooks/user", source="users")
        route = _Route(cfg, "ktest", ordering_key="json:/user/id")
        with structlog.testing.capture_logs() as logs:
            for _ in range(MISSING_KEY_LOG_EVERY):
                assert route.ordering_key({}, {}) is None
            reloaded = _Route(cfg, "ktest", before=route, ordering_key="json:/user/id")
            assert reloaded.ordering_key({}, {"user": {"id": "u-1"}}) == "u-1"
            assert reloaded.ordering_key({}, {}) is None
        counts = [e["count"] for e in logs if e["event"] == "listener.ordering_key_missing"]
        assert counts == [1, MISSING_KEY_LOG_EVERY + 1]

    async def test_long_keys_are_stored_as_a_digest(self, tmp_path: Path) -> None:
        long = "x" * 500
        async with keyed_listener(tmp_path) as h:
            key = await self.key_of(h, "/hooks/user", json.dumps({"user": {"id": long}}))
            again = await self.key_of(h, "/hooks/user", json.dumps({"user": {"id": long}}))
        assert key == again == "sha256:" + hashlib.sha256(long.encode()).hexdigest()

    async def test_other_modes_store_no_key(self, tmp_path: Path) -> None:
        async with keyed_listener(tmp_path, ordering="source") as h:
            assert await self.key_of(h, "/hooks/user", '{"user": {"id": "u-1"}}') is None
