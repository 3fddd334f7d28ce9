"""What only the SQLite backend promises: group commit, fsync'd durability, schema, sharing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from mfo_actors.config import InstanceConfig, StoreConfig
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import (
    SQLiteStore,
    StoreError,
    open_sqlite_store,
    open_store,
    sqlite_path,
)
from mfo_actors.store._schema import MIGRATIONS, SCHEMA_VERSION, migrate
from tests.helpers import poll

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def event(source: str = "s", **kw: object) -> Event:
    return Event(id=str(kw.pop("id", new_id())), source=source, type="t",
                 received_at=time.time(), headers={}, body=b'{"k": 1}')


async def append_concurrently(store: SQLiteStore, n: int) -> list[str]:
    ids: list[str] = []

    async def one() -> None:
        ids.append((await store.append(event())).id)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return ids


class TestGroupCommit:
    async def test_concurrent_appends_share_transactions(self, tmp_path: Path) -> None:
        """200 concurrent appends take far fewer than 200 commits."""
        async with open_sqlite_store(tmp_path / "s.db") as store:
            before = store.statistics()
            await append_concurrently(store, 200)
            stats = store.statistics()
        assert stats.appends - before.appends == 200
        assert stats.batches - before.batches <= 20
        assert stats.max_batch >= 10

    async def test_batch_size_is_bounded(self, tmp_path: Path) -> None:
        async with open_sqlite_store(tmp_path / "s.db", group_commit_max=16) as store:
            await append_concurrently(store, 100)
            stats = store.statistics()
        assert stats.max_batch <= 16
        assert stats.batches >= 100 // 16

    async def test_settles_are_batched_too(self, tmp_path: Path) -> None:
        async with open_sqlite_store(tmp_path / "s.db") as store:
            await append_concurrently(store, 100)
            claimed = await store.claim_due(limit=100, lease=60, ordered_by_source=False)
            assert len(claimed) == 100
            before = store.statistics().batches
            async with anyio.create_task_group() as tg:
                for c in claimed:
                    tg.start_soon(store.mark_delivered, c.event.id, c.claim_token or "")
            batches = store.statistics().batches - before
            stats = await store.stats()
        assert batches <= 10
        assert (stats.pending, stats.delivered) == (0, 100)

    async def test_committed_before_append_returns(self, tmp_path: Path) -> None:
        """Another connection sees the row the moment append returns."""
        path = tmp_path / "s.db"
        async with open_sqlite_store(path) as store:
            e = event()
            await store.append(e)
            other = sqlite3.connect(path)
            try:
                rows = other.execute("SELECT id, status FROM events").fetchall()
            finally:
                other.close()
        assert rows == [(e.id, "pending")]

    async def test_one_failing_write_does_not_fail_its_batch(self, tmp_path: Path) -> None:
        """Two appends of one id in one batch: the second fails alone."""
        e = event()
        outcomes: list[str] = []
        async with open_sqlite_store(tmp_path / "s.db") as store:

            async def one(ev: Event) -> None:
                try:
                    await store.append(ev)
                    outcomes.append("ok")
                except StoreError:
                    outcomes.append("error")

            async with anyio.create_task_group() as tg:
                for ev in (e, e, event()):
                    tg.start_soon(one, ev)
            stats = await store.stats()
            assert store.statistics().failed_batches == 0
        assert sorted(outcomes) == ["error", "ok", "ok"]
        assert (stats.pending, stats.pending_bytes) == (2, 2 * len(e.body))


KILL_SCRIPT = """
import sys, time, anyio
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import open_sqlite_store

async def main():
    async with open_sqlite_store(sys.argv[1]) as store:
        async def worker():
            while True:
                e = Event(id=new_id(), source="s", type="t", received_at=time.time(),
                          headers={}, body=b"{}")
                await store.append(e)
                sys.stdout.write("ACK " + e.id + "\\n")
                sys.stdout.flush()
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(worker)

