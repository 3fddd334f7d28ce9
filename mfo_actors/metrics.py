"""The Prometheus metrics of ARCHITECTURE.md, defined once, on a registry of our own.

Every metric carries the ``instance`` label. Actors import the metric objects from here and
label them; the admin port renders :data:`REGISTRY` with prometheus-client's exposition code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = [
    "BREAKER_STATE",
    "BREAKER_STATE_VALUES",
    "EVENTS_DEAD",
    "EVENTS_FORWARDED",
    "EVENTS_RECEIVED",
    "EVENTS_REJECTED",
    "EVENTS_RETRIED",
    "FLOW_RUNS",
    "FORWARD_LATENCY",
    "OUTBOX_DEPTH",
    "REGISTRY",
    "TASK_DURATION",
    "TOKEN_REFRESH",
    "render_metrics",
]

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_RECEIVED = Counter(
    "mfo_events_received", "Webhook events accepted and stored.",
    ["instance", "source"], registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "mfo_events_rejected", "Webhook requests refused, by reason (signature, json, size, full...).",
    ["instance", "source", "reason"], registry=REGISTRY,
)
EVENTS_FORWARDED = Counter(
    "mfo_events_forwarded", "Events delivered to the MFO server (2xx).",
    ["instance"], registry=REGISTRY,
)
EVENTS_RETRIED = Counter(
    "mfo_events_retried", "Delivery attempts that failed and were rescheduled.",
    ["instance"], registry=REGISTRY,
)
EVENTS_DEAD = Counter(
    "mfo_events_dead", "Events dead-lettered (non-retryable answer or attempts exhausted).",
    ["instance"], registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "mfo_outbox_depth", "Events stored and not yet delivered or dead.",
    ["instance"], registry=REGISTRY,
)
FORWARD_LATENCY = Histogram(
    "mfo_forward_latency_seconds", "Time from acceptance to delivery at the MFO server.",
    ["instance"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
BREAKER_STATE = Gauge(
    "mfo_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    ["instance", "upstream"], registry=REGISTRY,
)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
TOKEN_REFRESH = Counter(
    "mfo_token_refresh", "Logins and token refreshes, by result (ok, error, rejected).",
    ["instance", "result"], registry=REGISTRY,
)
FLOW_RUNS = Counter(
    "mfo_flow_runs", "Flow runs finished, by status.",
    ["instance", "flow", "status"], registry=REGISTRY,
)
TASK_DURATION = Histogram(
    "mfo_task_duration_seconds", "Duration of one task of a flow run.",
    ["instance", "flow", "task"], registry=REGISTRY,
)


def render_metrics() -> bytes:
    """The Prometheus text exposition of every metric above."""
    return generate_latest(REGISTRY)
