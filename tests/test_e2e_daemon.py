"""The delivery promise, end to end: real daemon processes, the reference MFO server, sockets.

Each test starts ``python -m mfo_actors mock-server`` and ``python -m mfo_actors run`` as real
processes, sends webhooks over HTTP, and checks what the upstream received (its dedupe by
``Idempotency-Key`` counts each event id once) and what the store holds (through the CLI).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, running_daemon, wait_for, wait_http_ok, write_config

pytestmark = pytest.mark.slow


class MockServer:
    """The reference MFO server in a subprocess, with its control endpoints."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.base_url = f"http://127.0.0.1:{port}"
        self._http = httpx.Client(base_url=self.base_url, timeout=10)

    def stats(self) -> dict[str, Any]:
        return dict(self._http.get("/_mock/stats").json())

    def faults(self, **changes: Any) -> None:
        self._http.post("/_mock/faults", json=changes).raise_for_status()

    def received_ids(self) -> set[str]:
        events = self._http.get("/_mock/events").json()["events"]
        return {e["idempotency_key"] for e in events}

    def close(self) -> None:
        self._http.close()


@contextlib.contextmanager
def mock_server(*args: str) -> Iterator[MockServer]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mfo_actors", "mock-server", "--port", str(port),
         "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = MockServer(port, proc)
    try:
        wait_http_ok(f"{server.base_url}/_mock/stats")
        yield server
    finally:
        server.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def instance_config(tmp_path: Path, upstream: MockServer, **sections: Any) -> Path:
    base: dict[str, Any] = {
        "client": {
            "base_url": upstream.base_url,
            "retry": {"max_attempts": 50, "initial_backoff": "50ms", "max_backoff": "500ms"},
            "circuit_breaker": {"failure_threshold": 5, "reset_timeout": "2s"},
        },
        "webhook_listener": {
            "host": "127.0.0.1", "port": free_port(),
            "routes": [{"path": f"/hooks/s{i}", "source": f"s{i}"} for i in range(4)],
        },
        "forwarder": {"concurrency": 8, "lease": "10s", "poll_interval": "200ms"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return write_config(tmp_path, **base)


def listener_url(config: Path) -> str:
    cfg = json.loads(config.read_text())
    return f"http://127.0.0.1:{cfg['webhook_listener']['port']}"


def admin_url(config: Path) -> str:
    cfg = json.loads(config.read_text())
    return f"http://127.0.0.1:{cfg['admin']['port']}"


class Sender:
    """Posts webhooks from many threads until told to stop; remembers every id answered 202."""

    def __init__(self, base_url: str, *, routes: int = 4) -> None:
        self.base_url = base_url
        self.routes = routes
        self.accepted: list[str] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def post_one(self, client: httpx.Client, n: int) -> str | None:
        body = {"type": "test.event", "n": n, "pad": "x" * 200}
        try:
            resp = client.post(f"/hooks/s{n % self.routes}", json=body)
        except httpx.TransportError:
            with self._lock:
                self.refused += 1
            return None
        if resp.status_code != 202:
            with self._lock:
                self.refused += 1
            return None
        event_id = str(resp.json()["id"])
        with self._lock:
            self.accepted.append(event_id)
        return event_id

    def send(self, count: int, *, concurrency: int = 16) -> list[str]:
        """Post *count* webhooks over *concurrency* keep-alive connections."""

        def worker(start: int) -> None:
            with httpx.Client(base_url=self.base_url, timeout=10) as client:
                for n in range(start, count, concurrency):
                    if self._stop.is_set():
                        return
                    self.post_one(client, n)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
        return list(self.accepted)

    def stream(self, *, concurrency: int, stop: threading.Event, rate: float | None = None) -> None:
        """Post until *stop* is set (at most *rate* requests/s in all, when given)."""
        interval = concurrency / rate if rate else 0.0

        def worker(start: int) -> None:
            n = start
            next_at = time.monotonic()
            with httpx.Client(base_url=self.base_url, timeout=10) as client:
                while not stop.is_set():
                    self.post_one(client, n)
                    n += concurrency
                    if interval:
                        next_at += interval
                        stop.wait(max(0.0, next_at - time.monotonic()))

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, range(concurrency)))


