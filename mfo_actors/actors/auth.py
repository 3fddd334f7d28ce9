"""The auth refresher: owns the MFO bearer token for the whole instance.

Modes (``auth.mode``):

* ``login``: ``POST {auth_base_url}/login`` with email/password; log in again proactively
  when ``auth.refresh_at`` (0.8) of the token's lifetime has passed, a little earlier at
  random (jitter, so many instances do not log in in step); the lifetime is ``expires_in``
  from the login answer, else the JWT ``exp`` claim read from the token (not verified: the
  server stays the judge of validity).
* ``token``: a static token; a 401 cannot be fixed by asking again, so it is only logged.
* ``none``: no ``Authorization`` header.

The actor owns the token and publishes it on :attr:`AuthRefresherActor.tokens`, a watch
(latest value; ``None`` while there is none) that the daemon's gate reads without awaiting.
A caller that got 401 sends a :class:`TokenRejected` to :attr:`AuthRefresherActor.rejections`
and waits for a different token. Single flight: only a report of the *current* token does
anything (the watch goes to ``None``, so callers wait for the new one, and one login
follows); a report of a token already replaced, or a second report of the same one, is
ignored, so a burst of concurrent 401s costs one login. The login request itself is the
library's (:func:`mfo_actors.client.login`).

Failed logins back off (``login_backoff`` doubling up to ``login_max_backoff``) and show in
:meth:`AuthRefresherActor.health` and ``mfo_token_refresh_total{result}``. A refused login
(401/403: wrong email or password) is logged once as ``auth.login_rejected`` until a login
succeeds again. Tokens and passwords are never logged (they are also registered with the
log redactor).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx

from mfo_actors.actors._reload import Apply, ConfigUpdate
from mfo_actors.actors._stop import cancel_on
from mfo_actors.client import AuthError, login
from mfo_actors.messages import TokenIssued, TokenRejected
from mfo_actors.metrics import TOKEN_REFRESH
from mfo_actors.observability import get_logger, register_secret
from mfo_actors.runtime import RestartPolicy, SystemClock, Watch, open_channel

if TYPE_CHECKING:
    from mfo_actors.config import InstanceConfig
    from mfo_actors.runtime import ChannelReceiver, ChannelSender, Clock, ReadySignal

__all__ = ["REJECTIONS_CHANNEL_SIZE", "AuthRefresherActor", "TokenUnavailableError"]

log = get_logger(__name__)

REFRESH_JITTER = 0.05  # refresh up to 5% of the lifetime earlier than refresh_at, at random
MIN_REFRESH_DELAY = 0.05  # seconds; a token that is (nearly) expired is renewed at once
REJECTIONS_CHANNEL_SIZE = 16  # one pending rejection is all that matters; the rest repeat it


class TokenUnavailableError(AuthError):
    """No token could be had in time: logins are failing (see ``/readyz``). Nothing was sent.

    A subclass of :class:`AuthError` (status 401) for library callers; the forwarder treats
    it as a reason to try later, never as the event's fault.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(401, "token_unavailable", reason)


