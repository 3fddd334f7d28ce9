"""An optional in-memory cache of GET answers (``client.cache``), as seed 002 suggests.

For data that changes slowly (tool lists, resources, info) polled by many flow runs. Rules:

* only GET, only a 2xx answer (errors are never kept);
* ``Cache-Control: no-store`` or ``no-cache`` from the server: not kept; ``max-age=N``
  shortens the entry's life to N seconds (0: not kept);
* any other call (POST, PUT, DELETE) to an endpoint group, ``/api/memory`` say, drops the
  cached answers of that group, so a write is never followed by a stale read in this process;
* a GET answer is kept only if no write to its group started or ended while it was being
  fetched: each group has a generation, bumped by every invalidation (when a write is sent
  and again when it is answered), and :meth:`ResponseCache.put` refuses an answer whose GET
  began under an older generation. Without it, a GET answered before a write but finishing
  after the write's invalidation would put the pre-write answer back, stale until the ttl;
* at most ``max_entries`` answers, the least recently used dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from urllib.parse import urlencode

from mfo_actors.config import CacheConfig

__all__ = ["CachedAnswer", "ResponseCache", "cache_lifetime", "group_of"]


def group_of(path: str) -> str:
    """``/api/memory/k`` -> ``/api/memory``: what a write invalidates."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    return "/" + "/".join(parts[:2])


def cache_lifetime(cache_control: str | None, ttl: float) -> float:
    """Seconds an answer with this ``Cache-Control`` may be kept (0: not at all)."""
    if not cache_control:
        return ttl
    lifetime = ttl
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            try:
                lifetime = min(lifetime, max(0.0, float(value.strip().strip('"'))))
            except ValueError:
                return 0.0  # a max-age we cannot read: keep nothing rather than guess
    return lifetime


class CachedAnswer:
    """A kept 2xx body and when it stops being fresh."""

    __slots__ = ("body", "expires", "group", "status")

    def __init__(self, status: int, body: bytes, expires: float, group: str) -> None:
        self.status = status
        self.body = body
        self.expires = expires
        self.group = group


class ResponseCache:
    """LRU of fresh GET answers, keyed by URL and query.

    Args:
      ttl: Seconds an answer is kept at most.
      max_entries: Answers kept at most.
      monotonic: Time source (a fake one in tests).
    """

    def __init__(self, ttl: float, max_entries: int, *,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.ttl = float(ttl)
        self.max_entries = max(1, max_entries)
        self._now = monotonic if monotonic is not None else time.monotonic
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        # group -> invalidations so far; a group never written is at 0 (not stored). Grows
        # with the groups written, which are the API's endpoint groups: a handful.
        self._generations: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: CacheConfig, *, monotonic: Callable[[], float] | None = None
                    ) -> ResponseCache:
        return cls(float(cfg.ttl), cfg.max_entries, monotonic=monotonic)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(url: str, params: Mapping[str, str] | None) -> str:
        return url if not params else f"{url}?{urlencode(sorted(params.items()))}"

    def get(self, key: str) -> CachedAnswer | None:
        """The fresh answer kept under *key*, or None (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._now():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def generation(self, path: str) -> int:
        """The invalidation count of *path*'s group: take it before a GET is sent and give
        it to :meth:`put`."""
        return self._generations.get(group_of(path), 0)

    def put(self, key: str, path: str, status: int, headers: Mapping[str, str],
            body: bytes, *, generation: int | None = None) -> bool:
        """Keep a GET answer if the rules allow; returns whether it was kept.

        *generation*: :meth:`generation` of *path* when the GET was sent; if the group was
        invalidated since, the answer may predate a write and is not kept (None: no check).
        """
        if not 200 <= status < 300:
            return False
        if generation is not None and generation != self.generation(path):
            return False
        lifetime = cache_lifetime(headers.get("cache-control"), self.ttl)
        if lifetime <= 0:
            self._entries.pop(key, None)
            return False
        self._entries[key] = CachedAnswer(status, body, self._now() + lifetime, group_of(path))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def invalidate(self, path: str) -> int:
        """Drop every answer of *path*'s endpoint group, and make answers to GETs already in
        flight unkeepable (the group's generation moves on); returns how many were dropped."""
        group = group_of(path)
        self._generations[group] = self._generations.get(group, 0) + 1
        stale = [k for k, e in self._entries.items() if e.group == group]
        for k in stale:
            del self._entries[k]
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()
