"""Login and bearer tokens: JWT-shaped, HMAC-signed, revocable and expiring.

``POST /auth/login`` with the configured email and password issues a token
(``header.payload.signature``, base64url, HMAC-SHA256 over a per-server secret; claims
``sub``, ``iat``, ``exp``, ``jti``) valid for the current ``token_lifetime``. An unknown,
forged, revoked or expired token is answered 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

import msgspec

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.ids import new_id
from mfo_actors.mock_server._base import HTTPError, MockPart, encode, json_response

__all__ = ["TokenAuth"]

_VERIFIED_MAX = 10_000  # verified Authorization values remembered (tokens in use)


def _b64(data: bytes) -> str:
    """base64url without padding, as JWTs write it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """The bytes of unpadded base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenAuth(MockPart):
    """The login route, and the tokens issued so far."""

    def _start_tokens(self) -> None:
        self._secret = secrets.token_bytes(32)
        self._tokens: dict[str, float] = {}  # jti -> exp
        # Authorization values whose signature checked out -> their jti: a client sends the
        # same token thousands of times, and an HMAC, two base64 and a JSON decode per
        # request were a third of the events route. Revocation and expiry are still checked
        # on every request (against _tokens).
        self._verified: dict[str, str] = {}

    def _revoke_tokens(self) -> None:
        now = self._clock()
        self._tokens = dict.fromkeys(self._tokens, now)

    def _auth(self, request: Request) -> Response:
        """``POST /auth/login``."""
        if request.path.rstrip("/") != "/auth/login":
            raise HTTPError(404, "not_found", f"no route for {request.path}")
        if request.method != "POST":
            raise HTTPError(405, "method_not_allowed", "use POST")
        try:
            login = msgspec.json.decode(request.body, type=m.LoginRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise HTTPError(400, "invalid_request", f"invalid login body: {exc}") from None
        if not (hmac.compare_digest(login.email, self.options.email)
                and hmac.compare_digest(login.password, self.options.password)):
            self.stats.failed_logins += 1
            raise HTTPError(401, "invalid_credentials", "wrong email or password")
        self.stats.logins += 1
        token, lifetime = self.issue_token(login.email)
        return json_response(m.LoginResponse(token=token, expires_in=lifetime))

    def issue_token(self, subject: str) -> tuple[str, float]:
        """A signed JWT-shaped token for *subject*, valid for the current ``token_lifetime``."""
        now = self._clock()
        lifetime = float(self.faults.token_lifetime)
        jti = new_id()
        exp = round(now + lifetime, 3)
        header = _b64(b'{"alg":"HS256","typ":"JWT"}')
        payload = _b64(encode({"sub": subject, "iat": round(now, 3), "exp": exp, "jti": jti}))
        signing_input = f"{header}.{payload}".encode("ascii")
        sig = _b64(hmac.new(self._secret, signing_input, hashlib.sha256).digest())
        self._tokens[jti] = exp
        return f"{header}.{payload}.{sig}", lifetime

    def _check_token(self, request: Request) -> None:
        """401 unless the request carries a valid, unexpired token of ours."""
        value = request.header("authorization")
        if not value:
            self.stats.unauthorized_requests += 1
            raise HTTPError(401, "unauthorized", "missing bearer token",
                            [("www-authenticate", "Bearer")])
        jti = self._verified.get(value)
        if jti is None:
            jti = self._verify(value)
            if jti is not None:
                if len(self._verified) >= _VERIFIED_MAX:
                    self._verified.clear()
                self._verified[value] = jti
        exp = self._tokens.get(jti) if jti is not None else None
        if exp is None:
            self.stats.unauthorized_requests += 1
            raise HTTPError(401, "invalid_token", "unknown or invalid token",
                            [("www-authenticate", 'Bearer error="invalid_token"')])
        if self._clock() >= exp:
            self.stats.expired_token_requests += 1
            self.stats.unauthorized_requests += 1
            raise HTTPError(401, "token_expired", "the token has expired",
                            [("www-authenticate", 'Bearer error="invalid_token"')])

    def _verify(self, value: str) -> str | None:
        """The jti of a ``Bearer`` token signed by us, or None (forged, malformed)."""
        scheme, _, token = value.partition(" ")
        parts = token.strip().split(".")
        if scheme.lower() != "bearer" or len(parts) != 3:
            return None
        expected = _b64(hmac.new(self._secret, f"{parts[0]}.{parts[1]}".encode("ascii"),
                                 hashlib.sha256).digest())
        if not hmac.compare_digest(expected, parts[2]):
            return None
        try:
            claims: Any = msgspec.json.decode(_unb64(parts[1]))
        except (ValueError, msgspec.DecodeError):
            return None
        jti = claims.get("jti") if isinstance(claims, dict) else None
        return jti if isinstance(jti, str) else None
