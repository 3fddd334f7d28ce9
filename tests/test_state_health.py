"""Write health of the stores and the state-dir guard, in-process on both backends.

The process-level behaviour (503, /readyz, exit 1) is in tests/test_e2e_state_faults.py;
here: the SQLite store refuses writes into a file no path names and recovers on its own, the
Postgres store reports writes that fail while the database turns it away and recovers on
its own, and the guard's grace period and lock retake, on a fake clock.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import anyio
import pytest

from mfo_actors.daemon._lock import StateDirLock, StateDirLockedError
from mfo_actors.daemon._statedir import LOST_GRACE, StateDirGuard
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.runtime import FakeClock
from mfo_actors.store import StoreError, open_postgres_store, open_sqlite_store
from tests.helpers import poll

pytestmark = pytest.mark.anyio


def event() -> Event:
    return Event(id=new_id(), source="s", type="t", received_at=time.time(), headers={},
                 body=b"{}", is_json=True, content_type="application/json")


@pytest.mark.slow
async def test_store_refuses_writes_into_a_moved_file_and_recovers(tmp_path: Path) -> None:
    """A store whose file no longer sits at its path refuses writes (they would be acked into
    a file nobody can find) and says so in stats(); when the file is back, a probe write
    makes it writable again without waiting for traffic."""
    path = tmp_path / "store.sqlite3"
    async with open_sqlite_store(path) as store:
        await store.append(event())
        assert (await store.stats()).writable
        os.rename(path, tmp_path / "moved.sqlite3")
        with pytest.raises(StoreError, match="removed"):
            await store.append(event())
        stats = await store.stats()
        assert not stats.writable and stats.write_error and "removed" in stats.write_error
        os.rename(tmp_path / "moved.sqlite3", path)

        async def writable() -> bool:
            return (await store.stats()).writable

        await poll(writable, deadline=20)
        await store.append(event())
        assert (await store.stats()).pending == 2


@pytest.mark.postgres
async def test_postgres_store_reports_failing_writes_and_recovers(pg_dsn: str,
                                                                   pg_schema: str) -> None:
    """Item 5 on the other backend: while the database turns the store away (its role may
    not log in, its sessions killed) writes fail and ``stats().writable`` says so, which
    ``/readyz`` reports; once logins work again the store's own maintenance write makes it
    writable, without traffic. A role of its own, so the shared database is not touched."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"r14_{uuid.uuid4().hex[:12]}"
    role = sql.Identifier(name)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        database = sql.Identifier(admin.execute("SELECT current_database()").fetchone()[0])
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        try:
            admin.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(database, role))
            dsn = make_conninfo(pg_dsn, user=name)
            async with open_postgres_store(dsn, schema=pg_schema) as store:
                await store.append(event())
                assert (await store.stats()).writable
                admin.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(role))
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE usename = %s", (name,))
                with pytest.raises(StoreError):
                    await store.append(event())
                stats = await store.stats()
                assert not stats.writable and stats.write_error
                admin.execute(sql.SQL("ALTER ROLE {} LOGIN").format(role))

                async def writable() -> bool:
                    return (await store.stats()).writable

                await poll(writable, deadline=20)
                await store.append(event())
        finally:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(pg_schema)))
            admin.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(database, role))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(role))
            admin.execute(sql.SQL("DROP ROLE {}").format(role))


async def test_guard_exits_after_the_grace_unless_the_dir_comes_back(tmp_path: Path) -> None:
    """Lost: not ok at once; the daemon is failed only after LOST_GRACE; a file that comes
    back first clears it."""
    state = tmp_path / "state"
    clock = FakeClock()
    failures: list[str] = []
    with StateDirLock(state) as lock:
        store = state / "store.sqlite3"
        store.write_bytes(b"x")
        guard = StateDirGuard(lock, files=[store], fail=failures.append, clock=clock)
        await guard.check()
        assert guard.ok
        os.rename(store, tmp_path / "away")
        await guard.check()
        assert not guard.ok and "store.sqlite3" in str(guard.health()["problem"])
        await clock.advance_to(LOST_GRACE - 1)
        await guard.check()
        assert failures == []
        os.rename(tmp_path / "away", store)  # a remount brings it back
        await guard.check()
        assert guard.ok
        os.remove(store)
        await guard.check()
        await clock.advance_to(clock.monotonic() + LOST_GRACE)
        await guard.check()
        await guard.check()
        assert len(failures) == 1 and "store.sqlite3" in failures[0]


async def test_guard_retakes_a_removed_lock_file(tmp_path: Path) -> None:
    """Only daemon.lock removed (the dir is intact): it is locked again, so no second
    daemon can start on the dir; the guard stays ok."""
    state = tmp_path / "state"
    with StateDirLock(state) as lock:
        guard = StateDirGuard(lock, fail=lambda reason: None, clock=FakeClock())
        os.remove(lock.path)
        await guard.check()
        assert guard.ok and lock.check() is None
        other = StateDirLock(state)
        with pytest.raises(StateDirLockedError):
            other.acquire()


async def test_guard_fails_at_once_when_another_daemon_took_the_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    failures: list[str] = []
    with StateDirLock(state) as lock:
        guard = StateDirGuard(lock, fail=failures.append, clock=FakeClock())
        os.remove(lock.path)
        with StateDirLock(state):  # the newcomer locks a fresh file at the same path
            with anyio.fail_after(5):
                await guard.check()
        assert len(failures) == 1 and "another daemon" in failures[0]
