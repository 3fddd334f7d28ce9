"""The socket fuzzer against a real daemon on each backend, bounded for the test suite.

The acceptance run (20,000 requests per backend) is ``python -m tests.fuzz --minutes 0
--socket-requests 20000``; its figures are in benchmarks/README.md.
"""

from __future__ import annotations

import pytest

from tests.fuzz.socket_fuzz import BACKENDS, run_socket_fuzz

REQUESTS = 1500  # per backend in the suite (a few seconds each)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_daemon_survives_mutated_requests_and_resets(backend: str) -> None:
    report = run_socket_fuzz(backend, requests=REQUESTS, seed=14)
    assert report.ok, report.line()
