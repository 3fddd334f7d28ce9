"""Shared fixtures: every async test of core code runs on both anyio backends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator

import pluggy
import pytest

from mfo_actors.runtime import set_debug


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _runtime_debug() -> Iterator[None]:
    """Tests run with runtime debug checks on (channels refuse messages of the wrong type)."""
    previous = set_debug(True)
    try:
        yield
    finally:
        set_debug(previous)


# -- PostgreSQL: $MFO_PG_DSN, one schema per test; MFO_REQUIRE_POSTGRES=1 (.ci/run) ----------

REQUIRE_POSTGRES = os.environ.get("MFO_REQUIRE_POSTGRES") == "1"


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The DSN of the test PostgreSQL ($MFO_PG_DSN); the test skips when it is not set or
    not reachable (and fails instead under MFO_REQUIRE_POSTGRES=1)."""
    dsn = os.environ.get("MFO_PG_DSN")
    if not dsn:
        pytest.skip("postgres: set MFO_PG_DSN to run the PostgreSQL tests")
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=5):
            pass
    except Exception as exc:
        pytest.skip(f"postgres at $MFO_PG_DSN unreachable: {exc}")
    return dsn


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name for one test; the schema is dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield name
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _postgres_skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """The skip reason if *report* is a skip that mentions Postgres (xfails excluded)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason if "postgres" in reason.lower() else None


def _fail_postgres_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _postgres_skip_reason(report)
    if REQUIRE_POSTGRES and reason is not None:
        report.outcome = "failed"
        report.longrepr = f"MFO_REQUIRE_POSTGRES=1 but this test was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    _fail_postgres_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pluggy.Result[pytest.CollectReport], None]:
    outcome = yield
    _fail_postgres_skip(outcome.get_result())