anyio.run(main)
"""


def test_no_acknowledged_append_is_lost_to_kill_9(tmp_path: Path) -> None:
    """A process killed mid-stream loses nothing whose append had returned."""
    path = tmp_path / "s.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    acked: list[str] = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked.append(line.split()[1])
            if len(acked) >= 500 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    acked += [ln.split()[1] for ln in rest.splitlines() if ln.startswith("ACK ")]
    assert len(acked) >= 500
    conn = sqlite3.connect(path)
    try:
        stored = {r[0] for r in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()
    assert set(acked) <= stored


class TestFile:
    async def test_wal_schema_version_and_default_path(self, tmp_path: Path) -> None:
        cfg = InstanceConfig(instance="x", state_dir=str(tmp_path / "deep" / "state"))
        async with open_store(cfg) as store:
            await store.append(event())
        path = sqlite_path(cfg)
        assert path == tmp_path / "deep" / "state" / "store.sqlite3"
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        finally:
            conn.close()

    async def test_store_path_from_config(self, tmp_path: Path) -> None:
        cfg = InstanceConfig(state_dir=str(tmp_path / "state"),
                             store=StoreConfig(path=str(tmp_path / "elsewhere.db")))
        async with open_store(cfg):
            pass
        assert (tmp_path / "elsewhere.db").exists()
        assert not (tmp_path / "state" / "store.sqlite3").exists()

    def test_migrate_is_idempotent(self, tmp_path: Path) -> None:
        conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
        try:
            assert migrate(conn) == (0, SCHEMA_VERSION)
            assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master "
                                                  "WHERE type = 'table'")}
        finally:
            conn.close()
        assert {"events", "runs", "task_runs"} <= tables

    async def test_newer_schema_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "s.db"
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        with pytest.raises(StoreError, match="newer"):
            async with open_sqlite_store(path):
                pass

    async def test_not_a_database(self, tmp_path: Path) -> None:
        path = tmp_path / "s.db"
        path.write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(StoreError, match="is not an mfo-actors store, or it is corrupt"):
            async with open_sqlite_store(path):
                pass

    async def test_another_programs_database_is_left_alone(self, tmp_path: Path) -> None:
        """A valid SQLite file without our schema version is refused, never migrated into."""
        path = tmp_path / "s.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE invoices (n INTEGER)")
        conn.commit()
        conn.close()
        with pytest.raises(StoreError, match=r"not an mfo-actors store: .*tables: invoices"):
            async with open_sqlite_store(path):
                pass
        conn = sqlite3.connect(path)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
        conn.close()
        assert tables == ["invoices"]

    async def test_must_exist(self, tmp_path: Path) -> None:
        with pytest.raises(StoreError, match="no event store"):
            async with open_sqlite_store(tmp_path / "missing.db", must_exist=True):
                pass
        assert not (tmp_path / "missing.db").exists()

    async def test_claims_from_before_node_ids_are_recovered(self, tmp_path: Path) -> None:
        """A version-1 file (claims had no owner) is migrated; its claims are this node's."""
        path = tmp_path / "s.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        MIGRATIONS[0](conn)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO events (id, source, type, received_at, headers, body, content_type, "
            "is_json, size, status, next_attempt_at, claim_token, lease_until) "
            "VALUES ('01OLD', 's', 't', 0, '{}', x'', 'text/plain', 0, 0, 'claimed', 0, 'tok', "
            "9e12)")
        conn.execute("COMMIT")
        conn.close()
        async with open_sqlite_store(path, node="n1") as store:
            assert await store.recover_claims() == 1
            (claimed,) = await store.claim_due(limit=1, lease=30)
        assert claimed.event.id == "01OLD"

    async def test_a_version_4_outbox_keeps_its_order_per_source(self, tmp_path: Path) -> None:
        """Version 6 (ordering keys) puts the waiting events of an older file in their
        source's lane: they are claimed in order, one per source, as before."""
        path = tmp_path / "s.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        for step in MIGRATIONS[:4]:
            step(conn)
        conn.execute("PRAGMA user_version = 4")
        for n, (source, status) in enumerate(
                [("a", "delivered"), ("a", "pending"), ("a", "pending"), ("b", "pending")]):
            conn.execute(
                "INSERT INTO events (id, source, type, received_at, headers, body, "
                "content_type, is_json, size, status, next_attempt_at) "
                "VALUES (?, ?, 't', 0, '{}', x'', 'text/plain', 0, 0, ?, 0)",
                (f"0{n}", source, status))
        conn.execute("COMMIT")
        conn.close()
        async with open_sqlite_store(path) as store:
            first = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in first] == ["01", "03"]
            assert all(c.event.ordering_key is None for c in first)
            await store.mark_delivered("01", first[0].claim_token or "")
            (second,) = await store.claim_due(limit=10, lease=30)
        assert second.event.id == "02"


