"""The socket-level fuzzer: mutated requests and resets at random points against a real daemon.

Each request is a valid one mutated (``mutate.py``), sent on its own connection by one of
several threads, and ended in one of five ways: read the answer and close; reset after
sending part of it; reset right after sending it; reset after reading one byte of the
answer; reset before sending anything. The daemon runs from a real config with a real store
(the forwarder off). Checks: it is alive, its listener was never restarted, its RSS grew less
than :data:`RSS_BUDGET` over a warmed-up baseline, and its open fds come back to the
baseline once the connections are gone.

``python -m tests.fuzz --minutes 0 --socket-requests 20000`` runs it on the three backends.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.fuzz.mutate import random_request
from tests.helpers import (
    free_port,
    process_fds,
    process_rss,
    running_daemon,
    wait_for,
    wait_http_ok,
    write_config,
)

__all__ = ["BACKENDS", "RSS_BUDGET", "FuzzReport", "run_socket_fuzz"]

MB = 1024 * 1024
RSS_BUDGET = 50 * MB
WARMUP = 300  # requests before the baseline: allocator arenas and caches settle
BACKENDS: dict[str, dict[str, Any]] = {
    "uvloop": {"async_backend": "asyncio", "uvloop": True},
    "asyncio": {"async_backend": "asyncio", "uvloop": False},
    "trio": {"async_backend": "trio"},
}


@dataclass
class FuzzReport:
    backend: str
    requests: int
    answered: int
    resets: int
    seconds: float
    rss_before: int
    rss_peak: int
    rss_after: int
    fds_before: int
    fds_after: int
    alive: bool
    restarts: int

    @property
    def ok(self) -> bool:
        return (self.alive and self.restarts == 0
                and self.rss_peak - self.rss_before < RSS_BUDGET
                and self.fds_after <= self.fds_before)

    def line(self) -> str:
        return (f"{self.backend:8s} {self.requests:>7,d} requests in {self.seconds:5.1f}s "
                f"({self.answered:,d} answered, {self.resets:,d} reset) "
                f"RSS {self.rss_before / MB:.1f} -> peak {self.rss_peak / MB:.1f} -> "
                f"{self.rss_after / MB:.1f} MB, fds {self.fds_before} -> {self.fds_after}, "
                f"restarts {self.restarts}, {'ok' if self.ok else 'FAILED'}")


def _one(port: int, rng: random.Random) -> tuple[bool, bool]:
    """One fuzzed connection; returns (got an answer, ended with a reset)."""
    data = random_request(rng)
    mode = rng.randrange(5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(3)
    answered = False
    try:
        sock.connect(("127.0.0.1", port))
        if mode == 1:
            sock.sendall(data[:rng.randint(0, len(data))])
        elif mode in (0, 2, 3):
            sock.sendall(data)
        if mode == 0:
            sock.shutdown(socket.SHUT_WR)
            answered = bool(sock.recv(65536))
            while sock.recv(65536):
                pass
        elif mode == 3:  # an incomplete head gets no answer before header_timeout: no waiting
            sock.settimeout(0.05)
            answered = bool(sock.recv(1))
    except OSError:
        pass
    finally:
        if mode != 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return answered, mode != 0


def run_socket_fuzz(backend: str, *, requests: int, seed: int = 0, workers: int = 8
                    ) -> FuzzReport:
    """Fuzz a fresh daemon on *backend* with *requests* connections; see the module doc."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{backend}-") as tmp:
        config = write_config(
            Path(tmp), name=f"fuzz-{backend}", **BACKENDS[backend],
            webhook_listener={"host": "127.0.0.1", "port": free_port(), "path": "/webhook",
                              "header_timeout": "2s", "body_timeout": "2s",
                              "keepalive_timeout": "2s", "max_body_size": "64KiB"},
            forwarder={"enabled": False})
        cfg = json.loads(config.read_text())
        port, admin = cfg["webhook_listener"]["port"], cfg["admin"]["port"]
        with running_daemon(config) as daemon:
            wait_http_ok(f"http://127.0.0.1:{admin}/readyz")
            warm = random.Random(seed ^ 0x5EED)
            for _ in range(WARMUP):
                _one(port, warm)
            wait_for(lambda: _quiet(daemon.pid, port), deadline=20, what="warm-up to settle")
            rss_before, fds_before = process_rss(daemon.pid), process_fds(daemon.pid)
            counts = {"answered": 0, "resets": 0}
            lock = threading.Lock()
            per_worker = [requests // workers + (i < requests % workers) for i in range(workers)]

            def work(i: int) -> None:
                rng = random.Random(seed * 1000 + i)
                for _ in range(per_worker[i]):
                    answered, reset = _one(port, rng)
                    with lock:
                        counts["answered"] += answered
                        counts["resets"] += reset

            started = time.monotonic()
            threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
            for thread in threads:
                thread.start()
            peak = rss_before
            while any(t.is_alive() for t in threads):
                if daemon.proc.poll() is not None:
                    break
                peak = max(peak, process_rss(daemon.pid))
                time.sleep(0.05)
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - started
            alive = daemon.proc.poll() is None
            fds_after = fds_before + 10**6
            rss_after = peak
            restarts = -1
            if alive:
                try:
                    wait_for(lambda: process_fds(daemon.pid) <= fds_before, deadline=20,
                             what="fds back to the baseline")
                except AssertionError:
                    pass
                fds_after = process_fds(daemon.pid)
                rss_after = process_rss(daemon.pid)
                peak = max(peak, rss_after)
                checks = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=10).json()
                restarts = int(checks["checks"]["listener"]["restarts"])
            return FuzzReport(backend, requests, counts["answered"], counts["resets"], seconds,
                              rss_before, peak, rss_after, fds_before, fds_after, alive,
                              restarts)


def _quiet(pid: int, port: int) -> bool:
    """No client connection of ours is open at the daemon any more (keep-alive ones closed)."""
    del port
    first = process_fds(pid)
    time.sleep(0.2)
    return process_fds(pid) <= first
