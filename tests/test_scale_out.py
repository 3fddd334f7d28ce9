"""Scale-out, end to end: several real daemon processes on one PostgreSQL store.

Each test starts the reference MFO server and daemons as real processes with their own state
dirs and ports, sharing one schema of $MFO_PG_DSN (or, for the restart test, a PostgreSQL
server of its own), sends webhooks over HTTP and checks what the upstream received.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import (
    DaemonProcess,
    free_port,
    running_daemon,
    wait_for,
    wait_http_ok,
)
from tests.test_e2e_daemon import (
    MockServer,
    admin_url,
    instance_config,
    listener_url,
    mock_server,
    wait_delivered,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SOURCES = [f"s{i}" for i in range(12)]

SLOW_FLOW = """
name: Slow
triggers:
  - event: {source: jobs}
tasks:
  - id: wait
    type: sleep
    config: {duration: 4s}
"""


def node_config(directory: Path, upstream: MockServer, dsn: str, schema: str,
                **sections: Any) -> Path:
    """One daemon of the cluster: its own state dir and ports, the shared store."""
    routes = [{"path": f"/hooks/{s}", "source": s} for s in [*SOURCES, "jobs"]]
    return instance_config(
        directory, upstream,
        instance="scale",
        webhook_listener={"host": "127.0.0.1", "port": free_port(), "routes": routes},
        store={"backend": "postgres", "dsn": dsn, "schema": schema, "node_lease": "3s"},
        **sections,
    )


def node_of(daemon: DaemonProcess) -> str:
    return str(daemon.wait_event("store.opened")["node"])


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql.encode(), params).fetchall()


class OrderedSender:
    """One thread per source posting that source's webhooks one after another (so acceptance
    order is well defined), each to the next listener in turn; stops at *total* accepted."""

    def __init__(self, listeners: list[str], total: int) -> None:
        self.listeners = listeners
        self.total = total
        self.accepted: dict[str, list[str]] = {s: [] for s in SOURCES}
        self.statuses: list[tuple[float, float, int]] = []  # (sent, answered, status)
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def count(self) -> int:
        with self._lock:
            return sum(map(len, self.accepted.values()))

    def _source(self, index: int) -> None:
        source = SOURCES[index]
        clients = [httpx.Client(base_url=url, timeout=10) for url in self.listeners]
        try:
            n = 0
            while not self.stop.is_set() and self.count() < self.total:
                client = clients[(index + n) % len(clients)]
                n += 1
                sent = time.monotonic()
                try:
                    resp = client.post(f"/hooks/{source}", json={"source": source, "n": n})
                except httpx.TransportError:
                    continue  # that listener is down: the next one takes the next event
                with self._lock:
                    self.statuses.append((sent, time.monotonic(), resp.status_code))
                    if resp.status_code == 202:
                        self.accepted[source].append(str(resp.json()["id"]))
                if resp.status_code == 503:
                    self.stop.wait(0.05)
        finally:
            for client in clients:
                client.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        pool = ThreadPoolExecutor(len(SOURCES))
        futures = [pool.submit(self._source, i) for i in range(len(SOURCES))]
        try:
            yield
        finally:
            self.stop.set()
            for future in futures:
                future.result(timeout=60)
            pool.shutdown()


def first_deliveries(upstream: MockServer) -> dict[str, list[str]]:
    """Per source, the event ids in the order they first reached the upstream."""
    events = httpx.get(f"{upstream.base_url}/_mock/events", timeout=30).json()["events"]
    order: dict[str, list[str]] = {}
    for e in events:
        order.setdefault(e["body"]["source"], []).append(e["idempotency_key"])
    return order


def test_kill_one_of_three_loses_nothing(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """Three daemons on one database, kill -9 one while it holds claims and runs: every
    202 is delivered, each source in acceptance order, its runs rerun elsewhere, and on
    restart it takes back only its own claims."""
    with mock_server("--no-auth", "--latency", "0.02") as upstream:
        configs = []
        for i in range(3):
            config = node_config(tmp_path / f"n{i}", upstream, pg_dsn, pg_schema,
                                 # The victim's event claims must outlive the wait for
                                 # 3000 accepts and its runs' rerun on a loaded machine
                                 # (30 s did not: others took them, nothing to recover).
                                 forwarder={"concurrency": 8, "lease": "120s",
                                            "poll_interval": "200ms"})
            (tmp_path / f"n{i}" / "flows" / "slow.yaml").write_text(SLOW_FLOW)
            configs.append(config)
        with contextlib.ExitStack() as stack:
            daemons = [stack.enter_context(running_daemon(c)) for c in configs]
            for config in configs:
                wait_http_ok(f"{admin_url(config)}/readyz")
            nodes = [node_of(d) for d in daemons]
            victim, victim_node = daemons[1], nodes[1]
            sender = OrderedSender([listener_url(c) for c in configs], total=3000)
            with sender.running():
                wait_for(lambda: sender.count() >= 1000, deadline=60, what="1000 accepted")
                with httpx.Client(timeout=10) as client:
                    for n in range(12):  # 12 slow runs; 4 run at once per node
                        url = f"{listener_url(configs[n % 3])}/hooks/jobs"
                        assert client.post(url, json={}).status_code == 202

                def victim_busy() -> bool:
                    claims = query(pg_dsn, f"SELECT count(*) FROM {pg_schema}.events WHERE "
                                   "status = 'claimed' AND claimed_by = %s", victim_node)
                    runs = query(pg_dsn, f"SELECT count(*) FROM {pg_schema}.runs WHERE "
                                 "status = 'active' AND node = %s", victim_node)
                    return claims[0][0] > 0 and runs[0][0] > 0

                wait_for(victim_busy, deadline=60, what="the victim holding claims and runs")
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                killed_runs = {r[0] for r in query(
                    pg_dsn, f"SELECT run_id FROM {pg_schema}.runs WHERE status = 'active' "
                    "AND node = %s", victim_node)}
                wait_for(lambda: sender.count() >= 3000, deadline=90, what="3000 accepted")
            # The victim's runs are rerun by the others once its lease ran out (3 s) ...
            others_log = daemons[0].output() + daemons[2].output()

            def rerun() -> bool:
                rows = query(pg_dsn, f"SELECT count(*) FROM {pg_schema}.runs WHERE "
                             "run_id = ANY(%s) AND interrupted = 1", list(killed_runs))
                return bool(rows[0][0] == len(killed_runs))

            wait_for(rerun, deadline=30, what="the victim's runs rerun")
            # ... while its event claims (lease 120 s) wait for it: it restarts and takes back
            # exactly those, and nobody else's.
            held = query(pg_dsn, f"SELECT count(*) FROM {pg_schema}.events WHERE "
                         "status = 'claimed' AND claimed_by = %s", victim_node)[0][0]
            assert held > 0
            restarted = stack.enter_context(running_daemon(configs[1]))
            assert node_of(restarted) == victim_node
            assert restarted.wait_event("store.claims_recovered")["count"] == held
            accepted = [i for ids in sender.accepted.values() for i in ids]
            wait_delivered(upstream, accepted, deadline=120)
            wait_for(lambda: query(pg_dsn, f"SELECT count(*) FROM {pg_schema}.runs WHERE "
                                   "status <> 'done'")[0][0] == 0,
                     deadline=60, what="every run done")
            others_log = daemons[0].output() + daemons[2].output()
        order = first_deliveries(upstream)
    for source, ids in sender.accepted.items():
        accepted_set = set(ids)
        assert [i for i in order.get(source, []) if i in accepted_set] == ids, source
    assert not [line for line in others_log if "store.stale_settle" in line]
    recovered_orphans = [json.loads(line) for line in others_log
                         if "scheduler.run_recovered" in line and '"orphaned": true' in line]
    assert {r["run_id"] for r in recovered_orphans} == killed_runs
    print(f"kill-one-of-three: accepted={len(accepted)} victim_claims={held} "
          f"victim_runs={len(killed_runs)}")


def test_two_daemons_receiving_one_delivery_at_once_store_it_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    with mock_server("--no-auth") as upstream:
        configs = [node_config(tmp_path / f"n{i}", upstream, pg_dsn, pg_schema)
                   for i in range(2)]
        with contextlib.ExitStack() as stack:
            for config in configs:
                stack.enter_context(running_daemon(config))
            for config in configs:
                wait_http_ok(f"{admin_url(config)}/readyz")
            clients = [stack.enter_context(httpx.Client(base_url=listener_url(c), timeout=10))
                       for c in configs]
            for round_ in range(30):
                delivery = f"gh-{round_}"
                barrier = threading.Barrier(2)

                def post(client: httpx.Client, delivery: str = delivery,
                         barrier: threading.Barrier = barrier) -> httpx.Response:
                    barrier.wait(5)
                    return client.post("/hooks/s0", json={"n": delivery},
                                       headers={"X-GitHub-Delivery": delivery})

                with ThreadPoolExecutor(2) as pool:
                    answers = list(pool.map(post, clients))
                assert sorted(a.status_code for a in answers) == [200, 202], answers
                assert answers[0].json()["id"] == answers[1].json()["id"]
                assert [a.json().get("duplicate", False) for a in answers].count(True) == 1
            stored = query(pg_dsn, f"SELECT dedupe_key, count(*) FROM {pg_schema}.events "
                           "GROUP BY dedupe_key")
            assert sorted(stored) == sorted((f"gh-{r}", 1) for r in range(30))


# -- a database restart under load, on a PostgreSQL server of the test's own -----------------

def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"postgres server binaries ({name}) not installed")
    return path


class OwnPostgres:
    """A throwaway PostgreSQL server: its own data dir and port (never the shared one)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "--no-sync")

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                  "-c fsync=on -c synchronous_commit=on", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    root = Path(tempfile.mkdtemp(prefix="mfo-pg-"))
    server = OwnPostgres(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def test_database_restart_under_load_loses_no_acknowledged_event(
    tmp_path: Path, own_postgres: OwnPostgres
) -> None:
    """The database crashes and comes back while webhooks arrive: the listener answers 503
    (not 202) while it is away, and every 202 is stored and delivered."""
    with mock_server("--no-auth") as upstream:
        # A settle that failed while the database was away leaves its claim to the lease.
        config = node_config(tmp_path, upstream, own_postgres.dsn, "mfo",
                             forwarder={"concurrency": 8, "lease": "3s",
                                        "poll_interval": "200ms"})
        sender = OrderedSender([listener_url(config)], total=10**9)
        with running_daemon(config) as daemon:
            wait_http_ok(f"{admin_url(config)}/readyz")
            with sender.running():
                wait_for(lambda: sender.count() >= 300, deadline=60, what="300 accepted")
                own_postgres.stop("immediate")  # a crash: only the WAL survives
                down_from = time.monotonic()
                wait_for(lambda: any(s == 503 and t0 > down_from
                                     for t0, _, s in list(sender.statuses)),
                         deadline=30, what="a 503 while the database is down")
                down_until = time.monotonic()
                own_postgres.start()
                before = sender.count()
                wait_for(lambda: sender.count() >= before + 300, deadline=60,
                         what="300 more accepted after the restart")
            accepted = [i for ids in sender.accepted.values() for i in ids]
            wait_delivered(upstream, accepted, deadline=120)
            assert daemon.proc.poll() is None  # it rode out the outage
        during = [s for t0, t1, s in sender.statuses if t0 > down_from and t1 < down_until]
    assert during and set(during) == {503}, during
    stored = {r[0] for r in query(own_postgres.dsn, "SELECT id FROM mfo.events")}
    assert set(accepted) <= stored
