"""Unit tests of the client's parts: error classification, retry policy, SSE parser, auth."""

from __future__ import annotations

import base64
import email.utils
import pickle
import time

import anyio
import httpx
import msgspec
import pytest

from mfo_actors.client import (
    APIError,
    AuthError,
    BaseClient,
    CircuitBreakerError,
    LoginAuth,
    MFOClient,
    NoAuth,
    RetryableError,
    RetryPolicy,
    SSEParser,
    StaticTokenAuth,
    ValidationError,
    classify_response,
    classify_transport_error,
    compute_backoff,
    jwt_expiry,
    parse_retry_after,
)
from mfo_actors.client import models as m
from mfo_actors.client._sse import SSEEvent
from mfo_actors.config import RetryConfig

# --- errors -----------------------------------------------------------------------------------


class TestClassifyResponse:
    def test_success_is_none(self) -> None:
        """Only a 2xx is a success; a 3xx is a retryable error (never a delivery)."""
        assert classify_response(200, {}, b"{}") is None
        assert classify_response(204, {}, b"") is None
        assert isinstance(classify_response(304, {}, b""), RetryableError)

    def test_slop_error_body_is_parsed(self) -> None:
        """A 400 with SLOP's envelope becomes APIError with its code, message and details."""
        body = b'{"error": {"code": "invalid_request", "message": "Missing messages", ' \
               b'"status": 400, "field": "messages"}}'
        err = classify_response(400, {}, body)
        assert type(err) is APIError
        assert (err.status, err.code, err.message) == (400, "invalid_request", "Missing messages")
        assert err.details == {"field": "messages"}
        assert str(err) == "400 invalid_request: Missing messages"

    def test_non_json_body_falls_back(self) -> None:
        """An HTML error page still yields an APIError with the status as code."""
        err = classify_response(404, {}, b"<html>not here</html>")
        assert isinstance(err, APIError)
        assert err.code == "http_404" and err.message == "<html>not here</html>"
        empty = classify_response(409, {}, b"")
        assert isinstance(empty, APIError) and empty.message == "Conflict"

    @pytest.mark.parametrize("status", [401, 403])
    def test_auth_statuses(self, status: int) -> None:
        """401 and 403 are AuthError (an APIError)."""
        assert isinstance(classify_response(status, {}, b""), AuthError)

    @pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
    def test_retryable_statuses_carry_retry_after(self, status: int) -> None:
        """408, 429 and 5xx are retryable, with the Retry-After header (any case) parsed."""
        err = classify_response(status, {"Retry-After": "3"}, b"")
        assert isinstance(err, RetryableError)
        assert (err.status, err.retry_after) == (status, 3.0)

    @pytest.mark.parametrize("status", [400, 404, 405, 409, 410, 422])
    def test_other_4xx_are_final(self, status: int) -> None:
        """Every other 4xx is a plain APIError."""
        err = classify_response(status, {"retry-after": "1"}, b"")
        assert type(err) is APIError

    def test_transport_errors(self) -> None:
        """Network failures become RetryableError without status, the cause kept."""
        req = httpx.Request("GET", "http://x")
        for exc, word in [(httpx.ConnectError("refused", request=req), "connection failed"),
                          (httpx.ReadTimeout("slow", request=req), "timeout"),
                          (httpx.RemoteProtocolError("eof", request=req), "closed"),
                          (OSError("boom"), "network")]:
            err = classify_transport_error(exc)
            assert err.status is None and err.retry_after is None
            assert word in err.message
            assert err.__cause__ is exc

    def test_errors_pickle(self) -> None:
        """Errors survive pickling (they may cross process boundaries in tests and tools)."""
        for err in [APIError(400, "c", "m", {"a": 1}), AuthError(401, "c", "m"),
                    RetryableError("x", status=503, retry_after=2.0),
                    ValidationError("bad", field="a.b"),
                    CircuitBreakerError("mfo", "open", 3.0)]:
            back = pickle.loads(pickle.dumps(err))
            assert type(back) is type(err) and str(back) == str(err)


