"""The breaker actor: owns the upstream's circuit breaker and tells everyone when it changes.

Design (one path for outcomes, no lag): the :class:`CircuitBreaker` is a synchronous state
machine shared by reference. Every upstream call goes through the one ``BaseClient`` built
with ``breaker=actor.breaker``, and the client calls ``before_call()`` before and ``record()``
after each attempt, in the caller's task. So the state is never behind the outcomes, and a
library caller gets :class:`~mfo_actors.client.errors.CircuitBreakerError` at once while the
breaker is open: nothing waits on a channel to find out.

What the actor adds:

* it publishes every state change as a :class:`BreakerState` on :attr:`states` (a
  ``Broadcast``: the breaker never waits for a slow subscriber; a subscriber that lags sees
  the newest state). The forwarder and the scheduler subscribe, or read ``states.latest``.
* :attr:`outcomes` takes :class:`DeliveryOutcome` messages for calls made *without* a client
  that holds this breaker (a custom HTTP task, another process's report). Do not send the
  outcome of a call that went through such a client: it was recorded already, and a second
  record would count the failure twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from mfo_actors.actors._stop import cancel_on
from mfo_actors.client._breaker import CircuitBreaker
from mfo_actors.client._policy import breaker_from_config
from mfo_actors.messages import BreakerState, DeliveryOutcome
from mfo_actors.observability import get_logger
from mfo_actors.runtime import Broadcast, RestartPolicy, open_channel

if TYPE_CHECKING:
    from mfo_actors.config import InstanceConfig
    from mfo_actors.runtime import ChannelSender, Clock, ReadySignal

__all__ = ["OUTCOMES_CHANNEL_SIZE", "BreakerActor"]

log = get_logger(__name__)

OUTCOMES_CHANNEL_SIZE = 256  # outcomes are tiny; a full buffer slows the reporter, as it should


class BreakerActor:
    """Owns the :class:`CircuitBreaker` of ``cfg.client.base_url``.

    Args:
      cfg: ``client.circuit_breaker`` (thresholds), ``client.base_url`` (the upstream name),
        ``instance`` (metric label).
      upstream: Name of the upstream; default ``cfg.client.base_url``.
      clock: Time source for the breaker (a ``FakeClock`` in tests).

    Attributes:
      breaker: Give it to the client (``MFOClient.from_config(cfg, breaker=actor.breaker)``)
        and to the forwarder.
      states: ``Broadcast[BreakerState]``; ``states.latest`` is the current state.
      outcomes: Sender of :class:`DeliveryOutcome` for calls the breaker did not see.
    """

    name = "breaker"
    restart = RestartPolicy("permanent")

    def __init__(
        self, cfg: InstanceConfig, *, upstream: str | None = None, clock: Clock | None = None
    ) -> None:
        self.states: Broadcast[BreakerState] = Broadcast(BreakerState)
        self.breaker: CircuitBreaker = breaker_from_config(cfg, clock=clock, upstream=upstream,
                                                           on_change=self._publish)
        # The initial state, so a subscriber that reads `latest` before any change has one.
        self.states.publish_nowait(self.breaker.snapshot())
        self.outcomes: ChannelSender[DeliveryOutcome]
        self.outcomes, self._inbox = open_channel(DeliveryOutcome, OUTCOMES_CHANNEL_SIZE)
        self._stop = anyio.Event()

    def _publish(self, state: BreakerState) -> None:
        try:
            self.states.publish_nowait(state)
        except anyio.ClosedResourceError:
            pass  # shutting down: nobody is listening any more

    def health(self) -> dict[str, object]:
        """For ``/readyz``: the breaker's state (an open breaker does not make us unready)."""
        snap = self.breaker.snapshot()
        return {"ok": True, "upstream": snap.upstream, "state": snap.state,
                "retry_in": round(self.breaker.retry_in(), 3)}

    async def run(self, ready: ReadySignal) -> None:
        """Feed reported outcomes to the breaker until asked to stop."""
        ready.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
                async for outcome in self._inbox:
                    if outcome.upstream != self.breaker.upstream:
                        log.warning("breaker.outcome_for_other_upstream",
                                    upstream=outcome.upstream)
                        continue
                    self.breaker.record(ok=outcome.ok, failure=outcome.failure,
                                        status=outcome.status)
                tg.cancel_scope.cancel()  # every sender closed: nothing more will come
        finally:
            if self._stop.is_set():  # a graceful stop, not a crash to restart from
                self.outcomes.close()
                self._inbox.close()
                self.states.close()

    def request_stop(self) -> None:
        """Stop consuming outcomes (recording them takes no time: nothing to drain)."""
        self._stop.set()
