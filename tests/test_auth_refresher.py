"""The auth refresher against the reference server over a real socket (both backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
from structlog.testing import capture_logs

from mfo_actors.actors.auth import AuthRefresherActor, TokenUnavailableError
from mfo_actors.client._client import MFOClient
from mfo_actors.config import InstanceConfig
from mfo_actors.metrics import TOKEN_REFRESH
from mfo_actors.mock_server import MockOptions
from mfo_actors.runtime import Clock, FakeClock, ReadySignal
from tests.helpers import AuthView, poll
from tests.mock_fixtures import (
    EMAIL,
    PASSWORD,
    MockServerHandle,
    client_config,
    running_mock_server,
)

pytestmark = pytest.mark.anyio


def failed_logins_reach(srv: MockServerHandle, n: int) -> bool:
    return srv.app.stats.failed_logins >= n


@asynccontextmanager
async def running_refresher(
    cfg: InstanceConfig, *, clock: Clock | None = None, token_wait: float | None = None
) -> AsyncIterator[AuthRefresherActor]:
    actor = AuthRefresherActor(cfg, clock=clock, token_wait=token_wait, rng=lambda: 0.0)
    ready = ReadySignal()
    async with anyio.create_task_group() as tg:
        tg.start_soon(actor.run, ready)
        await ready.wait()
        try:
            yield actor
        finally:
            actor.request_stop()


async def test_first_header_waits_for_login() -> None:
    """header() blocks until the first login, then serves the token; logins are counted."""
    async with running_mock_server(MockOptions(email=EMAIL, password=PASSWORD)) as srv:
        cfg = client_config(srv.base_url)
        async with running_refresher(cfg) as actor:
            with anyio.fail_after(5):
                header = await AuthView(actor).header()
            assert header is not None and header.startswith("Bearer ")
            assert actor.tokens.value is not None
            assert header == f"Bearer {actor.tokens.value.token}"
            assert srv.app.stats.logins == 1
            assert actor.health()["ok"] is True


async def test_refreshes_proactively_before_expiry() -> None:
    """With a 10 s lifetime the refresher logs in again at 8 s (refresh_at 0.8), not later."""
    clock = FakeClock()
    async with running_mock_server(
        MockOptions(email=EMAIL, password=PASSWORD, token_lifetime=10.0)
    ) as srv:
        cfg = client_config(srv.base_url)
        async with running_refresher(cfg, clock=clock) as actor:
            with anyio.fail_after(5):
                first = await AuthView(actor).header()
                await clock.wait_for_sleepers(1)
                assert clock.next_deadline == pytest.approx(8.0)
                await clock.advance_to(7.9)
                assert srv.app.stats.logins == 1
                await clock.advance_to(8.0)
                await poll(lambda: srv.app.stats.logins == 2)
                await poll(lambda: AuthView(actor).token is not None
                                 and f"Bearer {AuthView(actor).token}" != first)
            assert actor.tokens.value is not None
            assert actor.tokens.value.expires_at == pytest.approx(clock.now() + 10.0)


async def test_many_concurrent_401s_make_one_login() -> None:
    """50 calls rejected with the same token at once cause exactly one re-login."""
    async with running_mock_server(MockOptions(email=EMAIL, password=PASSWORD)) as srv:
        cfg = client_config(srv.base_url)
        async with running_refresher(cfg) as actor:
            async with MFOClient.from_config(cfg, gate=AuthView(actor).gate) as client:
                await client.info()
                assert srv.app.stats.logins == 1
                srv.app.set_faults(expire_tokens=True)
                results: list[object] = []

                async def call() -> None:
                    results.append(await client.info())

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for _ in range(50):
                            tg.start_soon(call)
            assert len(results) == 50
            assert srv.app.stats.logins == 2
            assert actor.logins == 2


async def test_stale_rejection_is_ignored() -> None:
    """A 401 reported for a token already replaced does not cause another login."""
    async with running_mock_server(MockOptions(email=EMAIL, password=PASSWORD)) as srv:
        cfg = client_config(srv.base_url)
        async with running_refresher(cfg) as actor:
            with anyio.fail_after(5):
                old = await AuthView(actor).header()
                assert old is not None
                await AuthView(actor).invalidate(old.split(" ", 1)[1])
                new = await AuthView(actor).header()
                assert new != old
                await AuthView(actor).invalidate(old.split(" ", 1)[1])  # late report: ignored
                assert await AuthView(actor).header() == new
                await anyio.wait_all_tasks_blocked()
            assert srv.app.stats.logins == 2


async def test_wrong_password_logged_once_and_backs_off() -> None:
    """A refused login is logged once, retried after 1, 2, 4, 8 s, and visible in health()."""
    clock = FakeClock()
    rejected = TOKEN_REFRESH.labels(instance="test", result="rejected")
    before = rejected._value.get()
    async with running_mock_server(MockOptions(email=EMAIL, password=PASSWORD)) as srv:
        cfg = client_config(srv.base_url, password="wrong-password")
        with capture_logs() as logs:
            async with running_refresher(cfg, clock=clock) as actor:
                waits = []
                with anyio.fail_after(20):
                    for attempt in range(1, 5):
                        await clock.wait_for_sleepers(1)
                        assert srv.app.stats.failed_logins == attempt
                        deadline = clock.next_deadline
                        assert deadline is not None
                        waits.append(round(deadline - clock.monotonic(), 3))
                        await clock.advance_to(deadline)
                        await poll(partial(failed_logins_reach, srv, attempt + 1))
                # The server counts a login before the refresher has read its answer.
                await poll(lambda: actor.health()["consecutive_failures"] == 5)
                health = actor.health()
        assert waits == [1.0, 2.0, 4.0, 8.0]
        assert health["ok"] is False
        assert health["consecutive_failures"] == 5
        assert "wrong email or password" in str(health["last_error"])
        assert rejected._value.get() - before == 5
        assert [e["event"] for e in logs].count("auth.login_rejected") == 1
        assert PASSWORD not in repr(logs) and "wrong-password" not in repr(logs)


async def test_header_times_out_without_a_token() -> None:
    """While logins fail, header() gives up after token_wait with a clear error."""
    async with running_mock_server(MockOptions(email=EMAIL, password=PASSWORD)) as srv:
        cfg = client_config(srv.base_url, password="nope-nope")
        async with running_refresher(cfg, token_wait=0.2) as actor:
            with anyio.fail_after(5), pytest.raises(TokenUnavailableError) as info:
                await AuthView(actor).header()
            assert "login rejected" in str(info.value)


async def test_token_and_none_modes() -> None:
    """Static tokens are published as they are; mode none sends no header."""
    cfg = client_config("http://127.0.0.1:9", auth="token", token="static-token-123")
    async with running_refresher(cfg) as actor:
        assert await AuthView(actor).header() == "Bearer static-token-123"
        await AuthView(actor).invalidate("static-token-123")  # logged, cannot be fixed
        assert await AuthView(actor).header() == "Bearer static-token-123"
        assert actor.tokens.value is not None and actor.tokens.value.expires_at is None
    cfg = client_config("http://127.0.0.1:9", auth="none")
    async with running_refresher(cfg) as actor:
        assert await AuthView(actor).header() is None
        assert actor.health()["ok"] is True


async def test_token_expired_by_our_clock_does_not_cause_a_login_storm() -> None:
    """A fresh token whose JWT exp is already past by our clock (clock skew) is kept until
    a 401: before the fix the refresher logged in again every 50 ms, for ever."""
    import base64

    import httpx
    import msgspec

    clock = FakeClock()
    logins = 0

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal logins
        logins += 1
        exp = clock.now() - 300  # the server's clock is 5 minutes behind ours
        token = f"{b64(b'{}')}.{b64(msgspec.json.encode({'exp': exp}))}.sig{logins}"
        return httpx.Response(200, json={"token": token})

    cfg = client_config("http://mfo.test")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        actor = AuthRefresherActor(cfg, http, clock=clock, rng=lambda: 0.0)
        ready = ReadySignal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(actor.run, ready)
            await ready.wait()
            with anyio.fail_after(5):
                await AuthView(actor).header()
            with anyio.move_on_after(0.3):  # the buggy refresher sleeps on the clock at once
                await clock.wait_for_sleepers(1)
            for step in range(1, 21):
                await clock.advance_to(step * 0.5)
            assert logins == 1
            assert AuthView(actor).token is not None
            actor.request_stop()
