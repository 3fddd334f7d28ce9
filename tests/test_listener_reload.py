"""The listener's operator features over real sockets: rate limits, TLS, and live reload
(routes, rotated secrets with their grace period, certificates) without dropping a connection.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme

from mfo_actors.actors._admission import ClientLimiter, RateLimiter, client_key, take_both
from mfo_actors.actors._reload import ConfigUpdate
from mfo_actors.actors.listener import ListenerActor
from mfo_actors.config import InstanceConfig, RateLimitConfig, load_config_text
from mfo_actors.errors import ConfigError
from mfo_actors.metrics import EVENTS_REJECTED
from mfo_actors.runtime import ReadySignal
from tests.helpers import poll
from tests.test_listener import FakeStore, counter, gh_sign

pytestmark = pytest.mark.anyio


def listener_config(tmp_path: Path, *, secret: str = "old-secret", grace: str = "24h",
                    route_limit: str = "", client_limit: str = "", tls: str = "",
                    extra_route: str = "", limits: str = "") -> InstanceConfig:
    text = f"""
instance: reload-test
state_dir: {tmp_path / "state"}
webhook_listener:
  host: 127.0.0.1
  port: 0
  {client_limit}
  {tls}
  {limits}
  routes:
    - path: /hooks/gh
      source: gh
      verify: {{scheme: github, secret: "{secret}", rotation_grace: "{grace}"}}
      {route_limit}
    - {{path: /hooks/open, source: open}}
    {extra_route}
