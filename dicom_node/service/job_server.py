"""The processing pipeline's job-server calls (``POST /job/``, ``GET /query/{uid}``) over the job service.

Scripts written for the aiohttp job server of the processing pipeline post
``{"job_name": "3dblur", "in_dir": "dicom_data"}`` and poll ``/query/<uid>``; these routes
answer them in that server's words, while the jobs are ordinary ledger jobs (origin ``api``)
run, reported and sent like any other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from dicom_node.errors import InvalidJobRequest
from dicom_node.service.jobs import JobService
from dicom_node.state.records import JobState

logger = logging.getLogger(__name__)

#: HTTP status of ``GET /query/{uid}`` for a job that ended without results.
ENDED_WITHOUT_RESULTS = 422


def resolve_job_dir(jobs_root: Path, in_dir: str) -> Path:
    """Return the folder ``in_dir`` names, which must lie inside ``jobs_root``.

    A relative ``in_dir`` is taken relative to ``jobs_root``; an absolute one must already
    point inside it. Symbolic links are followed before the check, so neither ``..`` nor a
    link leads outside.

    Parameters
    ----------
    jobs_root
        The folder job inputs are put in (``api.jobs_root``).
    in_dir
        The request's ``in_dir``.

    Returns
    -------
    pathlib.Path
        The resolved folder.

    Raises
    ------
    InvalidJobRequest
        Naming ``in_dir``: empty, outside ``jobs_root``, or not a folder.
    """
    if not in_dir.strip() or "\x00" in in_dir:
        raise InvalidJobRequest("in_dir", "must name a folder under the jobs folder")
    root = jobs_root.resolve()
    folder = (root / in_dir).resolve()
    if folder != root and root not in folder.parents:
        raise InvalidJobRequest("in_dir", f"{in_dir!r} lies outside the jobs folder {root}")
    if folder == root:
        raise InvalidJobRequest("in_dir", "must name a folder inside the jobs folder, not the jobs folder itself")
    if not folder.is_dir():
        raise InvalidJobRequest("in_dir", f"{in_dir!r} is not a folder under {root}")
    return folder


def query_answer(jobs: JobService, uid: str) -> tuple[int, dict[str, Any]]:
    """Return the status code and body of ``GET /query/{uid}``.

    202 ``{"msg": "Job is running"}`` while queued or running; 200 ``{"msg": "Job has
    completed", "output_dir": ...}`` when done (the folder holding the derived series files
    and ``result.json``); 422 with the reason when it failed, was cancelled or had nothing
    to run on; 404 when unknown.
    """
    job = jobs.job(uid)
    if job is None:
        return 404, {"msg": f"No job with uid {uid}"}
    if not job.state.is_final:
        return 202, {"msg": "Job is running", "status": str(job.state)}
    if job.state == JobState.DONE:
        return 200, {"msg": "Job has completed", "output_dir": job.result_dir, "status": str(job.state)}
    return ENDED_WITHOUT_RESULTS, {"msg": f"Job has {_ended(job.state)}: {job.reason or 'no reason recorded'}",
                                   "status": str(job.state)}


def _ended(state: JobState) -> str:
    return {JobState.FAILED: "failed", JobState.CANCELLED: "been cancelled",
            JobState.NOT_APPLICABLE: "nothing to run on",
            JobState.SUPERSEDED: "been superseded"}.get(state, str(state))


def _request_fields(body: Any) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise InvalidJobRequest("body", 'expected a JSON object {"job_name": ..., "in_dir": ...}')
    unknown = sorted(set(body) - {"job_name", "in_dir"})
    if unknown:
        raise InvalidJobRequest(unknown[0], "unknown field (expected job_name and in_dir)")
    for name in ("job_name", "in_dir"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise InvalidJobRequest(name, "required, a non-empty string")
    return str(body["job_name"]), str(body["in_dir"])


def add_job_server_routes(
    app: FastAPI, jobs: JobService, *, job_names: Mapping[str, str], jobs_root: Path,
    authorised: Callable[..., None],
) -> None:
    """Add ``POST /job/`` and ``GET /query/{uid}`` to the API.

    Parameters
    ----------
    app
        The node's API.
    jobs
        Creates and looks up jobs.
    job_names
        A request's ``job_name`` -> the task it runs (``api.job_names``); a task's own name
        is accepted as well.
    jobs_root
        Where relative ``in_dir`` folders are looked up (``api.jobs_root``).
    authorised
        The dependency that checks the bearer token of changing calls.
    """

    async def create(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            return _refused(InvalidJobRequest("body", "not valid JSON"))
        try:
            job_name, in_dir = _request_fields(body)
            task = job_names.get(job_name, job_name)
            if task not in jobs.runnable:
                known = sorted({*job_names, *jobs.task_names})
                raise InvalidJobRequest("job_name", f"unknown job {job_name!r} (known: {', '.join(known)})")
            folder = resolve_job_dir(jobs_root, in_dir)
            uid = jobs.submit(task, input_dir=folder)
        except InvalidJobRequest as exc:
            return _refused(exc)
        logger.info("job %s requested as %r on %s", uid, job_name, in_dir)
        return JSONResponse({"uid": uid}, status_code=201, headers={"Location": f"/query/{uid}"})

    def query(uid: str) -> JSONResponse:
        status, body = query_answer(jobs, uid)
        return JSONResponse(body, status_code=status)

    for path in ("/job/", "/job"):
        app.add_api_route(path, create, methods=["POST"], status_code=201, dependencies=[Depends(authorised)],
                          include_in_schema=path == "/job/", summary="Create a job (processing pipeline form)",
                          description='`{"job_name": "3dblur", "in_dir": "dicom_data"}` -> 201 `{"uid"}`; '
                                      "`in_dir` is relative to the jobs folder. 400 with `msg` when refused.")
    app.add_api_route("/query/{uid}", query, methods=["GET"], summary="A job's state (processing pipeline form)",
                      description='202 `{"msg": "Job is running"}`; 200 `{"msg": "Job has completed", '
                                  '"output_dir"}`; 422 `{"msg"}` when it ended without results; 404 unknown.')


def _refused(exc: InvalidJobRequest) -> JSONResponse:
    logger.warning("job request refused: %s", exc)
    return JSONResponse({"msg": str(exc), "field": exc.field}, status_code=400)
