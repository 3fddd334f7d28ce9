"""Ordering keys end to end: a real daemon with ``forwarder.ordering: key``, real sockets and
the reference MFO server in its own process.

Events of 8 keys arrive interleaved (one client thread per key, each waiting for its 202
before the next, so its acceptance order is known); the upstream answers after 50 ms and
fails a fifth of the calls. Each key's events must reach it in acceptance order, and
different keys must overlap in flight (what ``ordering: source`` cannot do for one source).
"""

from __future__ import annotations

import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import running_daemon, wait_for, wait_http_ok
from tests.test_e2e_daemon import admin_url, instance_config, listener_url, mock_server

pytestmark = pytest.mark.slow

KEYS = 8
PER_KEY = 12
LATENCY = 0.05  # seconds the upstream takes per request


def post_key_in_order(base_url: str, key: int, accepted: dict[str, list[str]],
                      lock: threading.Lock) -> None:
    """Post one key's events one after the other, remembering the ids in 202 order."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for n in range(PER_KEY):
            body = {"type": "order.updated", "user": {"id": f"user-{key}"}, "n": n}
            resp = client.post("/hooks/orders", json=body)
            assert resp.status_code == 202, resp.text
            with lock:
                accepted[f"user-{key}"].append(resp.json()["id"])


def test_each_key_arrives_in_acceptance_order_with_keys_in_parallel(tmp_path: Path) -> None:
    with mock_server("--no-auth", "--latency", str(LATENCY)) as upstream:
        config = instance_config(
            tmp_path, upstream,
            webhook_listener={"routes": [{"path": "/hooks/orders", "source": "orders",
                                          "ordering_key": "json:/user/id"}]},
            forwarder={"ordering": "key", "concurrency": 8},
            client={"base_url": upstream.base_url,
                    "retry": {"max_attempts": 50, "initial_backoff": "20ms",
                              "max_backoff": "200ms"},
                    "circuit_breaker": {"failure_threshold": 1000, "reset_timeout": "1s"}})
        with running_daemon(config):
            wait_http_ok(f"{admin_url(config)}/readyz")
            upstream.faults(fail_rate=0.2)
            accepted: dict[str, list[str]] = {f"user-{k}": [] for k in range(KEYS)}
            lock = threading.Lock()
            with ThreadPoolExecutor(KEYS) as pool:
                list(pool.map(lambda k: post_key_in_order(listener_url(config), k, accepted,
                                                          lock), range(KEYS)))
            wanted = {i for ids in accepted.values() for i in ids}
            assert len(wanted) == KEYS * PER_KEY

            def arrived() -> list[dict[str, object]] | None:
                events = httpx.get(f"{upstream.base_url}/_mock/events").json()["events"]
                return events if wanted <= {e["id"] for e in events} else None

            events = wait_for(arrived, deadline=120, what="every event upstream")
            failures = upstream.stats()["requests_by_status"].get("503", 0)
        for key, ids in accepted.items():
            got = [e["id"] for e in events if e["body"]["payload"]["user"]["id"] == key]
            assert got == ids, key
        # Sent one at a time, two arrivals are at least LATENCY apart; keys in parallel
        # arrive closer together.
        times = sorted(float(e["received_at"]) for e in events)  # type: ignore[arg-type]
        close = sum(1 for a, b in itertools.pairwise(times) if b - a < LATENCY / 2)
        assert close >= KEYS, json.dumps(times[:20])
        assert failures > 0  # retries happened on the way