class TestRetryAfter:
    def test_seconds(self) -> None:
        assert parse_retry_after("120") == 120.0
        assert parse_retry_after(" 1.5 ") == 1.5
        assert parse_retry_after("-3") == 0.0

    def test_http_date(self) -> None:
        """An HTTP-date gives the seconds from now until then."""
        now = 1_700_000_000.0
        header = email.utils.formatdate(now + 30, usegmt=True)
        assert parse_retry_after(header, now=now) == pytest.approx(30.0)
        past = email.utils.formatdate(now - 30, usegmt=True)
        assert parse_retry_after(past, now=now) == 0.0

    def test_garbage(self) -> None:
        for value in [None, "", "soon", "nan", "Mon, 99 Foo 2020"]:
            assert parse_retry_after(value) is None


class TestValidationError:
    def test_names_nested_and_missing_fields(self) -> None:
        """msgspec's path becomes a dotted field name, missing fields included."""
        with pytest.raises(msgspec.ValidationError) as exc:
            msgspec.json.decode(b'{"message": {"role": "a"}}', type=m.ChatResponse)
        err = ValidationError.from_msgspec(exc.value)
        assert err.field == "message.content"
        with pytest.raises(msgspec.ValidationError) as exc2:
            msgspec.json.decode(b'{"tools": [{"id": 1}]}', type=m.ToolList)
        assert ValidationError.from_msgspec(exc2.value).field == "tools[0].id"


# --- retry ------------------------------------------------------------------------------------


class TestComputeBackoff:
    cfg = RetryConfig(max_attempts=5, initial_backoff=1.0, max_backoff=10.0,  # type: ignore[arg-type]
                      backoff_multiplier=2.0)

    def test_full_jitter_bounds(self) -> None:
        """The wait is uniform in [0, min(max, initial * mult**(n-1))]."""
        assert compute_backoff(1, self.cfg, rng=lambda: 0.999) == pytest.approx(0.999)
        assert compute_backoff(3, self.cfg, rng=lambda: 1.0) == 4.0
        assert compute_backoff(3, self.cfg, rng=lambda: 0.0) == 0.0
        assert compute_backoff(10, self.cfg, rng=lambda: 1.0) == 10.0
        assert compute_backoff(10_000, self.cfg, rng=lambda: 1.0) == 10.0
        for attempt in range(1, 8):
            assert 0 <= compute_backoff(attempt, self.cfg) <= 10.0

    def test_retry_after_is_a_floor(self) -> None:
        """Never sooner than Retry-After, even beyond max_backoff."""
        assert compute_backoff(1, self.cfg, 1.0, rng=lambda: 0.0) == 1.0
        assert compute_backoff(1, self.cfg, 30.0, rng=lambda: 1.0) == 30.0
        assert compute_backoff(4, self.cfg, 0.5, rng=lambda: 1.0) == 8.0



class TestRetryPolicy:
    def test_should_retry_rules(self) -> None:
        policy = RetryPolicy(3)
        retryable = RetryableError("x", status=503)
        assert policy.should_retry(retryable, method="GET")
        assert policy.should_retry(retryable, method="PUT")
        assert not policy.should_retry(retryable, method="POST")
        assert not policy.should_retry(retryable, method="PATCH")
        assert policy.should_retry(retryable, method="POST", idempotency_key="k")
        assert not policy.should_retry(APIError(400, "c", "m"), method="GET")
        assert not policy.should_retry(ValueError(), method="GET")

    def test_invalid_attempts(self) -> None:
        with pytest.raises(ValueError):
            RetryPolicy(0)

    @pytest.mark.anyio
    async def test_call_retries_until_success(self) -> None:
        """Retryable failures are retried; the result of the first success is returned."""
        policy = RetryPolicy(5, 0.001, 0.002)
        calls = 0

        async def fn() -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise RetryableError("flaky", status=503)
            return "ok"

        assert await policy.call(fn, method="GET") == "ok"
        assert calls == 3

    @pytest.mark.anyio
    async def test_call_stops_at_max_attempts_and_on_final_errors(self) -> None:
        policy = RetryPolicy(3, 0.001, 0.002)
        calls = 0

        async def always_503() -> None:
            nonlocal calls
            calls += 1
            raise RetryableError("down", status=503, retry_after=0.001)

        with pytest.raises(RetryableError) as err:
            await policy.call(always_503, method="DELETE")
        assert calls == 3 and err.value.retry_after == 0.001

        calls = 0

        async def bad_request() -> None:
            nonlocal calls
            calls += 1
            raise APIError(400, "invalid_request", "no")

        with pytest.raises(APIError):
            await policy.call(bad_request, method="GET")
        assert calls == 1

        calls = 0
        with pytest.raises(RetryableError):
            await policy.call(always_503, method="POST")
        assert calls == 1


