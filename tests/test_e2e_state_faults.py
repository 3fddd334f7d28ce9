"""A daemon whose state goes wrong under it: the state dir removed, the disk refusing
writes, logins failing. It must stop accepting what it cannot keep, say so on ``/readyz``
and in its log, keep its gauges moving, and exit non-zero rather than run on a dir that is gone.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    DaemonProcess,
    free_port,
    running_daemon,
    start_daemon,
    wait_for,
    wait_http_ok,
    write_config,
)

pytestmark = pytest.mark.slow  # real daemon processes


def ports(config: Path) -> tuple[int, int]:
    cfg = json.loads(config.read_text())
    return int(cfg["webhook_listener"]["port"]), int(cfg["admin"]["port"])


def post(port: int, body: bytes = b'{"type":"t"}') -> int:
    reply = httpx.post(f"http://127.0.0.1:{port}/webhook", content=body,
                       headers={"content-type": "application/json"}, timeout=10)
    return reply.status_code


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def readyz(admin: int) -> tuple[int, dict[str, Any]]:
    reply = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)
    return reply.status_code, reply.json()


def metric(admin: int, name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_outbox_depth_moves_while_logins_fail(tmp_path: Path) -> None:
    """Item 12: the forwarder set ``mfo_outbox_depth`` only once a token was ready, so an
    alert on the backlog never fired while logins failed."""
    config = write_config(
        tmp_path,
        client={"base_url": f"http://127.0.0.1:{free_port()}"},  # nobody listens: logins fail
        auth={"mode": "login", "email": "a@b.c", "password": "a password of 16+ bytes"},
    )
    port, admin = ports(config)
    with running_daemon(config):
        wait_http_ok(f"http://127.0.0.1:{admin}/healthz")  # not /readyz: it sets the gauge too
        wait_for(lambda: _listening(port), what="the listener")  # it may start after admin
        for _ in range(3):
            assert post(port) == 202
        wait_for(lambda: metric(admin, "mfo_outbox_depth") == 3.0,
                 what="mfo_outbox_depth == 3 while logins fail")


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_unwritable_store_makes_readyz_fail(tmp_path: Path) -> None:
    """Item 5: with the disk refusing writes, webhooks got 503 but ``/readyz`` stayed 200
    with ``store.ok: true``. Readiness follows the last write's outcome."""
    config = write_config(tmp_path, forwarder={"enabled": False})
    port, admin = ports(config)
    # The file-size limit stands in for a full disk: writes past it fail with EFBIG.
    with running_daemon(config, preexec_fn=_limit_file_size(2 * 1024 * 1024)) as daemon:
        wait_http_ok(f"http://127.0.0.1:{admin}/readyz")
        body = b'{"type":"t","pad":"' + b"x" * 60_000 + b'"}'
        statuses = []
        for _ in range(200):
            statuses.append(post(port, body))
            if statuses[-1] == 503:
                # Right after the failed write: a probe write (every PROBE_INTERVAL without
                # traffic) may find room for one page later and make it ready again.
                code, state = readyz(admin)
                break
        assert statuses[0] == 202 and statuses[-1] == 503, statuses
        assert code == 503, state
        assert state["checks"]["store"]["ok"] is False
        assert state["checks"]["store"]["write_error"]
        assert daemon.find_event("store.batch_failed") is not None


def test_removed_state_dir_stops_accepting_and_exits(tmp_path: Path) -> None:
    """Item 4: ``rm -rf`` of the state dir under a running daemon: it answered 202 into
    unlinked files, ``/readyz`` stayed 200, and a second daemon could start on the dir.
    Now: 503 at once, not ready, a clear error, and when a second daemon takes the dir
    over, the first exits non-zero."""
    config = write_config(tmp_path, forwarder={"enabled": False})
    state_dir = Path(json.loads(config.read_text())["state_dir"])
    port, admin = ports(config)
    with running_daemon(config) as first:
        wait_http_ok(f"http://127.0.0.1:{admin}/readyz")
        assert post(port) == 202
        shutil.rmtree(state_dir)
        assert post(port) == 503  # no 202 into a deleted file, not even before the check
        lost = first.wait_event("daemon.state_dir_lost")
        assert str(state_dir) in json.dumps(lost)
        code, state = readyz(admin)
        assert code == 503 and state["checks"]["state_dir"]["ok"] is False

        # The second daemon gets the dir (it is gone, so it is free) on other ports ...
        second_cfg = write_config(tmp_path / "second", state_dir=str(state_dir))
        second: DaemonProcess = start_daemon(second_cfg)
        try:
            second_admin = ports(second_cfg)[1]
            wait_http_ok(f"http://127.0.0.1:{second_admin}/readyz")
            # ... and the first, seeing its lock held by someone else, exits 1.
            assert first.wait_exit(deadline=30) == 1
            assert first.find_event("daemon.failed") or first.find_event("daemon.stopped")
        finally:
            second.terminate()
