"""Reload of a real daemon process: SIGHUP and ``mfo-actors reload`` under signed traffic.

The acceptance checks of issue 12: 20 reloads under steady signed traffic with a secret
rotated among them (every request 202 on one keep-alive connection, nothing lost, the old
secret refused once its grace period is over), and a broken flow file that leaves the running
flows in place with one log line naming the file and line.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from mfo_actors.config import load_config
from mfo_actors.store import open_store
from tests.helpers import free_port, running_daemon, wait_for, write_config
from tests.test_daemon import notify_socket, receive_until

pytestmark = pytest.mark.slow

__all__ = ["notify_socket"]  # the fixture, imported for this module's tests

ROUTE = "/hooks/gh"
GRACE = 4.0  # seconds the old secret keeps verifying after the rotation


def gh_headers(body: bytes, secret: str) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}",
            "x-github-event": "push"}


def reload_config(tmp_path: Path, port: int, *, secret: str, extra: int = 0,
                  admin_port: int, **sections: Any) -> Path:
    routes: list[dict[str, Any]] = [
        {"path": ROUTE, "source": "gh",
         "verify": {"scheme": "github", "secret": secret, "rotation_grace": f"{GRACE}s"}},
        {"path": "/hooks/open", "source": "open"},
    ]
    routes += [{"path": f"/hooks/extra{i}", "source": f"extra{i}"} for i in range(extra)]
    path = write_config(
        tmp_path, name="rl",
        webhook_listener={"host": "127.0.0.1", "port": port, "routes": routes},
        admin={"host": "127.0.0.1", "port": admin_port},
        client={"base_url": "http://127.0.0.1:9"}, forwarder={"enabled": False}, **sections)
    return path


class SignedTraffic(threading.Thread):
    """Signed POSTs back to back on one keep-alive connection; records every answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.secret = "old-secret"
        self.generation = 0  # reloads known to be done when a request is sent
        # (secret, status, event id, reloads done before the request was sent)
        self.answers: list[tuple[str, int, str | None, int]] = []
        self.sockets: set[int] = set()
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = 0
        try:
            while not self.stop.is_set():
                body = json.dumps({"n": n}).encode()
                secret, generation = self.secret, self.generation
                try:
                    conn.request("POST", ROUTE, body, gh_headers(body, secret))
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(repr(exc))
                    conn.close()
                    continue
                assert conn.sock is not None
                self.sockets.add(id(conn.sock))
                event_id = json.loads(data).get("id") if resp.status == 202 else None
                self.answers.append((secret, resp.status, event_id, generation))
                n += 1
        finally:
            conn.close()

    def wait_more(self, count: int) -> None:
        target = len(self.answers) + count
        wait_for(lambda: len(self.answers) >= target, what=f"{count} more answers")


def old_after_rotation(traffic: SignedTraffic) -> list[int]:
    """The statuses of old-secret requests sent after reload 6, which rotated the secret."""
    return [status for secret, status, _, generation in list(traffic.answers)
            if secret == "old-secret" and generation >= 6]