# --- SSE --------------------------------------------------------------------------------------


def parse_all(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [e for c in chunks for e in parser.feed(c)]
    return events + parser.close()


class TestSSEParser:
    def test_basic_events_and_comments(self) -> None:
        events = parse_all(b": hello\n\ndata: a\n\nevent: x\nid: 7\ndata: b\n\n")
        assert events == [SSEEvent("a"), SSEEvent("b", event="x", id="7")]

    def test_multiline_data_joined_with_newline(self) -> None:
        assert parse_all(b"data: line1\ndata: line2\ndata:\n\n") == [
            SSEEvent("line1\nline2\n")]

    def test_field_without_space_and_without_colon(self) -> None:
        assert parse_all(b"data:x\n\ndata\n\n") == [SSEEvent("x"), SSEEvent("")]

    def test_crlf_and_cr_line_endings_split_across_chunks(self) -> None:
        events = parse_all(b"data: a\r", b"\n\r", b"\ndata: b\r\rdata: c\r\n\r\n")
        assert [e.data for e in events] == ["a", "b", "c"]

    def test_eof_without_trailing_blank_line(self) -> None:
        """A last event without its blank line (or even its newline) is still delivered."""
        assert [e.data for e in parse_all(b"data: a\n\ndata: last")] == ["a", "last"]
        assert [e.data for e in parse_all(b"data: last\n")] == ["last"]

    def test_event_without_data_is_not_dispatched(self) -> None:
        assert parse_all(b"event: ping\n\nretry: 100\n\n") == []

    def test_bom_and_utf8_split_inside_a_character(self) -> None:
        text = "data: héllo ✓\n\n".encode()
        cut = text.index("✓".encode()) + 1
        events = parse_all(b"\xef\xbb\xbf" + text[:cut], text[cut:])
        assert events == [SSEEvent("héllo ✓")]

    def test_byte_at_a_time(self) -> None:
        raw = b"data: {\"content\": \"a\"}\n\ndata: [DONE]\n\n"
        assert [e.data for e in parse_all(*[raw[i:i + 1] for i in range(len(raw))])] == [
            '{"content": "a"}', "[DONE]"]


# --- client over a fake transport -------------------------------------------------------------


def make_client(handler: httpx.MockTransport, auth: object = None) -> MFOClient:
    http = httpx.AsyncClient(transport=handler)
    base = BaseClient("http://mfo.test", auth=auth or NoAuth(), http=http,  # type: ignore[arg-type]
                      retry=RetryPolicy(2, 0.001, 0.002))
    return MFOClient(base, owns_http=True)


@pytest.mark.anyio
async def test_stream_stops_at_done_even_if_more_follows() -> None:
    """Iteration ends at [DONE]; data after it is ignored."""
    body = (b": keep-alive\n\ndata: {\"content\": \"Hel\"}\n\n"
            b"data: {\"content\": \"lo\"}\n\ndata: plain\n\ndata: [DONE]\n\n"
            b"data: {\"content\": \"x\"}\n\n")

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/chat/stream"
        assert msgspec.json.decode(request.content)["messages"][0]["content"] == "hi"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with make_client(httpx.MockTransport(handler)) as client:
        assert [c async for c in client.chat.stream("hi")] == ["Hel", "lo", "plain"]


@pytest.mark.anyio
async def test_stream_error_status_raises_typed_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"code": "rate_limited", "message": "slow",
                                                   "status": 429}},
                              headers={"retry-after": "2"})

    async with make_client(httpx.MockTransport(handler)) as client:
        with pytest.raises(RetryableError) as err:
            async for _ in client.chat.stream("hi"):
                pass
    assert (err.value.status, err.value.retry_after) == (429, 2.0)


