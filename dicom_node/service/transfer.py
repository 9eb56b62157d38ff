"""Files between a receiving node and worker hosts over its HTTP API: a job's instances out, its results in.

Workers on other hosts need no shared filesystem: they read a job's manifest (SOP
Instance UIDs, sizes, SHA-256, recorded at receive time), ask each receiving node which
of the job's instances are in its own spool (two receivers on one ledger may each hold
part of a study), fetch each instance from one that holds it (streamed), and upload their
result files, which the receiving node then sends to the PACS. Every route needs the
node's bearer token; without ``api.token`` they are not served.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse

from dicom_node.receive.spool import Spool, fsync_dir, is_valid_uid
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import JobRecord, ManifestEntry

logger = logging.getLogger(__name__)

#: Result file names a worker may upload: no folders, no hidden files.
_RESULT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def add_transfer_routes(app: FastAPI, ledger: Ledger, spool: Spool, results_dir: Path,
                        authorised: Callable[..., None]) -> None:
    """Serve ``/transfer/jobs/{uid}/...``: the manifest, the instances held here, the instances, result uploads.

    Parameters
    ----------
    app
        The node's API application.
    ledger
        The ledger the jobs and manifests are read from.
    spool
        This node's instance store: only the files in it are served (the ledger's paths may
        be another receiving node's).
    results_dir
        Uploaded results go to ``results_dir/<job uid>/<name>``.
    authorised
        The dependency that checks the bearer token.
    """

    def running(uid: str) -> JobRecord:
        job = ledger.job(uid)
        if job is None:
            raise HTTPException(404, f"no job {uid}")
        if job.series_uid is None:
            raise HTTPException(409, f"job {uid} has no series")
        return job

    @app.get("/transfer/jobs/{uid}/manifest", dependencies=[Depends(authorised)])
    def manifest(uid: str) -> dict[str, Any]:
        """The job's instances: SOP Instance UID, size and SHA-256 of each."""
        job = running(uid)
        entries = ledger.manifest(job.series_uid or "")
        return {"job_uid": uid, "series_uid": job.series_uid,
                "instances": [entry.to_json() for entry in entries]}

    def local_path(job: JobRecord, entry: ManifestEntry) -> Path:
        return spool.path_for(job.study_uid, job.series_uid or "", entry.sop_instance_uid)

    @app.get("/transfer/jobs/{uid}/held", dependencies=[Depends(authorised)])
    def held(uid: str) -> dict[str, Any]:
        """The SOP Instance UIDs of the job's instances whose files are in this node's spool."""
        job = running(uid)
        present = [entry.sop_instance_uid for entry in ledger.manifest(job.series_uid or "")
                   if local_path(job, entry).is_file()]
        return {"job_uid": uid, "sop_instance_uids": present}

    @app.get("/transfer/jobs/{uid}/instances/{sop_instance_uid}", dependencies=[Depends(authorised)])
    def instance(uid: str, sop_instance_uid: str) -> FileResponse:
        """One instance file of the job's series, streamed as stored in this node's spool.

        The spool keeps each instance under its study and series, so a file at the job's
        series path is one of its instances, served without reading the series' manifest (a
        read per instance grew with the square of the series); the worker checks every file
        against the manifest it fetched once. Only a miss reads it, to answer 410 (in the
        series, not in this spool) or 404 (not in the series).
        """
        job = running(uid)
        if is_valid_uid(sop_instance_uid):
            path = spool.path_for(job.study_uid, job.series_uid or "", sop_instance_uid)
            if path.is_file():
                return FileResponse(path, media_type="application/dicom")
            if any(entry.sop_instance_uid == sop_instance_uid for entry in ledger.manifest(job.series_uid or "")):
                raise HTTPException(410, f"instance {sop_instance_uid} is not in this node's spool")
        raise HTTPException(404, f"instance {sop_instance_uid} is not in job {uid}'s series")

    @app.put("/transfer/jobs/{uid}/results/{name}", status_code=201, dependencies=[Depends(authorised)])
    async def upload(uid: str, name: str, request: Request) -> dict[str, Any]:
        """Store one result file of the job (atomically); return where it is on this host."""
        if ledger.job(uid) is None:
            raise HTTPException(404, f"no job {uid}")
        if not _RESULT_NAME.match(name):
            raise HTTPException(422, f"result name {name!r}: letters, digits, '.', '_', '-' only")
        folder = results_dir / uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        tmp = folder / f".{name}.{os.getpid()}.upload"
        size = 0
        with open(tmp, "wb") as handle:
            async for chunk in request.stream():
                handle.write(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
        logger.debug("job %s: result %s received (%d bytes)", uid, name, size)
        return {"path": str(path), "size_bytes": size}
