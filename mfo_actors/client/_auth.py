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
from typing import Protocol, runtime_checkable

import anyio
import httpx
import msgspec

from mfo_actors.client._transport import exchange
from mfo_actors.client.errors import (
    AuthError,
    RetryableError,
    ValidationError,
    classify_response,
)
from mfo_actors.client.models import LoginRequest, LoginResponse
from mfo_actors.observability import get_logger, register_secret

__all__ = ["AuthProvider", "LoginAuth", "NoAuth", "StaticTokenAuth", "jwt_expiry"]

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
        body = msgspec.json.encode(LoginRequest(email=self._email, password=self._password))
        try:
            response = await exchange(self._http, "POST", self._url, content=body,
                                      headers={"content-type": "application/json"},
                                      max_body=LOGIN_BODY_CAP)
        except RetryableError as exc:
            log.warning("auth.login_failed", url=self._url, error=str(exc))
            raise
        error = classify_response(response.status_code, response.headers, response.content)
        if error is not None:
            log.warning("auth.login_failed", url=self._url, status=response.status_code)
            if isinstance(error, AuthError):
                raise AuthError(error.status, error.code, f"login rejected: {error.message}",
                                error.details)
            raise error
        try:
            login = _login_decoder.decode(response.content)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ValidationError.from_msgspec(exc) from None
        register_secret(login.token)
        lifetime = login.expires_in
        if lifetime is None:
            exp = jwt_expiry(login.token)
            if exp is not None:
                lifetime = exp - time.time()
        if lifetime is not None and lifetime <= 0:
            # Expired on arrival by our clock (clock skew, or a bogus expires_in): a refresh
            # deadline of "now" would log in again on every call. Keep it until a 401.
            log.warning("auth.token_expiry_in_past", url=self._url,
                        hint="clock skew with the MFO server? refreshing on 401 only")
            lifetime = None
        self._token = login.token
        self._refresh_deadline = (
            self._clock() + max(0.0, lifetime) * self._refresh_at
            if lifetime is not None and self._refresh_at is not None else None
        )
        self.logins += 1
        log.info("auth.login_ok", url=self._url,
                 expires_in=None if lifetime is None else round(lifetime, 1))
