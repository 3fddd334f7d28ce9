"""End-to-end benchmark: webhook in -> durable store -> forwarder -> MFO server receipt.

Runs the real daemon (``python -m mfo_actors run``) and the reference MFO server
(``python -m mfo_actors mock-server``, with ``--latency`` for the RTT rows) as subprocesses on
this machine and drives the webhook listener from a separate load generator. Two modes:

* **matrix** (full speed): each row is an ordering (``none``, ``key``, ``source``), an added
  upstream latency (0 or 20 ms) and a ``forwarder.concurrency``; the load generator sends
  ``--events`` webhooks as fast as the listener takes them, spread round-robin over
  ``--sources`` routes (``/hooks/s0`` ...), each body carrying one of ``--keys`` customer ids
  (``data.customer.id``, ``cus_0`` ...). With ``ordering: key`` every route has
  ``ordering_key: json:/data/customer/id``, so there are ``--keys`` ordering keys; with
  ``ordering: source`` there are ``--sources``. Load generator: ``wrk -t1 -c<connections>``
  with a Lua ``request()`` that cycles through the (route, key) bodies; without ``wrk``
  (``apt-get install wrk``) a Python raw-socket generator in ``--python-procs`` processes.
* **steady**: a fixed arrival rate (``--steady-rate`` per second for ``--steady-seconds``,
  ``ordering: key`` by default) from a paced Python generator in ``--python-procs`` separate
  processes (wrk cannot pace; wrk2 is not packaged here): request *i* is due at
  ``start + i / rate`` and is sent on the next free keep-alive connection of its process
  (late sends are counted, never dropped). It reports whether the backlog stays flat
  (delivery ends within ``--flat-within`` s, default 1, of the last arrival) beside the
  backlog sampled every second (events the daemon stored minus events the server received).

* **drain**: the forwarder alone (``--drain-matrix``, rows as in the matrix). The daemon
  first runs with its upstream on a port where nothing listens (no login, so nothing is
  claimed) while wrk stores ``--events`` webhooks; it is stopped (SIGTERM), its config
  pointed at the reference server, and started again: delivered/s is then events / (the
  server's last receipt - its first), the backlog delivered with no ingest beside it. The
  matrix's delivered/s is the whole pipeline's rate (ingest and delivery sharing the daemon
  and the 2 cores); this is the delivery side's own.

Reported per row (a row waits until the server holds every event the daemon stored):

* **ingest/s**: webhooks answered 202 per second, as the load generator saw them;
* **delivered/s**: unique events received by the server / (its last receipt - the daemon's
  first accept);
* **accept->delivered p50/p99**: per event, the server's receive time (``GET
  /_mock/events``) minus the forwarded body's ``received_at`` (the daemon's accept time).
  Both are this machine's wall clock; no client timestamps. At full speed this is mostly
  the backlog the load generator builds; the steady row is the latency figure.
* **order inversions**: for ``key`` and ``source``, events the server received before an
  event of the same key (or source) that the daemon accepted earlier (the event ids are
  monotonic in acceptance order). Must be 0.

A row whose config the daemon refuses (``mfo-actors check``; e.g. ``ordering: key`` before
the daemon knows it) is skipped with a ``SKIP`` line. ``--rounds N`` runs the matrix N
times (the row order reversed every other round) and reports min / median / max of
delivered/s, with latency from the median round. ``--py-spy FILE`` records the daemon of every
row with py-spy (``pip install py-spy``; use it with a one-row ``--matrix``) and prints its
top frames. Results: a table on stdout and ``benchmarks/results/e2e.json``.

Usage::

    .venv/bin/python benchmarks/e2e.py [--modes matrix,steady] [--rounds 3]
        [--matrix none:0,key:0,source:0,none:20:64,key:20:64,source:20:64:4000]
        [--events 20000] [--connections 16] [--sources 8] [--keys 64] [--concurrency 16]
        [--steady-rate 1000] [--steady-seconds 60] [--steady-ordering key]
        [--drain-matrix none:0,key:0]
        [--loadgen auto|wrk|python] [--py-spy prof.txt] [--keep]

A matrix row is ``ORDERING:LATENCY_MS[:CONCURRENCY[:EVENTS]]`` (concurrency defaults to
``--concurrency``, events to ``--events``). Not a test: it is outside pytest's testpaths.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "e2e.json"
# The tree whose mfo_actors runs (the daemon, the reference server): the one this interpreter
# imports, so PYTHONPATH picks it (benchmarks/e2e_ab.sh). The subprocesses start in it:
# ``python -m`` puts its working directory ahead of PYTHONPATH on sys.path.
_SPEC = importlib.util.find_spec("mfo_actors")
TREE = (Path(_SPEC.origin).resolve().parent.parent
        if _SPEC is not None and _SPEC.origin is not None else ROOT)
EMAIL = "bench@example.com"
PASSWORD = "bench-password"
START_DEADLINE = 30.0  # seconds for each subprocess to come up
DELIVERY_DEADLINE = 300.0  # seconds, after the load stops, for every event to reach the server
KEY_POINTER = "/data/customer/id"
LATE = 0.005  # a paced send this far behind its due time counts as late
DEFAULT_MATRIX = "none:0,key:0,source:0,none:20:64,key:20:64,source:20:64:4000"

# Targets of issue 15 (delivered/s at full speed; steady: p50 and a flat backlog).
TARGET_NONE_0MS = 5000.0
TARGET_KEY_0MS = 3000.0
TARGET_20MS_C64 = 2000.0
TARGET_STEADY_P50_MS = 20.0


def payload(key: int) -> bytes:
    """A ~0.9 KiB webhook body whose ``data.customer.id`` is ``cus_<key>``."""
    return json.dumps({
        "type": "order.created",
        "data": {
            "customer": {"id": f"cus_{key}", "email": "someone@example.com"},
            "items": [{"sku": f"SKU-{i:04d}", "qty": i % 5 + 1, "price": 1999 + i}
                      for i in range(12)],
            "note": "x" * 200,
        },
    }).encode()


def http_request(index: int, sources: int, keys: int) -> bytes:
    """The raw POST for webhook number *index*: route ``index % sources``, key
    ``index % keys``."""
    body = payload(index % keys)
    return (b"POST /hooks/s%d HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (index % sources, len(body), body))


@dataclass(frozen=True)
class Row:
    """One configuration of the matrix (or the steady run)."""

    ordering: str
    latency_ms: float
    concurrency: int
    events: int

    @property
    def name(self) -> str:
        return f"{self.ordering} {self.latency_ms:g}ms c{self.concurrency}"


def parse_matrix(spec: str, args: argparse.Namespace) -> list[Row]:
    rows = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if parts[0] not in ("none", "key", "source") or not 2 <= len(parts) <= 4:
            raise SystemExit(f"--matrix: {item!r} is not ORDERING:LATENCY_MS[:CONC[:EVENTS]]")
        rows.append(Row(ordering=parts[0], latency_ms=float(parts[1]),
                        concurrency=int(parts[2]) if len(parts) > 2 else args.concurrency,
                        events=int(parts[3]) if len(parts) > 3 else args.events))
    return rows


# --------------------------------------------------------------------------------------------
# Load generators

# Fill-ins: %(events)d, %(sources)d, %(keys)d, %(bodies)s (a Lua list of the --keys bodies).
# After the last POST is sent, the free connections send a slow trickle of GETs to an unknown
# path (404 from the listener's head check, no event) until every POST has its answer; then
# the thread stops. `done` (main Lua state) sums the thread's counters.
WRK_SCRIPT = """
local N, S, K = %(events)d, %(sources)d, %(keys)d
local bodies = {%(bodies)s}
local posts, idle = {}, nil
sent, answered, accepted, refused = 0, 0, 0, 0
local threads = {}

