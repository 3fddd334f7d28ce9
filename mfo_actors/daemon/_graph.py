"""The instance's message graph, declared in one place: which actor sends what to whom, over
what kind of channel, with what bound.

Three kinds of channel carry the messages of ``mfo_actors/messages.py``:

* ``mailbox``: the durable store, between listener, forwarder and scheduler (it survives
  kill -9; bounded by ``store.max_pending``, past which the listener answers 503);
* ``channel``: a bounded in-memory queue of messages that must each be handled (a full one
  slows its producer);
* ``watch``: a latest-value channel holding state its owner publishes; readers read it
  without awaiting and never see a backlog.

:func:`declare_channels` is what ``mfo-actors check --graph`` and ``run --print-graph`` print
(as Mermaid, :func:`mermaid`), and what :func:`~mfo_actors.daemon._wiring.open_instance`
checks the actors it built against: each in-memory channel an actor opened must have the
declared message type and bound, so this page cannot drift from the running daemon.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mfo_actors.actors.auth import REJECTIONS_CHANNEL_SIZE
from mfo_actors.actors.breaker import OUTCOMES_CHANNEL_SIZE
from mfo_actors.config import InstanceConfig
from mfo_actors.messages import BreakerState, DeliveryOutcome, Event, TokenIssued, TokenRejected
from mfo_actors.runtime import ChannelSender, Watch
from mfo_actors.store import RunRequest

__all__ = ["ChannelDecl", "check_channels", "declare_channels", "graph_text", "mermaid"]

ChannelKind = Literal["mailbox", "channel", "watch"]


@dataclass(frozen=True, slots=True)
class ChannelDecl:
    """One declared channel of the instance."""

    name: str
    message: type
    kind: ChannelKind
    bound: int | None
    """Messages it holds at most (None for a watch: only the latest)."""
    producers: tuple[str, ...]
    consumers: tuple[str, ...]

    @property
    def bound_text(self) -> str:
        if self.kind == "watch":
            return "latest value"
        if self.kind == "mailbox":
            return "durable" if self.bound is None else f"durable, {self.bound} pending"
        return f"bound {self.bound}"


def declare_channels(cfg: InstanceConfig) -> list[ChannelDecl]:
    """The channels of an instance built from *cfg* (disabled actors left out)."""
    listener = ["listener"] if cfg.webhook_listener.enabled else []
    forwarder = ["forwarder"] if cfg.forwarder.enabled else []
    scheduler = ["scheduler"] if cfg.flows.enabled else []
    # Who calls the MFO server through the gate: the forwarder, and flow tasks.
    callers = tuple(forwarder + scheduler)
    return [
        ChannelDecl("events", Event, "mailbox", cfg.store.max_pending,
                    producers=tuple(listener), consumers=tuple(forwarder)),
        ChannelDecl("runs", RunRequest, "mailbox", None,
                    producers=tuple(listener + scheduler), consumers=tuple(scheduler)),
        ChannelDecl("outcomes", DeliveryOutcome, "channel", OUTCOMES_CHANNEL_SIZE,
                    producers=callers, consumers=("breaker",)),
        ChannelDecl("breaker_state", BreakerState, "watch", None,
                    producers=("breaker",), consumers=callers),
        ChannelDecl("token", TokenIssued, "watch", None,
                    producers=("auth",), consumers=callers),
        ChannelDecl("token_rejections", TokenRejected, "channel", REJECTIONS_CHANNEL_SIZE,
                    producers=callers, consumers=("auth",)),
    ]


def check_channels(declared: list[ChannelDecl], opened: Mapping[str, Any]) -> None:
    """Raise ``RuntimeError`` if a channel an actor opened differs from its declaration.

    Args:
      opened: Channel name -> the sender (``ChannelSender``) or ``Watch`` the actor holds.
    """
    by_name = {decl.name: decl for decl in declared}
    for name, channel in opened.items():
        decl = by_name.get(name)
        if decl is None:
            raise RuntimeError(f"channel {name!r} is not declared in daemon/_graph.py")
        if isinstance(channel, Watch):
            kind: ChannelKind = "watch"
            bound = None
        elif isinstance(channel, ChannelSender):
            kind = "channel"
            bound = int(channel.statistics().max_buffer_size)
        else:
            raise RuntimeError(f"channel {name!r}: not a channel: {type(channel).__name__}")
        actual = (kind, _named(channel.message_type), bound)
        expected = (decl.kind, decl.message, decl.bound)
        if actual != expected:
            raise RuntimeError(f"channel {name!r} is {actual}, declared {expected}")


def _named(message_type: Any) -> Any:
    """The message type of ``T | None`` (a watch that may hold no value yet) is ``T``."""
    args = [a for a in typing.get_args(message_type) if a is not type(None)]
    return args[0] if len(args) == 1 else message_type


def mermaid(channels: list[ChannelDecl], actors: list[str]) -> str:
    """The graph as a Mermaid flowchart: actors as boxes, channels as labelled nodes
    (message type and bound), a dotted arrow where a watch is read."""
    lines = ["flowchart LR"]
    for actor in actors:
        lines.append(f"    {actor}[{actor}]")
    for ch in channels:
        label = f"{ch.name}<br/>{ch.message.__name__}<br/>{ch.kind}, {ch.bound_text}"
        shape = f'[("{label}")]' if ch.kind == "mailbox" else f'{{{{"{label}"}}}}'
        lines.append(f"    ch_{ch.name}{shape}")
    for ch in channels:
        arrow_in, arrow_out = ("-->", "-.->") if ch.kind == "watch" else ("-->", "-->")
        for producer in ch.producers:
            lines.append(f"    {producer} {arrow_in} ch_{ch.name}")
        for consumer in ch.consumers:
            lines.append(f"    ch_{ch.name} {arrow_out} {consumer}")
    return "\n".join(lines) + "\n"


def graph_text(cfg: InstanceConfig) -> str:
    """The Mermaid graph of the instance *cfg* describes (``check --graph``)."""
    channels = declare_channels(cfg)
    actors: list[str] = []
    for ch in channels:
        for name in (*ch.producers, *ch.consumers):
            if name not in actors:
                actors.append(name)
    return mermaid(channels, actors)
