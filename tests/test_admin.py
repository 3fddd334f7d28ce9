"""The admin port over real sockets: liveness, readiness with per-actor checks, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from mfo_actors.actors.admin import AdminActor
from mfo_actors.config import AdminConfig, Port
from mfo_actors.metrics import EVENTS_RECEIVED
from mfo_actors.runtime import Actor, ReadySignal

pytestmark = pytest.mark.anyio


class Readiness:
    def __init__(self) -> None:
        self.ready = True
        self.checks: dict[str, Any] = {"listener": "ready", "store": "writable"}
        self.fail = False

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        if self.fail:
            raise RuntimeError("store gone")
        return self.ready, dict(self.checks)


@asynccontextmanager
async def running_admin(readiness: Readiness) -> AsyncIterator[httpx.AsyncClient]:
    actor = AdminActor(AdminConfig(port=Port(0)), instance="adm", readiness=readiness)
    assert isinstance(actor, Actor)
    async with anyio.create_task_group() as tg:
        ready = ReadySignal()
        stopped = anyio.Event()

        async def run() -> None:
            await actor.run(ready)
            stopped.set()

        tg.start_soon(run)
        with anyio.fail_after(5):
            await ready.wait()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{actor.port}") as client:
            yield client
        actor.request_stop()
        with anyio.fail_after(5):
            await stopped.wait()  # run returns by itself after request_stop


async def test_healthz() -> None:
    async with running_admin(Readiness()) as client:
        r = await client.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_readyz_reports_checks_and_turns_503() -> None:
    readiness = Readiness()
    async with running_admin(readiness) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready",
                            "checks": {"listener": "ready", "store": "writable"}}
        readiness.ready = False
        readiness.checks["listener"] = "restarting"
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["listener"] == "restarting"
        readiness.fail = True
        r = await client.get("/readyz")
        assert r.status_code == 503 and "store gone" in r.json()["checks"]["readiness"]


async def test_metrics_prometheus_text() -> None:
    EVENTS_RECEIVED.labels("adm", "src").inc()
    async with running_admin(Readiness()) as client:
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == CONTENT_TYPE_LATEST
        assert 'mfo_events_received_total{instance="adm",source="src"}' in r.text


async def test_unknown_path_and_method() -> None:
    async with running_admin(Readiness()) as client:
        assert (await client.get("/nope")).status_code == 404
        r = await client.post("/healthz")
        assert r.status_code == 405 and "GET" in r.headers["allow"]