@contextlib.contextmanager
def streaming(sender: Sender, *, concurrency: int, rate: float | None = None) -> Iterator[None]:
    """Post webhooks from *concurrency* threads for as long as the block runs."""
    stop = threading.Event()
    thread = threading.Thread(target=sender.stream, kwargs={
        "concurrency": concurrency, "stop": stop, "rate": rate})
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def cli_json(*args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "mfo_actors", *args, "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def wait_delivered(upstream: MockServer, ids: list[str], *, deadline: float) -> set[str]:
    wanted = set(ids)

    def all_arrived() -> set[str] | None:
        got = upstream.received_ids()
        return got if wanted <= got else None

    return set(wait_for(all_arrived, deadline=deadline, what=f"{len(wanted)} events upstream"))


def test_kill_9_mid_stream_loses_no_accepted_event(tmp_path: Path) -> None:
    """Every id answered 202 before a SIGKILL is stored, and delivered after the restart."""
    with mock_server("--no-auth") as upstream:
        config = instance_config(tmp_path, upstream)
        sender = Sender(listener_url(config))
        with running_daemon(config) as daemon:
            wait_http_ok(f"{admin_url(config)}/readyz")
            with streaming(sender, concurrency=16):
                wait_for(lambda: len(sender.accepted) >= 1500, deadline=60,
                         what="1500 accepted")
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait(10)
        accepted = list(sender.accepted)
        assert len(accepted) >= 1500

        stored = cli_json("events", "list", "--config", str(config), "--limit", "1000000")
        stored_ids = {row["id"] for row in stored}
        assert set(accepted) <= stored_ids
        with running_daemon(config):
            wait_http_ok(f"{admin_url(config)}/readyz")
            # Stored includes events committed just before the kill whose 202 never left.
            got = wait_delivered(upstream, sorted(stored_ids), deadline=120)
        assert set(accepted) <= got
        stats = upstream.stats()
        # Duplicates are possible only around the crash, and always under the same key.
        assert stats["unique_event_ids"] == len(stored_ids)


def test_sigterm_mid_stream_drains_and_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM while webhooks arrive: exit 0, every 202 is delivered after a restart."""
    with mock_server("--no-auth") as upstream:
        config = instance_config(tmp_path, upstream)
        sender = Sender(listener_url(config))
        with running_daemon(config) as daemon:
            wait_http_ok(f"{admin_url(config)}/readyz")
            with streaming(sender, concurrency=8):
                wait_for(lambda: len(sender.accepted) >= 500, deadline=60, what="500 accepted")
                daemon.proc.send_signal(signal.SIGTERM)
                assert daemon.proc.wait(30) == 0
        with running_daemon(config):
            got = wait_delivered(upstream, sender.accepted, deadline=120)
        assert set(sender.accepted) <= got


def test_outage_5000_events_arrive_once_without_hammering(tmp_path: Path) -> None:
    """5,000 events accepted during a 10 s outage all arrive once; the breaker holds back."""
    outage_s, reset_s, threshold = 10.0, 2.0, 5
    with mock_server("--no-auth") as upstream:
        config = instance_config(tmp_path, upstream)
        with running_daemon(config):
            wait_http_ok(f"{admin_url(config)}/readyz")
            upstream.faults(outage_for=outage_s)
            started = time.monotonic()
            accepted = Sender(listener_url(config)).send(5000, concurrency=16)
            assert len(accepted) == 5000
            # Count what reached the upstream while it was down.
            wait_for(lambda: time.monotonic() - started >= outage_s, deadline=outage_s + 5,
                     what="outage to end")
            during = upstream.stats()["requests_by_status"].get("503", 0)
            got = wait_delivered(upstream, accepted, deadline=180)
        stats = upstream.stats()
    assert set(accepted) <= got
    assert stats["unique_event_ids"] == 5000
    periods = math.ceil(outage_s / reset_s) + 1
    # failure_threshold calls open the breaker (the forwarder's slow start keeps no more in
    # flight while failures pile up), then one half-open probe per reset period.
    assert during <= threshold + periods, stats


def test_expiring_tokens_lose_nothing_and_login_once_per_expiry(tmp_path: Path) -> None:
    """Tokens living 2 s through a 20 s stream: no loss, logins about one per expiry."""
    lifetime, duration = 2.0, 20.0
    with mock_server("--token-lifetime", str(lifetime), "--email", "ops@example.com",
                     "--password", "pw-test-1234") as upstream:
        config = instance_config(
            tmp_path, upstream,
            auth={"mode": "login", "email": "ops@example.com", "password": "${env:MFO_TEST_PW}"},
        )
        sender = Sender(listener_url(config))
        with running_daemon(config, env={"MFO_TEST_PW": "pw-test-1234"}) as daemon:
            wait_http_ok(f"{admin_url(config)}/readyz")
            with streaming(sender, concurrency=4, rate=100.0):
                time.sleep(duration)  # the stream's length is the scenario, not a race guard
            got = wait_delivered(upstream, sender.accepted, deadline=60)
            output = "\n".join(daemon.output())
        stats = upstream.stats()
    assert set(sender.accepted) <= got
    expiries = duration / lifetime
    # Proactive refresh at 80% of the lifetime: ~12 logins in 20 s, never one per request.
    assert stats["logins"] <= expiries * 1.5 + 3, stats
    assert stats["logins"] >= expiries * 0.8, stats
    # A request with an expired token happens at most once per expiry.
    assert stats["expired_token_requests"] <= expiries, stats
    assert "pw-test-1234" not in output


def test_rejected_event_is_dead_lettered_then_replayed(tmp_path: Path) -> None:
    """A 400 dead-letters at once; `events replay` sends it again and it is delivered."""
    with mock_server("--no-auth") as upstream:
        config = instance_config(tmp_path, upstream)
        with running_daemon(config):
            wait_http_ok(f"{admin_url(config)}/readyz")
            upstream.faults(fail_status=400, fail_next=1)
            [event_id] = Sender(listener_url(config)).send(1, concurrency=1)

            def dead() -> list[Any] | None:
                rows = cli_json("events", "dead", "--config", str(config))
                return rows or None

            rows = wait_for(dead, deadline=30, what="dead event")
            assert [r["id"] for r in rows] == [event_id]
            assert event_id not in upstream.received_ids()
            subprocess.run([sys.executable, "-m", "mfo_actors", "events", "replay", event_id,
                            "--config", str(config)], check=True, timeout=60)
            wait_delivered(upstream, [event_id], deadline=30)
