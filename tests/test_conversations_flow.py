"""Conversations in flows: chat sessions kept in the store, streaming chat tasks, jobs waited
to completion, and the other SLOP task types, run by the engine against the reference server
over real sockets, with the run history in a real SQLite store. Both backends."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from mfo_actors.actors._runs import StoreRecorder
from mfo_actors.actors.sessions import SessionsActor, StoreSessions
from mfo_actors.client import MFOClient
from mfo_actors.config import InstanceConfig, load_config_text
from mfo_actors.errors import ConfigError
from mfo_actors.ids import new_id
from mfo_actors.metrics import REGISTRY
from mfo_actors.mock_server import MockMFOServer, MockOptions
from mfo_actors.runtime import FakeClock, ReadySignal
from mfo_actors.store import EventStore, RunRequest, TaskRunRecord, open_sqlite_store
from mfo_actors.taskflow import (
    Flow,
    FlowExecutor,
    RunOutcome,
    builtin_registry,
    load_flow_text,
)
from tests.helpers import poll
from tests.mock_fixtures import MockServerHandle, running_mock_server

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0


class WallClock:
    """The store's wall clock, moved by the test (session TTLs)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def flow(text: str) -> Flow:
    return load_flow_text(textwrap.dedent(text), builtin_registry(), file="test.yaml")


def instance_config(base_url: str, instance: str) -> InstanceConfig:
    return load_config_text(f"""
instance: {instance}
client: {{base_url: {base_url}, timeout: 5s, retry: {{max_attempts: 1}}}}
auth: {{mode: none}}
sessions: {{ttl: 10m, max_active: 100, context_messages: 4}}
""")


@dataclass
class Harness:
    srv: MockServerHandle
    cfg: InstanceConfig
    store: EventStore
    client: MFOClient
    executor: FlowExecutor
    wall: WallClock

    async def run(self, f: Flow, event: dict[str, Any] | None = None
                  ) -> tuple[RunOutcome, dict[str, TaskRunRecord]]:
        """Run *f* as the scheduler does: a run record, task records, the settle."""
        run_id = new_id()
        await self.store.create_runs([RunRequest(run_id=run_id, flow=f.name,
                                                 trigger="manual")], claim=True)
        recorder = StoreRecorder(self.store, run_id, f.name, instance=self.cfg.instance)
        outcome = await self.executor.run(f, run_id=run_id, event=event, recorder=recorder)
        await self.store.finish_run(run_id, status=outcome.status, error=outcome.error,
                                    outputs=outcome.outputs)
        found = await self.store.get_run(run_id)
        assert found is not None
        return outcome, {t.task_id: t for t in found[1]}


@asynccontextmanager
async def harness(tmp_path: Path, app: MockMFOServer | None = None) -> AsyncIterator[Harness]:
    wall = WallClock()
    async with running_mock_server(app or MockMFOServer(MockOptions(require_auth=False))) as srv:
        cfg = instance_config(srv.base_url, f"conv-{new_id()}")
        async with open_sqlite_store(tmp_path / "store.sqlite3", clock=wall) as store:
            async with MFOClient.from_config(cfg) as client:
                sessions = StoreSessions(store, cfg.sessions, instance=cfg.instance)
                executor = FlowExecutor(client=client, sessions=sessions)
                yield Harness(srv, cfg, store, client, executor, wall)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SUPPORT = """
    name: support
    outputs: {thread: "${session.thread_id}", turns: "${session.turns}", said: "${reply.content}"}
    tasks:
      - id: reply
        type: mfo.chat
        config: {session: "${event.payload.user}", message: "${event.payload.text}"}
      - id: note
        type: set
        dependencies: [reply]
        config: {values: {line: "turn ${session.turns} in ${session.thread_id}"}}
"""


def said(user: str, text: str) -> dict[str, Any]:
    return {"id": new_id(), "source": "chat", "type": "message", "payload":
            {"user": user, "text": text}}