@pytest.mark.anyio
async def test_stream_relogins_on_401() -> None:
    """A 401 on a stream triggers the one re-login too."""
    tokens: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/login":
            return httpx.Response(200, json={"token": f"t{len(tokens)}"})
        tokens.append(request.headers.get("authorization"))
        if len(tokens) == 1:
            return httpx.Response(401, json={"error": {"code": "token_expired",
                                                       "message": "x", "status": 401}})
        return httpx.Response(200, content=b"data: {\"content\": \"ok\"}\n\n")

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    auth = LoginAuth("http://mfo.test/auth", "a@b.c", "pw", http)
    async with make_client(httpx.MockTransport(handler), auth=auth) as client:
        assert [c async for c in client.chat.stream("hi")] == ["ok"]
    await http.aclose()
    assert tokens == ["Bearer t0", "Bearer t1"]


@pytest.mark.anyio
async def test_empty_body_and_untyped_json() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.url.path == "/bad":
            return httpx.Response(200, content=b"{nope")
        return httpx.Response(200, json={"a": [1]})

    async with make_client(httpx.MockTransport(handler)) as client:
        assert await client.base.delete("/x") is None
        assert await client.base.get("/x") == {"a": [1]}
        with pytest.raises(ValidationError) as err:
            await client.base.get("/bad")
        assert err.value.field is None
        with pytest.raises(ValidationError) as err2:
            await client.base.post("/x", json={"a": object()})
        assert err2.value.direction == "request"


# --- auth -------------------------------------------------------------------------------------


def jwt(exp: float) -> str:
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    return f"{enc(b'{}')}.{enc(msgspec.json.encode({'exp': exp}))}.sig"


def test_jwt_expiry() -> None:
    assert jwt_expiry(jwt(123.5)) == 123.5
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.!!!.c") is None
    assert jwt_expiry(f"a.{base64.urlsafe_b64encode(b'[1]').decode()}.c") is None


@pytest.mark.anyio
async def test_static_and_no_auth() -> None:
    auth = StaticTokenAuth("tok-123")
    assert await auth.header() == "Bearer tok-123"
    await auth.invalidate("tok-123")
    assert await auth.header() == "Bearer tok-123"
    assert "tok-123" not in repr(auth)
    assert await NoAuth().header() is None


class LoginServer:
    """A fake login endpoint that counts logins and can be slow."""

    def __init__(self, *, expires_in: float | None = None, token_exp: float | None = None,
                 status: int = 200) -> None:
        self.logins = 0
        self.expires_in = expires_in
        self.token_exp = token_exp
        self.status = status
        self.bodies: list[dict[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(msgspec.json.decode(request.content))
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {
                "code": "invalid_credentials", "message": "nope", "status": self.status}})
        self.logins += 1
        await anyio.sleep(0.01)  # let concurrent callers pile up behind the lock
        token = jwt(self.token_exp) if self.token_exp else f"token-{self.logins}"
        body: dict[str, object] = {"token": token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)


@pytest.mark.anyio
async def test_login_auth_single_flight() -> None:
    """Concurrent callers after an invalidation share one login."""
    server = LoginServer()
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        auth = LoginAuth("http://mfo.test/auth/", "me@x.y", "pw", http)
        headers: list[str | None] = []

        async def get() -> None:
            headers.append(await auth.header())

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(get)
        assert server.logins == 1 and set(headers) == {"Bearer token-1"}
        await auth.invalidate("token-1")
        await auth.invalidate("token-1")  # a second report of the same stale token
        headers.clear()
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(get)
        assert server.logins == 2 and set(headers) == {"Bearer token-2"}
        await auth.invalidate("token-1")  # stale report after the refresh: ignored
        assert await auth.header() == "Bearer token-2"
    assert server.bodies[0] == {"email": "me@x.y", "password": "pw"}