class AuthRefresherActor:
    """Keeps a valid token and publishes it on :attr:`tokens`.

    Args:
      cfg: ``auth`` (mode, credentials, refresh_at, login backoff), ``client`` (URL, timeout).
      http: The ``httpx.AsyncClient`` to log in with; ``None``: one of our own, closed on
        exit. (The caller owns one it passes.)
      clock: Time source for refresh and backoff (a ``FakeClock`` in tests).
      token_wait: How long a caller waits for a token (:attr:`token_wait`); default
        ``client.timeout``.
      rng: Uniform [0, 1) source for the refresh jitter (tests pass a constant).

    Attributes:
      tokens: ``Watch[TokenIssued | None]``: the token in use, None while there is none
        (before the first login, after a rejection, ``auth.mode: none``).
      rejections: Where a caller that got 401 sends :class:`TokenRejected`.
      logins: Successful logins so far.
    """

    name = "auth"
    restart = RestartPolicy("permanent")

    def __init__(
        self,
        cfg: InstanceConfig,
        http: httpx.AsyncClient | None = None,
        *,
        clock: Clock | None = None,
        token_wait: float | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._cfg = cfg
        self._auth = cfg.auth
        self._http = http
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._rng = rng
        self._url = cfg.client.effective_auth_base_url.rstrip("/") + "/login"
        self.rejections: ChannelSender[TokenRejected]
        self._rejections_rx: ChannelReceiver[TokenRejected]
        self.rejections, self._rejections_rx = open_channel(TokenRejected,
                                                            REJECTIONS_CHANNEL_SIZE)
        self.token_wait = float(cfg.client.timeout) if token_wait is None else token_wait
        self.tokens: Watch[TokenIssued | None] = Watch(TokenIssued | None, None)
        self.logins = 0
        self._failures = 0
        self._last_error: str | None = None
        self._expires_at: float | None = None  # wall clock
        self._rejected_logged = False
        self._issued: str | None = None  # the last token issued; rejections are matched to it
        self._static_rejected_logged = False
        self._stop = anyio.Event()
        self._credentials_changed = anyio.Event()
        if cfg.auth.mode == "login":
            if not cfg.auth.email or not cfg.auth.password:
                raise ValueError("auth.mode login needs auth.email and auth.password")
            register_secret(cfg.auth.password)
        elif cfg.auth.mode == "token":
            if not cfg.auth.token:
                raise ValueError("auth.mode token needs auth.token")
            self._publish(cfg.auth.token, None)

    @property
    def mode(self) -> Literal["login", "token", "none"]:
        """``login``, ``token`` or ``none`` (``auth.mode``; a reload keeps it)."""
        return self._auth.mode

    def unavailable_reason(self) -> str:
        """Why there is no token (for the error of a caller that waited in vain)."""
        return self._last_error or "login has not succeeded yet"

    # -- status ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok`` is False while there is no usable token (logins failing)."""
        if self._auth.mode != "login":
            return {"ok": True, "mode": self._auth.mode}
        expires_in = (
            None if self._expires_at is None
            else round(self._expires_at - self._clock.now(), 1)
        )
        has_token = self.tokens.value is not None
        return {
            "ok": has_token,
            "mode": "login",
            "has_token": has_token,
            "logins": self.logins,
            "consecutive_failures": self._failures,
            "last_error": self._last_error,
            "expires_in": expires_in,
        }

    # -- the actor ---------------------------------------------------------------------

    async def run(self, ready: ReadySignal) -> None:
        """Log in, refresh before expiry, re-login on rejection, until asked to stop.

        Ready at once: the listener must take webhooks even while the MFO server (and so the
        login) is down; ``health()`` says whether a token is available.
        """
        ready.set()
        try:
            await self._serve()
        finally:
            if self._stop.is_set():  # a graceful stop, not a crash to restart from
                self.close()

    async def _serve(self) -> None:
        if self._auth.mode != "login":
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
                async for _ in self._rejections_rx:
                    self._static_rejected()
            return
        owns_http = self._http is None
        http = self._http or httpx.AsyncClient(
            timeout=httpx.Timeout(float(self._cfg.client.timeout)))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on, self._stop, tg.cancel_scope)
                await self._refresh_loop(http)
        finally:
            if owns_http:
                with anyio.move_on_after(1, shield=True):
                    await http.aclose()

    def prepare_reload(self, update: ConfigUpdate) -> Apply:
        """New credentials (a rotated password or token) and refresh settings.

        A changed email or password logs in again at once, even while backing off after
        failures (so fixing a wrong password takes effect now); a changed static token is
        used from the next request on. ``auth.mode`` itself needs a restart (the daemon
        reports it) and is kept.
        """
        new = update.cfg.auth
        if new.mode != self._auth.mode:
            return lambda: None
        new_login = new.mode == "login" and (new.email, new.password) != (
            self._auth.email, self._auth.password)
        new_token = new.mode == "token" and new.token != self._auth.token

        def apply() -> None:
            self._auth = new
            if new.password:
                register_secret(new.password)
            if new_token and new.token:
                self._static_rejected_logged = False
                self._publish(new.token, None)
            if new_login:
                self._rejected_logged = False
                self._credentials_changed.set()
            if new_login or new_token:
                log.info("auth.credentials_changed", mode=new.mode)

        return apply

    def request_stop(self) -> None:
        """Stop refreshing (nothing in flight worth finishing: a login can be redone)."""
        self._stop.set()

    def close(self) -> None:
        """Close the rejections channel, both ends: for the owner, once the actor will not
        run again (a graceful stop closes it too; a crash keeps it for the restart)."""
        self.rejections.close()
        self._rejections_rx.close()

    async def _refresh_loop(self, http: httpx.AsyncClient) -> None:
        while True:
            lifetime = await self._login(http)
            if lifetime is None:
                await self._wait(self._backoff(), on_rejection=False)
            elif lifetime == float("inf"):
                await self._wait(None, on_rejection=True)  # no expiry known: until a 401
            else:
                await self._wait(self._refresh_delay(lifetime), on_rejection=True)

    def _refresh_delay(self, lifetime: float) -> float:
        base = lifetime * self._auth.refresh_at
        jitter = lifetime * REFRESH_JITTER * self._rng()
        return max(MIN_REFRESH_DELAY, base - jitter)

    def _backoff(self) -> float:
        wait = float(self._auth.login_backoff) * (2.0 ** max(0, self._failures - 1))
        return min(float(self._auth.login_max_backoff), wait)

    async def _wait(self, delay: float | None, *, on_rejection: bool) -> None:
        """Sleep *delay* (None: forever), cut short by a rejection of the current token or
        by new credentials from a reload."""
        changed = self._credentials_changed
        if changed.is_set():  # set while we were logging in: the next login uses them
            self._credentials_changed = anyio.Event()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on, changed, tg.cancel_scope)

            async def watch_rejections() -> None:
                async for rejected in self._rejections_rx:
                    if not on_rejection:
                        continue  # already failing and backing off: the next try is coming
                    current = self.tokens.value
                    if (rejected.token is not None and rejected.token == self._issued
                            and current is not None and current.token == rejected.token):
                        log.info("auth.token_rejected", action="login")
                        self._withdraw()  # callers wait for the new token from now on
                        break
                tg.cancel_scope.cancel()

            tg.start_soon(watch_rejections)
            if delay is None:
                await anyio.sleep_forever()
            else:
                await self._clock.sleep(delay)
            tg.cancel_scope.cancel()
        if changed.is_set():
            self._credentials_changed = anyio.Event()

    async def _login(self, http: httpx.AsyncClient) -> float | None:
        """One login. Returns the token's lifetime in seconds (``inf`` if unknown) or None
        when it failed (and records why)."""
        assert self._auth.email is not None and self._auth.password is not None
        try:
            issued = await login(http, self._url, self._auth.email, self._auth.password,
                                 now=self._clock.now)
        except AuthError as exc:
            self._failed("rejected", f"login rejected ({exc.status}): wrong email or password?")
            if not self._rejected_logged:
                self._rejected_logged = True
                log.error("auth.login_rejected", url=self._url, status=exc.status,
                          email=self._auth.email, code=exc.code,
                          hint="check auth.email and auth.password; retrying with backoff")
            return None
        except Exception as exc:  # network, 5xx, bad body: all "try again later"
            self._failed("error", str(exc))
            log.warning("auth.login_failed", url=self._url, error=str(exc),
                        failures=self._failures, retry_in=round(self._backoff(), 2))
            return None
        lifetime = issued.lifetime
        self._expires_at = None if lifetime is None else self._clock.now() + lifetime
        self._issued = issued.token
        self._publish(issued.token, self._expires_at)
        self.logins += 1
        self._failures = 0
        self._last_error = None
        self._rejected_logged = False
        TOKEN_REFRESH.labels(instance=self._cfg.instance, result="ok").inc()
        log.info("auth.login_ok", url=self._url,
                 expires_in=None if lifetime is None else round(lifetime, 1))
        return float("inf") if lifetime is None else max(0.0, lifetime)

    def _failed(self, result: str, reason: str) -> None:
        self._failures += 1
        self._last_error = reason
        TOKEN_REFRESH.labels(instance=self._cfg.instance, result=result).inc()

    def _publish(self, token: str, expires_at: float | None) -> None:
        register_secret(token)
        self.tokens.publish(TokenIssued(token=token, expires_at=expires_at))

    def _withdraw(self) -> None:
        """The current token was rejected: no token until the next login."""
        self.tokens.publish(None)

    def _static_rejected(self) -> None:
        if not self._static_rejected_logged:
            self._static_rejected_logged = True
            log.error("auth.static_token_rejected",
                      hint="the server refused auth.token; fix the config and restart")
