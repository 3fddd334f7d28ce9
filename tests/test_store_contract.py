"""The EventStore contract: every backend must pass these (parametrised by ``backend``).

A new backend adds its name to the ``backend`` fixture's params and a branch to
``make_config``; the tests only use the protocol, through ``open_store(cfg)``. Postgres tests
each get their own schema ($MFO_PG_DSN), dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from mfo_actors.config import (
    Duration,
    InstanceConfig,
    Size,
    StoreConfig,
    WebhookListenerConfig,
)
from mfo_actors.ids import new_id
from mfo_actors.messages import Event
from mfo_actors.store import (
    OUTPUT_CAP,
    AppendResult,
    Delivered,
    EventStore,
    RunRequest,
    StoreClosedError,
    StoreError,
    StoreFullError,
    TaskRunRecord,
    open_store,
)
from tests.helpers import poll

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Opener = Callable[..., AbstractAsyncContextManager[EventStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_store(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Store options that point *backend* at this test's own data."""
    if backend == "postgres":
        schema = request.getfixturevalue("pg_schema")
        return {"dsn": request.getfixturevalue("pg_dsn"), "schema": schema}
    return {}


def make_config(backend: str, state_dir: Path, **store: Any) -> InstanceConfig:
    dedupe_window = store.pop("dedupe_window", 3600.0)
    if "max_bytes" in store:
        store["max_bytes"] = Size(store["max_bytes"])
    return InstanceConfig(
        instance="test",
        state_dir=str(state_dir),
        store=StoreConfig(backend=backend, **store),  # type: ignore[arg-type]
        webhook_listener=WebhookListenerConfig(dedupe_window=Duration(dedupe_window)),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def opener(backend: str, backend_store: dict[str, Any], tmp_path: Path,
           clock: FakeClock) -> Opener:
    """``opener(**store_options)`` opens the store of one instance (the same data each time);
    ``node=`` opens it as another node of the same instance."""

    def open_(node: str | None = None, **store: Any) -> AbstractAsyncContextManager[EventStore]:
        cfg = make_config(backend, tmp_path / "state", **backend_store, **store)
        return open_store(cfg, clock=clock, node=node)

    return open_


def make_event(
    clock: FakeClock,
    *,
    source: str = "github",
    type: str = "push",
    body: bytes = b'{"n": 1}',
    dedupe_key: str | None = None,
    headers: dict[str, str] | None = None,
) -> Event:
    return Event(
        id=new_id(), source=source, type=type, received_at=clock(),
        headers=headers if headers is not None else {"content-type": "application/json"},
        body=body, dedupe_key=dedupe_key,
    )


def msgspec_fields(event: Event) -> dict[str, Any]:
    return {f: getattr(event, f) for f in event.__struct_fields__}


async def append_all(store: EventStore, events: list[Event]) -> list[AppendResult]:
    """Append *events* concurrently (so a group-committing backend batches them)."""
    results: list[AppendResult | None] = [None] * len(events)

    async def one(i: int) -> None:
        results[i] = await store.append(events[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(events)):
            tg.start_soon(one, i)
    return [r for r in results if r is not None]


class TestAppend:
    async def test_append_round_trips_every_field(self, opener: Opener, clock: FakeClock) -> None:
        """What the listener stored is what the forwarder reads back, byte for byte."""
        event = make_event(clock, body=b'{"a": [1, 2]}', dedupe_key="d-1",
                           headers={"X-GitHub-Event": "push", "content-type": "text/plain"})
        async with opener() as store:
            assert isinstance(store, EventStore)
            result = await store.append(event)
            assert result == AppendResult(event.id, duplicate=False)
            stored = await store.get_event(event.id)
        assert stored is not None
        assert stored.event == event
        assert stored.status == "pending"
        assert stored.attempts == 0
        assert stored.next_attempt_at <= clock()

    async def test_get_unknown_event_is_none(self, opener: Opener) -> None:
        async with opener() as store:
            assert await store.get_event("01NOPE") is None

    async def test_append_is_durable_across_reopen(self, opener: Opener, clock: FakeClock) -> None:
        """An append that returned is found by a new store on the same data."""
        events = [make_event(clock) for _ in range(20)]
        async with opener() as store:
            await append_all(store, events)
        async with opener() as store:
            found = [await store.get_event(e.id) for e in events]
            stats = await store.stats()
        assert all(f is not None and f.status == "pending" for f in found)
        assert stats.pending == 20

    async def test_one_bad_write_fails_alone(self, opener: Opener, clock: FakeClock) -> None:
        """A write that cannot be stored (here: an id already taken) fails its own caller;
        the writes committed in the same batch are stored."""
        taken = make_event(clock)
        good = [make_event(clock, source=f"s{i}") for i in range(9)]
        outcomes: dict[str, str] = {}
        async with opener() as store:
            await store.append(taken)

            async def one(e: Event, key: str) -> None:
                try:
                    await store.append(e)
                    outcomes[key] = "stored"
                except StoreError:
                    outcomes[key] = "failed"

            async with anyio.create_task_group() as tg:
                for i, e in enumerate([*good[:4], taken, *good[4:]]):
                    tg.start_soon(one, e, "taken" if e is taken else str(i))
            found = [await store.get_event(e.id) for e in good]
            stats = await store.stats()
        assert outcomes.pop("taken") == "failed"
        assert set(outcomes.values()) == {"stored"}
        assert all(f is not None for f in found)
        assert stats.pending == 10

    async def test_list_events_newest_first_with_filters(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        a1, b1, a2 = (make_event(clock, source=s) for s in ("a", "b", "a"))
        async with opener() as store:
            for e in (a1, b1, a2):
                await store.append(e)
            everything = await store.list_events()
            only_a = await store.list_events(source="a")
            limited = await store.list_events(limit=1)
            dead = await store.list_events(status="dead")
        assert [s.event.id for s in everything] == [a2.id, b1.id, a1.id]
        assert [s.event.id for s in only_a] == [a2.id, a1.id]
        assert [s.event.id for s in limited] == [a2.id]
        assert dead == []


class TestDedupe:
    async def test_second_delivery_returns_first_id(self, opener: Opener, clock: FakeClock) -> None:
        first = make_event(clock, dedupe_key="k")
        again = make_event(clock, dedupe_key="k")
        async with opener() as store:
            assert (await store.append(first)).duplicate is False
            result = await store.append(again)
            assert result == AppendResult(first.id, duplicate=True)
            assert await store.get_event(again.id) is None
            assert (await store.stats()).pending == 1

    async def test_same_key_other_source_is_not_a_duplicate(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        async with opener() as store:
            await store.append(make_event(clock, source="a", dedupe_key="k"))
            result = await store.append(make_event(clock, source="b", dedupe_key="k"))
        assert result.duplicate is False

    async def test_duplicates_within_one_batch(self, opener: Opener, clock: FakeClock) -> None:
        """Concurrent deliveries of one key (one group commit) store exactly one event."""
        events = [make_event(clock, dedupe_key="same") for _ in range(10)]
        async with opener() as store:
            results = await append_all(store, events)
            stats = await store.stats()
        first_ids = {r.id for r in results}
        assert len(first_ids) == 1
        assert sum(not r.duplicate for r in results) == 1
        assert stats.pending == 1

    async def test_outside_the_window_is_new(self, opener: Opener, clock: FakeClock) -> None:
        first = make_event(clock, dedupe_key="k")
        async with opener(dedupe_window=60.0) as store:
            await store.append(first)
            clock.advance(61)
            later = make_event(clock, dedupe_key="k")
            result = await store.append(later)
        assert result == AppendResult(later.id, duplicate=False)


class TestBackpressure:
    async def test_max_pending(self, opener: Opener, clock: FakeClock) -> None:
        """At the bound append refuses; delivering one frees a slot."""
        async with opener(max_pending=3) as store:
            for _ in range(3):
                await store.append(make_event(clock, source=new_id()))
            with pytest.raises(StoreFullError):
                await store.append(make_event(clock))
            (claimed,) = await store.claim_due(limit=1, lease=30)
            with pytest.raises(StoreFullError):  # claimed still counts as pending
                await store.append(make_event(clock))
            await store.mark_delivered(claimed.event.id, claimed.claim_token or "")
            await store.append(make_event(clock))
            assert (await store.stats()).pending == 3

    async def test_max_bytes(self, opener: Opener, clock: FakeClock) -> None:
        async with opener(max_bytes=100) as store:
            await store.append(make_event(clock, body=b"x" * 60))
            with pytest.raises(StoreFullError):
                await store.append(make_event(clock, body=b"y" * 41))
            await store.append(make_event(clock, body=b"z" * 40))
            assert (await store.stats()).pending_bytes == 100

    async def test_concurrent_appends_never_exceed_bound(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """Writes in flight count against the bound too."""
        accepted = refused = 0

        async with opener(max_pending=10) as store:

            async def one() -> None:
                nonlocal accepted, refused
                try:
                    await store.append(make_event(clock))
                    accepted += 1
                except StoreFullError:
                    refused += 1

            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(one)
            assert (await store.stats()).pending == 10
        assert (accepted, refused) == (10, 20)


class TestClaim:
    async def test_claims_due_events_oldest_first(self, opener: Opener, clock: FakeClock) -> None:
        events = [make_event(clock, source=f"s{i}") for i in range(5)]
        async with opener() as store:
            for e in events:
                await store.append(e)
            first = await store.claim_due(limit=2, lease=30, ordered_by_source=False)
            rest = await store.claim_due(limit=10, lease=30, ordered_by_source=False)
            none = await store.claim_due(limit=10, lease=30, ordered_by_source=False)
        assert [c.event.id for c in first] == [e.id for e in events[:2]]
        assert [c.event.id for c in rest] == [e.id for e in events[2:]]
        assert none == []
        assert all(c.status == "claimed" and c.claim_token for c in first + rest)

    async def test_unordered_claims_many_of_one_source(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        async with opener() as store:
            for _ in range(4):
                await store.append(make_event(clock, source="a"))
            claimed = await store.claim_due(limit=10, lease=30, ordered_by_source=False)
        assert len(claimed) == 4

    async def test_ordered_one_in_flight_per_source(self, opener: Opener, clock: FakeClock) -> None:
        a1, a2, b1, a3 = (make_event(clock, source=s) for s in ("a", "a", "b", "a"))
        async with opener() as store:
            for e in (a1, a2, b1, a3):
                await store.append(e)
            first = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in first] == [a1.id, b1.id]
            assert await store.claim_due(limit=10, lease=30) == []
            await store.mark_delivered(a1.id, first[0].claim_token or "")
            second = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in second] == [a2.id]

    async def test_ordered_head_of_line_waits_for_backoff(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """A rescheduled head blocks its source (even though the next event is due)."""
        a1, a2, b1 = (make_event(clock, source=s) for s in ("a", "a", "b"))
        async with opener() as store:
            for e in (a1, a2, b1):
                await store.append(e)
            claimed = await store.claim_due(limit=10, lease=30)
            token = {c.event.id: c.claim_token or "" for c in claimed}
            await store.reschedule(a1.id, token[a1.id], next_attempt_at=clock() + 10, error="503")
            await store.mark_delivered(b1.id, token[b1.id])
            assert await store.claim_due(limit=10, lease=30) == []
            unordered = await store.claim_due(limit=10, lease=30, ordered_by_source=False)
            assert [c.event.id for c in unordered] == [a2.id]
            await store.reschedule(a2.id, unordered[0].claim_token or "",
                                   next_attempt_at=clock(), error="x")
            clock.advance(10)
            again = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in again] == [a1.id]

    async def test_not_due_is_not_claimed(self, opener: Opener, clock: FakeClock) -> None:
        event = make_event(clock)
        async with opener() as store:
            await store.append(event)
            (c,) = await store.claim_due(limit=1, lease=30)
            await store.reschedule(event.id, c.claim_token or "", next_attempt_at=clock() + 5,
                                   error="timeout")
            stored = await store.get_event(event.id)
            assert stored is not None
            assert (stored.status, stored.attempts, stored.last_error) == (
                "pending", 1, "timeout")
            assert await store.claim_due(limit=1, lease=30) == []
            clock.advance(5)
            (again,) = await store.claim_due(limit=1, lease=30)
            assert again.attempts == 1

    async def test_reschedule_without_attempt_keeps_the_count(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """A reschedule for a call never sent (breaker open) leaves the attempts alone."""
        event = make_event(clock)
        async with opener() as store:
            await store.append(event)
            (c,) = await store.claim_due(limit=1, lease=30)
            await store.reschedule(event.id, c.claim_token or "", next_attempt_at=clock() + 1,
                                   error="circuit open", count_attempt=False)
            stored = await store.get_event(event.id)
            assert stored is not None
            assert (stored.status, stored.attempts) == ("pending", 0)

    async def test_ordered_claim_takes_runs_per_source(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """per_source claims a source's head with the due events right behind it, in order;
        the source stays blocked until the whole run is settled."""
        a1, a2, a3, b1 = (make_event(clock, source=s) for s in ("a", "a", "a", "b"))
        async with opener() as store:
            for event in (a1, a2, a3, b1):
                await store.append(event)
            claimed = await store.claim_due(limit=10, lease=30, per_source=2)
            assert [c.event.id for c in claimed] == [a1.id, a2.id, b1.id]
            assert await store.claim_due(limit=10, lease=30, per_source=2) == []
            token = {c.event.id: c.claim_token or "" for c in claimed}
            await store.mark_delivered(a1.id, token[a1.id])
            await store.reschedule(a2.id, token[a2.id], next_attempt_at=clock() + 5,
                                   error="503")
            assert await store.claim_due(limit=10, lease=30, per_source=2) == []
            clock.advance(5)
            again = await store.claim_due(limit=10, lease=30, per_source=2)
            assert [c.event.id for c in again] == [a2.id, a3.id]

    async def test_zero_limit_claims_nothing(self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            await store.append(make_event(clock))
            assert await store.claim_due(limit=0, lease=30) == []

    async def test_lease_expiry_makes_event_due_again(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """A crashed claimer's event comes back after the lease; its late settle is ignored."""
        event = make_event(clock)
        async with opener() as store:
            await store.append(event)
            (first,) = await store.claim_due(limit=1, lease=30)
            clock.advance(29)
            assert await store.claim_due(limit=1, lease=30) == []
            clock.advance(2)
            (second,) = await store.claim_due(limit=1, lease=30)
            assert second.event.id == event.id
            assert second.claim_token != first.claim_token
            await store.mark_delivered(event.id, first.claim_token or "")  # stale: ignored
            stored = await store.get_event(event.id)
            assert stored is not None and stored.status == "claimed"
            await store.mark_delivered(event.id, second.claim_token or "")
            stored = await store.get_event(event.id)
            assert stored is not None and stored.status == "delivered"


class TestOrderingKeys:
    """Ordered claims go by lane: an event's ordering key, else its source."""

    @staticmethod
    def keyed(clock: FakeClock, key: str | None, source: str = "hooks") -> Event:
        return msgspec.structs.replace(make_event(clock, source=source), ordering_key=key)

    async def test_ordering_key_round_trips(self, opener: Opener, clock: FakeClock) -> None:
        keyed, plain = self.keyed(clock, "user-7"), make_event(clock)
        async with opener() as store:
            await append_all(store, [keyed, plain])
            got = [await store.get_event(e.id) for e in (keyed, plain)]
        assert [g.event.ordering_key for g in got if g is not None] == ["user-7", None]
        assert [g.event for g in got if g is not None] == [keyed, plain]

    async def test_one_in_flight_per_key_keys_in_parallel(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """Two keys of one source go in parallel; an event without a key is in its
        source's lane; each lane's next event waits for its head to settle."""
        u1a, u2a, u1b, bare, u2b = (self.keyed(clock, k) for k in
                                    ("u1", "u2", "u1", None, "u2"))
        async with opener() as store:
            for e in (u1a, u2a, u1b, bare, u2b):
                await store.append(e)
            first = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in first] == [u1a.id, u2a.id, bare.id]
            assert await store.claim_due(limit=10, lease=30) == []
            token = {c.event.id: c.claim_token or "" for c in first}
            await store.mark_delivered(u2a.id, token[u2a.id])
            second = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in second] == [u2b.id]

    async def test_a_retried_head_holds_only_its_key(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """A rescheduled head keeps its key's successors back until it is delivered; other
        keys go on meanwhile."""
        a1, b1, a2, b2 = (self.keyed(clock, k) for k in ("a", "b", "a", "b"))
        async with opener() as store:
            for e in (a1, b1, a2, b2):
                await store.append(e)
            claimed = await store.claim_due(limit=10, lease=30)
            token = {c.event.id: c.claim_token or "" for c in claimed}
            await store.reschedule(a1.id, token[a1.id], next_attempt_at=clock() + 10,
                                   error="503")
            await store.mark_delivered(b1.id, token[b1.id])
            assert [c.event.id for c in await store.claim_due(limit=10, lease=30)] == [b2.id]
            clock.advance(10)
            (again,) = await store.claim_due(limit=10, lease=30)
            assert again.event.id == a1.id
            await store.mark_delivered(a1.id, again.claim_token or "")
            assert [c.event.id for c in await store.claim_due(limit=10, lease=30)] == [a2.id]

    async def test_runs_per_key(self, opener: Opener, clock: FakeClock) -> None:
        """per_source claims a key's head with the due events right behind it (the claim
        lists them in acceptance order)."""
        events = [self.keyed(clock, k) for k in ("a", "b", "a", "a", "b")]
        async with opener() as store:
            for e in events:
                await store.append(e)
            claimed = await store.claim_due(limit=10, lease=30, per_source=2)
        assert [c.event.id for c in claimed] == [events[i].id for i in (0, 1, 2, 4)]

    async def test_blocked_lanes_do_not_use_up_the_claim(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """Lanes that are ready but blocked (head in flight) are passed over: the claim
        still takes *limit* lanes that have work."""
        a1, a2, b1, b2 = (self.keyed(clock, k) for k in ("a", "a", "b", "b"))
        async with opener() as store:
            for e in (a1, a2, b1, b2):
                await store.append(e)
            claimed = await store.claim_due(limit=10, lease=30, per_source=2)
            token = {c.event.id: c.claim_token or "" for c in claimed}
            # Settling each run's first event makes its lane ready, its head still claimed.
            await store.mark_delivered(a1.id, token[a1.id])
            await store.mark_delivered(b1.id, token[b1.id])
            c1, d1 = self.keyed(clock, "c"), self.keyed(clock, "d")
            await append_all(store, [c1, d1])
            got = await store.claim_due(limit=2, lease=30)
        assert sorted(c.event.id for c in got) == sorted([c1.id, d1.id])

    async def test_an_idle_key_pruned_comes_back(self, opener: Opener, clock: FakeClock) -> None:
        """Prune forgets idle keys; a new event, or a replay, of one is claimed again."""
        first, dead = self.keyed(clock, "k"), self.keyed(clock, "gone")
        async with opener() as store:
            await append_all(store, [first, dead])
            claimed = await store.claim_due(limit=10, lease=30)
            token = {c.event.id: c.claim_token or "" for c in claimed}
            await store.mark_delivered(first.id, token[first.id])
            await store.dead_letter(dead.id, token[dead.id], reason="400")
            assert await store.claim_due(limit=10, lease=30) == []  # both lanes now idle
            clock.advance(3600)
            await store.prune(delivered_older_than=60)
            second = self.keyed(clock, "k")
            await store.append(second)
            assert [c.event.id for c in await store.claim_due(limit=10, lease=30)] == [
                second.id]
            assert await store.replay([dead.id]) == 1
            assert [c.event.id for c in await store.claim_due(limit=10, lease=30)] == [dead.id]

    async def test_many_keys_deliver_in_order_per_key(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """40 keys interleaved, claimed and settled in rounds: each key's events come out
        in acceptance order, and a round has many keys in flight."""
        events = [self.keyed(clock, f"k{i % 40}") for i in range(200)]
        out: list[Event] = []
        widest = 0
        async with opener() as store:
            await append_all(store, events)  # concurrently: the store's order is acceptance
            accepted = [s.event.id for s in reversed(await store.list_events(limit=1000))]
            while len(out) < len(events):
                claimed = await store.claim_due(limit=16, lease=30)
                assert claimed
                widest = max(widest, len({c.event.ordering_key for c in claimed}))
                for c in claimed:
                    await store.mark_delivered(c.event.id, c.claim_token or "")
                out += [c.event for c in claimed]
        stored_order = {event_id: i for i, event_id in enumerate(accepted)}
        for key in {e.ordering_key for e in events}:
            ids = [e.id for e in out if e.ordering_key == key]
            assert ids == sorted(ids, key=stored_order.__getitem__)
        assert widest == 16


class TestSettle:
    async def test_mark_delivered(self, opener: Opener, clock: FakeClock) -> None:
        event = make_event(clock, body=b"12345")
        async with opener() as store:
            await store.append(event)
            (c,) = await store.claim_due(limit=1, lease=30)
            clock.advance(1)
            await store.mark_delivered(event.id, c.claim_token or "")
            stored = await store.get_event(event.id)
            stats = await store.stats()
            listed = await store.list_events(status="delivered")
        assert stored is not None
        assert (stored.status, stored.attempts, stored.delivered_at) == ("delivered", 1, clock())
        assert stored.claim_token is None
        assert (stats.pending, stats.pending_bytes, stats.delivered) == (0, 0, 1)
        assert [s.event.id for s in listed] == [event.id]

    async def test_mark_delivered_many_settles_each_as_one_would(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """One write for a run; a stale token in it is skipped alone; the lanes move on."""
        a1, a2, b1 = (make_event(clock, source=s, body=b"123") for s in ("a", "a", "b"))
        async with opener() as store:
            for e in (a1, a2, b1):
                await store.append(e)
            claimed = {c.event.id: c for c in await store.claim_due(
                limit=10, lease=30, ordered_by_source=True, per_source=2)}
            assert set(claimed) == {a1.id, a2.id, b1.id}
            clock.advance(1)
            await store.mark_delivered_many([
                Delivered(event_id=a1.id, claim_token=claimed[a1.id].claim_token or "",
                          latency=0.02, status=202),
                Delivered(event_id=b1.id, claim_token="stale"),
                Delivered(event_id=a2.id, claim_token=claimed[a2.id].claim_token or "",
                          sent_at=clock() - 0.5, latency=0.01, status=200),
            ])
            await store.mark_delivered_many([])  # nothing to do
            states = {e.id: await store.get_event(e.id) for e in (a1, a2, b1)}
            attempts = {e.id: await store.list_attempts(e.id) for e in (a1, a2, b1)}
            stats = await store.stats()
        assert {i: s.status for i, s in states.items() if s is not None} == {
            a1.id: "delivered", a2.id: "delivered", b1.id: "claimed"}
        assert (stats.pending, stats.pending_bytes, stats.delivered) == (1, 3, 2)
        assert [(a.number, a.outcome, a.status) for a in attempts[a1.id]] == [
            (1, "delivered", 202)]
        assert attempts[a2.id][0].at == pytest.approx(T0 + 0.5)
        assert attempts[a2.id][0].status == 200 and attempts[b1.id] == []

    async def test_stale_token_is_ignored(self, opener: Opener, clock: FakeClock) -> None:
        event = make_event(clock)
        async with opener() as store:
            await store.append(event)
            await store.claim_due(limit=1, lease=30)
            await store.mark_delivered(event.id, "not-the-token")
            await store.dead_letter(event.id, "not-the-token", reason="x")
            await store.reschedule(event.id, "nope", next_attempt_at=0, error="x")
            await store.mark_delivered("unknown-id", "nope")
            stored = await store.get_event(event.id)
            stats = await store.stats()
        assert stored is not None and stored.status == "claimed"
        assert (stats.pending, stats.delivered, stats.dead) == (1, 0, 0)

    async def test_dead_letter_and_replay(self, opener: Opener, clock: FakeClock) -> None:
        e1, e2, e3 = (make_event(clock, source=s) for s in ("a", "b", "c"))
        async with opener() as store:
            for e in (e1, e2, e3):
                await store.append(e)
            claimed = await store.claim_due(limit=10, lease=30)
            for c in claimed:
                await store.dead_letter(c.event.id, c.claim_token or "", reason="400 bad request")
            stats = await store.stats()
            assert (stats.pending, stats.dead) == (0, 3)
            dead = await store.list_events(status="dead")
            assert {d.event.id for d in dead} == {e1.id, e2.id, e3.id}
            assert all(d.last_error == "400 bad request" and d.attempts == 1 for d in dead)

            assert await store.replay([e1.id, "unknown"]) == 1
            assert await store.replay([e1.id]) == 0  # not dead any more
            replayed = await store.get_event(e1.id)
            assert replayed is not None
            # Attempts go on counting; the retry budget starts again at attempt_base.
            assert (replayed.status, replayed.attempts, replayed.attempt_base) == (
                "pending", 1, 1)
            assert replayed.next_attempt_at <= clock()

            assert await store.replay(all_dead=True) == 2
            stats = await store.stats()
            assert (stats.pending, stats.dead) == (3, 0)
            again = await store.claim_due(limit=10, lease=30)
            assert {c.event.id for c in again} == {e1.id, e2.id, e3.id}

    async def test_attempt_history(self, opener: Opener, clock: FakeClock) -> None:
        """Each counted send is one attempt: when, how it ended, status or error, latency;
        a delivered event keeps no stale error, and a replay keeps counting."""
        event = make_event(clock)
        async with opener() as store:
            await store.append(event)
            (c,) = await store.claim_due(limit=1, lease=30)
            await store.reschedule(event.id, c.claim_token or "", next_attempt_at=clock(),
                                   error="503 outage", sent_at=clock() - 0.5, status=503,
                                   latency=0.25)
            (c,) = await store.claim_due(limit=1, lease=30)
            await store.reschedule(event.id, c.claim_token or "", next_attempt_at=clock(),
                                   error="circuit open", count_attempt=False)
            (c,) = await store.claim_due(limit=1, lease=30)
            clock.advance(2)
            await store.dead_letter(event.id, c.claim_token or "", reason="400 bad", status=400,
                                    latency=0.01)
            await store.replay([event.id])
            (c,) = await store.claim_due(limit=1, lease=30)
            assert (c.attempts, c.attempt_base) == (2, 2)
            clock.advance(1)
            await store.mark_delivered(event.id, c.claim_token or "", sent_at=clock() - 0.1,
                                       latency=0.1)
            stored = await store.get_event(event.id)
            attempts = await store.list_attempts(event.id)
            assert await store.list_attempts("unknown") == []
        assert stored is not None
        assert (stored.status, stored.attempts, stored.last_error) == ("delivered", 3, None)
        assert [(a.number, a.outcome, a.status, a.error) for a in attempts] == [
            (1, "retry", 503, "503 outage"),
            (2, "dead", 400, "400 bad"),
            (3, "delivered", None, None),
        ]
        assert attempts[0].at == T0 - 0.5 and attempts[0].latency == 0.25
        assert attempts[1].at == pytest.approx(T0 + 2 - 0.01)  # now less the latency
        assert attempts[2].at == pytest.approx(T0 + 2.9) and attempts[2].latency == 0.1

    async def test_prune_takes_the_attempts_along(self, opener: Opener, clock: FakeClock) -> None:
        event = make_event(clock)
        async with opener(retention=Duration(60), dedupe_window=0.0) as store:
            await store.append(event)
            (c,) = await store.claim_due(limit=1, lease=30)
            await store.mark_delivered(event.id, c.claim_token or "", latency=0.01)
            assert len(await store.list_attempts(event.id)) == 1
            clock.advance(120)
            assert await store.prune(delivered_older_than=60) == 1
            assert await store.list_attempts(event.id) == []

    async def test_oldest_pending_at(self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            assert await store.oldest_pending_at() is None
            first, second = make_event(clock, source="a"), make_event(clock, source="b")
            await store.append(first)
            clock.advance(5)
            await store.append(Event(**{**msgspec_fields(second), "received_at": clock()}))
            assert await store.oldest_pending_at() == T0
            (c, _) = await store.claim_due(limit=2, lease=30)
            assert await store.oldest_pending_at() == T0  # claimed is still pending
            await store.mark_delivered(c.event.id, c.claim_token or "")
            assert await store.oldest_pending_at() == T0 + 5

    async def test_replay_nothing(self, opener: Opener) -> None:
        async with opener() as store:
            assert await store.replay() == 0
            assert await store.replay(all_dead=True) == 0

    async def test_recover_claims(self, opener: Opener, clock: FakeClock) -> None:
        """Claimed and never settled (a crash): after reopen, recover makes them due now."""
        events = [make_event(clock, source=f"s{i}") for i in range(4)]
        async with opener() as store:
            for e in events:
                await store.append(e)
            await store.claim_due(limit=3, lease=3600)
        async with opener() as store:  # "restart"
            assert [c.event.id for c in await store.claim_due(limit=10, lease=30)] == [
                events[3].id]
            assert await store.recover_claims() == 4
            again = await store.claim_due(limit=10, lease=30)
            assert [c.event.id for c in again] == [e.id for e in events]
            assert (await store.stats()).pending == 4

    async def test_recover_claims_takes_back_only_this_nodes(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """Node b restarting takes back b's claims; a's stay a's (a is alive and settles)."""
        events = [make_event(clock, source=f"s{i}") for i in range(4)]
        async with opener(node="a") as a:
            for e in events:
                await a.append(e)
            mine = await a.claim_due(limit=2, lease=3600)
            async with opener(node="b") as b:
                theirs = await b.claim_due(limit=10, lease=3600)
            assert {c.event.id for c in mine + theirs} == {e.id for e in events}
            async with opener(node="b") as b:  # b restarts
                assert await b.recover_claims() == len(theirs)
                again = await b.claim_due(limit=10, lease=30)
            assert {c.event.id for c in again} == {c.event.id for c in theirs}
            for c in mine:
                await a.mark_delivered(c.event.id, c.claim_token or "")
                stored = await a.get_event(c.event.id)
                assert stored is not None and stored.status == "delivered"

    async def test_prune_keeps_recent_and_dedupe_window(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        old = make_event(clock)
        old_dedupe = make_event(clock, source="b", dedupe_key="k")
        async with opener(dedupe_window=7200.0) as store:
            for e in (old, old_dedupe):
                await store.append(e)
            for c in await store.claim_due(limit=10, lease=30):
                await store.mark_delivered(c.event.id, c.claim_token or "")
            clock.advance(3600)
            fresh = make_event(clock, source="c")
            await store.append(fresh)
            (c,) = await store.claim_due(limit=10, lease=30)
            await store.mark_delivered(c.event.id, c.claim_token or "")
            assert await store.prune(delivered_older_than=1800) == 1  # old; dedupe one kept
            assert await store.get_event(old.id) is None
            assert await store.get_event(old_dedupe.id) is not None
            assert (await store.stats()).delivered == 2
            clock.advance(7200)
            assert await store.prune(delivered_older_than=1800) == 2
            assert (await store.stats()).delivered == 0


class TestWakeUps:
    async def test_wait_for_events_wakes_on_append(self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            await store.wait_for_events(0)  # consume whatever signal is there
            woke = anyio.Event()

            async def waiter() -> None:
                await store.wait_for_events(30)
                woke.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert not woke.is_set()
                await store.append(make_event(clock))
                with anyio.fail_after(5):
                    await woke.wait()

    async def test_signal_is_kept_until_consumed(self, opener: Opener, clock: FakeClock) -> None:
        """An append between a claim and the wait is not missed."""
        async with opener() as store:
            await store.append(make_event(clock))
            with anyio.fail_after(5):
                await store.wait_for_events(30)

    async def test_wait_times_out(self, opener: Opener) -> None:
        async with opener() as store:
            await store.wait_for_events(0)
            with anyio.fail_after(5):
                await store.wait_for_events(0.01)

    async def test_wait_for_runs(self, opener: Opener) -> None:
        async with opener() as store:
            await store.wait_for_runs(0)
            await store.create_runs([RunRequest(run_id=new_id(), flow="f", trigger="manual")])
            with anyio.fail_after(5):
                await store.wait_for_runs(30)


def commits(store: EventStore) -> int:
    """Transactions the store's writer has committed (both backends count them)."""
    return int(store.statistics().batches)  # type: ignore[attr-defined]


def queued(store: EventStore) -> int:
    """Writes the store's writer has not taken yet (both backends count them)."""
    return int(store.statistics().queued)  # type: ignore[attr-defined]


class TestClaimWithTheNextWrite:
    """``claim_due(within=...)``: an idle claimer's claim rides with the next write."""

    async def test_a_new_event_is_claimed_in_the_commit_that_stores_it(
            self, opener: Opener, clock: FakeClock, backend: str) -> None:
        async with opener() as store:
            if backend == "postgres":  # its LISTEN is up (it wakes claims when it connects)
                with anyio.fail_after(10):
                    await store.wait_for_events(30)
            # A write of the store's own upkeep (Postgres: each second) may come between
            # the claim and the append and take the claim along: then the round is redone.
            for _ in range(3):
                await store.claim_due(limit=8, lease=60)  # has seen everything
                event = make_event(clock)
                claimed: list[Any] = []

                async def claim(into: list[Any]) -> None:
                    into.extend(await store.claim_due(limit=8, lease=60, within=30))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(claim, claimed)
                    await anyio.wait_all_tasks_blocked()  # the claim is queued
                    await poll(lambda: queued(store) == 0)  # and the writer holds it
                    before = commits(store)
                    with anyio.fail_after(5):
                        await store.append(event)
                took = commits(store) - before
                if claimed:
                    break
            assert [c.event.id for c in claimed] == [event.id]
            assert took == 1  # the append and the claim: one commit
            stored = await store.get_event(event.id)
            assert stored is not None and stored.status == "claimed"

    async def test_runs_at_once_after_a_write_no_claim_has_seen(
            self, opener: Opener, clock: FakeClock) -> None:
        """An append committed between an empty claim and the waiting one is not missed."""
        async with opener() as store:
            assert await store.claim_due(limit=8, lease=60) == []
            event = await store.append(make_event(clock))
            with anyio.fail_after(5):  # not the 30 s of *within*
                claimed = await store.claim_due(limit=8, lease=60, within=30)
            assert [c.event.id for c in claimed] == [event.id]

    async def test_claims_after_within_when_nothing_is_written(
            self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            assert await store.claim_due(limit=8, lease=60) == []
            with anyio.fail_after(5):
                assert await store.claim_due(limit=8, lease=60, within=0.05) == []

    async def test_a_cancelled_claim_takes_nothing(self, opener: Opener,
                                                   clock: FakeClock) -> None:
        async with opener() as store:
            assert await store.claim_due(limit=8, lease=60) == []
            with anyio.move_on_after(0.05):
                await store.claim_due(limit=8, lease=60, within=30)
            event = await store.append(make_event(clock))
            stored = await store.get_event(event.id)
            assert stored is not None and stored.status == "pending"
            claimed = await store.claim_due(limit=8, lease=60)
            assert [c.event.id for c in claimed] == [event.id]

    async def test_release_gives_claims_back_unsent_in_one_commit(
            self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            await append_all(store, [make_event(clock, source=f"s{i}") for i in range(3)])
            claimed = await store.claim_due(limit=8, lease=60)
            assert len(claimed) == 3
            before = commits(store)
            await store.release(claimed, reason="not sent: test")
            assert commits(store) == before + 1
            for c in claimed:
                stored = await store.get_event(c.event.id)
                assert stored is not None
                assert (stored.status, stored.attempts, stored.last_error) == (
                    "pending", 0, "not sent: test")
            again = await store.claim_due(limit=8, lease=60)
            assert sorted(c.event.id for c in again) == sorted(c.event.id for c in claimed)

    async def test_a_settle_waits_for_the_next_write_to_share_its_commit(
            self, opener: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
        """A delivered settle (``SETTLE_LINGER``, made long here) commits with the next
        write instead of on its own."""
        from mfo_actors.store import _pg_events, _sqlite_events
        monkeypatch.setattr(_sqlite_events, "SETTLE_LINGER", 30.0)
        monkeypatch.setattr(_pg_events, "SETTLE_LINGER", 30.0)
        async with opener() as store:
            # As above: the store's own upkeep may be the write it rides with; then again.
            for _ in range(3):
                await store.append(make_event(clock))
                (c,) = await store.claim_due(limit=1, lease=60)
                settled = anyio.Event()

                async def settle(c: Any, done: anyio.Event) -> None:
                    await store.mark_delivered(c.event.id, c.claim_token or "", latency=0.001)
                    done.set()

                async with anyio.create_task_group() as tg:
                    before = commits(store)
                    tg.start_soon(settle, c, settled)
                    await anyio.wait_all_tasks_blocked()
                    await poll(lambda: queued(store) == 0)  # the writer holds the settle
                    waited = not settled.is_set() and commits(store) == before
                    with anyio.fail_after(5):
                        await store.append(make_event(clock))
                        await settled.wait()
                took = commits(store) - before
                if waited and took == 1:
                    break
            assert waited and took == 1
            stored = await store.get_event(c.event.id)
            assert stored is not None and stored.status == "delivered"


class TestClose:
    async def test_writes_after_aclose_raise(self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            await store.aclose()
            with pytest.raises(StoreClosedError):
                await store.append(make_event(clock))
            with pytest.raises(StoreClosedError):
                await store.claim_due(limit=1, lease=1)

    async def test_aclose_drains_queued_appends(self, opener: Opener, clock: FakeClock) -> None:
        """Appends already queued when the store closes are committed and answered."""
        events = [make_event(clock) for _ in range(50)]
        results: list[AppendResult] = []
        async with opener() as store:

            async def one(e: Event) -> None:
                results.append(await store.append(e))

            async with anyio.create_task_group() as tg:
                for e in events:
                    tg.start_soon(one, e)
                await anyio.wait_all_tasks_blocked()
                await store.aclose()
        assert len(results) == 50
        async with opener() as store:
            assert (await store.stats()).pending == 50

    async def test_body_exception_is_not_wrapped(self, opener: Opener) -> None:
        with pytest.raises(KeyError):
            async with opener():
                raise KeyError("mine")


def run_request(flow: str = "f", **kw: Any) -> RunRequest:
    return RunRequest(run_id=new_id(), flow=flow, trigger=kw.pop("trigger", "manual"), **kw)


class TestRuns:
    async def test_lifecycle(self, opener: Opener, clock: FakeClock) -> None:
        req = run_request(input={"x": 1})
        async with opener() as store:
            assert await store.create_runs([req]) == [req.run_id]
            created = await store.get_run(req.run_id)
            assert created is not None
            assert (created[0].status, created[0].input, created[1]) == ("new", {"x": 1}, [])
            clock.advance(1)
            (active,) = await store.claim_runs(limit=5)
            assert (active.run_id, active.status, active.started_at) == (
                req.run_id, "active", clock())
            assert await store.claim_runs(limit=5) == []
            await store.record_task(TaskRunRecord(run_id=req.run_id, task_id="a", state="running",
                                                  attempts=1, started_at=clock()))
            await store.record_task(TaskRunRecord(run_id=req.run_id, task_id="b",
                                                  state="pending"))
            await store.record_task(TaskRunRecord(run_id=req.run_id, task_id="a", state="done",
                                                  attempts=2, started_at=clock(),
                                                  finished_at=clock() + 1, output={"ok": True}))
            clock.advance(2)
            await store.finish_run(req.run_id, status="done", outputs={"result": 42})
            got = await store.get_run(req.run_id)
        assert got is not None
        run, tasks = got
        assert (run.status, run.finished_at, run.outputs) == ("done", clock(), {"result": 42})
        assert [(t.task_id, t.state, t.attempts, t.output) for t in tasks] == [
            ("a", "done", 2, {"ok": True}), ("b", "pending", 0, None)]

    async def test_finish_with_error(self, opener: Opener) -> None:
        req = run_request()
        async with opener() as store:
            await store.create_runs([req])
            await store.claim_runs(limit=1)
            await store.finish_run(req.run_id, status="error", error="task a failed")
            await store.finish_run(req.run_id, status="done")  # already settled: ignored
            got = await store.get_run(req.run_id)
        assert got is not None
        assert (got[0].status, got[0].error) == ("error", "task a failed")

    async def test_claim_runs_oldest_first(self, opener: Opener) -> None:
        reqs = [run_request() for _ in range(5)]
        async with opener() as store:
            await store.create_runs(reqs)
            first = await store.claim_runs(limit=2)
            rest = await store.claim_runs(limit=10)
        assert [r.run_id for r in first + rest] == [r.run_id for r in reqs]

    async def test_unique_ticks(self, opener: Opener) -> None:
        """A (flow, schedule_key, tick) fires once, even across a restart."""
        tick1 = run_request(trigger="cron", schedule_key="cron:0", tick=T0)
        same = run_request(trigger="cron", schedule_key="cron:0", tick=T0)
        other_flow = run_request("g", trigger="cron", schedule_key="cron:0", tick=T0)
        tick2 = run_request(trigger="cron", schedule_key="cron:0", tick=T0 + 60)
        async with opener() as store:
            assert await store.last_tick("f", "cron:0") is None
            assert await store.create_runs([tick1, same, other_flow]) == [
                tick1.run_id, other_flow.run_id]
        async with opener() as store:
            assert await store.create_runs([same, tick2]) == [tick2.run_id]
            assert await store.last_tick("f", "cron:0") == T0 + 60
            assert await store.last_tick("f", "interval:30") is None
            got = await store.get_run(tick2.run_id)
            assert got is not None and (got[0].schedule_key, got[0].tick) == ("cron:0", T0 + 60)

    async def test_event_triggers_are_stored_with_the_event(
        self, opener: Opener, clock: FakeClock
    ) -> None:
        """Runs passed to append exist once it returns; a duplicate delivery adds none."""
        event = make_event(clock, dedupe_key="k")
        req = run_request(trigger="event", event_id=event.id)
        dup = make_event(clock, dedupe_key="k")
        async with opener() as store:
            await store.append(event, runs=[req])
            result = await store.append(
                dup, runs=[run_request(trigger="event", event_id=dup.id)])
            assert result.duplicate
        async with opener() as store:
            runs = await store.list_runs()
        assert [(r.run_id, r.event_id, r.status) for r in runs] == [
            (req.run_id, event.id, "new")]

    async def test_list_runs_filters_newest_first(self, opener: Opener) -> None:
        a1, b1, a2 = run_request("a"), run_request("b"), run_request("a")
        async with opener() as store:
            await store.create_runs([a1, b1, a2])
            await store.claim_runs(limit=1)
            assert [r.run_id for r in await store.list_runs()] == [a2.run_id, b1.run_id, a1.run_id]
            assert [r.run_id for r in await store.list_runs(flow="a")] == [a2.run_id, a1.run_id]
            assert [r.run_id for r in await store.list_runs(status="active")] == [a1.run_id]
            assert [r.run_id for r in await store.list_runs(limit=1)] == [a2.run_id]
            assert await store.get_run("nope") is None

    async def test_recover_runs(self, opener: Opener) -> None:
        """Active runs at start-up were interrupted: rerun or fail by flow policy."""
        rerun, fail, done = run_request("rerun"), run_request("fail"), run_request("done")
        async with opener() as store:
            await store.create_runs([rerun, fail, done])
            await store.claim_runs(limit=3)
            await store.finish_run(done.run_id, status="done")
            await store.record_task(TaskRunRecord(run_id=fail.run_id, task_id="t",
                                                  state="running"))
        async with opener() as store:
            recovered = await store.recover_runs(rerun_flows=["rerun"])
            by_id = {r.run_id: r for r in recovered}
            assert set(by_id) == {rerun.run_id, fail.run_id}
            assert (by_id[rerun.run_id].status, by_id[rerun.run_id].interrupted) == ("new", 1)
            assert (by_id[fail.run_id].status, by_id[fail.run_id].error) == (
                "error", "interrupted")
            got = await store.get_run(fail.run_id)
            assert got is not None and got[1][0].state == "cancelled"
            (again,) = await store.claim_runs(limit=10)
            assert again.run_id == rerun.run_id
            (second,) = await store.recover_runs(rerun_flows=["rerun"])
            assert (second.run_id, second.status, second.interrupted) == (rerun.run_id, "new", 2)

    async def test_recover_runs_takes_back_only_this_nodes(self, opener: Opener) -> None:
        mine, theirs = run_request("f"), run_request("f")
        async with opener(node="a") as a:
            await a.create_runs([mine])
            await a.claim_runs(limit=10)
            async with opener(node="b") as b:
                await b.create_runs([theirs])
                (claimed,) = await b.claim_runs(limit=10)
                assert claimed.run_id == theirs.run_id
            async with opener(node="b") as b:  # b restarts
                recovered = await b.recover_runs(rerun_flows=["f"])
            assert [r.run_id for r in recovered] == [theirs.run_id]
            got = await a.get_run(mine.run_id)
            assert got is not None and got[0].status == "active"
            await a.finish_run(mine.run_id, status="done")
            got = await a.get_run(mine.run_id)
            assert got is not None and got[0].status == "done"

    async def test_other_nodes_runs_come_back_only_after_their_lease(
            self, opener: Opener, clock: FakeClock) -> None:
        """Node a holds an active run and stops renewing (died; or its id changed, as after
        a reboot): node b takes it over by lease expiry, never before, and never by its own
        start-up recovery; a's late settle is ignored. Renewing keeps a live node's runs."""
        lost, kept = run_request("f"), run_request("g")
        async with opener(node="a") as a, opener(node="b") as b:  # node_lease 30 s
            await a.create_runs([lost, kept])
            assert len(await a.claim_runs(limit=10)) == 2
            assert await b.recover_runs(rerun_flows=["f"]) == []  # not b's own
            clock.advance(29)
            assert await b.recover_runs(rerun_flows=["f"], orphaned=True) == []
            await a._renew_runs()  # type: ignore[attr-defined]  # what a does every 10 s
            await a.finish_run(kept.run_id, status="done")
            clock.advance(2)  # 31 s after the claim, 2 s after the renewal
            assert await b.recover_runs(rerun_flows=["f"], orphaned=True) == []
            await a.create_runs([other := run_request("f")])
            (claimed,) = await a.claim_runs(limit=1)
            assert claimed.run_id == other.run_id
            clock.advance(31)  # no renewal since: both of a's active runs are out
            recovered = await b.recover_runs(rerun_flows=["f"], orphaned=True)
            assert sorted((r.run_id, r.status, r.interrupted) for r in recovered) == sorted(
                [(lost.run_id, "new", 1), (other.run_id, "new", 1)])
            assert await b.recover_runs(rerun_flows=["f"], orphaned=True) == []
            taken = {r.run_id for r in await b.claim_runs(limit=10)}
            assert taken == {lost.run_id, other.run_id}
            await a.finish_run(lost.run_id, status="error", error="late")  # b's run now
            got = await b.get_run(lost.run_id)
            assert got is not None and got[0].status == "active"
            await b.finish_run(lost.run_id, status="done")
            got = await a.get_run(lost.run_id)
            assert got is not None and got[0].status == "done"

    async def test_output_is_size_capped(self, opener: Opener) -> None:
        req = run_request()
        big = {"blob": "x" * (OUTPUT_CAP + 10)}
        async with opener() as store:
            await store.create_runs([req])
            await store.claim_runs(limit=1)
            await store.record_task(TaskRunRecord(run_id=req.run_id, task_id="t", state="done",
                                                  output=big))
            await store.record_task(TaskRunRecord(run_id=req.run_id, task_id="small",
                                                  state="done", output={"v": "x" * 1000}))
            got = await store.get_run(req.run_id)
        assert got is not None
        out = got[1][0].output
        assert out is not None and out["_truncated"] is True and out["size"] > OUTPUT_CAP
        assert got[1][1].output == {"v": "x" * 1000}


class TestSessions:
    """Chat sessions: one active per key, decided in one transaction; TTL; eviction."""

    async def test_open_creates_once_then_continues(self, opener: Opener,
                                                    clock: FakeClock) -> None:
        async with opener() as store:
            first = await store.open_session("alice", thread_id="thread_a", ttl=60,
                                             max_active=10, metadata={"flow": "f"})
            assert first.created and first.closed == []
            assert first.session.thread_id == "thread_a" and first.session.turns == 0
            assert first.session.metadata == {"flow": "f"}
            clock.advance(30)
            again = await store.open_session("alice", thread_id="thread_other", ttl=60,
                                             max_active=10)
            assert not again.created
            assert again.session.session_id == first.session.session_id
            assert again.session.thread_id == "thread_a"

    async def test_racing_opens_of_a_new_key_share_one_session(self, opener: Opener) -> None:
        """Ten opens of one new key at once: one session, one thread, one 'created'."""
        results: list[Any] = []

        async def open_one(i: int) -> None:
            results.append(await store.open_session("carol", thread_id=f"thread_{i}", ttl=60,
                                                    max_active=100))

        async with opener() as store:
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(open_one, i)
            assert sum(r.created for r in results) == 1
            assert len({r.session.session_id for r in results}) == 1
            assert len({r.session.thread_id for r in results}) == 1
            assert await store.count_sessions() == 1

    async def test_ttl_expiry_starts_a_new_session(self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            old = (await store.open_session("bob", thread_id="t1", ttl=60, max_active=10)).session
            turned = await store.record_turn(old.session_id, thread_id="t1",
                                             messages=[{"role": "user", "content": "hi"}])
            assert turned is not None and turned.turns == 1
            clock.advance(59)
            assert not (await store.open_session("bob", thread_id="t2", ttl=60,
                                                 max_active=10)).created
            clock.advance(60)  # 60 s after the last activity
            fresh = await store.open_session("bob", thread_id="t2", ttl=60, max_active=10)
            assert fresh.created and fresh.session.thread_id == "t2"
            assert [(s.session_id, s.close_reason) for s in fresh.closed] == [
                (old.session_id, "expired")]
            latest = await store.get_session("bob")
            assert latest is not None and latest.session_id == fresh.session.session_id
            closed = await store.list_sessions(status="closed")
            assert [s.turns for s in closed] == [1] and closed[0].closed_at == clock()

    async def test_max_active_evicts_the_longest_idle(self, opener: Opener,
                                                      clock: FakeClock) -> None:
        async with opener() as store:
            for key in ("k1", "k2", "k3"):
                await store.open_session(key, thread_id=f"t-{key}", ttl=3600, max_active=3)
                clock.advance(1)
            await store.record_turn((await store.get_session("k1")).session_id,  # type: ignore[union-attr]
                                    thread_id="t-k1")
            opened = await store.open_session("k4", thread_id="t-k4", ttl=3600, max_active=3)
            assert [(s.key, s.close_reason) for s in opened.closed] == [("k2", "evicted")]
            assert await store.count_sessions() == 3
            active = {s.key for s in await store.list_sessions(status="active")}
            assert active == {"k1", "k3", "k4"}

    async def test_record_turn_keeps_recent_context_and_follows_the_thread(
            self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            s = (await store.open_session("dan", thread_id="t1", ttl=60, max_active=5)).session
            for i in range(4):
                clock.advance(1)
                rec = await store.record_turn(
                    s.session_id, thread_id="t-server" if i == 3 else "t1",
                    messages=[{"role": "user", "content": f"q{i}"},
                              {"role": "assistant", "content": f"a{i}"}],
                    context_limit=3, metadata={"last_run": f"r{i}"})
            assert rec is not None
            assert rec.turns == 4 and rec.thread_id == "t-server"
            assert [m["content"] for m in rec.context] == ["a2", "q3", "a3"]
            assert rec.metadata == {"last_run": "r3"} and rec.last_activity == clock()
            assert await store.record_turn("no-such-session", thread_id="x") is None

    async def test_close_and_expire(self, opener: Opener, clock: FakeClock) -> None:
        async with opener() as store:
            await store.open_session("a", thread_id="ta", ttl=60, max_active=5)
            await store.open_session("b", thread_id="tb", ttl=60, max_active=5)
            closed = await store.close_session("a")
            assert closed is not None and closed.close_reason == "closed"
            assert await store.close_session("a") is None
            assert await store.expire_sessions(ttl=60) == []
            clock.advance(60)
            expired = await store.expire_sessions(ttl=60)
            assert [(s.key, s.close_reason) for s in expired] == [("b", "expired")]
            assert await store.count_sessions() == 0
            assert await store.get_session("nobody") is None
            assert [s.key for s in await store.list_sessions(limit=1)] == ["b"]

    async def test_closed_sessions_are_pruned_in_chunks_after_retention(
            self, opener: Opener, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
        """prune_sessions deletes the sessions closed before the cutoff (by expiry, eviction
        or close), in chunks; sessions closed later, and active ones however idle, stay."""
        from mfo_actors.store import _pg_sessions, _sqlite_sessions, _tables

        for module in (_tables, _pg_sessions, _sqlite_sessions):
            monkeypatch.setattr(module, "PRUNE_CHUNK", 2)  # 5 old sessions: 3 chunks
        async with opener() as store:
            for key in ("e1", "e2", "e3"):
                await store.open_session(key, thread_id=f"t-{key}", ttl=60, max_active=100)
            await store.open_session("c1", thread_id="t-c1", ttl=60, max_active=100)
            await store.close_session("c1")
            await store.open_session("v1", thread_id="t-v1", ttl=60, max_active=1)  # evicts
            clock.advance(60)
            expired = await store.expire_sessions(ttl=60)
            assert {s.key for s in expired} == {"v1"}  # e1..e3 were evicted by v1's open
            await store.open_session("recent", thread_id="t-r", ttl=60, max_active=100)
            clock.advance(100)
            await store.close_session("recent")  # closed 0 s ago
            await store.open_session("idle", thread_id="t-i", ttl=10**6, max_active=100)
            clock.advance(10)
            assert await store.prune_sessions(closed_older_than=20) == 5
            assert await store.prune_sessions(closed_older_than=20) == 0
            left = {(s.key, s.status) for s in await store.list_sessions()}
            assert left == {("recent", "closed"), ("idle", "active")}
            clock.advance(10**5)
            assert await store.prune_sessions(closed_older_than=20) == 1
            assert [s.key for s in await store.list_sessions()] == ["idle"]

    async def test_sessions_survive_a_reopen(self, opener: Opener) -> None:
        async with opener() as store:
            first = await store.open_session("eve", thread_id="t-eve", ttl=60, max_active=5)
        async with opener() as store:
            again = await store.open_session("eve", thread_id="t-new", ttl=60, max_active=5)
            assert not again.created
            assert again.session.session_id == first.session.session_id
