"""The front door of a real daemon process: signatures, status codes, dedupe, slowloris, 503.

One daemon (``python -m mfo_actors run``) serves every test of the module; requests go over
real sockets. The upstream is a closed port: nothing is forwarded, which is what these tests
want (events stay in the store where the CLI can see them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.helpers import DaemonProcess, free_port, running_daemon, wait_http_ok, write_config

SW_SECRET = "whsec_" + base64.b64encode(b"e2e standard webhooks secret 32b").decode()
GH_SECRET = "gh-e2e-secret-value"
HMAC_SECRET = "hmac-e2e-secret-value"
BODY = b'{"type": "invoice.paid", "data": {"id": "in_1"}}'


class Instance:
    def __init__(self, config: Path, daemon: DaemonProcess) -> None:
        cfg = json.loads(config.read_text())
        self.config = config
        self.daemon = daemon
        self.port = int(cfg["webhook_listener"]["port"])
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def stored_ids(self) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "mfo_actors", "events", "list", "--config", str(self.config),
             "--json", "--limit", "100000"],
            capture_output=True, text=True, timeout=60, check=True)
        return {row["id"] for row in json.loads(out.stdout)}


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    tmp = tmp_path_factory.mktemp("front-door")
    config = write_config(
        tmp,
        webhook_listener={
            "host": "127.0.0.1", "port": free_port(), "max_body_size": "4KiB",
            "header_timeout": "1s", "body_timeout": "2s",
            "routes": [
                {"path": "/hooks/sw", "source": "billing",
                 "verify": {"scheme": "standard-webhooks", "secret": SW_SECRET}},
                {"path": "/hooks/github", "source": "github",
                 "verify": {"scheme": "github", "secret": GH_SECRET}},
                {"path": "/hooks/hmac", "source": "shop",
                 "verify": {"scheme": "hmac-sha256", "secret": HMAC_SECRET,
                            "header": "X-Shop-Signature", "encoding": "base64"}},
                {"path": "/hooks/plain", "source": "plain"},
                {"path": "/hooks/raw", "source": "raw", "body": "raw"},
            ],
        },
        forwarder={"enabled": False},
    )
    with running_daemon(config) as daemon:
        cfg = json.loads(config.read_text())
        wait_http_ok(f"http://127.0.0.1:{cfg['admin']['port']}/readyz")
        inst = Instance(config, daemon)
        try:
            yield inst
        finally:
            inst.http.close()


def sw_headers(secret: str, body: bytes, *, ts: float, msg_id: str) -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(ts)),
            "webhook-signature": signature, "content-type": "application/json"}


def gh_headers(secret: str, body: bytes, delivery: str) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"x-hub-signature-256": f"sha256={digest}", "x-github-event": "push",
            "x-github-delivery": delivery, "content-type": "application/json"}


def hmac_headers(secret: str, body: bytes) -> dict[str, str]:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
    return {"x-shop-signature": digest.decode(), "content-type": "application/json"}


class TestSignatures:
    """Each scheme: a third-party or reference signature passes; tampering does not."""

    def test_standard_webhooks(self, instance: Instance) -> None:
        now = time.time()
        ok = instance.http.post("/hooks/sw", content=BODY,
                                headers=sw_headers(SW_SECRET, BODY, ts=now, msg_id="m-ok"))
        assert ok.status_code == 202
        other = "whsec_" + base64.b64encode(b"not the configured secret, 32 b").decode()
        refused = [
            instance.http.post("/hooks/sw", content=BODY.replace(b"in_1", b"in_2"),
                               headers=sw_headers(SW_SECRET, BODY, ts=now, msg_id="m-t")),
            instance.http.post("/hooks/sw", content=BODY,
                               headers=sw_headers(other, BODY, ts=now, msg_id="m-w")),
            instance.http.post("/hooks/sw", content=BODY,
                               headers=sw_headers(SW_SECRET, BODY, ts=now - 600, msg_id="m-s")),
        ]
        assert [r.status_code for r in refused] == [401, 401, 401]
        assert all("error" in r.json() for r in refused)
        stored = instance.stored_ids()
        assert ok.json()["id"] in stored

    def test_github(self, instance: Instance) -> None:
        ok = instance.http.post("/hooks/github", content=BODY,
                                headers=gh_headers(GH_SECRET, BODY, "d-ok"))
        assert ok.status_code == 202
        tampered = instance.http.post("/hooks/github", content=BODY + b" ",
                                      headers=gh_headers(GH_SECRET, BODY, "d-t"))
        wrong = instance.http.post("/hooks/github", content=BODY,
                                   headers=gh_headers("other", BODY, "d-w"))
        assert (tampered.status_code, wrong.status_code) == (401, 401)

    def test_hmac_sha256(self, instance: Instance) -> None:
        ok = instance.http.post("/hooks/hmac", content=BODY,
                                headers=hmac_headers(HMAC_SECRET, BODY))
        assert ok.status_code == 202
        wrong = instance.http.post("/hooks/hmac", content=BODY, headers=hmac_headers("x", BODY))
        missing = instance.http.post("/hooks/hmac", content=BODY,
                                     headers={"content-type": "application/json"})
        assert (wrong.status_code, missing.status_code) == (401, 401)

    def test_refused_bodies_are_not_stored(self, instance: Instance) -> None:
        before = instance.stored_ids()
        instance.http.post("/hooks/github", content=b'{"evil": 1}',
                           headers=gh_headers("other", b'{"evil": 1}', "d-evil"))
        assert instance.stored_ids() == before


def test_provider_retry_is_answered_with_the_first_id(instance: Instance) -> None:
    """A redelivery with the same delivery id: 200, the first id, duplicate, nothing stored."""
    first = instance.http.post("/hooks/github", content=BODY,
                               headers=gh_headers(GH_SECRET, BODY, "d-dupe"))
    again = instance.http.post("/hooks/github", content=BODY,
                               headers=gh_headers(GH_SECRET, BODY, "d-dupe"))
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "duplicate": True}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", "/hooks/plain", b'{"broken": ', {"content-type": "application/json"}, 400),
        ("POST", "/nowhere", b"{}", {"content-type": "application/json"}, 404),
        ("GET", "/hooks/plain", b"", {}, 405),
        ("POST", "/hooks/plain", b'{"a": "' + b"x" * 5000 + b'"}',
         {"content-type": "application/json"}, 413),
        ("POST", "/hooks/plain", b"a=1", {"content-type": "application/x-www-form-urlencoded"},
         415),
        ("POST", "/hooks/raw", b"a=1", {"content-type": "application/x-www-form-urlencoded"},
         202),
    ],
)
def test_status_codes(instance: Instance, method: str, path: str, body: bytes,
                      headers: dict[str, str], status: int) -> None:
    resp = instance.http.request(method, path, content=body, headers=headers)
    assert resp.status_code == status
    if status >= 400:
        assert "error" in resp.json()


def test_chunked_body_over_the_limit_is_413(instance: Instance) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"a": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    resp = instance.http.post("/hooks/plain", content=chunks(),
                              headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_slowloris_is_cut_off_while_others_are_served(instance: Instance) -> None:
    """A client that never finishes its head is closed by the header timeout (1 s here)."""
    with socket.create_connection(("127.0.0.1", instance.port)) as slow:
        slow.sendall(b"POST /hooks/plain HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        served = instance.http.post("/hooks/plain", json={"n": 1})
        assert served.status_code == 202
        slow.settimeout(10)
        data = b""
        while chunk := slow.recv(4096):  # returns b"" once the server closed the socket
            data += chunk
        waited = time.monotonic() - started
    assert waited < 5
    assert data == b"" or data.startswith(b"HTTP/1.1 408")


def test_full_store_answers_503_with_retry_after(tmp_path: Path) -> None:
    """Past store.max_pending the listener refuses with 503 + Retry-After, storing nothing."""
    config = write_config(
        tmp_path, store={"max_pending": 3}, forwarder={"enabled": False},
        webhook_listener={"host": "127.0.0.1", "port": free_port(), "path": "/webhook",
                          "retry_after": "7s"},
    )
    with running_daemon(config):
        cfg: dict[str, Any] = json.loads(config.read_text())
        wait_http_ok(f"http://127.0.0.1:{cfg['admin']['port']}/healthz")
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg['webhook_listener']['port']}") as c:
            codes = [c.post("/webhook", json={"n": n}).status_code for n in range(3)]
            full = c.post("/webhook", json={"n": 3})
        assert codes == [202, 202, 202]
        assert full.status_code == 503
        assert full.headers["retry-after"] == "7"
        readyz = httpx.get(f"http://127.0.0.1:{cfg['admin']['port']}/readyz")
        assert readyz.status_code == 503
        assert readyz.json()["checks"]["store"]["ok"] is False
