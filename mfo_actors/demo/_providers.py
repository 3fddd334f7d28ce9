"""Simulated webhook providers: an app signing with Standard Webhooks, and GitHub.

They behave as real providers do: each delivery has an id (``webhook-id`` /
``X-GitHub-Delivery``) and is signed; some deliveries are sent again with the same id (the
provider did not see our answer in time), and a delivery answered 503 or not answered at all
is retried later. Two are wrong on purpose: one carries a forged signature (must be refused
401 and never stored) and one a malformed JSON body (must be refused 400). Every payload
carries its delivery id (``"delivery"``), so the verdict can check what reached the server.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import anyio
import httpx

from mfo_actors.actors._verify import sign_github, sign_standard_webhooks
from mfo_actors.demo._setup import APP_PATH, GITHUB_PATH, GITHUB_SECRET, STANDARD_WEBHOOKS_SECRET

__all__ = ["Delivery", "Tally", "make_deliveries", "play"]

RETRY_CHANCE = 0.08  # of accepted deliveries sent once more with the same id
RETRY_DELAY = 0.5  # seconds before such a provider retry
UNAVAILABLE_RETRY_DELAY = 1.0  # seconds before resending after a 503 or no answer
MAX_IN_FLIGHT = 32  # requests open at once, like a provider's worker pool
FORGED_KEY = "whsec_" + "Zm9yZ2Vk" * 4  # not the route's key

Kind = Literal["normal", "forged", "malformed"]


@dataclass(frozen=True)
class Delivery:
    """One webhook as a provider sends it (again, if it retries)."""

    provider: Literal["app", "github"]
    delivery_id: str
    event_type: str
    body: bytes
    kind: Kind = "normal"

    def request(self) -> tuple[str, dict[str, str]]:
        """The path and headers to send now (Standard Webhooks signs a fresh timestamp)."""
        headers = {"content-type": "application/json"}
        if self.provider == "app":
            ts = int(time.time())
            key = FORGED_KEY if self.kind == "forged" else STANDARD_WEBHOOKS_SECRET
            headers.update({
                "webhook-id": self.delivery_id, "webhook-timestamp": str(ts),
                "webhook-signature": sign_standard_webhooks(key, self.delivery_id, ts,
                                                            self.body)})
            return APP_PATH, headers
        headers.update({"x-github-delivery": self.delivery_id,
                        "x-github-event": self.event_type,
                        "x-hub-signature-256": sign_github(GITHUB_SECRET, self.body)})
        return GITHUB_PATH, headers


@dataclass
class Tally:
    """What the providers sent and were answered."""

    sent: int = 0  # requests, retries included
    deliveries: int = 0  # distinct deliveries
    accepted: dict[str, str] = field(default_factory=dict)  # delivery id -> event id (202)
    duplicates: int = 0  # 200 "duplicate": a retry recognised
    duplicate_mismatch: int = 0  # a duplicate answered with another event id (never expected)
    rejected_signature: int = 0  # 401
    rejected_body: int = 0  # 400
    unavailable: int = 0  # 503 or no answer: resent later
    unexpected: list[str] = field(default_factory=list)  # any other answer
    refused: set[str] = field(default_factory=set)  # delivery ids refused on purpose


def _payload(rng: random.Random, provider: str, event_type: str, delivery_id: str,
             n: int) -> dict[str, object]:
    if provider == "github":
        return {"delivery": delivery_id, "action": rng.choice(["opened", "closed", "edited"]),
                "repository": {"full_name": "acme/shop"}, "sender": {"login": f"dev{n % 7}"}}
    if event_type == "user.signup":
        return {"type": event_type, "delivery": delivery_id, "email": f"user{n}@example.com",
                "email_verified": rng.random() < 0.7, "plan": rng.choice(["free", "pro"])}
    if event_type == "ticket.created":
        return {"type": event_type, "delivery": delivery_id, "title": f"Order {n} is late",
                "priority": rng.choice(["low", "normal", "high", "urgent"]), "status": "open"}
    return {"type": event_type, "delivery": delivery_id, "amount": rng.randint(5, 500),
            "currency": "EUR"}


def make_deliveries(count: int, *, seed: int = 7) -> list[Delivery]:
    """*count* deliveries from both providers; one forged at 30 %, one malformed at 60 %."""
    rng = random.Random(seed)
    forged_at, malformed_at = int(count * 0.3), int(count * 0.6)
    out = []
    for n in range(count):
        if rng.random() < 0.6:
            provider: Literal["app", "github"] = "app"
            event_type = rng.choice(["user.signup", "user.signup", "ticket.created",
                                     "invoice.paid"])
            delivery_id = f"msg_{n:05d}{rng.getrandbits(32):08x}"
        else:
            provider = "github"
            event_type = rng.choice(["push", "issues", "pull_request"])
            delivery_id = f"{rng.getrandbits(64):016x}-gh{n:05d}"
        body = json.dumps(_payload(rng, provider, event_type, delivery_id, n)).encode()
        kind: Kind = "normal"
        if n == forged_at:
            provider, kind = "app", "forged"
            event_type = "user.signup"
        elif n == malformed_at:
            provider, kind = "github", "malformed"
            body = body[: len(body) // 2]  # cut short: not JSON any more
        out.append(Delivery(provider, delivery_id, event_type, body, kind))
    return out


async def play(
    http: httpx.AsyncClient,
    deliveries: list[Delivery],
    *,
    rate: float,
    tally: Tally,
    clock: Callable[[], float] = time.monotonic,
    seed: int = 11,
) -> None:
    """Send *deliveries* at *rate* per second, with the retries real providers make.

    Returns once every delivery has a final answer (accepted, duplicate, or refused).
    """
    rng = random.Random(seed)
    limiter = anyio.CapacityLimiter(MAX_IN_FLIGHT)

    async def send(delivery: Delivery, *, retry: bool) -> None:
        path, headers = delivery.request()
        async with limiter:
            tally.sent += 1
            try:
                response = await http.post(path, content=delivery.body, headers=headers)
            except httpx.HTTPError:
                response = None
        if response is None or response.status_code == 503:
            tally.unavailable += 1
            await anyio.sleep(UNAVAILABLE_RETRY_DELAY)
            await send(delivery, retry=retry)
            return
        status = response.status_code
        if status == 202:
            tally.accepted[delivery.delivery_id] = response.json()["id"]
            if not retry and rng.random() < RETRY_CHANCE:
                await anyio.sleep(RETRY_DELAY)  # "our answer was lost": the same delivery
                await send(delivery, retry=True)
        elif status == 200 and response.json().get("duplicate"):
            tally.duplicates += 1
            # (setdefault: a first send whose 202 was lost was stored all the same.)
            event_id = response.json()["id"]
            if tally.accepted.setdefault(delivery.delivery_id, event_id) != event_id:
                tally.duplicate_mismatch += 1
        elif status == 401 and delivery.kind == "forged":
            tally.rejected_signature += 1
            tally.refused.add(delivery.delivery_id)
        elif status == 400 and delivery.kind == "malformed":
            tally.rejected_body += 1
            tally.refused.add(delivery.delivery_id)
        else:
            tally.unexpected.append(f"{delivery.delivery_id}: {status} {response.text[:200]}")

    start = clock()
    async with anyio.create_task_group() as tg:
        for i, delivery in enumerate(deliveries):
            delay = start + i / rate - clock()
            if delay > 0:
                await anyio.sleep(delay)
            tally.deliveries += 1
            tg.start_soon(partial(send, delivery, retry=False))
