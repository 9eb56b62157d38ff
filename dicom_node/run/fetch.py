"""A worker host's side of the transfer: a job's instances fetched from the receiving node and verified, its results sent back.

The receiving node serves ``/transfer/jobs/<uid>/...`` (:mod:`dicom_node.service.transfer`).
Every instance is streamed into the job's cache folder, checked against the manifest
recorded at receive time (size and SHA-256) and only then renamed into place; a mismatch
fails the job with the instance named. A receiver that cannot be reached is a transient
failure (:class:`dicom_node.errors.ReceiverUnavailable`): the job goes back to the queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dicom_node.errors import ReceiverUnavailable, StudyNotProcessable

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


class ReceiverClient:
    """The receiving node's transfer routes, with its bearer token.

    Parameters
    ----------
    base_url
        ``http://host:port`` (or https) of the receiving node's API.
    token
        Its bearer token (``api.token`` / ``api.token_file``, the same on every host).
    timeout_s
        Per-request socket timeout.
    """

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s

    def _open(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=body, method=method,
            headers={"Authorization": f"Bearer {self._token}", **(headers or {})},
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310 - configured URL
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise ReceiverUnavailable(f"{method} {path}: the receiving node answered {exc.code}") from exc
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise StudyNotProcessable(f"{method} {path}: the receiving node answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ReceiverUnavailable(f"cannot reach the receiving node at {self.base_url}: {exc}") from exc

    def fetch_instances(self, job_uid: str, cache_dir: Path) -> list[Path]:
        """Fetch and verify a job's instances into ``cache_dir``; return their paths.

        Raises
        ------
        StudyNotProcessable
            If an instance's size or SHA-256 differs from the manifest, or the receiving node
            no longer has it.
        ReceiverUnavailable
            If the receiving node cannot be reached.
        """
        with self._open("GET", f"/transfer/jobs/{job_uid}/manifest") as response:
            manifest = json.loads(response.read())
        cache_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for entry in manifest["instances"]:
            sop, expected_size, expected_sha = entry["sop_instance_uid"], entry["size_bytes"], entry["sha256"]
            path = cache_dir / f"{sop}.dcm"
            partial = cache_dir / f".{sop}.part"
            digest, size = hashlib.sha256(), 0
            with self._open("GET", f"/transfer/jobs/{job_uid}/instances/{sop}") as response, \
                    open(partial, "wb") as handle:
                while chunk := response.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
            if size != expected_size or (expected_sha and digest.hexdigest() != expected_sha):
                partial.unlink(missing_ok=True)
                raise StudyNotProcessable(
                    f"instance {sop} from {self.base_url} does not match the manifest recorded at"
                    f" receive time ({size} bytes, SHA-256 {digest.hexdigest()[:16]}...; expected"
                    f" {expected_size} bytes, {str(expected_sha)[:16]}...)"
                )
            os.replace(partial, path)
            paths.append(path)
        logger.info("job %s: %d instance(s) fetched from %s and verified", job_uid, len(paths), self.base_url)
        return paths

    def upload_results(self, job_uid: str, files: list[str]) -> list[str]:
        """Send a job's result files to the receiving node; return their paths there."""
        stored = []
        for name in files:
            path = Path(name)
            with open(path, "rb") as body, self._open(
                "PUT", f"/transfer/jobs/{job_uid}/results/{path.name}", body,
                {"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
            ) as response:
                stored.append(str(json.loads(response.read())["path"]))
        return stored


def drop_cache(cache_dir: Path) -> None:
    """Remove a job's cached instances once it has finished."""
    shutil.rmtree(cache_dir, ignore_errors=True)