function setup(thread) table.insert(threads, thread) end

function init(args)  -- wrk.host is known from here on (wrk.format adds the Host header)
  for s = 0, S - 1 do
    posts[s] = {}
    for k = 0, K - 1 do
      posts[s][k] = wrk.format("POST", "/hooks/s" .. s,
                               {["Content-Type"] = "application/json"}, bodies[k + 1])
    end
  end
  idle = wrk.format("GET", "/_e2e_idle", {})
end

local checked = false
function request()
  if not checked then  -- wrk calls request() once before the run to check it: not sent
    checked = true
    return posts[0][0]
  end
  if sent < N then
    local r = posts[sent %% S][sent %% K]
    sent = sent + 1
    return r
  end
  return idle
end

function delay()
  if sent >= N then return 20 end
  return 0
end

function response(status, headers, body)
  if status == 404 then return end
  answered = answered + 1
  if status == 202 then accepted = accepted + 1 else refused = refused + 1 end
  if answered == N then
    -- wrk's main thread sleeps for -d regardless: tell the parent, which sends SIGINT.
    io.write("E2E_ALL_ANSWERED\\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local s, a, r = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); a = a + t:get("accepted"); r = r + t:get("refused")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"sent":%%d,"accepted":%%d,"refused":%%d,"duration_us":%%d,"p50_us":%%d,' ..
    '"p99_us":%%d,"socket_errors":%%d}\\n', s, a, r, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout))
