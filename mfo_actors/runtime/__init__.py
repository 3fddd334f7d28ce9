"""The actor runtime: typed channels, broadcast, watch, actor protocol, supervisor, clock.

Knows nothing of MFO or webhooks; everything above builds on these few names.
"""

from ._actor import Actor as Actor
from ._actor import ActorStatus as ActorStatus
from ._actor import ReadySignal as ReadySignal
from ._actor import RestartPolicy as RestartPolicy
from ._broadcast import Broadcast as Broadcast
from ._channel import ChannelReceiver as ChannelReceiver
from ._channel import ChannelSender as ChannelSender
from ._channel import open_channel as open_channel
from ._clock import Clock as Clock
from ._clock import FakeClock as FakeClock
from ._clock import SystemClock as SystemClock
from ._debug import set_debug as set_debug
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorGaveUp as SupervisorGaveUp
from ._watch import Watch as Watch
from ._watch import wait_any as wait_any

__all__ = [
    "Actor",
    "ActorStatus",
    "Broadcast",
    "ChannelReceiver",
    "ChannelSender",
    "Clock",
    "FakeClock",
    "ReadySignal",
    "RestartPolicy",
    "Supervisor",
    "SupervisorGaveUp",
    "SystemClock",
    "Watch",
    "open_channel",
    "set_debug",
    "wait_any",
]
