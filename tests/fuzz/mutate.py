"""Mutations of valid HTTP requests, shared by the in-process and the socket-level fuzzers.

A fuzzer that sends random bytes mostly tests the first line's parser; one that mutates
valid requests reaches the header, framing, body and pipelining code. Each mutation is one
of: flip a byte, insert an interesting token, delete a span, duplicate a span, truncate.
"""

from __future__ import annotations

import random

__all__ = ["BASE_REQUESTS", "TOKENS", "mutate", "random_request"]

_JSON = b'{"type":"fuzz","n":1,"s":"\\u00e9t\\u00e9","a":[1,2,{"b":null}]}'

BASE_REQUESTS: list[bytes] = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_JSON), _JSON),
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_JSON), _JSON),
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n{}",
    b"POST /webhook HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}") * 3,
]

TOKENS: list[bytes] = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\xff", b"\xc3\x28",
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 0\r\n", b"Content-Length: -1\r\n",
    b"Content-Length: 99999999999999999999\r\n", b"Content-Length: 10, 20\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Connection: close\r\n",
    b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n", b"Host: \r\n",
    b"HTTP/2.0", b"HTTP/0.9", b"http://evil:1/webhook", b"*", b"%00", b"../",
    b"ffffffffffffffff\r\n", b"0\r\n\r\n", b";ext=1", b"\"", b"{", b"}", b"[" * 64,
    b"A" * 300, b"X-A: " + b"b" * 9000 + b"\r\n",
]


def mutate(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """*data* with 1 to 4 random mutations (or *rounds*)."""
    out = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.randint(1, 4)):
        pos = rng.randint(0, len(out))
        kind = rng.randrange(5)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[pos:pos] = rng.choice(TOKENS)
        elif kind == 2:
            del out[pos:pos + rng.randint(1, 16)]
        elif kind == 3:
            end = min(len(out), pos + rng.randint(1, 64))
            out[pos:pos] = out[pos:end]
        else:
            del out[pos:]
    return bytes(out)


def random_request(rng: random.Random) -> bytes:
    """A base request, mutated (nine times in ten) or as is."""
    base = rng.choice(BASE_REQUESTS)
    return base if rng.random() < 0.1 else mutate(rng, base)