"""
    return load_config_text(text)


@asynccontextmanager
async def serving(cfg: InstanceConfig, store: FakeStore) -> AsyncIterator[ListenerActor]:
    actor = ListenerActor(cfg, store)
    async with anyio.create_task_group() as tg:
        ready = ReadySignal()
        tg.start_soon(actor.run, ready)
        with anyio.fail_after(5):
            await ready.wait()
        try:
            yield actor
        finally:
            actor.request_stop()


def reload(actor: ListenerActor, cfg: InstanceConfig) -> None:
    actor.prepare_reload(ConfigUpdate(cfg=cfg, flows={}))()


async def post_signed(client: httpx.AsyncClient, path: str, secret: str,
                      body: bytes = b'{"n": 1}') -> httpx.Response:
    headers = {k.replace("_", "-"): v for k, v in gh_sign(body, secret).items()}
    return await client.post(path, content=body,
                             headers={"content-type": "application/json", **headers})


class TestRateLimits:
    async def test_route_limit_answers_429_with_retry_after_and_stores_nothing(
        self, tmp_path: Path
    ) -> None:
        """Past the route's burst: 429, Retry-After, counted, not stored; other routes free."""
        cfg = listener_config(tmp_path, route_limit="rate_limit: {requests_per_second: 0.5, "
                                                    "burst: 2}")
        store = FakeStore()
        before = counter(EVENTS_REJECTED, "reload-test", "gh", "rate_limited")
        async with serving(cfg, store) as actor, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{actor.port}") as client:
            statuses = [(await post_signed(client, "/hooks/gh", "old-secret")).status_code
                        for _ in range(2)]
            refused = await post_signed(client, "/hooks/gh", "old-secret")
            other = await client.post("/hooks/open", json={"n": 2})
        assert statuses == [202, 202]
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "2"  # one token per 2 s, rounded up
        assert "rate limit" in refused.json()["error"]
        assert other.status_code == 202
        assert len(store.events) == 3
        assert counter(EVENTS_REJECTED, "reload-test", "gh", "rate_limited") == before + 1

    async def test_client_limit_is_per_address_across_routes(self, tmp_path: Path) -> None:
        cfg = listener_config(tmp_path, client_limit="client_rate_limit: "
                                                     "{requests_per_second: 1, burst: 1}")
        store = FakeStore()
        async with serving(cfg, store) as actor, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{actor.port}") as client:
            first = await client.post("/hooks/open", json={})
            second = await client.post("/hooks/open", json={})
            third = await post_signed(client, "/hooks/gh", "old-secret")
        assert (first.status_code, second.status_code, third.status_code) == (202, 429, 429)
        assert second.headers["retry-after"] == "1"
        assert len(store.events) == 1

    async def test_a_flooding_client_does_not_lock_everyone_out_of_the_route(
        self, tmp_path: Path
    ) -> None:
        """A client over its own limit spends none of the route's tokens, so other clients
        still get in (review of issue 12, D2). The route's rate is slow enough that nothing
        refills during the test: before the fix the flooder's refused requests emptied it."""
        cfg = listener_config(
            tmp_path, client_limit="client_rate_limit: {requests_per_second: 0.01, burst: 2}",
            route_limit="rate_limit: {requests_per_second: 0.01, burst: 10}")
        store = FakeStore()
        async with serving(cfg, store) as actor:
            url = f"http://127.0.0.1:{actor.port}"

            async def post_from(address: str, count: int) -> list[int]:
                transport = httpx.AsyncHTTPTransport(local_address=address)
                async with httpx.AsyncClient(base_url=url, transport=transport) as client:
                    return [(await post_signed(client, "/hooks/gh", "old-secret")).status_code
                            for _ in range(count)]

            flooder = await post_from("127.0.0.2", 30)
            others = [(await post_from(f"127.0.0.{n}", 1))[0] for n in range(3, 9)]
        assert flooder == [202, 202] + [429] * 28
        assert others == [202] * 6
        assert len(store.events) == 8

    def test_a_request_takes_a_token_from_both_buckets_or_from_neither(self) -> None:
        now = [0.0]
        route = RateLimiter(RateLimitConfig(requests_per_second=1, burst=2),
                            clock=lambda: now[0])
        client = RateLimiter(RateLimitConfig(requests_per_second=1, burst=1),
                             clock=lambda: now[0])
        assert take_both(route, client) == 0.0
        assert take_both(route, client) == pytest.approx(1.0)  # the client's bucket is empty
        assert route.wait() == 0.0  # ... and the route kept its token
        assert take_both(route, None) == 0.0
        assert take_both(route, None) == pytest.approx(1.0)
        assert client.wait() == pytest.approx(1.0)  # the route refused: the client kept its
        now[0] += 1.0
        assert take_both(route, client) == 0.0

    def test_ipv6_clients_share_a_bucket_per_64(self) -> None:
        assert client_key("192.0.2.7") == "192.0.2.7"
        assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") \
            == "2001:db8:1:2::/64"
        assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
        assert client_key("::ffff:192.0.2.7") == "192.0.2.7"  # dual-stack socket, IPv4 client
        limiter = ClientLimiter(RateLimitConfig(requests_per_second=1, burst=1),
                                max_clients=10, clock=lambda: 0.0)
        assert limiter.take("2001:db8::1") == 0.0
        assert limiter.take("2001:db8::2") > 0  # another address of the same /64
        assert len(limiter) == 1

    def test_bucket_refills_at_its_rate(self) -> None:
        now = [100.0]
        bucket = RateLimiter(RateLimitConfig(requests_per_second=4, burst=2),
                             clock=lambda: now[0])
        assert (bucket.take(), bucket.take()) == (0.0, 0.0)
        assert bucket.take() == pytest.approx(0.25)
        now[0] += 0.25
        assert bucket.take() == 0.0

    def test_client_buckets_are_bounded_least_recent_first(self) -> None:
        limiter = ClientLimiter(RateLimitConfig(requests_per_second=1, burst=1), max_clients=2,
                                clock=lambda: 0.0)
        assert limiter.take("a") == 0.0
        assert limiter.take("b") == 0.0
        assert limiter.take("a") > 0  # a is limited, and now the most recent
        assert limiter.take("c") == 0.0  # forgets b, the least recently seen
        assert len(limiter) == 2
        assert limiter.take("a") > 0  # a was kept
        assert limiter.take("b") == 0.0  # b starts again with a full bucket


