"""The node's HTTP API (jobs, studies, health, metrics) and status page, served by uvicorn in a thread."""

from __future__ import annotations

import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dicom_node import __version__
from dicom_node.config import ApiSettings, TlsSettings
from dicom_node.errors import InvalidJobRequest
from dicom_node.receive.spool import Spool
from dicom_node.service.job_server import add_job_server_routes
from dicom_node.service.jobs import JobService, fleet_of
from dicom_node.service.transfer import add_transfer_routes
from dicom_node.service.status_page import render_status_page
from dicom_node.state.records import DeliveryState, JobRecord, JobState

logger = logging.getLogger(__name__)

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

    task: str = Field(min_length=1, description="An analysis or task name, as configured on the node")
    input: JobInput
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the task, validated by the task")


def job_view(job: JobRecord) -> dict[str, Any]:
    """Return the API's view of a ledger job: status, timings and, once final, outputs or reason."""
    summary = job.summary
    files: list[str] = []
    if job.result_dir and Path(job.result_dir).is_dir():
        files = sorted(str(p) for p in Path(job.result_dir).iterdir() if not p.name.startswith("."))
    view: dict[str, Any] = {
        "uid": job.uid,
        "status": str(job.state),
        "task": job.analysis,
        "origin": str(job.origin),
        "study_instance_uid": job.study_uid,
        "series_instance_uid": job.series_uid,
        "options": job.options,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "timings": job.timings,
        "reason": job.reason,
        "deliveries": [d.to_json() for d in job.deliveries],
    }
    if job.state == JobState.DONE:
        view["outputs"] = {
            "files": files,
            "result_uids": summary.get("result_uids", {}),
            "derived_series": summary.get("derived_series"),
            "measurements": summary.get("measurements", []),
            "findings": summary.get("findings", []),
            "quality": summary.get("quality"),
            "sent": [d.to_json() for d in job.deliveries if d.state == DeliveryState.SENT],
        }
    return view


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(
    jobs: JobService, settings: ApiSettings, *, ae_title: str,
    live_figures: Callable[[], dict[str, Any]], render_metrics: Callable[[], bytes], jobs_root: Path,
    results_dir: Path | None = None, stalled_after_s: float = 30.0, spool: Spool | None = None,
) -> FastAPI:
    """Build the FastAPI application.

    Parameters
    ----------
    jobs
        Creates, retries, cancels and lists jobs and studies.
    settings
        Where to listen and the bearer token.
    ae_title
        The node's AE title, shown on the status page.
    live_figures
        Returns the node's live figures (busy workers) for ``/healthz``.
    render_metrics
        Returns the Prometheus text of ``/metrics``.
    jobs_root
        Where the job-server calls (``POST /job/``) find their relative ``in_dir`` folders.
    results_dir
        Scaled out: serve the transfer routes for worker hosts
        (:mod:`dicom_node.service.transfer`), uploads going here. They need ``api.token``.
    stalled_after_s
        ``queue.stalled_after_s``, for the fleet view of ``/fleet``.
    spool
        Scaled out: this node's instance store, whose files the transfer routes serve.
    """
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

    if results_dir is not None and spool is not None and token is not None:
        add_transfer_routes(app, jobs.ledger, spool, results_dir, authorised)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(e["loc"]), "message": str(e["msg"]).removeprefix("Value error, ")}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    def found(uid: str) -> JobRecord:
        job = jobs.job(uid)
        if job is None:
            raise HTTPException(404, f"no job {uid}")
        return job

    @app.post("/jobs", status_code=201, dependencies=[Depends(authorised)])
    def create_job(request: JobRequest) -> JSONResponse:
        """Create a job; 201 with its uid. 422 names the field when the request cannot run."""
        try:
            uid = jobs.submit(
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
        return JSONResponse({"uid": uid, "status": str(job.state)}, status_code=201,
                            headers={"Location": f"/jobs/{uid}"})

    @app.get("/jobs")
    def list_jobs(
        state: str | None = None, task: str | None = None, study: str | None = None,
        origin: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Recent jobs, newest first, filtered by state, task, study UID or origin."""
        rows = jobs.jobs(state=state, task=task, study_uid=study, origin=origin, limit=limit)
        return {"jobs": [job_view(j) for j in rows]}

    @app.get("/jobs/{uid}", responses={202: {"description": "queued or running"}})
    def get_job(uid: str) -> JSONResponse:
        """One job: 202 while queued or running, 200 with outputs or the reason once final."""
        job = found(uid)
        return JSONResponse(job_view(job), status_code=200 if job.state.is_final else 202)

    @app.post("/jobs/{uid}/retry", dependencies=[Depends(authorised)])
    def retry_job(uid: str) -> dict[str, Any]:
        """Queue a failed, cancelled or finished job again (its results keep their UIDs)."""
        job = found(uid)
        if job.series_uid is None:
            raise HTTPException(409, "the job has no series to run on (not applicable)")
        if not jobs.retry(uid).requeued:
            raise HTTPException(409, f"job is {job.state}; only final jobs can be retried")
        return {"uid": uid, "status": str(JobState.QUEUED)}

    @app.delete("/jobs/{uid}", dependencies=[Depends(authorised)])
    def cancel_job(uid: str) -> dict[str, Any]:
        """Cancel: a queued job at once; a running one ends as cancelled and its results are discarded."""
        job = found(uid)
        if job.state.is_final:
            raise HTTPException(409, f"job is already {job.state}")
        state = jobs.cancel(uid)
        return {"uid": uid, "status": None if state is None else str(state),
                "cancel_requested": state == JobState.RUNNING}

    add_job_server_routes(app, jobs, job_names=settings.job_names, jobs_root=jobs_root, authorised=authorised)

    @app.get("/studies")
    def list_studies(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Recent studies with instance counts and their jobs' states."""
        studies = []
        for study in jobs.studies(limit=limit):
            view = study.to_json()
            view["jobs"] = [{"uid": j.uid, "task": j.analysis, "status": str(j.state)}
                            for j in jobs.jobs(study_uid=study.study_uid, limit=50)]
            studies.append(view)
        return {"studies": studies}

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        """Liveness: the node answers, with its AE title, workers and queue."""
        counts = jobs.counts()
        return {"status": "ok", "ae_title": ae_title, "version": __version__, **live_figures(),
                "jobs_queued": counts.jobs.get(JobState.QUEUED, 0), "tasks": jobs.task_names,
                "token_required": token is not None, "time": time.time()}

    @app.get("/fleet")
    def fleet() -> dict[str, Any]:
        """Scaled out: jobs per queue and the registered workers; on one box ``mode`` is ``single``."""
        view = fleet_of(jobs.ledger, stalled_after_s)
        if view is None:
            return {"mode": "single", "queues": {}, "workers": []}
        return {"mode": "queue", **view}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/status", response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        return HTMLResponse(render_status_page(ae_title))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, "no such file")
        body = resources.files("dicom_node").joinpath("static", name).read_bytes()
        return Response(body, media_type=_STATIC[name])

    return app


class ApiServer:
    """uvicorn serving an application in a background thread; whoever starts it stops it."""

    def __init__(self, app: FastAPI, settings: ApiSettings, tls: TlsSettings | None = None) -> None:
        self.settings = settings
        # With node.tls the API serves HTTPS with the same certificate, CAs and client check.
        tls_options: dict[str, Any] = {}
        if tls is not None and tls.certificate is not None:
            tls_options = {"ssl_certfile": str(tls.certificate), "ssl_keyfile": str(tls.private_key),
                           "ssl_ca_certs": str(tls.ca_certificates) if tls.ca_certificates else None,
                           "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_certificate
                           else ssl.CERT_NONE}
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                access_log=False, lifespan="off", **tls_options)
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
