"""Auth providers: where the ``Authorization`` header of every MFO call comes from.

The base client asks :meth:`AuthProvider.header` before each request and, when the server
answers 401, reports the rejected token with :meth:`AuthProvider.invalidate` and asks again,
once. :class:`LoginAuth` logs in with email/password (``POST {auth_base_url}/login``) and
re-logs in single-flight: however many calls fail with the same stale token at once, one
login is made and everyone gets the new token. Tokens and passwords are registered with the
log redactor and never appear in a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio
import httpx
import msgspec

from mfo_actors.client._transport import exchange
from mfo_actors.client.errors import (
    APIError,
    AuthError,
    RetryableError,
    ValidationError,
    classify_response,
)
from mfo_actors.client.models import LoginRequest, LoginResponse
from mfo_actors.observability import get_logger, register_secret

__all__ = ["AuthProvider", "Login", "LoginAuth", "NoAuth", "StaticTokenAuth", "jwt_expiry", "login"]

log = get_logger(__name__)

_login_decoder = msgspec.json.Decoder(LoginResponse)
LOGIN_BODY_CAP = 64 * 1024  # bytes of a login answer read: a token and its lifetime


@runtime_checkable
class AuthProvider(Protocol):
    """Supplies the ``Authorization`` header; told when the server rejected a token."""

    async def header(self) -> str | None:
        """The header value (``"Bearer <token>"``), or ``None`` to send none."""
        ...

    async def invalidate(self, token: str | None) -> None:
        """The server answered 401 to *token* (the bare token, without ``Bearer``)."""
        ...


class NoAuth:
    """No ``Authorization`` header at all (``auth.mode: none``)."""

    async def header(self) -> str | None:
        return None

    async def invalidate(self, token: str | None) -> None:
        return None

    def __repr__(self) -> str:
        return "NoAuth()"


class StaticTokenAuth:
    """A fixed bearer token (``auth.mode: token``); a 401 cannot be fixed by asking again."""

    def __init__(self, token: str) -> None:
        register_secret(token)
        self._header = f"Bearer {token}"

    async def header(self) -> str | None:
        return self._header

    async def invalidate(self, token: str | None) -> None:
        return None

    def __repr__(self) -> str:
        return "StaticTokenAuth(token='***')"


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT-shaped token, or ``None``.

    The signature is not checked: the client only uses ``exp`` to refresh early; the
    server remains the judge of validity.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = msgspec.json.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


@dataclass(frozen=True, slots=True)
class Login:
    """A token from a successful login, and its lifetime in seconds (None: unknown)."""

    token: str
    lifetime: float | None

    def __repr__(self) -> str:
        return f"Login(token='***', lifetime={self.lifetime!r})"


async def login(http: httpx.AsyncClient, url: str, email: str, password: str, *,
                now: Callable[[], float] = time.time) -> Login:
    """One ``POST {auth_base_url}/login``: the one login of the library and the daemon.

    The lifetime is ``expires_in`` from the answer, else the JWT ``exp`` claim (by *now*,
    wall-clock seconds); one that has already passed (clock skew, a bogus ``expires_in``)
    is taken as unknown, so the token is kept until the server answers 401 instead of being
    renewed in a loop. The token is registered with the log redactor.

    Raises:
      AuthError: the server refused the credentials (401/403).
      APIError: another 4xx; RetryableError: no answer, a timeout, 5xx;
      ValidationError: the answer is not a login answer.
    """
    body = msgspec.json.encode(LoginRequest(email=email, password=password))
    response = await exchange(http, "POST", url, content=body,
                              headers={"content-type": "application/json"},
                              max_body=LOGIN_BODY_CAP)
    error = classify_response(response.status_code, response.headers, response.content)
    if error is not None:
        raise error
    try:
        answer = _login_decoder.decode(response.content)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValidationError.from_msgspec(exc) from None
    register_secret(answer.token)
    lifetime = None if answer.expires_in is None else float(answer.expires_in)
    if lifetime is None:
        exp = jwt_expiry(answer.token)
        if exp is not None:
            lifetime = exp - now()
    if lifetime is not None and lifetime <= 0:
        log.warning("auth.token_expiry_in_past", url=url, lifetime=round(lifetime, 1),
                    hint="clock skew with the MFO server? refreshing on 401 only")
        lifetime = None
    return Login(answer.token, lifetime)


class LoginAuth:
    """Email/password login against ``POST {auth_base_url}/login``, token kept in memory.

    Args:
      auth_base_url: e.g. ``http://127.0.0.1:9000/auth``; ``/login`` is appended.
      email: The account.
      password: Its password (registered as a secret: never logged).
      http_client: The ``httpx.AsyncClient`` to log in with (the caller owns it).
      refresh_at: Log in again, before the server would refuse the token, once this fraction
        of its lifetime (``expires_in``, else the JWT ``exp``) has passed. ``None``: only
        after a 401.
      clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        auth_base_url: str,
        email: str,
        password: str,
        http_client: httpx.AsyncClient,
        *,
        refresh_at: float | None = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        register_secret(password)
        self._url = auth_base_url.rstrip("/") + "/login"
        self._email = email
        self._password = password
        self._http = http_client
        self._refresh_at = refresh_at
        self._clock = clock
        self._token: str | None = None
        self._refresh_deadline: float | None = None
        self._lock = anyio.Lock()
        self.logins = 0  # successful logins, for tests and stats

    def __repr__(self) -> str:
        return f"LoginAuth({self._url!r}, email={self._email!r}, password='***')"

    @property
    def token(self) -> str | None:
        """The current token (``None`` before the first login or after a 401)."""
        return self._token

    def _fresh(self) -> bool:
        if self._token is None:
            return False
        return self._refresh_deadline is None or self._clock() < self._refresh_deadline

    async def header(self) -> str | None:
        if self._fresh():
            return f"Bearer {self._token}"
        async with self._lock:
            if not self._fresh():  # someone else may have logged in while we waited
                await self._login()
            return f"Bearer {self._token}"

    async def invalidate(self, token: str | None) -> None:
        # Only forget the token the server rejected: if another caller already replaced it,
        # the new one is good and a second login would be wasted.
        if token is None or token == self._token:
            self._token = None
            self._refresh_deadline = None

    async def _login(self) -> None:
        try:
            issued = await login(self._http, self._url, self._email, self._password)
        except RetryableError as exc:
            log.warning("auth.login_failed", url=self._url, error=str(exc))
            raise
        except APIError as exc:
            log.warning("auth.login_failed", url=self._url, status=exc.status)
            if isinstance(exc, AuthError):
                raise AuthError(exc.status, exc.code, f"login rejected: {exc.message}",
                                exc.details) from None
            raise
        lifetime = issued.lifetime
        self._token = issued.token
        self._refresh_deadline = (
            self._clock() + max(0.0, lifetime) * self._refresh_at
            if lifetime is not None and self._refresh_at is not None else None
        )
        self.logins += 1
        log.info("auth.login_ok", url=self._url,
                 expires_in=None if lifetime is None else round(lifetime, 1))
