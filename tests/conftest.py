"""Shared fixtures: every async test of core code runs on both anyio backends."""

from __future__ import annotations

import os
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


# -- MFO_REQUIRE_REDIS=1 (set by .ci/run): a Redis test may not quietly skip -------------------

REQUIRE_REDIS = os.environ.get("MFO_REQUIRE_REDIS") == "1"


def _redis_skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """The skip reason if *report* is a skip that mentions Redis (xfails excluded)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason if "redis" in reason.lower() else None


def _fail_redis_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _redis_skip_reason(report)
    if REQUIRE_REDIS and reason is not None:
        report.outcome = "failed"
        report.longrepr = f"MFO_REQUIRE_REDIS=1 but this test was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    _fail_redis_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pluggy.Result[pytest.CollectReport], None]:
    outcome = yield
    _fail_redis_skip(outcome.get_result())
