"""The gate every attempt to the upstream passes: one object answers "may I send now?"
(breaker allowance, a token, the rate limit) and takes the attempt's one outcome.

A sender asks :meth:`Gate.admit` once per attempt and gets an :class:`Admission`: the
``Authorization`` header to send, and where the attempt's single outcome goes
(:meth:`Admission.settle`), or :meth:`Admission.abandon` when it ends without one (cancelled,
or a local error before any answer). On a 401 the sender calls :meth:`Admission.reauth` once:
the rejected token is reported and a different header, if one comes, is sent again under the
same admission (the single re-login).

Two gates implement it:

* :class:`PolicyGate` (the library: ``MFOClient.from_config``/``from_url``) joins an
  :class:`AuthProvider`, a :class:`CircuitBreaker` and a :class:`TokenBucket`, each optional,
  and records outcomes synchronously in its breaker;
* the daemon's ``UpstreamGate`` (``mfo_actors.actors``) reads the breaker and auth actors'
  watches without awaiting and sends outcomes and token rejections back to them as messages.

``BaseClient`` sends through a gate; so can any other sender (a lean HTTP client for the
forwarder): admit, send once, settle.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mfo_actors.client._auth import AuthProvider, NoAuth
from mfo_actors.client._hooks import Breaker, RateLimiter

if TYPE_CHECKING:
    from mfo_actors.runtime import Clock

__all__ = ["Admission", "Gate", "PolicyGate", "bare_token"]


def bare_token(header: str | None) -> str | None:
    """The token of a ``Bearer <token>`` header (the header itself for another scheme)."""
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token if scheme.lower() == "bearer" and token else header


@runtime_checkable
class Admission(Protocol):
    """One attempt the gate let through."""

    @property
    def header(self) -> str | None:
        """The ``Authorization`` value to send (None: send none)."""
        ...

    async def reauth(self) -> str | None:
        """The server answered 401 to :attr:`header`: report it, and return a different
        header to send once more (the rate limit applied again), or None."""
        ...

    async def settle(self, *, ok: bool, failure: bool, status: int | None) -> None:
        """The attempt's outcome, reported once.

        Args:
          ok: A 2xx answer.
          failure: The upstream is to blame (no answer, a timeout, 408, 429, 5xx); a 3xx or
            another 4xx is an answer (``ok=False, failure=False``).
          status: The HTTP status, None when no answer arrived.
        """
        ...

    def abandon(self) -> None:
        """The attempt ends without an outcome: give its breaker slot back."""
        ...


@runtime_checkable
class Gate(Protocol):
    """Admission to one upstream (see the module docstring)."""

    async def admit(self) -> Admission:
        """Let one attempt through, waiting for a token and the rate limit.

        Raises:
          CircuitBreakerError: the breaker refuses now (nothing was sent).
          AuthError: no token could be had (``code == "token_unavailable"``: nothing sent).
        """
        ...

    def allowance(self) -> int | None:
        """Attempts :meth:`admit` would let start now without a breaker refusal (None: no
        limit); read without awaiting."""
        ...

    async def wait_ready(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109
        """Wait up to *timeout* seconds until the breaker allows an attempt and a token is
        there; True when both are, False when the time ran out first."""
        ...


class _PolicyAdmission:
    __slots__ = ("_gate", "_header", "_open")

    def __init__(self, gate: PolicyGate, header: str | None) -> None:
        self._gate = gate
        self._header = header
        self._open = True

    @property
    def header(self) -> str | None:
        return self._header

    async def reauth(self) -> str | None:
        auth = self._gate.auth
        rejected = self._header
        await auth.invalidate(bare_token(rejected))
        new = await auth.header()
        if new is None or new == rejected:
            return None
        self._header = new
        await self._gate.pace()
        return new

    async def settle(self, *, ok: bool, failure: bool, status: int | None) -> None:
        if self._open:
            self._open = False
            if self._gate.breaker is not None:
                self._gate.breaker.record(ok=ok, failure=failure, status=status)

    def abandon(self) -> None:
        if self._open:
            self._open = False
            breaker = self._gate.breaker
            if breaker is not None:
                breaker.release()


class PolicyGate:
    """The library's gate: an auth provider, an optional breaker and rate limiter.

    Args:
      auth: Supplies the header; told of a 401 (default: no header).
      breaker: Refuses while open, records each outcome at once (None: no breaker).
      rate_limiter: Awaited before each request sent (None: no limit).
      clock: Time for :meth:`wait_ready`'s bound (a ``FakeClock`` in tests).
    """

    def __init__(self, auth: AuthProvider | None = None, breaker: Breaker | None = None,
                 rate_limiter: RateLimiter | None = None, *, clock: Clock | None = None
                 ) -> None:
        self.auth: AuthProvider = auth if auth is not None else NoAuth()
        self.breaker = breaker
        self.rate_limiter = rate_limiter
        self._clock = clock

    def __repr__(self) -> str:
        return f"PolicyGate(auth={self.auth!r}, breaker={self.breaker!r})"

    async def pace(self) -> None:
        """Wait for the rate limit (one request)."""
        if self.rate_limiter is not None:
            await self.rate_limiter.acquire()

    async def admit(self) -> _PolicyAdmission:
        header = await self.auth.header()
        if self.breaker is not None:
            self.breaker.before_call()
        admission = _PolicyAdmission(self, header)
        try:
            await self.pace()
        except BaseException:
            admission.abandon()
            raise
        return admission

    def allowance(self) -> int | None:
        return None if self.breaker is None else self.breaker.allowance()

    async def wait_ready(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109
        if self.breaker is None:
            return True
        return await self.breaker.wait_callable(timeout)
