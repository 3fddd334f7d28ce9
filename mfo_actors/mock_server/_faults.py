"""Fault injection: failures, latency, outages and corrupted answers, changed at run time.

Faults come from :class:`~mfo_actors.mock_server.MockOptions` at start-up and from
``POST /_mock/faults`` (:meth:`FaultInjection.set_faults`) while the server runs.
"""

from __future__ import annotations

import math
import random
from dataclasses import fields, replace
from typing import Any

import anyio
import msgspec

from mfo_actors.http import Response
from mfo_actors.mock_server._base import (
    JSON_HEADERS,
    HTTPError,
    MockOptions,
    MockPart,
    encode,
    error_response,
)
from mfo_actors.observability import get_logger

__all__ = ["FAULT_KEYS", "BrokenStream", "FaultInjection", "check_faults", "corrupt"]

log = get_logger("mfo_actors.mock_server")

FAULT_KEYS = frozenset({
    "fail_rate", "fail_status", "retry_after", "latency", "outage_mode", "malformed",
    "token_lifetime", "stream_delay", "job_duration", "require_auth",
})


def corrupt(body: bytes) -> bytes:
    """Replace the top-level string values of a JSON object by numbers (the malformed fault)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if isinstance(data, dict):
        data = {k: (12345 if isinstance(v, str) else v) for k, v in data.items()}
    return encode(data)


def check_faults(faults: MockOptions) -> None:
    if not 0.0 <= faults.fail_rate <= 1.0:
        raise ValueError("fail_rate must be between 0 and 1")
    if not 300 <= faults.fail_status <= 599:  # 3xx: a redirect at a load balancer
        raise ValueError("fail_status must be a redirect or error status (300-599)")
    if faults.latency < 0 or faults.token_lifetime < 0 or faults.stream_delay < 0 \
            or faults.job_duration < 0:
        raise ValueError("latency, token_lifetime, stream_delay and job_duration must be >= 0")
    if faults.retry_after is not None and faults.retry_after < 0:
        raise ValueError("retry_after must be >= 0")
    if faults.outage_mode not in ("503", "close"):
        raise ValueError("outage_mode must be '503' or 'close'")


class BrokenStream:
    """A body that fails at once: the head goes out, then the connection is dropped
    (the ``close`` outage mode; a client sees an incomplete response)."""

    def __aiter__(self) -> BrokenStream:
        return self

    async def __anext__(self) -> bytes:
        raise anyio.BrokenResourceError("injected outage: connection dropped")


class FaultInjection(MockPart):
    """The faults in force, and how an ``/api`` or ``/auth`` request meets them."""

    def _start_faults(self) -> None:
        self._rng = random.Random(self.options.seed)
        self.faults = self.options
        self._outage_until = (self._clock() + self.options.outage_for
                              if self.options.outage_for else 0.0)
        self._fail_next = 0  # the next N /api requests fail (deterministic, for tests)

    def _injected_failure(self) -> Response | None:
        """The failure this ``/api`` request gets (``fail_next``, ``fail_rate``), if any."""
        faults = self.faults
        if self._fail_next > 0 or (faults.fail_rate > 0 and self._rng.random() < faults.fail_rate):
            self._fail_next = max(0, self._fail_next - 1)
            self.stats.faults_injected += 1
            return error_response(faults.fail_status, "injected_failure",
                                  "failure injected by the mock server", self._retry_after())
        return None

    def _retry_after(self, seconds: float | None = None) -> list[tuple[str, str]]:
        value = self.faults.retry_after if seconds is None else seconds
        if value is None:
            return []
        return [("retry-after", str(max(0, math.ceil(value))))]

    def _outage(self, path: str) -> Response | None:
        now = self._clock()
        if now >= self._outage_until:
            return None
        self.stats.faults_injected += 1
        if self.faults.outage_mode == "close":
            return Response(200, list(JSON_HEADERS), stream=BrokenStream())
        # Retry-After only when configured, so tests control the client's waits exactly.
        return error_response(503, "outage", "the server is down (injected outage)",
                              self._retry_after())

    def _fault_view(self) -> dict[str, Any]:
        view = {f.name: getattr(self.faults, f.name) for f in fields(MockOptions)
                if f.name in FAULT_KEYS}
        view["malformed"] = list(self.faults.malformed)
        view["fail_next"] = self._fail_next
        view["outage_remaining"] = round(max(0.0, self._outage_until - self._clock()), 3)
        return view

    def set_faults(self, **changes: Any) -> None:
        """Change faults at run time (the keys of ``POST /_mock/faults``).

        Also ``fail_next`` (the next N ``/api`` requests fail with ``fail_status``),
        ``outage_for`` (seconds of outage from now; 0 ends one), ``expire_tokens``
        (revoke every token issued so far) and ``reset`` (back to the start-up options).
        """
        if changes.pop("reset", False):
            self.faults = self.options
            self._outage_until = 0.0
            self._fail_next = 0
        if changes.pop("expire_tokens", False):
            self._revoke_tokens()
        if "fail_next" in changes:
            count = changes.pop("fail_next")
            if not isinstance(count, int) or count < 0:
                raise HTTPError(400, "invalid_request", "fail_next must be an integer >= 0")
            self._fail_next = count
        if "outage_for" in changes:
            seconds = changes.pop("outage_for")
            if not isinstance(seconds, int | float) or seconds < 0:
                raise HTTPError(400, "invalid_request", "outage_for must be seconds >= 0")
            self._outage_until = self._clock() + float(seconds)
        unknown = set(changes) - FAULT_KEYS
        if unknown:
            raise HTTPError(400, "invalid_request", f"unknown fault keys: {sorted(unknown)}")
        if "outage_mode" in changes:
            changes["outage_mode"] = str(changes["outage_mode"])
        if "malformed" in changes:
            value = changes["malformed"]
            changes["malformed"] = (value,) if isinstance(value, str) else tuple(value or ())
        try:
            updated = replace(self.faults, **changes)
            check_faults(updated)
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, "invalid_request", str(exc)) from None
        self.faults = updated
        log.info("mock.faults_changed", **{k: v for k, v in changes.items()})