class TestReload:
    async def test_rotated_secret_verifies_during_grace_only_and_keeps_connections(
        self, tmp_path: Path
    ) -> None:
        """After a reload both secrets verify on the same keep-alive connection; once the
        grace period ends only the new one does."""
        store = FakeStore()
        async with serving(listener_config(tmp_path), store) as actor, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{actor.port}") as client:
            assert (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 202
            reload(actor, listener_config(tmp_path, secret="new-secret", grace="300ms"))
            assert (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 202
            assert (await post_signed(client, "/hooks/gh", "new-secret")).status_code == 202
            assert actor._server is not None and actor._server.active_connections == 1

            async def old_refused() -> bool:
                return (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 401

            await poll(old_refused, deadline=5)
            assert (await post_signed(client, "/hooks/gh", "new-secret")).status_code == 202
            assert actor._server.active_connections == 1

    async def test_a_second_rotation_keeps_every_secret_still_in_grace(
        self, tmp_path: Path
    ) -> None:
        store = FakeStore()
        async with serving(listener_config(tmp_path, secret="s1"), store) as actor, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{actor.port}") as client:
            reload(actor, listener_config(tmp_path, secret="s2"))
            reload(actor, listener_config(tmp_path, secret="s3"))
            codes = [(await post_signed(client, "/hooks/gh", s)).status_code
                     for s in ("s1", "s2", "s3", "s4")]
        assert codes == [202, 202, 202, 401]

    async def test_zero_grace_switches_at_once_and_routes_change_live(
        self, tmp_path: Path
    ) -> None:
        store = FakeStore()
        async with serving(listener_config(tmp_path), store) as actor, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{actor.port}") as client:
            assert (await client.post("/hooks/new", json={})).status_code == 404
            reload(actor, listener_config(
                tmp_path, secret="new-secret", grace="0s",
                extra_route="- {path: /hooks/new, source: fresh}"))
            assert (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 401
            assert (await client.post("/hooks/new", json={})).status_code == 202
        assert store.events[-1].source == "fresh"

    async def test_new_limits_apply_and_an_unchanged_limit_keeps_its_bucket(
        self, tmp_path: Path
    ) -> None:
        limited = "rate_limit: {requests_per_second: 0.1, burst: 1}"
        store = FakeStore()
        async with serving(listener_config(tmp_path), store) as actor, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{actor.port}") as client:
            reload(actor, listener_config(tmp_path, route_limit=limited))
            assert (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 202
            # Same limit again (another key changed): the spent bucket is not refilled.
            reload(actor, listener_config(tmp_path, route_limit=limited,
                                          extra_route="- {path: /x, source: x}"))
            assert (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 429
            reload(actor, listener_config(tmp_path))
            assert (await post_signed(client, "/hooks/gh", "old-secret")).status_code == 202


    async def test_new_header_limits_reach_an_open_keep_alive_connection(
        self, tmp_path: Path
    ) -> None:
        """The HTTP core reads its limits each time a connection waits for a request, not
        once per connection: an idle keep-alive connection (already waiting when the reload
        came) applies them from its next request but one, and is not closed for it."""
        store = FakeStore()
        headers = {f"x-extra-{i}": "1" for i in range(10)}
        async with serving(listener_config(tmp_path), store) as actor, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{actor.port}") as client:
            assert (await client.post("/hooks/open", json={}, headers=headers)).status_code \
                == 202
            reload(actor, listener_config(tmp_path, limits="max_headers: 8"))
            assert actor._server is not None and actor._server.active_connections == 1
            statuses = [(await client.post("/hooks/open", json={}, headers=headers)).status_code
                        for _ in range(2)]
        assert statuses[0] in (202, 431)  # 202: parsed under the limits it waited with
        assert statuses[1] == 431


def write_cert(ca: trustme.CA, directory: Path, name: str) -> str:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / f"{name}.pem"))
    return str(directory / f"{name}.pem")


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class TestTls:
    async def test_https_with_a_generated_certificate_and_reload_to_a_new_one(
        self, tmp_path: Path
    ) -> None:
        """The listener serves TLS; a reload swaps the certificate for new connections while
        an open keep-alive connection keeps working."""
        first_ca, second_ca = trustme.CA(), trustme.CA()
        pem1 = write_cert(first_ca, tmp_path, "one")
        pem2 = write_cert(second_ca, tmp_path, "two")
        cfg1 = listener_config(tmp_path, tls=f'tls: {{cert: "{pem1}", key: "{pem1}"}}')
        cfg2 = listener_config(tmp_path, tls=f'tls: {{cert: "{pem2}", key: "{pem2}"}}')
        store = FakeStore()
        async with serving(cfg1, store) as actor:
            base = f"https://127.0.0.1:{actor.port}"
            async with httpx.AsyncClient(base_url=base, verify=client_context(first_ca)) as old:
                assert (await old.post("/hooks/open", json={"a": 1})).status_code == 202
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{actor.port}") as plain:
                    with pytest.raises(httpx.HTTPError):
                        await plain.post("/hooks/open", json={})
                reload(actor, cfg2)
                assert (await old.post("/hooks/open", json={"a": 2})).status_code == 202
                async with httpx.AsyncClient(base_url=base,
                                             verify=client_context(second_ca)) as new:
                    assert (await new.post("/hooks/open", json={"a": 3})).status_code == 202
                async with httpx.AsyncClient(base_url=base,
                                             verify=client_context(first_ca)) as stale:
                    with pytest.raises(httpx.ConnectError):
                        await stale.post("/hooks/open", json={})
        assert [json.loads(e.body)["a"] for e in store.events] == [1, 2, 3]

    async def test_a_certificate_that_does_not_load_fails_the_reload_and_changes_nothing(
        self, tmp_path: Path
    ) -> None:
        ca = trustme.CA()
        pem = write_cert(ca, tmp_path, "good")
        cfg = listener_config(tmp_path, tls=f'tls: {{cert: "{pem}", key: "{pem}"}}')
        store = FakeStore()
        async with serving(cfg, store) as actor:
            await anyio.Path(pem).write_text("not a certificate")
            with pytest.raises(ConfigError, match=r"webhook_listener\.tls"):
                actor.prepare_reload(ConfigUpdate(cfg=cfg, flows={}))
            async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{actor.port}",
                                         verify=client_context(ca)) as client:
                assert (await client.post("/hooks/open", json={})).status_code == 202

    def test_config_check_names_a_missing_certificate(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"webhook_listener\.tls: cannot load"):
            listener_config(tmp_path, tls=f'tls: {{cert: "{tmp_path}/no.pem", '
                                           f'key: "{tmp_path}/no.pem"}}')


def test_handshake_timeout_and_garbage_do_not_log_errors(tmp_path: Path) -> None:
    """A client that is not speaking TLS is dropped quietly (no http.connection_failed)."""
    import structlog

    ca = trustme.CA()
    pem = write_cert(ca, tmp_path, "c")
    cfg = listener_config(tmp_path, tls=f'tls: {{cert: "{pem}", key: "{pem}"}}')

    async def main() -> list[dict[str, Any]]:
        with structlog.testing.capture_logs() as logs:
            async with serving(cfg, FakeStore()) as actor:
                stream = await anyio.connect_tcp("127.0.0.1", actor.port)
                async with stream:
                    await stream.send(b"POST /hooks/open HTTP/1.1\r\nhost: x\r\n\r\n")
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        with anyio.fail_after(5):
                            while True:
                                await stream.receive()
        return logs

    logs = anyio.run(main)
    assert not [e for e in logs if e.get("log_level") == "error"]
