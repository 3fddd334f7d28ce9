"""The Prometheus metrics of ARCHITECTURE.md, defined once, on a registry of our own.

Every metric carries the ``instance`` label. Actors import the metric objects from here and
label them; the admin port renders :data:`REGISTRY` with prometheus-client's exposition code.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

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
    "ORDERING_KEY_MISSING",
    "OUTBOX_DEPTH",
    "REGISTRY",
    "SESSIONS_ACTIVE",
    "SESSIONS_CLOSED",
    "SESSIONS_CREATED",
    "TASK_DURATION",
    "TOKEN_REFRESH",
    "UPSTREAM_CACHE",
    "UPSTREAM_ERRORS",
    "UPSTREAM_REQUESTS",
    "UPSTREAM_REQUEST_SECONDS",
    "UPSTREAM_RESPONSE_BYTES",
    "UPSTREAM_TOKENS",
    "instance_totals",
    "render_metrics",
]

# Without this every counter and histogram also exports a ``*_created`` series (a Unix time per
# label set): 298 lines for a small instance, no use to a dashboard. Process-wide, by design of
# prometheus-client; we own the process.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_RECEIVED = Counter(
    "mfo_events_received", "Webhook events accepted and stored.",
    ["instance", "source"], registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "mfo_events_rejected", "Webhook requests refused, by reason (signature, json, size, full...).",
    ["instance", "source", "reason"], registry=REGISTRY,
)
ORDERING_KEY_MISSING = Counter(
    "mfo_ordering_key_missing",
    "Events accepted with forwarder.ordering: key whose key could not be read (missing JSON "
    "field or header, not a string or number): ordered by their source instead.",
    ["instance", "source"], registry=REGISTRY,
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


# -- calls to the MFO server (seeds 002 and 003), one set for the forwarder, flows and CLI ----
# ``endpoint`` is the route with its variable segments as ``{id}`` (``/api/memory/{id}``), so
# the label set stays small whatever the keys are.
UPSTREAM_REQUESTS = Counter(
    "mfo_upstream_requests", "HTTP exchanges with the MFO server, by endpoint and status "
    "(status \"error\": no answer arrived: network error or timeout).",
    ["instance", "endpoint", "status"], registry=REGISTRY,
)
UPSTREAM_REQUEST_SECONDS = Histogram(
    "mfo_upstream_request_seconds", "Time from sending a request to its answer's head "
    "(a whole body for non-streaming calls).",
    ["instance", "endpoint"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_ERRORS = Counter(
    "mfo_upstream_errors", "Failed calls to the MFO server, by kind (timeout, network, "
    "server_error, rate_limited, client_error, auth, circuit_open, validation).",
    ["instance", "endpoint", "kind"], registry=REGISTRY,
)
UPSTREAM_RESPONSE_BYTES = Histogram(
    "mfo_upstream_response_bytes", "Size of the MFO server's answers (bodies read whole).",
    ["instance", "endpoint"], registry=REGISTRY,
    buckets=(64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
)
UPSTREAM_TOKENS = Counter(
    "mfo_upstream_tokens", "Model tokens consumed, as the server reports them (usage).",
    ["instance", "kind"], registry=REGISTRY,
)
UPSTREAM_CACHE = Counter(
    "mfo_upstream_cache", "GET response cache lookups (client.cache), by result (hit, miss).",
    ["instance", "result"], registry=REGISTRY,
)

# -- chat sessions ------------------------------------------------------------------------------
SESSIONS_ACTIVE = Gauge(
    "mfo_sessions_active", "Chat sessions open (not closed, not yet expired by the cleanup).",
    ["instance"], registry=REGISTRY,
)
SESSIONS_CREATED = Counter(
    "mfo_sessions_created", "Chat sessions started (a new thread for a session key).",
    ["instance"], registry=REGISTRY,
)
SESSIONS_CLOSED = Counter(
    "mfo_sessions_closed", "Chat sessions closed, by reason (expired, evicted, closed).",
    ["instance", "reason"], registry=REGISTRY,
)
def instance_totals(instance: str) -> dict[str, float]:
    """The counters of *instance*, each summed over its other labels.

    Keys are metric family names (``mfo_events_received``); ``mfo_events_rejected`` also
    has one key per reason (``mfo_events_rejected:duplicate``). For the summary log line,
    every few seconds: it walks the whole registry.
    """
    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.type != "counter":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total") or sample.labels.get("instance") != instance:
                continue
            totals[family.name] = totals.get(family.name, 0.0) + sample.value
            reason = sample.labels.get("reason")
            if reason:
                key = f"{family.name}:{reason}"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def render_metrics() -> bytes:
    """The Prometheus text exposition of every metric above."""
    return generate_latest(REGISTRY)
