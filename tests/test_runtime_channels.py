"""Typed bounded channels and the drop-oldest broadcast (mfo_actors.runtime)."""

from __future__ import annotations

from contextlib import closing
from typing import Any

import anyio
import msgspec
import pytest

from mfo_actors.runtime import Broadcast, ChannelReceiver, open_channel, set_debug

pytestmark = pytest.mark.anyio


class Ping(msgspec.Struct, frozen=True):
    n: int


class Pong(msgspec.Struct, frozen=True):
    n: int


class TestOpenChannel:
    """Every test closes each end (and clone) it opens: an unclosed memory stream is a leak."""

    async def test_messages_arrive_in_order(self) -> None:
        """What is sent comes out in the same order, and iteration ends when senders close."""
        send, recv = open_channel(Ping, 4)
        with recv:
            async with send:
                for i in range(3):
                    await send.send(Ping(i))
            got = [m.n async for m in recv]
        assert got == [0, 1, 2]

    async def test_full_channel_blocks_sender(self) -> None:
        """A full buffer makes send wait and send_nowait raise WouldBlock."""
        send, recv = open_channel(Ping, 2)
        with send, recv:
            send.send_nowait(Ping(1))
            send.send_nowait(Ping(2))
            with pytest.raises(anyio.WouldBlock):
                send.send_nowait(Ping(3))
            with anyio.move_on_after(0.05) as scope:
                await send.send(Ping(3))
            assert scope.cancelled_caught, "send returned although the buffer was full"
            assert send.statistics().current_buffer_used == 2
            assert recv.receive_nowait() == Ping(1)
            send.send_nowait(Ping(3))  # room again
            assert [recv.receive_nowait().n for _ in range(2)] == [2, 3]

    async def test_blocked_sender_resumes_when_receiver_takes(self) -> None:
        """Backpressure releases as soon as the consumer takes a message."""
        send, recv = open_channel(Ping, 1)
        sent = anyio.Event()

        async def producer() -> None:
            await send.send(Ping(2))
            sent.set()

        with send, recv:
            send.send_nowait(Ping(1))
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer)
                with anyio.fail_after(5):
                    while send.statistics().tasks_waiting_send == 0:
                        await anyio.lowlevel.checkpoint()
                assert not sent.is_set()
                assert await recv.receive() == Ping(1)
                with anyio.fail_after(5):
                    await sent.wait()
            assert recv.receive_nowait() == Ping(2)

    async def test_rendezvous_channel_has_no_buffer(self) -> None:
        """Size 0: send_nowait fails unless a receiver is already waiting."""
        send, recv = open_channel(Ping, 0)
        result: list[Ping] = []

        async def consumer() -> None:
            result.append(await recv.receive())

        with send, recv:
            with pytest.raises(anyio.WouldBlock):
                send.send_nowait(Ping(1))
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer)
                with anyio.fail_after(5):
                    while send.statistics().tasks_waiting_receive == 0:
                        await anyio.lowlevel.checkpoint()
                send.send_nowait(Ping(7))
        assert result == [Ping(7)]

    async def test_negative_size_is_refused(self) -> None:
        """Unbounded buffers are not offered."""
        with pytest.raises(ValueError, match="size"):
            open_channel(Ping, -1)

    async def test_debug_mode_refuses_wrong_type(self) -> None:
        """In debug mode the sender refuses a message of another type, naming both types."""
        send, recv = open_channel(Ping, 1)
        with send, recv:
            with pytest.raises(TypeError, match=r"Ping.*Pong"):
                await send.send(Pong(1))  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"Ping.*Pong"):
                send.send_nowait(Pong(1))  # type: ignore[arg-type]
            assert send.statistics().current_buffer_used == 0
            with send.clone() as clone, pytest.raises(TypeError):
                clone.send_nowait(Pong(1))  # type: ignore[arg-type]

    async def test_without_debug_mode_no_check(self) -> None:
        """With debug off the check is skipped entirely (no per-message cost)."""
        previous = set_debug(False)
        try:
            send, recv = open_channel(Ping, 1)
        finally:
            set_debug(previous)
        with send, recv:
            send.send_nowait(Pong(1))  # type: ignore[arg-type]
            assert recv.receive_nowait() == Pong(1)  # type: ignore[comparison-overlap]

    async def test_union_and_generic_types_are_checked(self) -> None:
        """Union and parametrised types are checked by what isinstance can see."""
        optional: Any = Ping | None  # a type expression, not a class (mypy's type[T] says no)
        send, recv = open_channel(optional, 2)
        with send, recv:
            send.send_nowait(None)
            with pytest.raises(TypeError):
                send.send_nowait(Pong(1))
        parametrised: Any = list[int]
        lsend, lrecv = open_channel(parametrised, 1)
        with lsend, lrecv:
            lsend.send_nowait([1])
            with pytest.raises(TypeError):
                lsend.send_nowait((1,))

    async def test_closing_last_receiver_breaks_senders(self) -> None:
        """Senders learn right away that nobody will read."""
        send, recv = open_channel(Ping, 1)
        with send:
            clone = recv.clone()
            await recv.aclose()
            send.send_nowait(Ping(1))  # the clone still reads
            clone.close()
            with pytest.raises(anyio.BrokenResourceError):
                await send.send(Ping(2))

    async def test_closed_senders_end_stream(self) -> None:
        """receive raises EndOfStream once every sender clone is closed and buffer drained."""
        send, recv = open_channel(Ping, 1)
        with recv:
            other = send.clone()
            send.send_nowait(Ping(1))
            send.close()
            assert await recv.receive() == Ping(1)
            await other.aclose()
            with pytest.raises(anyio.EndOfStream):
                await recv.receive()


