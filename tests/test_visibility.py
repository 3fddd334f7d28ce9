"""What a running daemon says about its work: a summary line at info, per-event lines at debug.

A real daemon process and the reference server in a subprocess; one webhook fails once
upstream and is then delivered.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers import running_daemon, wait_for, wait_http_ok
from tests.test_e2e_daemon import admin_url, instance_config, listener_url, mock_server


def test_summary_at_info_and_one_line_per_event_at_debug(tmp_path: Path) -> None:
    with mock_server("--no-auth") as upstream:
        config = instance_config(tmp_path, upstream, logging={
            "level": "debug", "format": "json", "summary_interval": "300ms"})
        with running_daemon(config) as daemon:
            wait_http_ok(f"{admin_url(config)}/readyz")
            upstream.faults(fail_next=1, fail_status=503)
            answer = httpx.post(f"{listener_url(config)}/hooks/s1", json={"type": "t.x"})
            assert answer.status_code == 202
            event_id = answer.json()["id"]

            def find(name: str) -> list[dict[str, object]]:
                return [e for e in daemon.events()
                        if e.get("event") == name and e.get("event_id", event_id) == event_id]

            [delivered] = wait_for(lambda: find("forwarder.delivered"), what="delivered line")
            assert delivered["level"] == "debug" and delivered["attempt"] == 2
            assert isinstance(delivered["latency_ms"], float)
            [accepted] = find("listener.accepted")
            assert (accepted["level"], accepted["source"], accepted["type"]) == (
                "debug", "s1", "t.x")
            [rescheduled] = find("forwarder.rescheduled")
            assert rescheduled["level"] == "debug" and rescheduled["attempt"] == 1
            assert rescheduled["status"] == 503 and "503" in str(rescheduled["reason"])

            def summary() -> dict[str, object] | None:
                lines = [e for e in daemon.events() if e.get("event") == "instance.summary"]
                totals = {k: sum(int(e[k]) for e in lines)  # type: ignore[call-overload]
                          for k in ("received", "delivered", "retried")}
                return lines[-1] if totals == {"received": 1, "delivered": 1,
                                               "retried": 1} else None

            last = wait_for(summary, what="summary lines adding up to the event's story")
            assert last["level"] == "info" and last["pending"] == 0
            assert "oldest_pending_s" in last
