"""The breaker actor: owns the upstream's protections (its circuit breaker and the rate limit
``client.rate_limit``) and publishes the breaker's state.

The state machine is the library's :class:`~mfo_actors.client.CircuitBreaker` (one
implementation), held privately here. Around it:

* :attr:`BreakerActor.states` is a watch (latest value) of :class:`BreakerState`: the
  daemon's gate, the forwarder, the scheduler and ``/readyz`` read it without awaiting, and
  wait on it (its version also moves when only the in-flight window changed, so a sender
  waiting for a slot wakes);
* :attr:`BreakerActor.outcomes` takes one :class:`DeliveryOutcome` per attempt, sent by the
  gate's admission when the attempt settles; the actor records them in arrival order.

Admission (:meth:`BreakerActor.admit`) is the one synchronous call into the actor: taking a
probe or in-flight slot has to be decided at once, so two senders cannot both take the last
one. Only the gate calls it (``mfo_actors.actors.UpstreamGate``), and :meth:`pace` for the
rate limit. A reload changes both (``client.circuit_breaker``, ``client.rate_limit``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.actors._stop import cancel_on
from mfo_actors.client import TokenBucket, breaker_from_config, rate_limiter_from_config
from mfo_actors.messages import BreakerState, DeliveryOutcome
from mfo_actors.observability import get_logger
from mfo_actors.runtime import RestartPolicy, Watch, open_channel

if TYPE_CHECKING:
    from mfo_actors.config import InstanceConfig
    from mfo_actors.runtime import ChannelSender, Clock, ReadySignal

__all__ = ["OUTCOMES_CHANNEL_SIZE", "BreakerActor"]

log = get_logger(__name__)

OUTCOMES_CHANNEL_SIZE = 256  # outcomes are tiny; a full buffer slows the reporter, as it should


class BreakerActor:
    """Owns the circuit breaker of ``cfg.client.base_url``.

    Args:
      cfg: ``client.circuit_breaker`` (thresholds), ``client.base_url`` (the upstream name),
        ``instance`` (metric label).
      upstream: Name of the upstream; default ``cfg.client.base_url``.
      clock: Time source for the breaker (a ``FakeClock`` in tests).

    Attributes:
      states: ``Watch[BreakerState]``: the current state.
      outcomes: Sender of :class:`DeliveryOutcome`, one per attempt that got through.
    """

    name = "breaker"
    restart = RestartPolicy("permanent")

    def __init__(
        self, cfg: InstanceConfig, *, upstream: str | None = None, clock: Clock | None = None
    ) -> None:
        self._breaker = breaker_from_config(cfg, clock=clock, upstream=upstream,
                                            on_change=self._publish)
        self._clock = clock
        self._rate = cfg.client.rate_limit
        self._limiter: TokenBucket | None = rate_limiter_from_config(cfg.client, clock=clock)
        self.states: Watch[BreakerState] = Watch(BreakerState, self._breaker.snapshot())
        self.outcomes: ChannelSender[DeliveryOutcome]
        self.outcomes, self._inbox = open_channel(DeliveryOutcome, OUTCOMES_CHANNEL_SIZE)
        self._stop = anyio.Event()

    @property
    def upstream(self) -> str:
        return self._breaker.upstream

    # -- admission (the gate's synchronous calls) ----------------------------------------

    def admit(self) -> None:
        """Take a slot for one attempt.

        Raises:
          CircuitBreakerError: open, or every half-open probe slot is taken.
        """
        self._breaker.before_call()

    def give_back(self) -> None:
        """An admitted attempt ended without an outcome (cancelled): free its slot."""
        self._breaker.release()
        self.states.touch()

    def allowance(self) -> int | None:
        """Attempts that would be admitted now (None: no limit)."""
        return self._breaker.allowance()

    def retry_in(self) -> float:
        """Seconds until an attempt may be admitted (0: now, or when a slot frees)."""
        return self._breaker.retry_in()

    async def pace(self) -> None:
        """Wait for the rate limit (one request), if one is configured."""
        limiter = self._limiter
        if limiter is not None:
            await limiter.acquire()

    # -- the actor -----------------------------------------------------------------------

    def _publish(self, state: BreakerState) -> None:
        self.states.publish(state)

    def health(self) -> dict[str, object]:
        """For ``/readyz``: the breaker's state (an open breaker does not make us unready)."""
        snap = self.states.value
        return {"ok": True, "upstream": snap.upstream, "state": snap.state,
                "retry_in": round(self._breaker.retry_in(), 3)}

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """New thresholds (``client.circuit_breaker``), applied from the next outcome on (the
        current state is kept), and a new rate limit (``client.rate_limit``) for the next
        requests (callers already waiting on the old one finish there)."""
        cfg = update.cfg.client.circuit_breaker
        rate = update.cfg.client.rate_limit
        limiter = (self._limiter if rate == self._rate
                   else rate_limiter_from_config(update.cfg.client, clock=self._clock))

        def apply() -> None:
            self._breaker.reconfigure(cfg)
            self._rate, self._limiter = rate, limiter
            self.states.touch()

        return apply

    async def run(self, ready: ReadySignal) -> None:
        """Record reported outcomes until asked to stop."""
        ready.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
                async for outcome in self._inbox:
                    if outcome.upstream != self._breaker.upstream:
                        log.warning("breaker.outcome_for_other_upstream",
                                    upstream=outcome.upstream)
                        continue
                    self._breaker.record(ok=outcome.ok, failure=outcome.failure,
                                         status=outcome.status)
                    self.states.touch()  # the in-flight window moved
                tg.cancel_scope.cancel()  # every sender closed: nothing more will come
        finally:
            if self._stop.is_set():  # a graceful stop, not a crash to restart from
                self.close()

    def request_stop(self) -> None:
        """Stop consuming outcomes (recording them takes no time: nothing to drain)."""
        self._stop.set()

    def close(self) -> None:
        """Close the outcomes channel, both ends: for the owner, once the actor will not run
        again (a graceful stop closes it too; a crash keeps it for the restart)."""
        self.outcomes.close()
        self._inbox.close()