class TestBroadcast:
    """Every test closes the broadcast and each subscription it opens."""

    async def test_every_subscriber_gets_every_value(self) -> None:
        """Fan-out: each subscriber sees each published value."""
        hub = Broadcast(Ping)
        with hub.subscribe() as a, hub.subscribe() as b:
            for i in range(3):
                hub.publish_nowait(Ping(i))
            await hub.aclose()
            assert [m.n async for m in a] == [0, 1, 2]
            assert [m.n async for m in b] == [0, 1, 2]

    async def test_full_subscriber_keeps_latest(self) -> None:
        """A lagging subscriber keeps only the newest `size` values; the publisher never waits."""
        with closing(Broadcast(Ping)) as hub, hub.subscribe(size=2) as slow, \
                hub.subscribe(size=100) as fast:
            for i in range(10):
                hub.publish_nowait(Ping(i))  # would raise WouldBlock if it had to wait
            assert [slow.receive_nowait().n for _ in range(2)] == [8, 9]
            with pytest.raises(anyio.WouldBlock):
                slow.receive_nowait()
            assert [fast.receive_nowait().n for _ in range(10)] == list(range(10))

    async def test_latest_for_late_subscribers(self) -> None:
        """latest is None before the first publish, then the last value published."""
        hub: Broadcast[Ping] = Broadcast()
        with closing(hub):
            assert hub.latest is None
            hub.publish_nowait(Ping(1))
            hub.publish_nowait(Ping(2))
            assert hub.latest == Ping(2)
            with hub.subscribe() as late:
                with pytest.raises(anyio.WouldBlock):
                    late.receive_nowait()  # only values published after subscribing
                hub.publish_nowait(Ping(3))
                assert late.receive_nowait() == Ping(3)

    async def test_waiting_subscriber_is_woken(self) -> None:
        """A subscriber blocked in receive gets the value directly."""
        hub = Broadcast(Ping)
        got: list[Ping] = []

        async def reader(r: ChannelReceiver[Ping]) -> None:
            async for m in r:
                got.append(m)

        with hub.subscribe(size=1) as sub:
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader, sub)
                with anyio.fail_after(5):
                    while sub.statistics().tasks_waiting_receive == 0:
                        await anyio.lowlevel.checkpoint()
                hub.publish_nowait(Ping(1))
                hub.close()
        assert got == [Ping(1)]

    async def test_closed_subscriber_is_forgotten(self) -> None:
        """A subscriber that closed its receiver stops costing the publisher anything."""
        with closing(Broadcast(Ping)) as hub, hub.subscribe() as keep:
            sub = hub.subscribe()
            assert hub.subscribers == 2
            await sub.aclose()
            hub.publish_nowait(Ping(1))
            assert hub.subscribers == 1
            assert keep.receive_nowait() == Ping(1)

    async def test_closed_broadcast(self) -> None:
        """After close, publish raises and a new subscription is already ended."""
        hub = Broadcast(Ping)
        await hub.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            hub.publish_nowait(Ping(1))
        with hub.subscribe() as late, pytest.raises(anyio.EndOfStream):
            await late.receive()

    async def test_debug_mode_refuses_wrong_type(self) -> None:
        """Broadcast checks its declared type in debug mode too."""
        hub = Broadcast(Ping)
        with pytest.raises(TypeError, match=r"Ping.*Pong"):
            hub.publish_nowait(Pong(1))  # type: ignore[arg-type]
        assert hub.latest is None

    async def test_subscriber_size_must_be_positive(self) -> None:
        """Drop-oldest needs at least one slot."""
        with pytest.raises(ValueError):
            Broadcast(Ping).subscribe(size=0)