class TestSessions:
    async def test_one_thread_per_user_new_thread_after_ttl_one_for_racing_runs(
            self, tmp_path: Path) -> None:
        f = flow(SUPPORT)
        async with harness(tmp_path) as h:
            threads: dict[str, list[str]] = {"A": [], "B": []}
            for user, text in [("A", "a1"), ("B", "b1"), ("A", "a2"), ("B", "b2"), ("A", "a3")]:
                outcome, tasks = await h.run(f, said(user, text))
                assert outcome.status == "done", outcome.error
                threads[user].append(outcome.outputs["thread"])
            assert len(set(threads["A"])) == 1 and len(set(threads["B"])) == 1
            assert threads["A"][0] != threads["B"][0]
            assert outcome.outputs["turns"] == 3
            assert tasks["note"].output == {"line": f"turn 3 in {threads['A'][0]}"}
            assert tasks["reply"].output is not None and tasks["reply"].output["turns"] == 3
            server = h.srv.app.threads
            assert server[threads["A"][0]]["user_messages"] == 3
            assert server[threads["B"][0]]["user_messages"] == 2
            stored = await h.store.get_session("A")
            assert stored is not None and stored.turns == 3
            assert [m["content"] for m in stored.context] == ["a2", "You said: a2", "a3",
                                                             "You said: a3"]

            h.wall.now += 600  # sessions.ttl of silence: A's next message starts a new thread
            outcome, _ = await h.run(f, said("A", "a4"))
            assert outcome.outputs["thread"] != threads["A"][0]
            assert outcome.outputs["turns"] == 1

            results: list[RunOutcome] = []

            async def one(text: str) -> None:
                results.append((await h.run(f, said("C", text)))[0])

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "c1")
                tg.start_soon(one, "c2")
            assert len({r.outputs["thread"] for r in results}) == 1
            assert h.srv.app.threads[results[0].outputs["thread"]]["user_messages"] == 2
            labels = {"instance": h.cfg.instance}
            assert metric("mfo_sessions_created_total", **labels) == 4  # A, B, A again, C
            assert metric("mfo_sessions_closed_total", reason="expired", **labels) == 1
            assert metric("mfo_sessions_active", **labels) == 3

    async def test_cleanup_actor_closes_idle_sessions(self, tmp_path: Path) -> None:
        clock = FakeClock()
        async with harness(tmp_path) as h:
            await h.run(flow(SUPPORT), said("D", "hi"))
            actor = SessionsActor(h.cfg, h.store, clock=clock)
            async with anyio.create_task_group() as tg:
                ready = ReadySignal()
                tg.start_soon(actor.run, ready)
                await ready.wait()
                await clock.wait_for_sleepers(1)
                assert actor.expired == 0
                h.wall.now += 600
                await clock.advance_to(clock.monotonic() + float(h.cfg.sessions.cleanup_interval))
                await poll(lambda: actor.expired == 1)
                actor.request_stop()
            found = await h.store.get_session("D")
            assert found is not None and found.close_reason == "expired"
            assert metric("mfo_sessions_active", instance=h.cfg.instance) == 0

    def test_load_checks_session_references(self) -> None:
        with pytest.raises(ConfigError, match=r"no mfo\.chat task with session"):
            flow("""
                name: bad
                tasks:
                  - {id: a, type: set, config: {values: {t: "${session.thread_id}"}}}
            """)
        with pytest.raises(ConfigError, match="session has only"):
            flow("""
                name: bad
                outputs: {x: "${session.nope}"}
                tasks:
                  - {id: a, type: mfo.chat, config: {session: k, message: hi}}
            """)
        with pytest.raises(ConfigError, match="session or thread_id"):
            flow("""
                name: bad
                tasks:
                  - {id: a, type: mfo.chat, config: {session: k, thread_id: t, message: hi}}
            """)


class TestStreaming:
    async def test_stream_records_first_token_time_and_chunk_count(self, tmp_path: Path) -> None:
        f = flow("""
            name: streamed
            tasks:
              - {id: talk, type: mfo.chat, config: {message: "one two three", stream: true,
                                                    session: user-s}}
        """)
        async with harness(tmp_path) as h:
            outcome, tasks = await h.run(f)
            assert outcome.status == "done", outcome.error
            out = tasks["talk"].output
            assert out is not None
            assert out["content"] == "You said: one two three"
            assert out["chunks"] == 5 and out["first_token_seconds"] is not None
            assert 0 <= out["first_token_seconds"] <= out["stream_seconds"]
            assert out["thread_id"] == out["thread_id"] and out["turns"] == 1
            assert out["usage"]["completion_tokens"] == 5
            assert h.srv.app.stats.streams_completed == 1

    @pytest.mark.parametrize("how", ["cancel", "timeout"])
    async def test_cancelling_mid_stream_closes_the_http_stream(
            self, tmp_path: Path, how: str) -> None:
        """The run is cancelled (or the task times out) mid-answer: the server sees the
        client go away."""
        timeout = "timeout: 300ms" if how == "timeout" else ""
        f = flow(f"""
            name: long
            tasks:
              - id: talk
                type: mfo.chat
                {timeout}
                config: {{message: "{' '.join(['word'] * 200)}", stream: true}}
        """)
        app = MockMFOServer(MockOptions(require_auth=False, stream_delay=0.05))
        async with harness(tmp_path, app) as h:
            stats = h.srv.app.stats
            if how == "cancel":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(h.run, f)
                    await poll(lambda: stats.streams_started == 1)
                    tg.cancel_scope.cancel()
            else:
                outcome, tasks = await h.run(f)
                assert outcome.status == "error"
                assert "timed out after 0.3s" in (tasks["talk"].error or "")
            await poll(lambda: stats.streams_disconnected == 1)
            assert stats.streams_completed == 0


