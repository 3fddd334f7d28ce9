"""Reference server benchmark: ``POST /api/events``/s that ``mfo-actors mock-server`` serves.

The server (auth on, dedupe on) runs in its own process and ``wrk -t1 -c<connections>``
POSTs 600-byte events to it with a fresh id each (``mock_events.lua``: every request is a new
event, answered 202, so the dedupe table grows as it would under the forwarder). Per round:
requests/s (wrk) and the server's CPU per request (user + system from ``/proc/PID/stat``
over the round). ``--tree LABEL=PATH`` runs the server from another source tree too (e.g.
the commit before a change, from ``git archive``), each in the same run, rounds interleaved.

Usage::

    .venv/bin/python benchmarks/mock_server.py [--rounds 3] [--duration 10]
        [--connections 64] [--tree before=/tmp/before-src]

Results: a table on stdout and ``benchmarks/results/mock_server.json``. Needs ``wrk``.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mock_server.json"
LUA = ROOT / "benchmarks" / "mock_events.lua"
EMAIL, PASSWORD = "bench@example.com", "bench-pass"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class Server:
    """``mock-server`` from the source tree *src*, on a free port, logged in."""

    def __init__(self, label: str, src: Path) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mfo_actors", "mock-server", "--port", "0", "--email",
             EMAIL, "--password", PASSWORD, "--log-level", "info"],
            cwd=src, env={**os.environ, "PYTHONPATH": str(src)},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise SystemExit(f"{label}: mock-server did not start: {line!r}")
        self.url = line.removeprefix("listening on ").strip()
        answer = httpx.post(f"{self.url}/auth/login",
                            json={"email": EMAIL, "password": PASSWORD})
        answer.raise_for_status()
        self.token = str(answer.json()["token"])

    def wrk(self, seconds: float, connections: int) -> dict[str, float]:
        before = cpu_seconds(self.proc.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(LUA),
             self.url],
            env={**os.environ, "TOKEN": self.token}, capture_output=True, text=True,
            check=True).stdout
        cpu = cpu_seconds(self.proc.pid) - before
        requests = int(re.search(r"requests=(\d+)", out).group(1))  # type: ignore[union-attr]
        bad = int(re.search(r"non2xx_or_3xx=(\d+)", out).group(1))  # type: ignore[union-attr]
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        if bad:
            raise SystemExit(f"{self.label}: {bad} answers were not 2xx:\n{out}")
        return {"req_s": rate, "cpu_us": cpu / requests * 1e6, "requests": requests}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds, once per server")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="also run the server of another source tree")
    args = parser.parse_args()
    trees = [("this", ROOT)] + [(t.split("=", 1)[0], Path(t.split("=", 1)[1]))
                                for t in args.tree]
    servers = [Server(label, src) for label, src in trees]
    results: dict[str, list[dict[str, float]]] = {s.label: [] for s in servers}
    try:
        for server in servers:
            server.wrk(args.warmup, args.connections)
        for _ in range(args.rounds):
            for server in servers:  # interleaved: drift in the machine's load hits all alike
                results[server.label].append(server.wrk(args.duration, args.connections))
                time.sleep(0.5)  # let the server's backlog of closes settle between runs
    finally:
        for server in servers:
            server.stop()
    rows = []
    print(f"{'server':8} {'req/s min / median / max':>28} {'CPU µs/req median':>18}")
    for label, rounds in results.items():
        rates = sorted(r["req_s"] for r in rounds)
        cpu = statistics.median(r["cpu_us"] for r in rounds)
        rows.append({"server": label, "req_s_min": rates[0],
                     "req_s_median": statistics.median(rates), "req_s_max": rates[-1],
                     "cpu_us_median": cpu, "rounds": rounds})
        print(f"{label:8} {rates[0]:8,.0f} / {statistics.median(rates):7,.0f} / "
              f"{rates[-1]:7,.0f}   {cpu:14.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "connections": args.connections,
        "duration": args.duration, "trees": {label: str(src) for label, src in trees},
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
