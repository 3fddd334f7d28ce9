"""Conversations end to end: a real daemon and the reference server as processes, webhooks
over HTTP. Chat sessions keep one thread per user across events (a new one after the TTL,
one for two simultaneous events of a new user); a flow waits for a 2 s job and uses its
result; the ``sessions`` and ``chat`` commands read and continue the same sessions."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from mfo_actors.cli import main
from tests.helpers import running_daemon, wait_for
from tests.test_e2e_daemon import MockServer, instance_config, listener_url, mock_server

pytestmark = pytest.mark.slow

SUPPORT_FLOW = """
name: support
triggers: [{event: {source: s0}}]
outputs: {thread: "${session.thread_id}", turns: "${session.turns}"}
tasks:
  - id: reply
    type: mfo.chat
    config: {session: "${event.payload.user}", message: "${event.payload.text}"}
"""

REPORT_FLOW = """
name: report
triggers: [{event: {source: s1}}]
outputs: {kind: "${use.kind}"}
tasks:
  - id: job
    type: mfo.job.create
    config: {type: "${event.payload.job}", wait: true, poll_interval: 200ms, timeout: 30s}
  - {id: use, type: set, dependencies: [job], config: {values: {kind: "${job.result.type}"}}}
"""


def user_threads(upstream: MockServer) -> dict[str, int]:
    """thread id -> user messages, at the server."""
    threads = httpx.get(f"{upstream.base_url}/_mock/threads", timeout=5).json()["threads"]
    return {tid: t["user_messages"] for tid, t in threads.items()}


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_sessions_jobs_and_cli_against_a_real_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mock_server("--no-auth", "--job-duration", "2") as upstream:
        config = instance_config(
            tmp_path, upstream,
            sessions={"ttl": "1500ms", "cleanup_interval": "100ms"},
            flows={"dir": str(tmp_path / "flows"), "concurrency": 4})
        (tmp_path / "flows").mkdir(exist_ok=True)
        (tmp_path / "flows" / "support.yaml").write_text(SUPPORT_FLOW)
        (tmp_path / "flows" / "report.yaml").write_text(REPORT_FLOW)
        cfg = str(config)
        with running_daemon(config) as daemon, \
                httpx.Client(base_url=listener_url(config), timeout=10) as http:
            daemon.wait_event("daemon.ready")

            def send(source: str, **payload: Any) -> None:
                assert http.post(f"/hooks/{source}", json=payload).status_code == 202

            send("s1", job="summary")
            for user, text in [("A", "a1"), ("B", "b1"), ("A", "a2"), ("B", "b2"), ("A", "a3")]:
                send("s0", user=user, text=text)
            first = wait_for(lambda: (t := user_threads(upstream)) and
                             sorted(t.values()) == [2, 3] and t, what="A and B threads")
            thread_a = next(tid for tid, n in first.items() if n == 3)

            # A's session expires (ttl 1.5 s, closed by the cleanup); A's next message
            # starts a new thread.
            wait_for(lambda: cli_json(capsys, "sessions", "show", "A", "--config", cfg,
                                      "--json")["status"] == "closed", what="A expired")
            send("s0", user="A", text="a4")
            wait_for(lambda: sorted(user_threads(upstream).values()) == [1, 2, 3],
                     what="a new thread for A")

            # Two simultaneous events of a new user: one thread.
            barrier = threading.Barrier(2)

            def at_once(text: str) -> None:
                barrier.wait()
                send("s0", user="C", text=text)

            senders = [threading.Thread(target=at_once, args=(t,)) for t in ("c1", "c2")]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            wait_for(lambda: sorted(user_threads(upstream).values()) == [1, 2, 2, 3],
                     what="C's two messages in one thread")

            sessions = cli_json(capsys, "sessions", "list", "--config", cfg, "--json")
            by_key = {(s["key"], s["status"]): s for s in sessions}
            assert by_key[("A", "closed")]["thread_id"] == thread_a
            assert by_key[("A", "closed")]["close_reason"] == "expired"
            assert by_key[("C", "active")]["turns"] == 2

            # The job flow: the job took 2 s at the server; the next task used its result.
            def report_run() -> dict[str, Any] | None:
                runs = cli_json(capsys, "runs", "list", "--config", cfg, "--flow", "report",
                                "--json")
                return runs[0] if runs and runs[0]["status"] == "done" else None

            run = wait_for(report_run, what="the report run")
            shown = cli_json(capsys, "runs", "show", run["id"], "--config", cfg, "--json")
            assert shown["outputs"] == {"kind": "summary"}
            job = next(t for t in shown["tasks"] if t["task"] == "job")
            states = [s["state"] for s in job["output"]["states"]]
            assert states == ["new", "active", "done"] and job["duration"] >= 1.9

            # The command line continues C's session in the same thread, streaming.
            capsys.readouterr()
            assert main(["chat", "--config", cfg, "--session", "C", "c3 from the cli"]) == 0
            out = capsys.readouterr()
            assert out.out == "You said: c3 from the cli\n"
            assert "session C: thread" in out.err and "turn 3" in out.err
            assert sorted(user_threads(upstream).values()) == [1, 2, 3, 3]
            assert main(["sessions", "close", "C", "--config", cfg]) == 0
            assert "closed session C" in capsys.readouterr().out
            assert main(["sessions", "close", "C", "--config", cfg]) == 1
            assert "no active session with key 'C'" in capsys.readouterr().err

            admin = json.loads(config.read_text())["admin"]["port"]
            metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
            # A and B (at least) expired while A waited; 8 chat messages went through the
            # daemon (the CLI's is another process).
            assert metric(metrics, 'mfo_sessions_closed_total{instance="test",'
                                   'reason="expired"}') >= 2
            assert metric(metrics, 'mfo_sessions_created_total{instance="test"}') == 4
            assert metric(metrics, 'mfo_upstream_requests_total{endpoint="/api/chat",'
                                   'instance="test",status="200"}') == 8


def metric(text: str, series: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])