class TestJobs:
    async def test_waits_for_a_job_and_uses_its_result_or_fails_with_its_error(
            self, tmp_path: Path) -> None:
        now = [T0]
        app = MockMFOServer(MockOptions(require_auth=False, job_duration=2.0),
                            clock=lambda: now[0])
        f = flow("""
            name: report
            outputs: {kind: "${use.kind}"}
            tasks:
              - id: job
                type: mfo.job.create
                config: {type: "${input.type?}", params: {n: 1}, wait: true,
                         poll_interval: 5ms}
              - {id: use, type: set, dependencies: [job],
                 config: {values: {kind: "${job.result.type}"}}}
        """)

        async def server_time_passes(done: anyio.Event) -> None:
            while not done.is_set():  # 0.1 s of server time per 2 ms: 2 s in ~40 ms
                await anyio.sleep(0.002)
                now[0] += 0.1

        async with harness(tmp_path, app) as h:
            for job_type, ok in (("report", True), ("fail", False)):
                done = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(server_time_passes, done)
                    run_id = new_id()
                    await h.store.create_runs([RunRequest(
                        run_id=run_id, flow=f.name, trigger="manual",
                        input={"type": job_type})], claim=True)
                    outcome = await h.executor.run(
                        f, run_id=run_id, input={"type": job_type},
                        recorder=StoreRecorder(h.store, run_id, f.name,
                                               instance=h.cfg.instance))
                    done.set()
                found = await h.store.get_run(run_id)
                assert found is not None
                record = {t.task_id: t for t in found[1]}["job"]
                assert record.output is not None
                states = [s["state"] for s in record.output["states"]]
                assert states == ["new", "active", "done" if ok else "error"]
                assert record.output["job_id"].startswith("job_")
                if ok:
                    assert outcome.status == "done", outcome.error
                    assert outcome.outputs == {"kind": "report"}
                else:
                    assert outcome.status == "error"
                    assert record.state == "error"
                    assert record.error is not None and "ended in error: the job failed" \
                        in record.error
                    assert record.output["error"] == "the job failed"

    async def test_wait_timeout_cancels_the_job(self, tmp_path: Path) -> None:
        app = MockMFOServer(MockOptions(require_auth=False, job_duration=3600))
        f = flow("""
            name: slow
            tasks:
              - {id: job, type: mfo.job.create,
                 config: {type: x, wait: true, poll_interval: 10ms, timeout: 50ms}}
        """)
        async with harness(tmp_path, app) as h:
            outcome, tasks = await h.run(f)
            assert outcome.status == "error"
            assert "did not finish within 0.05s (still new)" in (tasks["job"].error or "")
            assert tasks["job"].output is not None and tasks["job"].output["cancelled"] is True
            assert h.srv.app.stats.jobs_cancelled == 1


class TestOtherSlopTasks:
    async def test_cancel_resource_create_and_pay(self, tmp_path: Path) -> None:
        app = MockMFOServer(MockOptions(require_auth=False, job_duration=3600))
        f = flow("""
            name: misc
            tasks:
              - {id: job, type: mfo.job.create, config: {type: x}}
              - {id: stop, type: mfo.job.cancel, dependencies: [job],
                 config: {job_id: "${job.job_id}"}}
              - {id: doc, type: mfo.resource.create,
                 config: {title: Minutes, content: "${run.id}", metadata: {k: v}}}
              - {id: pay, type: mfo.pay, retry: {max_attempts: 2, initial_backoff: 1ms},
                 config: {amount: 2.5, currency: EUR, description: credits}}
        """)
        async with harness(tmp_path, app) as h:
            outcome, tasks = await h.run(f)
            assert outcome.status == "done", outcome.error
            assert tasks["job"].output == {"job_id": tasks["stop"].output["job_id"],  # type: ignore[index]
                                           "status": "new"}
            assert tasks["stop"].output is not None
            assert (tasks["stop"].output["status"], tasks["stop"].output["error"]) == \
                ("error", "cancelled")
            doc = tasks["doc"].output
            assert doc is not None and doc["title"] == "Minutes" and doc["metadata"] == {"k": "v"}
            assert (await h.client.resources.get(doc["id"])).content == outcome.run_id
            assert tasks["pay"].output is not None
            assert tasks["pay"].output["status"] == "success"
            assert h.srv.app.stats.payments == 1

    async def test_session_without_a_keeper_fails_clearly(self) -> None:
        f = flow("""
            name: nokeeper
            tasks:
              - {id: a, type: mfo.chat, config: {session: k, message: hi}}
        """)

        class Client:
            pass

        outcome = await FlowExecutor(client=Client()).run(f)
        assert outcome.status == "error" and "chat sessions need a store" in (outcome.error or "")

