"""Job routes (``/api/jobs``): jobs that move through seed 001's states over time.

A job is ``new`` for the first quarter of ``job_duration``, ``active`` until it has passed,
then ``done`` (result: type and params) or ``error`` for a job of type ``fail``. ``POST
/api/jobs/{id}/cancel`` ends a job not yet finished in ``error`` "cancelled" (409 once
finished). Job answers are ``Cache-Control: no-store``.
"""

from __future__ import annotations

import msgspec

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
    no_store,
)

__all__ = ["JobRoutes"]


class JobRoutes(MockPart):
    """``/api/jobs``: the jobs created so far, and when each was cancelled."""

    def _start_jobs(self) -> None:
        self._jobs: dict[str, tuple[m.Job, float]] = {}
        self._cancelled: dict[str, float] = {}  # job id -> when it was cancelled

    async def _api_jobs(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            if method == "GET":
                jobs = [self._job_now(j) for j in self._jobs]
                return no_store(json_response(m.JobList(jobs=jobs)))
            allow(method, "POST")
            create = decode_typed(request, m.JobCreate)
            now = self._clock()
            job = m.Job(id=f"job_{new_id()}", type=create.type, status="new",
                        params=create.params, created_at=iso(now), updated_at=iso(now))
            self._jobs[job.id] = (job, now)
            self.stats.jobs_created += 1
            return no_store(json_response(job, status=201))
        if rest[0] not in self._jobs or len(rest) > 2 or (len(rest) == 2 and rest[1] != "cancel"):
            raise HTTPError(404, "not_found", f"no job {'/'.join(rest)}")
        job_id = rest[0]
        if len(rest) == 2:
            allow(method, "POST")
            current = self._job_now(job_id)
            if current.status not in ("new", "active"):
                if job_id in self._cancelled:
                    return no_store(json_response(current))  # cancelling twice is cancelling once
                raise HTTPError(409, "conflict", f"job {job_id} already ended ({current.status})")
            self._cancelled[job_id] = self._clock()
            self.stats.jobs_cancelled += 1
            return no_store(json_response(self._job_now(job_id)))
        allow(method, "GET")
        return no_store(json_response(self._job_now(job_id)))

    def _job_now(self, job_id: str) -> m.Job:
        """A job's state now: ``new`` for the first quarter of ``job_duration``, ``active``
        until it has passed, then done (or error); ``error`` "cancelled" once cancelled."""
        job, created = self._jobs[job_id]
        duration = self.faults.job_duration
        cancelled = self._cancelled.get(job_id)
        if cancelled is not None:
            return msgspec.structs.replace(job, status="error", error="cancelled",
                                           updated_at=iso(cancelled))
        now = self._clock()
        if now < created + duration / 4:
            return job
        if now < created + duration:
            return msgspec.structs.replace(job, status="active",
                                           updated_at=iso(created + duration / 4))
        stamp = iso(created + duration)
        if job.type == "fail":
            return msgspec.structs.replace(job, status="error", error="the job failed",
                                           updated_at=stamp)
        return msgspec.structs.replace(job, status="done", updated_at=stamp,
                                       result={"type": job.type, "params": job.params})
