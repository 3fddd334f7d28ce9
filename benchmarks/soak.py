"""Soak: steady signed webhook traffic through an upstream outage and its recovery.

Runs the real daemon (``python -m mfo_actors run``) with a GitHub-signed route and logins
against an upstream that is **down** (nobody listens on its port) for ``--down`` minutes,
then starts the reference MFO server (``python -m mfo_actors mock-server``) on that port.
Signed webhooks are sent at ``--rate`` per second for ``--minutes`` in all, from a paced
keep-alive client. Every ``--every`` seconds (10 by default) it prints: elapsed time, the
phase, webhooks accepted, the daemon's RSS and open fds, the store's size on disk (SQLite
file + WAL), the backlog (``mfo_outbox_depth``) and the events delivered and dead
(``mfo_events_forwarded_total``, ``mfo_events_dead_total``). At the end: the drain time
(from the upstream coming back until the backlog is empty, traffic still flowing), the
peak RSS over the baseline, and whether any event was dead-lettered (none may be: an
outage never uses up attempts) or lost (every accepted id must be at the server).

There is no peer here: the figures describe the daemon alone (memory and fds must stay flat
through the outage; the backlog must drain).

Usage::

    .venv/bin/python benchmarks/soak.py [--minutes 6] [--down 3] [--rate 200] [--every 10]

Writes ``benchmarks/results/soak.json``. Not a test: it is outside pytest's testpaths.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
SECRET = "soak-github-webhook-secret-0123456789"
EMAIL = "soak@example.com"
PASSWORD = "soak-password-0123456789"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def store_bytes(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.glob("store.sqlite3*"))


def metrics(client: httpx.Client, admin: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        text = client.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name.split("{", 1)[0]] = out.get(name.split("{", 1)[0], 0.0) + float(value)
    return out


class Sender(threading.Thread):
    """Signed POSTs at a steady rate on keep-alive connections; remembers accepted ids."""

    def __init__(self, port: int, rate: float, sources: int) -> None:
        super().__init__(daemon=True)
        self.port, self.rate, self.sources = port, rate, sources
        self.stop = threading.Event()
        self.accepted: list[str] = []
        self.refused = 0
        self.errors = 0

    def run(self) -> None:
        interval = 1.0 / self.rate
        start = time.monotonic()
        n = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as client:
            while not self.stop.is_set():
                target = start + n * interval
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                body = json.dumps({"type": "soak", "n": n, "pad": "x" * 600}).encode()
                digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                headers = {"content-type": "application/json", "x-github-event": "soak",
                           "x-hub-signature-256": f"sha256={digest}",
                           "x-github-delivery": f"d-{n}"}
                try:
                    reply = client.post(f"/hooks/s{n % self.sources}", content=body,
                                        headers=headers)
                except httpx.HTTPError:
                    self.errors += 1
                else:
                    if reply.status_code == 202:
                        self.accepted.append(reply.json()["id"])
                    else:
                        self.refused += 1
                n += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="traffic in all")
    parser.add_argument("--down", type=float, default=3.0, help="minutes the upstream is down")
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks per second")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    state_dir = tmp / "state"
    port, admin, upstream = free_port(), free_port(), free_port()
    routes = ",\n".join(
        f'    {{"path": "/hooks/s{i}", "source": "s{i}", '
        f'"verify": {{"scheme": "github", "secret": "{SECRET}"}}}}' for i in range(args.sources))
    config = tmp / "soak.yaml"
    config.write_text(f"""{{
  "instance": "soak", "state_dir": "{state_dir}", "shutdown_timeout": "10s",
  "client": {{"base_url": "http://127.0.0.1:{upstream}", "timeout": "5s",
             "retry": {{"max_attempts": 8, "initial_backoff": "1s", "max_backoff": "30s"}},
             "circuit_breaker": {{"failure_threshold": 5, "reset_timeout": "10s"}}}},
  "auth": {{"mode": "login", "email": "{EMAIL}", "password": "{PASSWORD}",
           "login_max_backoff": "5s"}},
  "webhook_listener": {{"host": "127.0.0.1", "port": {port}, "routes": [
{routes}]}},
  "admin": {{"host": "127.0.0.1", "port": {admin}}},
  "flows": {{"enabled": false}},
  "logging": {{"level": "warning", "format": "json"}}
}}
""")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemon_log = open(tmp / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "mfo_actors", "run", "--config",
                               str(config)], stderr=daemon_log, stdout=subprocess.DEVNULL,
                              env=env)
    mock: subprocess.Popen[bytes] | None = None
    samples: list[dict[str, Any]] = []
    client = httpx.Client()
    try:
        for _ in range(200):
            try:
                if client.get(f"http://127.0.0.1:{admin}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        sender = Sender(port, args.rate, args.sources)
        start = time.monotonic()
        base_rss = rss(daemon.pid)
        sender.start()
        up_at: float | None = None
        drained_at: float | None = None
        end = start + args.minutes * 60
        next_sample = start
        print(f"{'t':>6} {'phase':6} {'accepted':>9} {'RSS MB':>7} {'fds':>4} {'store MB':>8} "
              f"{'backlog':>8} {'delivered':>9} {'dead':>5}")
        while True:
            now = time.monotonic()
            if up_at is None and now - start >= args.down * 60:
                mock = subprocess.Popen(
                    [sys.executable, "-m", "mfo_actors", "mock-server", "--port", str(upstream),
                     "--email", EMAIL, "--password", PASSWORD, "--log-level", "warning"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                up_at = now
            if now >= end and not sender.stop.is_set():
                sender.stop.set()
            m = metrics(client, admin)
            backlog = m.get("mfo_outbox_depth", 0.0)
            if up_at is not None and drained_at is None and backlog <= args.rate:
                drained_at = now  # within one second's worth of traffic
            if now >= next_sample:
                sample = {
                    "t": round(now - start, 1), "phase": "down" if up_at is None else "up",
                    "accepted": len(sender.accepted), "rss": rss(daemon.pid),
                    "fds": fds(daemon.pid), "store_bytes": store_bytes(state_dir),
                    "backlog": backlog, "delivered": m.get("mfo_events_forwarded_total", 0.0),
                    "dead": m.get("mfo_events_dead_total", 0.0)}
                samples.append(sample)
                print(f"{sample['t']:6.0f} {sample['phase']:6} {sample['accepted']:9,d} "
                      f"{sample['rss'] / MB:7.1f} {sample['fds']:4d} "
                      f"{sample['store_bytes'] / MB:8.1f} {backlog:8,.0f} "
                      f"{sample['delivered']:9,.0f} {sample['dead']:5,.0f}", flush=True)
                next_sample += args.every
            if sender.stop.is_set() and backlog == 0 and up_at is not None:
                break
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}); see {tmp}")
            time.sleep(0.5)
        sender.join()
        final = metrics(client, admin)
        at_server: set[str] = set()
        if mock is not None:
            events = client.get(f"http://127.0.0.1:{upstream}/_mock/events", timeout=120).json()
            at_server = {e["id"] for e in events["events"]}
        lost = len(set(sender.accepted) - at_server)
        peak = max(s["rss"] for s in samples)
        result = {
            "when": datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.python_version()}, {os.cpu_count()} vCPU "
                       f"{platform.machine()}",
            "settings": vars(args),
            "accepted": len(sender.accepted), "refused": sender.refused,
            "errors": sender.errors, "lost": lost,
            "dead": final.get("mfo_events_dead_total", 0.0),
            "rss_baseline_mb": round(base_rss / MB, 1), "rss_peak_mb": round(peak / MB, 1),
            "fds_min": min(s["fds"] for s in samples), "fds_max": max(s["fds"] for s in samples),
            "store_peak_mb": round(max(s["store_bytes"] for s in samples) / MB, 1),
            "backlog_peak": max(s["backlog"] for s in samples),
            "drain_s": round(drained_at - up_at, 1) if drained_at and up_at else None,
            "samples": samples,
        }
        print(f"\naccepted {result['accepted']:,d} (refused {sender.refused}, errors "
              f"{sender.errors}); lost {lost}; dead {result['dead']:.0f}; RSS "
              f"{result['rss_baseline_mb']} -> peak {result['rss_peak_mb']} MB; fds "
              f"{result['fds_min']}-{result['fds_max']}; store peak {result['store_peak_mb']} MB; "
              f"backlog peak {result['backlog_peak']:,.0f}; drain {result['drain_s']} s")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if lost == 0 and not result["dead"] else 1
    finally:
        client.close()
        for proc in (daemon, mock):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        daemon_log.close()


if __name__ == "__main__":
    sys.exit(main())