@pytest.mark.anyio
async def test_login_auth_refreshes_before_expiry() -> None:
    """With expires_in (or a JWT exp), the token is renewed once refresh_at of it passed."""
    now = [1000.0]
    server = LoginServer(expires_in=100)
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        auth = LoginAuth("http://mfo.test/auth", "me", "pw", http, refresh_at=0.5,
                         clock=lambda: now[0])
        await auth.header()
        now[0] += 49
        await auth.header()
        assert server.logins == 1
        now[0] += 2
        await auth.header()
        assert server.logins == 2

    jwt_server = LoginServer(token_exp=time.time() + 100)
    async with httpx.AsyncClient(transport=httpx.MockTransport(jwt_server)) as http:
        auth = LoginAuth("http://mfo.test/auth", "me", "pw", http, refresh_at=0.5,
                         clock=lambda: now[0])
        await auth.header()
        now[0] += 60
        await auth.header()
        assert jwt_server.logins == 2


@pytest.mark.anyio
async def test_login_failures_are_typed() -> None:
    """A refused login is AuthError; a 503 from the login endpoint is retryable."""
    for status, exc_type in [(401, AuthError), (503, RetryableError)]:
        server = LoginServer(status=status)
        async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
            auth = LoginAuth("http://mfo.test/auth", "me", "pw", http)
            with pytest.raises(exc_type):
                await auth.header()


# --- breaker slots of calls that end without an outcome (review fixes) -------------------------


def _breaker(threshold: int = 2) -> object:
    from mfo_actors.client._breaker import CircuitBreaker
    from mfo_actors.config import CircuitBreakerConfig, Duration

    return CircuitBreaker("up", CircuitBreakerConfig(
        failure_threshold=threshold, reset_timeout=Duration(10.0), half_open_max_calls=1))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["request", "stream"])
async def test_cancelled_call_gives_its_breaker_slot_back(kind: str) -> None:
    """A call cancelled mid-flight leaves the breaker's in-flight window as it was.

    Before the fix every cancelled call kept a closed-state slot for ever; ``threshold``
    of them made ``wait_until_callable`` (the forwarder's dispatcher) wait for ever.
    """
    from mfo_actors.client._breaker import CircuitBreaker

    breaker = _breaker(threshold=2)
    assert isinstance(breaker, CircuitBreaker)
    arrived = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        base = BaseClient("http://mfo.test", auth=NoAuth(), http=http, breaker=breaker)
        for _ in range(2):
            arrived = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    if kind == "request":
                        await base.request("GET", "/api/info", retry=False)
                    else:
                        async with base.stream("POST", "/api/chat/stream", json={}):
                            pass

                tg.start_soon(call)
                with anyio.fail_after(5):
                    await arrived.wait()
                tg.cancel_scope.cancel()
        assert breaker.allowance() == 2
        with anyio.fail_after(1):
            await breaker.wait_until_callable()


@pytest.mark.anyio
async def test_local_error_gives_its_breaker_slot_back() -> None:
    """An httpx error that is not a transport error (a bad gzip body) frees the slot too."""
    from mfo_actors.client._breaker import CircuitBreaker

    breaker = _breaker(threshold=1)
    assert isinstance(breaker, CircuitBreaker)

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.DecodingError("bad gzip", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        base = BaseClient("http://mfo.test", auth=NoAuth(), http=http, breaker=breaker)
        with pytest.raises(httpx.DecodingError):
            await base.request("GET", "/api/info", retry=False)
    assert breaker.allowance() == 1


def test_non_finite_retry_after_is_unreadable() -> None:
    """``Retry-After: inf`` (or an overflowing number) would park an event for ever."""
    for value in ["inf", "Infinity", "-inf", "1e999"]:
        assert parse_retry_after(value) is None, value


@pytest.mark.anyio
async def test_login_auth_token_expired_by_our_clock_is_not_relogged_per_call() -> None:
    """A token whose JWT exp is already past by our clock (clock skew with the server) is
    used until the server refuses it: before the fix every call made a new login."""
    server = LoginServer(token_exp=time.time() - 100)
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        auth = LoginAuth("http://mfo.test/auth", "me", "pw", http)
        for _ in range(3):
            assert (await auth.header() or "").startswith("Bearer ")
    assert server.logins == 1
