"""Resource and memory routes (``/api/resources``, ``/api/memory``): what a client reads,
searches and stores.

Three resources exist from the start; ``POST /api/resources`` adds one. Memory is a key-value
store with a word-match query.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.ids import new_id
from mfo_actors.mock_server._base import (
    HTTPError,
    MockPart,
    allow,
    decode_typed,
    iso,
    json_response,
)

__all__ = ["ResourceRoutes"]


_RESOURCES: tuple[m.Resource, ...] = (
    m.Resource(id="mars-101", title="Mars: The Red Planet", type="article",
               content="Mars is the fourth planet from the Sun.",
               metadata={"source": "astronomy-db"}, created_at="2025-05-13T10:30:00.000Z"),
    m.Resource(id="solar-system", title="Our Solar System", type="article",
               content="The Solar System is the Sun and the objects that orbit it, Mars too.",
               metadata={"source": "astronomy-db"}, created_at="2025-05-13T10:30:00.000Z"),
    m.Resource(id="weather-api", title="Weather API Documentation", type="document",
               content="The Weather API provides current weather data.",
               created_at="2025-05-13T10:30:00.000Z"),
)


class ResourceRoutes(MockPart):
    """``/api/resources`` and ``/api/memory``."""

    def _start_resources(self) -> None:
        self._memory: dict[str, m.MemoryItem] = {}
        self._resources: dict[str, m.Resource] = {r.id: r for r in _RESOURCES}

    async def _api_memory(self, method: str, rest: list[str], request: Request) -> Response:
        stamp = iso(self._clock())
        if not rest:
            if method == "GET":
                return json_response(m.MemoryList(keys=[
                    m.MemoryKey(key=i.key, created_at=i.created_at)
                    for i in self._memory.values()]))
            allow(method, "POST")
            write = decode_typed(request, m.MemoryWrite)
            old = self._memory.get(write.key)
            self._memory[write.key] = m.MemoryItem(
                key=write.key, value=write.value,
                created_at=old.created_at if old else stamp, updated_at=stamp)
            return json_response(m.MemoryStatus(status="stored"))
        if rest == ["query"]:
            allow(method, "POST")
            query = decode_typed(request, m.MemoryQuery)
            return json_response(m.MemoryQueryResults(results=self._query_memory(query)))
        if len(rest) != 1:
            raise HTTPError(404, "not_found", "no such memory endpoint")
        key = rest[0]
        item = self._memory.get(key)
        if item is None:
            raise HTTPError(404, "not_found", f"no memory key {key!r}")
        if method == "GET":
            return json_response(item)
        if method == "PUT":
            update = decode_typed(request, m.MemoryUpdate)
            self._memory[key] = m.MemoryItem(key=key, value=update.value,
                                             created_at=item.created_at, updated_at=stamp)
            return json_response(m.MemoryStatus(status="updated", previous_value=item.value))
        allow(method, "DELETE")
        del self._memory[key]
        return json_response(m.MemoryStatus(status="deleted"))

    def _query_memory(self, query: m.MemoryQuery) -> list[m.MemoryQueryResult]:
        words = [w for w in query.query.lower().split() if w]
        prefix = (query.filter or {}).get("key_prefix") or ""
        results = []
        for item in self._memory.values():
            if not item.key.startswith(prefix):
                continue
            text = (item.key + " " + json.dumps(item.value, default=str)).lower()
            hits = sum(1 for w in words if w in text)
            if hits or not words:
                score = round(hits / len(words), 3) if words else 1.0
                results.append(m.MemoryQueryResult(key=item.key, value=item.value, score=score))
        results.sort(key=lambda r: -r.score)
        return results[: query.limit] if query.limit else results

    async def _api_resources(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest and method == "POST":
            create = decode_typed(request, m.ResourceCreate)
            resource_id = create.id or f"res_{new_id()}"
            if resource_id in self._resources:
                raise HTTPError(409, "conflict", f"resource {resource_id} exists")
            resource = m.Resource(id=resource_id, title=create.title, type=create.type,
                                  content=create.content, metadata=create.metadata or {},
                                  created_at=iso(self._clock()))
            self._resources[resource_id] = resource
            return json_response(resource, status=201)
        allow(method, "GET")
        if not rest:
            return json_response(m.ResourceList(resources=[
                m.ResourceSummary(id=r.id, title=r.title, type=r.type)
                for r in self._resources.values()]))
        if rest == ["search"]:
            q = " ".join(parse_qs(request.query).get("q", [""])).lower().strip()
            if not q:
                raise HTTPError(400, "invalid_request", "Missing required parameter: q")
            results = []
            for r in self._resources.values():
                title = (r.title or "").lower()
                if q in title or q in str(r.content).lower():
                    results.append(m.ResourceSummary(id=r.id, title=r.title, type=r.type,
                                                     score=0.98 if q in title else 0.75))
            results.sort(key=lambda s: -(s.score or 0))
            return json_response(m.ResourceSearchResults(results=results))
        found = self._resources.get(rest[0]) if len(rest) == 1 else None
        if found is None:
            raise HTTPError(404, "not_found", f"no resource {'/'.join(rest)}")
        return json_response(found)