async def test_second_process_writes_are_noticed(tmp_path: Path) -> None:
    """The CLI replaying while the daemon runs: the daemon's counts follow."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as daemon:
        e = event()
        await daemon.append(e)
        (c,) = await daemon.claim_due(limit=1, lease=60)
        await daemon.dead_letter(e.id, c.claim_token or "", reason="400")
        assert (await daemon.stats()).dead == 1
        async with open_sqlite_store(path, must_exist=True) as cli:
            assert await cli.replay(all_dead=True) == 1
        (again,) = await daemon.claim_due(limit=1, lease=60)  # any write resyncs
        stats = await daemon.stats()
        assert again.event.id == e.id
        assert (stats.pending, stats.dead) == (1, 0)
        assert daemon.statistics().external_resyncs >= 1


async def test_writes_queued_when_the_writer_is_cancelled_fail_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stuck past the close deadline is cancelled; its callers (in its batch and
    still queued behind it) get an error, not a hang."""
    import mfo_actors.store._engine as engine_module

    monkeypatch.setattr(engine_module, "CLOSE_TIMEOUT", 0.2)
    outcomes: list[str] = []
    stuck = threading.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            async with open_sqlite_store(tmp_path / "s.db", group_commit_max=2) as store:
                # The writer thread cannot run its batch (it is stuck until told to stop).
                store._apply_batch = lambda batch: stuck.wait(10)  # type: ignore[method-assign]

                async def release_when_writer_stopping() -> None:
                    await poll(lambda: store._stop_now)
                    stuck.set()

                async def one() -> None:
                    try:
                        await store.append(event())
                        outcomes.append("stored")
                    except StoreError as exc:
                        outcomes.append(type(exc).__name__)

                outer.start_soon(release_when_writer_stopping)
                for _ in range(5):
                    outer.start_soon(one)
                await anyio.wait_all_tasks_blocked()
    assert outcomes == ["StoreClosedError"] * 5
    async with open_sqlite_store(tmp_path / "s.db") as store:
        assert (await store.stats()).pending == 0


async def test_a_claim_cancelled_while_it_commits_gives_its_events_back(tmp_path: Path) -> None:
    """A waiting claim (``within``) that the writer already took when its caller was
    cancelled: the events it claimed are made due again at once, not left to their lease."""
    from mfo_actors.store._tables import UNCLAIMED

    async with open_sqlite_store(tmp_path / "s.sqlite3") as store:
        assert await store.claim_due(limit=4, lease=60) == []
        entered, release = threading.Event(), threading.Event()
        claim = store._tx_claim

        def held_claim(*args: object) -> object:
            entered.set()
            release.wait(10)
            return claim(*args)  # type: ignore[arg-type]

        store._tx_claim = held_claim  # type: ignore[method-assign,assignment]
        ev = event()
        waiting = anyio.CancelScope()

        async def claim_then_cancelled() -> None:
            with waiting:
                await store.claim_due(limit=4, lease=60, within=30)
            assert waiting.cancelled_caught

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim_then_cancelled)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(store.append, ev)  # the claim rides in this write's batch
            with anyio.fail_after(5):
                await anyio.to_thread.run_sync(entered.wait)
            waiting.cancel()  # taken by the writer: it cannot be withdrawn
            await anyio.wait_all_tasks_blocked()
            release.set()
        store._tx_claim = claim  # type: ignore[method-assign]
        stored = await store.get_event(ev.id)
        assert stored is not None
        assert (stored.status, stored.attempts, stored.last_error) == ("pending", 0, UNCLAIMED)
        assert [c.event.id for c in await store.claim_due(limit=4, lease=60)] == [ev.id]


async def test_a_settle_does_not_wait_when_nothing_else_is_being_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivered settle waits for company only while other writes come (a forwarder
    draining a backlog, whose settles only its claims follow, would lose the linger on
    every run): after a whole linger without one, it commits at once."""
    from mfo_actors.store import _sqlite_events

    monkeypatch.setattr(_sqlite_events, "SETTLE_LINGER", 30.0)
    async with open_sqlite_store(tmp_path / "s.sqlite3") as store:
        now = [1000.0]
        store._monotonic = lambda: now[0]  # the writer's clock
        await store.append(event())
        (c,) = await store.claim_due(limit=1, lease=60)
        now[0] += 31.0  # no write for longer than the linger
        with anyio.fail_after(5):  # not the 30 s linger
            await store.mark_delivered(c.event.id, c.claim_token or "", latency=0.001)
        stored = await store.get_event(c.event.id)
        assert stored is not None and stored.status == "delivered"