end
"""


def run_wrk(port: int, row: Row, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """wrk at full speed until every one of the row's POSTs is answered."""
    script = workdir / "e2e.lua"
    bodies = ", ".join(f"[==[{payload(k).decode()}]==]" for k in range(args.keys))
    script.write_text(WRK_SCRIPT % {"events": row.events, "sources": args.sources,
                                    "keys": args.keys, "bodies": bodies})
    cap = max(60, row.events // 50)
    with subprocess.Popen(
        ["wrk", "-t1", f"-c{args.connections}", f"-d{cap}s", "--timeout", "30s",
         "-s", str(script), f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE, text=True,
    ) as wrk:
        assert wrk.stdout is not None
        lines = []
        for text in wrk.stdout:
            lines.append(text)
            if text.strip() == "E2E_ALL_ANSWERED":
                wrk.send_signal(signal.SIGINT)  # ends its sleep; it then reports and exits
    if wrk.returncode != 0:
        raise SystemExit(f"wrk exited with {wrk.returncode}:\n{''.join(lines)}")
    out = "".join(lines)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no RESULT line:\n{out}")
    raw = json.loads(line[len("RESULT "):])
    seconds = raw["duration_us"] / 1e6
    return {"sent": raw["sent"], "accepted": raw["accepted"], "refused": raw["refused"],
            "socket_errors": raw["socket_errors"], "seconds": seconds,
            "ingest_per_s": raw["accepted"] / seconds,
            "client_p50_ms": raw["p50_us"] / 1000, "client_p99_ms": raw["p99_us"] / 1000}


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> bool:
    """Send one request on a keep-alive connection and read its answer: 202 or not."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    await reader.readexactly(int(match.group(1)) if match else 0)
    return head[9:12] == b"202"


def _python_child(c: dict[str, Any]) -> dict[str, Any]:
    """One load process: raw keep-alive sockets on asyncio, POSTing event numbers
    ``range(start, stop, step)``. Unpaced (as fast as answered) unless ``rate`` is given:
    then number *i* is due at ``t0 + i / rate`` (wall clock, shared with the other
    processes) and goes on the first free connection once due."""
    requests = [http_request(i, c["sources"], c["keys"])
                for i in range(c["sources"] * c["keys"])]
    todo = iter(range(c["start"], c["stop"], c["step"]))
    counts = {"sent": 0, "accepted": 0, "refused": 0}
    lags: list[float] = []
    rate, t0 = c.get("rate"), c.get("t0", 0.0)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", c["port"])
        try:
            for n in todo:
                if rate:
                    wait = t0 + n / rate - time.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    elif wait < -LATE:
                        lags.append(-wait)
                counts["sent"] += 1
                ok = await _exchange(reader, writer, requests[n % len(requests)])
                counts["accepted" if ok else "refused"] += 1
        finally:
            writer.close()

    async def main() -> float:
        if rate and t0 > time.time():
            await asyncio.sleep(t0 - time.time())
        start = time.monotonic()
        await asyncio.gather(*(client() for _ in range(c["connections"])))
        return time.monotonic() - start

    seconds = asyncio.run(main())
    lags.sort()
    return {**counts, "seconds": seconds, "late_sends": len(lags),
            "max_lag_ms": round(lags[-1] * 1000, 1) if lags else 0.0}


def run_python(port: int, args: argparse.Namespace, events: int,
               rate: float | None = None) -> dict[str, Any]:
    """``--python-procs`` child processes, the connections and event numbers split evenly;
    paced at *rate* per second in all when given."""
    procs = max(1, min(args.python_procs, args.connections))
    t0 = time.time() + 2.0  # every child is up and connected by then (a loaded machine)
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--loadgen-child", json.dumps({
                "port": port, "sources": args.sources, "keys": args.keys,
                "connections": args.connections // procs + (k < args.connections % procs),
                "start": k, "stop": events, "step": procs, "rate": rate, "t0": t0})],
            stdout=subprocess.PIPE, text=True)
        for k in range(procs)]
    parts = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"python load generator failed ({child.returncode})")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(p["seconds"] for p in parts)
    accepted = sum(p["accepted"] for p in parts)
    return {"sent": sum(p["sent"] for p in parts), "accepted": accepted,
            "refused": sum(p["refused"] for p in parts), "socket_errors": 0,
            "seconds": seconds, "ingest_per_s": accepted / seconds,
            "late_sends": sum(p["late_sends"] for p in parts),
            "max_lag_ms": max(p["max_lag_ms"] for p in parts)}


# --------------------------------------------------------------------------------------------
# Subprocesses


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, *, state_dir: Path, mock_port: int, listen_port: int,
                 admin_port: int, sources: int, ordering: str, concurrency: int) -> None:
    key = f', ordering_key: "json:{KEY_POINTER}"' if ordering == "key" else ""
    routes = "\n".join(
        f"    - {{path: /hooks/s{i}, source: s{i}{key}}}" for i in range(sources))
    path.write_text(f"""\
instance: e2e-bench
state_dir: {state_dir}
client:
  base_url: http://127.0.0.1:{mock_port}
  timeout: 10s
  retry: {{max_attempts: 8, initial_backoff: 100ms, max_backoff: 5s}}
auth: {{mode: login, email: {EMAIL}, password: {PASSWORD}}}
webhook_listener:
  host: 127.0.0.1
  port: {listen_port}
  routes:
{routes}
admin: {{host: 127.0.0.1, port: {admin_port}}}
forwarder: {{concurrency: {concurrency}, ordering: {ordering}}}
flows: {{enabled: false}}
store: {{max_pending: 10000000, max_bytes: 100GiB}}
logging: {{level: warning, format: json}}
""")


def refused_config(cfg: Path) -> str | None:
    """What ``mfo-actors check`` says against *cfg*, or None when it accepts it."""
    out = subprocess.run([sys.executable, "-m", "mfo_actors", "check", "--config", str(cfg)],
                         cwd=TREE, capture_output=True, text=True)
    if out.returncode == 0:
        return None
    problems: list[str] = []
    for line in (out.stdout + out.stderr).splitlines():
        # "<file>:<line>: routes[3].key: problem" -> "routes[*].key: problem", once each
        text = re.sub(r"\[\d+\]", "[*]", line.removeprefix(f"{cfg}:").lstrip("0123456789: "))
        if text and text not in problems:
            problems.append(text)
    return "; ".join(problems) or f"exit {out.returncode}"


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mfo_actors", *args], cwd=TREE,
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start_mock(port: int, row: Row, log: Path) -> subprocess.Popen[bytes]:
    """The reference server on *port*, answering after the row's added latency."""
    return start(["mock-server", "--port", str(port), "--email", EMAIL, "--password",
                  PASSWORD, "--log-level", "warning", "--latency", str(row.latency_ms / 1000)],
                 log)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def reference_server(port: int, row: Row, log: Path
                     ) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    """The reference server for *row*, up and reset, and a client; stopped afterwards."""
    mock = start_mock(port, row, log)
    try:
        with httpx.Client() as client:
            wait_ok(client, f"http://127.0.0.1:{port}/_mock/stats", mock, log, "mock-server")
            client.post(f"http://127.0.0.1:{port}/_mock/reset").raise_for_status()
            yield client, mock
    finally:
        stop(mock)


def tail(log: Path) -> str:
    """The end of a subprocess's log, for an error message (we are exiting anyway)."""
    return log.read_bytes()[-3000:].decode("utf-8", "replace")


def wait_ok(client: httpx.Client, url: str, proc: subprocess.Popen[bytes], log: Path,
            what: str) -> None:
    """GET *url* until 2xx; fail with the subprocess's log if it dies or takes too long."""
    end = time.monotonic() + START_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if client.get(url, timeout=2).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling a subprocess's start-up, not a test
    raise SystemExit(f"{what} not ready after {START_DEADLINE}s ({url}):\n{tail(log)}")


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the webhook listener on *port* takes connections."""
    end = time.monotonic() + START_DEADLINE
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"the listener never came up on {port}:\n{tail(log)}") from None
            time.sleep(0.05)  # polling another process's start-up


def received_total(client: httpx.Client, admin_url: str) -> int:
    """Sum of ``mfo_events_received_total`` over sources: every event the daemon stored."""
    text = client.get(f"{admin_url}/metrics", timeout=10).text
    return round(sum(float(m) for m in re.findall(
        r"^mfo_events_received_total\{[^}]*\} (\S+)$", text, re.MULTILINE)))


class BacklogSampler:
    """Every second: events the daemon stored minus events the server received."""

    def __init__(self, admin_url: str, mock_url: str) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (t, stored, delivered)
        self._urls = admin_url, mock_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BacklogSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        admin_url, mock_url = self._urls
        start = time.monotonic()
        with httpx.Client() as client:
            while not self._stop.wait(1.0):
                try:
                    stored = received_total(client, admin_url)
                    delivered = client.get(f"{mock_url}/_mock/stats", timeout=10).json()[
                        "unique_event_ids"]
                except httpx.HTTPError:
                    continue
                self.samples.append((round(time.monotonic() - start, 1), stored, delivered))

    def backlog(self) -> list[int]:
        return [max(0, s - d) for _, s, d in self.samples]


# --------------------------------------------------------------------------------------------
# CPU of a process (all its threads), for the CPU per delivered event


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* so far (``/proc``; 0.0 where there is no ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# py-spy


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([exe, "record", "-r", "250", "-f", "raw", "--threads",
                             "--nonblocking", "-o", str(out), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def top_frames(raw: Path, limit: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Inclusive and self shares of a py-spy raw (collapsed stacks) file, frames merged
    over line numbers."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for frame in stack.split(";"):
            if frame.startswith("process "):
                continue
            if frame.startswith("thread ("):
                threads[frame] += n
                continue
            frames.append(re.sub(r":\d+\)$", ")", frame))  # merged over line numbers
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    share = 100.0 / max(total, 1)
    return {"samples": [("total", float(total))],
            "threads": [(f, round(c * share, 1)) for f, c in threads.most_common(limit)],
            "inclusive": [(f, round(c * share, 1)) for f, c in inclusive.most_common(limit)],
            "self": [(f, round(c * share, 1)) for f, c in own.most_common(limit)]}


# --------------------------------------------------------------------------------------------
# One row


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def order_inversions(events: list[dict[str, Any]], ordering: str) -> int | None:
    """Events the server got after a same-key (or same-source) event accepted later."""
    if ordering == "none":
        return None
    newest: dict[str, str] = {}
    inversions = 0
    for e in events:  # the server's arrival order
        body = e["body"]
        key = body["source"] if ordering == "source" else body["payload"]["data"]["customer"]["id"]
        if key in newest and body["id"] < newest[key]:
            inversions += 1
        else:
            newest[key] = body["id"]
    return inversions


def run_row(args: argparse.Namespace, row: Row, loadgen: str, workdir: Path,
            steady: bool = False) -> dict[str, Any]:
    mock_port, listen_port, admin_port = free_port(), free_port(), free_port()
    mock_url, admin_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{admin_port}"
    cfg = workdir / "e2e.yaml"
    write_config(cfg, state_dir=workdir / "state", mock_port=mock_port,
                 listen_port=listen_port, admin_port=admin_port, sources=args.sources,
                 ordering=row.ordering, concurrency=row.concurrency)
    refusal = refused_config(cfg)
    if refusal is not None:
        return {"row": row.name, **asdict(row), "skipped": refusal}
    daemon_log = workdir / "daemon.log"
    daemon: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    profile: dict[str, Any] | None = None
    with reference_server(mock_port, row, workdir / "mock.log") as (client, mock):
        try:
            daemon = start(["run", "--config", str(cfg)], daemon_log)
            wait_ok(client, f"{admin_url}/readyz", daemon, daemon_log, "daemon")
            if args.py_spy:
                spy = start_py_spy(daemon.pid, args.py_spy)
            cpu_before = {"daemon": cpu_seconds(daemon.pid), "mock": cpu_seconds(mock.pid)}
            with BacklogSampler(admin_url, mock_url) as sampler:
                if steady:
                    load = run_python(listen_port, args, row.events, rate=args.steady_rate)
                elif loadgen == "wrk":
                    load = run_wrk(listen_port, row, args, workdir)
                else:
                    load = run_python(listen_port, args, row.events)
                load_samples = len(sampler.samples)
                if load["accepted"] == 0:
                    raise SystemExit(f"no webhook was accepted: {load}\n{tail(daemon_log)}")

                # Wait for every stored event (a POST cut off when the load stopped may
                # still have been stored, so the daemon's counter, not the client's, says
                # how many).
                end = time.monotonic() + DELIVERY_DEADLINE
                while True:
                    if daemon.poll() is not None:
                        raise SystemExit(f"daemon exited with {daemon.returncode}:\n"
                                         f"{tail(daemon_log)}")
                    stored = received_total(client, admin_url)
                    stats = client.get(f"{mock_url}/_mock/stats").json()
                    if stats["unique_event_ids"] >= max(stored, load["accepted"]):
                        if received_total(client, admin_url) == stored:
                            break
                    elif time.monotonic() > end:
                        raise SystemExit(
                            f"only {stats['unique_event_ids']} of {stored} stored events "
                            f"reached the server {DELIVERY_DEADLINE}s after the load "
                            f"stopped\n{tail(daemon_log)}")
                    time.sleep(0.1)  # polling another process's progress
            cpu = {"daemon": cpu_seconds(daemon.pid) - cpu_before["daemon"],
                   "mock": cpu_seconds(mock.pid) - cpu_before["mock"]}
            if spy is not None:
                stop_py_spy(spy)
                spy = None
                profile = top_frames(args.py_spy)
            events = client.get(f"{mock_url}/_mock/events", timeout=120).json()["events"]
        finally:
            if spy is not None:
                stop_py_spy(spy)
            if daemon is not None:
                stop(daemon)

    accepted_at = [datetime.fromisoformat(e["body"]["received_at"]).timestamp()
                   for e in events]
    delivered_at = [float(e["received_at"]) for e in events]
    latency = [d - a for a, d in zip(accepted_at, delivered_at, strict=True)]
    first, last = min(accepted_at), max(delivered_at)
    backlog = sampler.backlog()
    result: dict[str, Any] = {
        "row": row.name,
        **asdict(row),
        "events_stored": stored,
        "events_delivered": len(events),
        "server_duplicates": stats.get("duplicates", 0),
        "order_inversions": order_inversions(events, row.ordering),
        "ingest_per_s": round(load["ingest_per_s"], 1),
        "delivered_per_s": round(len(events) / (last - first), 1),
        "delivery_span_s": round(last - first, 3),
        # Steady state: how long after the last accept the last delivery came.
        "tail_after_last_accept_s": round(last - max(accepted_at), 3),
        "accept_to_delivered_ms": {
            "p50": round(percentile(latency, 0.50) * 1000, 1),
            "p99": round(percentile(latency, 0.99) * 1000, 1),
            "max": round(max(latency) * 1000, 1),
            "mean": round(statistics.fmean(latency) * 1000, 1),
        },
        # CPU of each process from the first request to the last delivery, per event.
        "cpu_us_per_event": {name: round(seconds / max(1, len(events)) * 1e6, 1)
                             for name, seconds in cpu.items()},
        "backlog": {"max": max(backlog, default=0),
                    "max_during_load": max(backlog[:load_samples], default=0),
                    "samples": backlog},
        "loadgen": {k: round(v, 3) if isinstance(v, float) else v for k, v in load.items()},
    }
    if steady:
        result["steady"] = {"rate": args.steady_rate, "seconds": args.steady_seconds,
                            "flat": result["tail_after_last_accept_s"] <= args.flat_within}
    if profile is not None:
        result["profile"] = profile
    return result


def run_drain(args: argparse.Namespace, row: Row, loadgen: str, workdir: Path
              ) -> dict[str, Any]:
    """A backlog stored with the upstream away, then delivered alone (see "drain")."""
    mock_port, listen_port, admin_port = free_port(), free_port(), free_port()
    mock_url, admin_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{admin_port}"
    cfg = workdir / "e2e.yaml"
    settings = {"state_dir": workdir / "state", "listen_port": listen_port,
                "admin_port": admin_port, "sources": args.sources,
                "ordering": row.ordering, "concurrency": row.concurrency}
    write_config(cfg, mock_port=free_port(), **settings)  # nothing listens there
    refusal = refused_config(cfg)
    if refusal is not None:
        return {"row": row.name, **asdict(row), "skipped": refusal}
    daemon_log = workdir / "daemon.log"
    daemon: subprocess.Popen[bytes] | None = None
    with reference_server(mock_port, row, workdir / "mock.log") as (client, mock):
        try:
            daemon = start(["run", "--config", str(cfg)], daemon_log)
            # Not /readyz: without a login the daemon is live, never ready.
            wait_ok(client, f"{admin_url}/healthz", daemon, daemon_log, "daemon")
            wait_listening(listen_port, daemon, daemon_log)
            load = (run_wrk(listen_port, row, args, workdir) if loadgen == "wrk"
                    else run_python(listen_port, args, row.events))
            stored = received_total(client, admin_url)
            stop(daemon)
            write_config(cfg, mock_port=mock_port, **settings)
            daemon = start(["run", "--config", str(cfg)], daemon_log)
            cpu_before = {"daemon": 0.0, "mock": cpu_seconds(mock.pid)}
            end = time.monotonic() + DELIVERY_DEADLINE
            while client.get(f"{mock_url}/_mock/stats").json()["unique_event_ids"] < stored:
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited with {daemon.returncode}:\n"
                                     f"{tail(daemon_log)}")
                if time.monotonic() > end:
                    raise SystemExit(f"the backlog of {stored} was not delivered in "
                                     f"{DELIVERY_DEADLINE}s\n{tail(daemon_log)}")
                time.sleep(0.1)  # polling another process's progress
            cpu = {"daemon": cpu_seconds(daemon.pid) - cpu_before["daemon"],
                   "mock": cpu_seconds(mock.pid) - cpu_before["mock"]}
            events = client.get(f"{mock_url}/_mock/events", timeout=120).json()["events"]
            duplicates = client.get(f"{mock_url}/_mock/stats").json().get("duplicates", 0)
        finally:
            if daemon is not None:
                stop(daemon)
    received = sorted(float(e["received_at"]) for e in events)
    span = received[-1] - received[0]
    return {
        "row": row.name, **asdict(row), "events_stored": stored,
        "events_delivered": len(events), "server_duplicates": duplicates,
        "order_inversions": order_inversions(events, row.ordering),
        "ingest_per_s": round(load["ingest_per_s"], 1),
        "delivered_per_s": round(len(events) / span, 1) if span > 0 else None,
        "delivery_span_s": round(span, 3),
        # The restarted daemon's CPU from its start (start-up included), per event.
        "cpu_us_per_event": {name: round(seconds / max(1, len(events)) * 1e6, 1)
                             for name, seconds in cpu.items()},
    }


# --------------------------------------------------------------------------------------------
# Report


def target(row: dict[str, Any], keys: int) -> tuple[str, bool] | None:
    """Issue 15's target for a matrix row, and whether its median met it."""
    rate = row["delivered_median"]
    if row["latency_ms"] == 0 and row["ordering"] == "none":
        return f">= {TARGET_NONE_0MS:,.0f}/s", rate >= TARGET_NONE_0MS
    if row["latency_ms"] == 0 and row["ordering"] == "key" and keys == 64:
        return f">= {TARGET_KEY_0MS:,.0f}/s", rate >= TARGET_KEY_0MS
    if row["latency_ms"] == 20 and row["concurrency"] == 64 and row["ordering"] != "source":
        return f">= {TARGET_20MS_C64:,.0f}/s", rate >= TARGET_20MS_C64
    return None


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max delivered/s over the rounds; the rest from the median round."""
    done = [r for r in rounds if "skipped" not in r]
    if not done:
        return {**rounds[0]}
    ordered = sorted(done, key=lambda r: r["delivered_per_s"])
    median = ordered[len(ordered) // 2]
    return {**median, "rounds": len(done),
            "delivered_min": ordered[0]["delivered_per_s"],
            "delivered_median": median["delivered_per_s"],
            "delivered_max": ordered[-1]["delivered_per_s"],
            "ingest_median": sorted(r["ingest_per_s"] for r in done)[len(done) // 2],
            "order_inversions_max": max((r["order_inversions"] or 0) for r in done)}


def print_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    s = result["settings"]
    print(f"\n{result['loadgen']}; {s['sources']} sources, {s['keys']} keys; "
          f"{s['rounds']} round(s); {os.cpu_count()} CPUs; commit {result['commit']}; "
          f"load average before: {result['machine']['loadavg_before']}")
    if result["matrix"]:
        print("| ordering | upstream latency | concurrency | events | delivered/s min / median "
              "/ max | ingest/s | accept→delivered p50 ms | p99 ms | inversions | dups "
              "| target |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["matrix"]:
        if "skipped" in r:
            print(f"| {r['ordering']} | {r['latency_ms']:g} ms | {r['concurrency']} "
                  f"| {r['events']} | skipped: {r['skipped']} | | | | | | |")
            continue
        lat = r["accept_to_delivered_ms"]
        goal = target(r, s["keys"])
        verdict = "" if goal is None else f"{goal[0]}: {'met' if goal[1] else 'NOT met'}"
        inv = "n/a" if r["order_inversions"] is None else str(r["order_inversions_max"])
        print(f"| {r['ordering']} | {r['latency_ms']:g} ms | {r['concurrency']} "
              f"| {r['events_delivered']} | {r['delivered_min']:,.0f} / "
              f"{r['delivered_median']:,.0f} / {r['delivered_max']:,.0f} "
              f"| {r['ingest_median']:,.0f} | {lat['p50']} | {lat['p99']} | {inv} "
              f"| {r['server_duplicates']} | {verdict} |")
    for r in result["steady"]:
        if "skipped" in r:
            print(f"\nsteady {r['row']}: skipped: {r['skipped']}")
            continue
        lat, lg = r["accept_to_delivered_ms"], r["loadgen"]
        print(f"\nsteady {r['row']}: {r['steady']['rate']:g}/s for {r['steady']['seconds']:g} s "
              f"(paced python generator, {args.python_procs} processes; achieved "
              f"{lg['ingest_per_s']:,.0f}/s, {lg['late_sends']} sends late, max lag "
              f"{lg['max_lag_ms']} ms)")
        print(f"  delivered {r['events_delivered']}, last delivery "
              f"{r['tail_after_last_accept_s']} s after the last accept -> backlog "
              f"{'FLAT' if r['steady']['flat'] else 'NOT flat'} (target <= "
              f"{args.flat_within:g} s); backlog per second max {r['backlog']['max']}, "
              f"samples {r['backlog']['samples']}")
        print(f"  accept->delivered p50 {lat['p50']} ms (target <= {TARGET_STEADY_P50_MS:g}: "
              f"{'met' if lat['p50'] <= TARGET_STEADY_P50_MS else 'NOT met'}), p99 "
              f"{lat['p99']} ms, max {lat['max']} ms; order inversions "
              f"{r['order_inversions']}")
    for r in result["matrix"] + result["steady"]:
        if "profile" in r:
            prof = r["profile"]
            print(f"\npy-spy of the daemon, {r['row']} ({prof['samples'][0][1]:.0f} samples, "
                  "share of all samples): threads")
            for frame, pct in prof["threads"]:
                print(f"  {pct:5.1f}%  {frame}")
            print("inclusive")
            for frame, pct in prof["inclusive"]:
                print(f"  {pct:5.1f}%  {frame}")
            print("self")
            for frame, pct in prof["self"]:
                print(f"  {pct:5.1f}%  {frame}")


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(TREE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="matrix,steady",
                        help="comma-separated: matrix, steady, drain")
    parser.add_argument("--matrix", default=DEFAULT_MATRIX,
                        help="rows ORDERING:LATENCY_MS[:CONCURRENCY[:EVENTS]], comma-separated")
    parser.add_argument("--events", type=int, default=20000, help="webhooks per matrix row")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every row")
    parser.add_argument("--connections", type=int, default=16,
                        help="concurrent keep-alive connections of the load generator")
    parser.add_argument("--sources", type=int, default=8, help="routes/sources to spread over")
    parser.add_argument("--keys", type=int, default=64, help="distinct data.customer.id values")
    parser.add_argument("--drain-matrix", default="none:0,key:0",
                        help="rows of the drain mode (as --matrix)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="forwarder.concurrency of rows that do not give one")
    parser.add_argument("--steady-rate", type=float, default=1000.0, help="arrivals per second")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--steady-ordering", choices=["none", "key", "source"], default="key")
    parser.add_argument("--steady-concurrency", type=int, default=None,
                        help="forwarder.concurrency of the steady run (default --concurrency)")
    parser.add_argument("--flat-within", type=float, default=1.0,
                        help="seconds after the last arrival by which delivery must end")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--python-procs", type=int, default=2,
                        help="processes of the python load generator (the steady one too)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="FILE",
                        help="record the daemon of each row with py-spy (raw format)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work dirs (logs, store)")
    parser.add_argument("--loadgen-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.loadgen_child:
        print(json.dumps(_python_child(json.loads(args.loadgen_child))))
        return

    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not modes <= {"matrix", "steady", "drain"}:
        raise SystemExit(f"--modes: unknown {sorted(modes - {'matrix', 'steady', 'drain'})}")
    rows = parse_matrix(args.matrix, args) if "matrix" in modes else []
    drain_rows = parse_matrix(args.drain_matrix, args) if "drain" in modes else []
    steady_row = Row(ordering=args.steady_ordering, latency_ms=0.0,
                     concurrency=args.steady_concurrency or args.concurrency,
                     events=round(args.steady_rate * args.steady_seconds))
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    loadgen_desc = (f"wrk -t1 -c{args.connections} (Lua request() over routes and keys)"
                    if loadgen == "wrk" else
                    f"python asyncio raw sockets, {args.python_procs} processes, "
                    f"{args.connections} connections")
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "loadgen": loadgen_desc,
        "commit": commit(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {"events": args.events, "connections": args.connections,
                     "sources": args.sources, "keys": args.keys, "rounds": args.rounds,
                     "matrix": [r.name for r in rows], "ordering_key": f"json:{KEY_POINTER}",
                     "payload_bytes": len(payload(0)),
                     "steady": asdict(steady_row) if "steady" in modes else None},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "runs": [],
    }

    def one(row: Row, steady: bool) -> dict[str, Any]:
        workdir = Path(tempfile.mkdtemp(prefix=f"mfo-e2e-{row.ordering}-"))
        try:
            res = run_row(args, row, loadgen, workdir, steady=steady)
        finally:
            if args.keep:
                print(f"work dir kept: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        res["steady_run"] = steady
        result["runs"].append(res)
        if "skipped" in res:
            print(f"SKIP {row.name}: the daemon refuses this config: {res['skipped']}",
                  flush=True)
        else:
            print(f"{'steady ' if steady else ''}{row.name}: {res['events_delivered']} "
                  f"delivered, {res['delivered_per_s']:,.0f}/s, p50 "
                  f"{res['accept_to_delivered_ms']['p50']} ms, p99 "
                  f"{res['accept_to_delivered_ms']['p99']} ms, tail "
                  f"{res['tail_after_last_accept_s']} s, ingest {res['ingest_per_s']:,.0f}/s, "
                  f"CPU µs/event daemon {res['cpu_us_per_event']['daemon']:,.0f} mock "
                  f"{res['cpu_us_per_event']['mock']:,.0f}", flush=True)
        return res

    by_row: dict[str, list[dict[str, Any]]] = {r.name: [] for r in rows}
    steady_runs: list[dict[str, Any]] = []
    drained: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(args.rounds):
        for row in rows if round_no % 2 == 0 else rows[::-1]:
            res = one(row, steady=False)
            by_row[row.name].append(res)
            if "skipped" in res:  # refused once, refused every round
                rows = [r for r in rows if r != row]
        if "steady" in modes:
            res = one(steady_row, steady=True)
            steady_runs.append(res)
            if "skipped" in res:
                modes.discard("steady")
        for row in drain_rows:
            workdir = Path(tempfile.mkdtemp(prefix=f"mfo-e2e-drain-{row.ordering}-"))
            try:
                res = run_drain(args, row, loadgen, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            drained.setdefault(row.name, []).append(res)
            if "skipped" in res:
                print(f"SKIP drain {row.name}: {res['skipped']}", flush=True)
            else:
                print(f"drain {row.name}: {res['events_delivered']} delivered from the "
                      f"backlog, {res['delivered_per_s']:,.0f}/s, duplicates "
                      f"{res['server_duplicates']}, inversions {res['order_inversions']}, "
                      f"CPU µs/event daemon {res['cpu_us_per_event']['daemon']:,.0f} mock "
                      f"{res['cpu_us_per_event']['mock']:,.0f}", flush=True)
    result["matrix"] = [summarise(rs) for rs in by_row.values()]
    done_steady = [r for r in steady_runs if "skipped" not in r]
    result["steady"] = done_steady or steady_runs[:1]
    result["drain"] = drained
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result, args)
    for name, runs in drained.items():
        rates = sorted(r["delivered_per_s"] for r in runs if r.get("delivered_per_s"))
        if rates:
            print(f"drain {name}: delivered/s min / median / max {rates[0]:,.0f} / "
                  f"{statistics.median(rates):,.0f} / {rates[-1]:,.0f} ({len(rates)} rounds)")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
