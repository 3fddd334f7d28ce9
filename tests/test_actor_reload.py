"""``prepare_reload`` of the scheduler and the auth refresher, on fake clocks: new flows and
schedules without a tick fired twice, new credentials used at once."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mfo_actors.actors._reload import ConfigUpdate
from mfo_actors.actors.scheduler import SchedulerActor
from mfo_actors.mock_server import MockOptions
from mfo_actors.runtime import FakeClock
from tests.helpers import AuthView, poll
from tests.mock_fixtures import EMAIL, PASSWORD, client_config, running_mock_server
from tests.test_auth_refresher import failed_logins_reach, running_refresher
from tests.test_scheduler import (
    EVERY_MINUTE,
    FIRST_TICK,
    SIGNUP,
    T0,
    advance_wall,
    make_cfg,
    make_flows,
    open_store,
    running,
    settled_runs,
    ticks,
    wait_sleeping,
)

pytestmark = pytest.mark.anyio


async def test_scheduler_takes_new_flows_and_schedules_and_fires_each_tick_once(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path) as store:
        clock = FakeClock(T0)
        actor = SchedulerActor(make_cfg(), store, make_flows(SIGNUP), client=None, clock=clock)
        async with running(actor):
            with pytest.raises(Exception, match="Every"):
                await actor.run_now("Every")
            actor.prepare_reload(ConfigUpdate(cfg=make_cfg(concurrency=2),
                                              flows=make_flows(SIGNUP, EVERY_MINUTE)))()
            await wait_sleeping(clock)
            await advance_wall(clock, FIRST_TICK)
            await settled_runs(store, 1)
            await wait_sleeping(clock)
            # A reload that keeps the schedule leaves its loop alone: the next tick fires once.
            actor.prepare_reload(ConfigUpdate(cfg=make_cfg(), flows=make_flows(EVERY_MINUTE)))()
            await wait_sleeping(clock)
            assert await ticks(store, "Every") == [FIRST_TICK]
            await advance_wall(clock, FIRST_TICK + 60)
            await settled_runs(store, 2)
            assert sorted(actor.flows) == ["Every"]
            # A schedule removed by a reload stops.
            actor.prepare_reload(ConfigUpdate(cfg=make_cfg(), flows=make_flows(SIGNUP)))()
            await poll(lambda: clock.sleepers == 0)
            await advance_wall(clock, FIRST_TICK + 180)
        assert await ticks(store, "Every") == [FIRST_TICK, FIRST_TICK + 60]


async def test_new_password_logs_in_at_once_even_while_backing_off() -> None:
    clock = FakeClock()
    async with running_mock_server(MockOptions(email=EMAIL, password=PASSWORD)) as srv:
        wrong = client_config(srv.base_url, password="wrong-password")
        async with running_refresher(wrong, clock=clock) as actor:
            await poll(lambda: failed_logins_reach(srv, 1))
            await clock.wait_for_sleepers(1)  # backing off, 1 s on the fake clock
            right = client_config(srv.base_url, password=PASSWORD)
            actor.prepare_reload(ConfigUpdate(cfg=right, flows={}))()
            with anyio.fail_after(5):
                assert await AuthView(actor).header() is not None  # no clock advance needed
            assert actor.logins == 1 and srv.app.stats.failed_logins == 1


async def test_a_changed_static_token_is_used_from_the_next_request() -> None:
    cfg = client_config("http://127.0.0.1:9", auth="token", token="static-token-123")
    async with running_refresher(cfg) as actor:
        new = client_config("http://127.0.0.1:9", auth="token", token="rotated-token-456")
        actor.prepare_reload(ConfigUpdate(cfg=new, flows={}))()
        assert await AuthView(actor).header() == "Bearer rotated-token-456"
        assert actor.tokens.value is not None and actor.tokens.value.token == "rotated-token-456"
        # A mode change needs a restart: the running mode is kept.
        actor.prepare_reload(ConfigUpdate(cfg=client_config("http://127.0.0.1:9"), flows={}))()
        assert await AuthView(actor).header() == "Bearer rotated-token-456"