def status_of(port: int, secret: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = b'{"probe": true}'
        conn.request("POST", ROUTE, body, gh_headers(body, secret))
        return conn.getresponse().status
    finally:
        conn.close()


def stored_ids(config: Path) -> set[str]:
    async def main() -> set[str]:
        async with open_store(load_config(config)) as store:
            return {s.event.id for s in await store.list_events(limit=1_000_000)}

    return anyio.run(main)


def test_twenty_reloads_under_signed_traffic_rotate_the_secret_and_lose_nothing(
    tmp_path: Path,
) -> None:
    port, admin_port = free_port(), free_port()
    config = reload_config(tmp_path, port, secret="old-secret", admin_port=admin_port)
    with running_daemon(config) as daemon:
        daemon.wait_event("daemon.ready")
        traffic = SignedTraffic(port)
        traffic.start()
        traffic.wait_more(20)
        rotated_at = 0.0
        for i in range(1, 21):
            secret = "old-secret" if i < 6 else "new-secret"
            reload_config(tmp_path, port, secret=secret, extra=i % 3, admin_port=admin_port,
                          logging={"level": "info" if i % 2 else "debug", "format": "json"})
            daemon.signal(signal.SIGHUP)
            wait_for(lambda i=i: sum(e.get("event") == "daemon.reload_done" and e["ok"]
                                     for e in daemon.events()) >= i, what=f"reload {i}")
            traffic.generation = i
            if i == 6:
                rotated_at = time.monotonic()
                # The provider goes on signing with the old secret after the rotation.
                wait_for(lambda: len(old_after_rotation(traffic)) >= 5,
                         what="old-secret requests sent after the rotation")
            if i == 11 or (rotated_at and time.monotonic() - rotated_at > GRACE / 4):
                traffic.secret = "new-secret"  # the provider switches during the grace period
            traffic.wait_more(5)
        traffic.wait_more(20)
        traffic.stop.set()
        traffic.join(timeout=10)
        assert traffic.errors == []
        # Sent once reload 6 (the rotation) had returned, signed with the old secret: the
        # grace period let them in.
        old_after = old_after_rotation(traffic)
        assert len(old_after) >= 5 and set(old_after) == {202}, old_after
        assert {status for _, status, _, _ in traffic.answers} == {202}
        assert len(traffic.sockets) == 1, "the keep-alive connection was dropped"
        assert sum(1 for s, _, _, _ in traffic.answers if s == "new-secret") >= 20

        wait_for(lambda: status_of(port, "old-secret") == 401, deadline=GRACE + 10,
                 what="the old secret refused after the grace period")
        assert status_of(port, "new-secret") == 202
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    accepted = {event_id for _, _, event_id, _ in traffic.answers}
    assert len(accepted) == len(traffic.answers) > 100
    assert accepted <= stored_ids(config)
    print(f"\n{len(traffic.answers)} signed requests, 20 reloads, all 202 and stored")


FLOW = """name: Greet
triggers:
  - event: {source: open, type: "*"}
tasks:
  - id: hello
    type: log
    config: {message: "hello ${event.payload.n}"}
"""

BROKEN = """name: Broken
triggers:
  - event: {source: open}
tasks:
  - id: oops
    type: no.such.task
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mfo_actors", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def post_open(port: int, n: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/hooks/open", json.dumps({"n": n}),
                     {"content-type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def finished_runs(daemon: Any, flow: str) -> int:
    return sum(1 for e in daemon.events()
               if e.get("event") == "scheduler.run_finished" and e.get("flow") == flow)


def test_a_broken_flow_keeps_the_running_flows_and_names_file_and_line(
    tmp_path: Path, notify_socket: tuple[socket.socket, str],
) -> None:
    sock, notify_path = notify_socket
    port, admin_port = free_port(), free_port()
    config = reload_config(tmp_path, port, secret="s", admin_port=admin_port)
    flows = tmp_path / "flows"
    (flows / "greet.yaml").write_text(FLOW)
    with running_daemon(config, env={"NOTIFY_SOCKET": notify_path}) as daemon:
        receive_until(sock, "READY=1")
        assert post_open(port, 1) == 202
        wait_for(lambda: finished_runs(daemon, "Greet") == 1, what="the first run")

        (flows / "broken.yaml").write_text(BROKEN)
        # The CLI validates first: exit 1 naming the file and line, the daemon left alone.
        result = run_cli("reload", "--config", str(config))
        assert result.returncode == 1
        assert f"{flows / 'broken.yaml'}:6" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_event("daemon.reload_failed")
        assert failed["error"].startswith(f"{flows / 'broken.yaml'}:6: ")
        reloading = receive_until(sock, "READY=1")
        fields = dict(line.split("=", 1) for msg in reloading for line in msg.splitlines())
        assert fields["RELOADING"] == "1"
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(fields["MONOTONIC_USEC"]) < 60_000_000
        assert "reload failed" in fields["STATUS"]

        assert post_open(port, 2) == 202  # the running flow still runs
        wait_for(lambda: finished_runs(daemon, "Greet") == 2, what="a run after the failure")
        assert sum(e.get("event") == "daemon.reload_failed" for e in daemon.events()) == 1
        assert sum(e.get("event") == "daemon.reload_requested" for e in daemon.events()) == 1

        (flows / "broken.yaml").unlink()
        (flows / "second.yaml").write_text(FLOW.replace("Greet", "Second"))
        result = run_cli("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"reloaded rl (pid {daemon.pid})")
        assert post_open(port, 3) == 202
        wait_for(lambda: finished_runs(daemon, "Second") == 1, what="the new flow's run")
        assert finished_runs(daemon, "Greet") == 3

        # The daemon reloads the file it runs: another file on the same state dir is refused
        # (it would be validated, reported as reloaded, and ignored).
        copy = tmp_path / "rl-copy.yaml"
        copy.write_text(config.read_text())
        result = run_cli("reload", "--config", str(copy))
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"mfo-actors: the daemon on state_dir {tmp_path / 'state'} (pid {daemon.pid}) "
            f"runs {config}, not {copy}: reload {config}")

        # A flows dir gone away (a typo, a deploy half done) does not remove every flow ...
        flows.rename(tmp_path / "flows-away")
        daemon.signal(signal.SIGHUP)
        failed = wait_for(lambda: [e for e in daemon.events()
                                   if e.get("event") == "daemon.reload_failed"][1:],
                          what="the refused reload")
        assert "would remove every flow (Greet, Second)" in failed[0]["error"]
        assert post_open(port, 4) == 202
        wait_for(lambda: finished_runs(daemon, "Greet") == 4, what="the flows still running")
        # ... an empty one does, and says so.
        (tmp_path / "flows-away").rename(flows)
        for flow in flows.iterdir():
            flow.unlink()
        result = run_cli("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert "flows added: none; removed: Greet, Second" in result.stdout
        assert "every flow was removed" in result.stdout

        # A key that needs a restart is reported, and the rest still applies.
        reload_config(tmp_path, port, secret="s", admin_port=admin_port,
                      store={"max_pending": 5})
        result = run_cli("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "needs a restart to take effect: store.max_pending"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0


def test_reload_cli_without_a_running_daemon_is_a_user_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli("reload", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("mfo-actors: no mfo-actors daemon is running on state_dir")


def test_sighup_before_ready_waits_instead_of_killing(tmp_path: Path) -> None:
    """systemd may send SIGHUP at any time: the handler is in place before any actor starts."""
    config = write_config(tmp_path)
    with running_daemon(config) as daemon:
        daemon.wait_event("daemon.started")
        os.kill(daemon.pid, signal.SIGHUP)
        daemon.wait_event("daemon.reload_done")
        assert daemon.proc.poll() is None
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
