"""The daemon's gate to the MFO server: admission from the breaker and auth actors' state.

One object answers "may I send now?" for every caller of the upstream (the forwarder's
workers and the flows' client alike): the breaker actor's slot (:meth:`BreakerActor.admit`),
a token read from the auth actor's watch without awaiting (waiting, bounded, only when there
is none), and the rate limit. Each admitted attempt reports its one outcome back to the
breaker actor as a :class:`DeliveryOutcome` message, and a 401 goes to the auth actor as a
:class:`TokenRejected` message; neither actor's state is touched from here otherwise.

:meth:`UpstreamGate.waiting` is the same gate for callers that would rather wait for the
breaker than be refused (flow tasks: their task timeout bounds the wait, so an outage does not
burn their retries); the forwarder uses the refusing one and decides itself how long to hold
an event.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import anyio

from mfo_actors.actors.auth import TokenUnavailableError
from mfo_actors.client import CircuitBreakerError, bare_token
from mfo_actors.messages import DeliveryOutcome, TokenRejected
from mfo_actors.runtime import SystemClock, wait_any

if TYPE_CHECKING:
    from mfo_actors.actors.auth import AuthRefresherActor
    from mfo_actors.actors.breaker import BreakerActor
    from mfo_actors.runtime import Clock

__all__ = ["UpstreamGate"]


class _Admission:
    __slots__ = ("_gate", "_header", "_open", "_started")

    def __init__(self, gate: UpstreamGate, header: str | None, started: float) -> None:
        self._gate = gate
        self._header = header
        self._started = started
        self._open = True

    @property
    def header(self) -> str | None:
        return self._header

    async def reauth(self) -> str | None:
        gate = self._gate
        new = await gate.replace_token(self._header)
        if new is None:
            return None
        self._header = new
        await gate.breaker.pace()
        return new

    async def settle(self, *, ok: bool, failure: bool, status: int | None) -> None:
        if not self._open:
            return
        self._open = False
        breaker = self._gate.breaker
        outcome = DeliveryOutcome(
            upstream=breaker.upstream, ok=ok, failure=failure, status=status,
            latency_s=max(0.0, self._gate.clock.monotonic() - self._started))
        try:
            await breaker.outcomes.send(outcome)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the breaker actor stopped (shutting down): nobody counts any more

    def abandon(self) -> None:
        if self._open:
            self._open = False
            self._gate.breaker.give_back()


class UpstreamGate:
    """Admission to the MFO server for the whole daemon (the client's ``Gate``).

    Args:
      breaker: The breaker actor (slots, state watch, outcomes inbox, rate limit).
      auth: The auth actor (token watch, rejections inbox, how long to wait for a token).
      clock: Time for waits (a ``FakeClock`` in tests).
      wait_for_breaker: Wait for a slot instead of raising ``CircuitBreakerError``.
    """

    def __init__(self, breaker: BreakerActor, auth: AuthRefresherActor, *,
                 clock: Clock | None = None, wait_for_breaker: bool = False) -> None:
        self.breaker = breaker
        self.auth = auth
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._wait_for_breaker = wait_for_breaker

    def __repr__(self) -> str:
        return (f"UpstreamGate({self.breaker.upstream!r}, auth={self.auth.mode!r}, "
                f"wait_for_breaker={self._wait_for_breaker})")

    def waiting(self) -> UpstreamGate:
        """This gate, but an admission waits for the breaker instead of being refused."""
        return UpstreamGate(self.breaker, self.auth, clock=self.clock, wait_for_breaker=True)

    # -- the Gate protocol ---------------------------------------------------------------

    async def admit(self) -> _Admission:
        header = await self.header()
        while True:
            try:
                self.breaker.admit()
                break
            except CircuitBreakerError:
                if not self._wait_for_breaker:
                    raise
            await self.wait_ready()
        admission = _Admission(self, header, self.clock.monotonic())
        try:
            await self.breaker.pace()
        except BaseException:
            admission.abandon()
            raise
        return admission

    def allowance(self) -> int | None:
        return self.breaker.allowance()

    async def wait_ready(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109
        deadline = self.clock.monotonic() + timeout
        states, tokens = self.breaker.states, self.auth.tokens
        while True:
            seen_state, seen_token = states.version, tokens.version
            allowed = self.breaker.allowance()
            breaker_ok = allowed is None or allowed > 0
            if breaker_ok and self._has_token():
                return True
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return False
            delay = remaining
            if not breaker_ok and self.breaker.retry_in() > 0:
                delay = min(delay, self.breaker.retry_in())
            await wait_any(self.clock, delay,
                           functools.partial(states.wait_changed, seen_state),
                           functools.partial(tokens.wait_changed, seen_token))

    # -- tokens ----------------------------------------------------------------------------

    def _has_token(self) -> bool:
        return self.auth.mode != "login" or self.auth.tokens.value is not None

    async def header(self) -> str | None:
        """``Bearer <token>``, waiting up to the auth actor's ``token_wait`` for one."""
        if self.auth.mode == "none":
            return None
        tokens = self.auth.tokens
        issued = tokens.value
        if issued is None:
            with anyio.move_on_after(self.auth.token_wait):
                while (issued := tokens.value) is None:
                    await tokens.wait_changed(tokens.version)
            if issued is None:
                raise TokenUnavailableError(
                    f"no MFO token after {self.auth.token_wait:.1f}s: "
                    f"{self.auth.unavailable_reason()}")
        return f"Bearer {issued.token}"

    async def replace_token(self, rejected_header: str | None) -> str | None:
        """Report a 401 to the auth actor; a different header once it has one, or None
        (a static token, or no auth).

        Raises:
          TokenUnavailableError: no new token within ``token_wait`` (logins failing).
        """
        if self.auth.mode == "none":
            return None
        rejected = bare_token(rejected_header)
        try:
            self.auth.rejections.send_nowait(TokenRejected(token=rejected))
        except anyio.WouldBlock:
            pass  # a rejection is already queued; one re-login serves everyone
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None  # the auth actor is gone (shutting down)
        if self.auth.mode != "login":
            return None
        tokens = self.auth.tokens
        with anyio.move_on_after(self.auth.token_wait):
            while (issued := tokens.value) is None or issued.token == rejected:
                await tokens.wait_changed(tokens.version)
            return f"Bearer {issued.token}"
        raise TokenUnavailableError(
            f"no new MFO token after {self.auth.token_wait:.1f}s: "
            f"{self.auth.unavailable_reason()}")
