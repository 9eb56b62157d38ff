"""The node's HTTP API (jobs, studies, health, metrics) and status page, served by uvicorn in a thread."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dicom_node import __version__
from dicom_node.config import ApiSettings

if TYPE_CHECKING:
    from dicom_node.service.node import Node

logger = logging.getLogger(__name__)

#: Job states that are final: GET /jobs/{uid} answers 200 with outputs or the reason.
FINAL_STATES = frozenset({"done", "failed", "not_applicable", "cancelled", "superseded"})
_STATIC = {"status.js": "text/javascript", "status.css": "text/css"}


class JobInput(BaseModel):
    """Where a job's images come from: a folder on the node, or a study it already received."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(None, description="Absolute path of a folder of DICOM files on the node")
    study_instance_uid: str | None = Field(None, description="A study the node already received")
    series_instance_uid: str | None = Field(None, description="Run on this series (default: the first the task accepts)")

    @model_validator(mode="after")
    def _one_source(self) -> JobInput:
        if (self.dir is None) == (self.study_instance_uid is None):
            raise ValueError("give exactly one of dir and study_instance_uid")
        return self


class JobRequest(BaseModel):
    """``POST /jobs``: run ``task`` (an analysis or processing task) on ``input`` with ``options``."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, description="An analysis or task name, e.g. gaussian-blur")
    input: JobInput
    options: dict[str, Any] = Field(default_factory=dict, description='Task options, e.g. {"sigma_mm": 2}')


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """Return the API's view of a ledger job: status, timings and, once final, outputs or reason."""
    summary = job.get("summary") or {}
    files: list[str] = []
    if job.get("result_dir") and Path(job["result_dir"]).is_dir():
        files = sorted(str(p) for p in Path(job["result_dir"]).iterdir() if not p.name.startswith("."))
    view: dict[str, Any] = {
        "uid": job["uid"],
        "status": job["state"],
        "task": job["analysis"],
        "origin": job.get("origin", "dicom"),
        "study_instance_uid": job["study_uid"],
        "series_instance_uid": job["series_uid"],
        "options": job.get("options") or {},
        "attempts": job["attempts"],
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "finished_at": job["finished_at"],
        "timings": job.get("timings") or {},
        "reason": job.get("reason"),
        "deliveries": job.get("deliveries", []),
    }
    if job["state"] == "done":
        view["outputs"] = {
            "files": files,
            "result_uids": summary.get("result_uids", {}),
            "derived_series": summary.get("derived_series"),
            "measurements": summary.get("measurements", []),
            "findings": summary.get("findings", []),
            "sent": [d for d in job.get("deliveries", []) if d["state"] == "sent"],
        }
    return view


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(node: Node, settings: ApiSettings) -> FastAPI:
    """Build the FastAPI application over a running node."""
    app = FastAPI(title="dicom-node", version=__version__,
                  description="Jobs, studies, health and metrics of a dicom-node. Changing calls need "
                              "`Authorization: Bearer <token>` when the node has a token.")
    token = settings.bearer_token()

    def authorised(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise HTTPException(401, "a bearer token is required for this call",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(e["loc"]), "message": str(e["msg"]).removeprefix("Value error, ")}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    def found(uid: str) -> dict[str, Any]:
        job = node.ledger.job(uid)
        if job is None:
            raise HTTPException(404, f"no job {uid}")
        return job

    @app.post("/jobs", status_code=201, dependencies=[Depends(authorised)])
    def create_job(request: JobRequest) -> JSONResponse:
        """Create a job; 201 with its uid. 422 names the field when the request cannot run."""
        from dicom_node.service.node import InvalidJobRequest

        try:
            uid = node.submit_job(
                request.task,
                input_dir=Path(request.input.dir) if request.input.dir is not None else None,
                study_uid=request.input.study_instance_uid,
                series_uid=request.input.series_instance_uid,
                options=request.options,
            )
        except InvalidJobRequest as exc:
            return JSONResponse({"detail": str(exc), "errors": [{"field": exc.field, "message": exc.reason}]},
                                status_code=422)
        job = found(uid)
        return JSONResponse({"uid": uid, "status": job["state"]}, status_code=201,
                            headers={"Location": f"/jobs/{uid}"})

    @app.get("/jobs")
    def list_jobs(
        state: str | None = None, task: str | None = None, study: str | None = None,
        origin: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Recent jobs, newest first, filtered by state, task, study UID or origin."""
        rows = node.ledger.job_rows(state=state, analysis=task, study_uid=study, origin=origin, limit=limit)
        return {"jobs": [job_view(j) for j in rows]}

    @app.get("/jobs/{uid}", responses={202: {"description": "queued or running"}})
    def get_job(uid: str) -> JSONResponse:
        """One job: 202 while queued or running, 200 with outputs or the reason once final."""
        job = found(uid)
        return JSONResponse(job_view(job), status_code=200 if job["state"] in FINAL_STATES else 202)

    @app.post("/jobs/{uid}/retry", dependencies=[Depends(authorised)])
    def retry_job(uid: str) -> dict[str, Any]:
        """Queue a failed, cancelled or finished job again (its results keep their UIDs)."""
        job = found(uid)
        if job["series_uid"] is None:
            raise HTTPException(409, "the job has no series to run on (not applicable)")
        if not node.ledger.retry_job(uid):
            raise HTTPException(409, f"job is {job['state']}; only final jobs can be retried")
        node.ledger.redeliver(node.clock(), uid)
        node.wake()
        return {"uid": uid, "status": "queued"}

    @app.delete("/jobs/{uid}", dependencies=[Depends(authorised)])
    def cancel_job(uid: str) -> dict[str, Any]:
        """Cancel: a queued job at once; a running one ends as cancelled and its results are discarded."""
        job = found(uid)
        if job["state"] in FINAL_STATES:
            raise HTTPException(409, f"job is already {job['state']}")
        state = node.ledger.cancel_job(uid, node.clock())
        return {"uid": uid, "status": state, "cancel_requested": state == "running"}

    @app.get("/studies")
    def list_studies(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Recent studies with instance counts and their jobs' states."""
        studies = node.ledger.study_rows(limit=limit)
        for study in studies:
            study["jobs"] = [{"uid": j["uid"], "task": j["analysis"], "status": j["state"]}
                             for j in node.ledger.job_rows(study_uid=study["study_uid"], limit=50)]
        return {"studies": studies}

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        """Liveness: the node answers, with its AE title, workers and queue."""
        counts = node.ledger.counts()
        return {"status": "ok", "ae_title": node.config.node.ae_title, "version": __version__,
                "workers_busy": node.pool.busy_count() if node.pool else 0,
                "jobs_queued": counts["jobs"].get("queued", 0), "tasks": sorted(node.runnable),
                "token_required": token is not None, "time": time.time()}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/status", response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        from dicom_node.service.status_page import render_status_page

        return HTMLResponse(render_status_page(node.config.node.ae_title))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, "no such file")
        body = resources.files("dicom_node").joinpath("static", name).read_bytes()
        return Response(body, media_type=_STATIC[name])

    return app


class ApiServer:
    """uvicorn serving :func:`create_app` in a background thread; whoever starts it stops it."""

    def __init__(self, node: Node, settings: ApiSettings) -> None:
        self.settings = settings
        app = create_app(node, settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> tuple[str, int]:
        """Start serving; return the bound (host, port).

        Raises
        ------
        RuntimeError
            If the server did not start (port taken) within ``timeout_s``.
        """
        self._thread = threading.Thread(target=self._server.run, name="http-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP API could not listen on {self.settings.host}:{self.settings.port}")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return str(host), int(port)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
