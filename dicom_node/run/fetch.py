"""A worker host's side of the transfer: a job's instances fetched from the receiving nodes that hold them and verified, its results sent back.

The receiving nodes serve ``/transfer/jobs/<uid>/...`` (:mod:`dicom_node.service.transfer`).
Two receivers on one ledger may each hold part of a study (a failover mid-study), so the
worker asks every configured receiver once per job which of the job's instances are in its
spool, then streams each instance from one that holds it into the job's cache folder,
checks it against the manifest recorded at receive time (size and SHA-256) and only then
renames it into place. A receiver that cannot be reached is skipped with a log line; an
instance that no receiver holds, or whose every copy differs from the manifest, fails the
job with the instance named. When a receiver that was skipped might hold it, that is a
transient failure (:class:`dicom_node.errors.ReceiverUnavailable`): the job goes back to
the queue. With ``https://`` addresses the receivers' certificates are checked against
``node.tls.ca_certificates``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import TlsSettings
from dicom_node.errors import ReceiverUnavailable, ReceiverUntrusted, StudyNotProcessable

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


def receiver_tls_context(tls: TlsSettings | None) -> ssl.SSLContext:
    """Return the context for ``https://`` receivers: TLS 1.2 or later, their certificate and host
    name checked against ``tls.ca_certificates`` (the system's CAs without it); ``tls``'s own
    certificate presented, for a node that requires client certificates.

    Raises
    ------
    ssl.SSLError, OSError
        A file is unreadable, or the key does not match the certificate.
    """
    context = ssl.create_default_context(
        cafile=None if tls is None or tls.ca_certificates is None else str(tls.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


class ReceiverClient:
    """One receiving node's transfer routes, with its bearer token.

    Parameters
    ----------
    base_url
        ``http://host:port`` (or https) of the receiving node's API.
    token
        Its bearer token (``api.token`` / ``api.token_file``, the same on every host).
    timeout_s
        Per-request socket timeout.
    tls_context
        Checks the certificate of an ``https://`` receiver (:func:`receiver_tls_context`).
    """

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 60.0,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._context = tls_context

    def _open(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=body, method=method,
            headers={"Authorization": f"Bearer {self._token}", **(headers or {})},
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s,  # noqa: S310 - configured URL
                                          context=self._context)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise ReceiverUnavailable(f"{method} {path}: the receiving node answered {exc.code}") from exc
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise StudyNotProcessable(f"{method} {path}: the receiving node answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise ReceiverUntrusted(
                    f"refusing {self.base_url}: its certificate is not trusted ({reason.verify_message});"
                    " node.tls.ca_certificates must hold the CA that signed it"
                ) from exc
            raise ReceiverUnavailable(f"cannot reach the receiving node at {self.base_url}: {reason}") from exc

    def check(self) -> None:
        """Connect once (``/healthz``), checking the certificate of an ``https://`` receiver.

        Raises
        ------
        ReceiverUntrusted
            If its certificate is not signed by a trusted CA, or names another host.
        ReceiverUnavailable
            If it cannot be reached.
        """
        with self._open("GET", "/healthz"):
            pass

    def manifest(self, job_uid: str) -> list[dict[str, Any]]:
        """Return the job's manifest: SOP Instance UID, size and SHA-256 of every instance."""
        with self._open("GET", f"/transfer/jobs/{job_uid}/manifest") as response:
            return list(json.loads(response.read())["instances"])

    def held(self, job_uid: str) -> set[str]:
        """Return the SOP Instance UIDs of the job's instances in this receiver's spool."""
        with self._open("GET", f"/transfer/jobs/{job_uid}/held") as response:
            return set(json.loads(response.read())["sop_instance_uids"])

    def download(self, job_uid: str, entry: dict[str, Any], cache_dir: Path) -> Path:
        """Stream one instance into ``cache_dir``, verified against its manifest ``entry``.

        Raises
        ------
        StudyNotProcessable
            If its size or SHA-256 differs from the manifest, or this receiver no longer has it.
        ReceiverUnavailable
            If this receiver cannot be reached.
        """
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
        return path

    def upload_results(self, job_uid: str, files: list[str]) -> list[str]:
        """Send a job's result files to this receiver; return their paths there."""
        stored = []
        for name in files:
            path = Path(name)
            with open(path, "rb") as body, self._open(
                "PUT", f"/transfer/jobs/{job_uid}/results/{path.name}", body,
                {"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
            ) as response:
                stored.append(str(json.loads(response.read())["path"]))
        return stored


class Receivers:
    """Every receiving node a worker fetches from (``queue.receiver_urls``), in the configured order.

    Parameters
    ----------
    clients
        One client per receiving node.
    """

    def __init__(self, clients: Sequence[ReceiverClient]) -> None:
        if not clients:
            raise ValueError("at least one receiving node is needed")
        self.clients = list(clients)

    def check(self) -> None:
        """Connect to each receiver once; one that is down is only logged (it may come back).

        Raises
        ------
        ReceiverUntrusted
            If a receiver's certificate is not trusted: this worker's TLS settings are wrong.
        """
        for client in self.clients:
            try:
                client.check()
            except ReceiverUntrusted:
                raise
            except ReceiverUnavailable as exc:
                logger.warning("receiving node %s not reachable yet: %s", client.base_url, exc)

    def fetch_instances(self, job_uid: str, cache_dir: Path) -> list[Path]:
        """Fetch and verify a job's instances into ``cache_dir``, each from a receiver holding it.

        Raises
        ------
        StudyNotProcessable
            If an instance is held by none of the receivers, or every copy of it differs from
            the manifest.
        ReceiverUnavailable
            If no receiver can be reached, or an instance may be on one that cannot.
        """
        manifest: list[dict[str, Any]] | None = None
        holdings: dict[str, set[str]] = {}
        skipped: list[str] = []
        for client in self.clients:
            try:
                if manifest is None:
                    manifest = client.manifest(job_uid)  # the ledger's: the same at every receiver
                holdings[client.base_url] = client.held(job_uid)
            except ReceiverUnavailable as exc:
                logger.warning("job %s: receiving node %s skipped: %s", job_uid, client.base_url, exc)
                skipped.append(client.base_url)
        if manifest is None:
            raise ReceiverUnavailable(f"no receiving node could be reached ({', '.join(skipped)})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        paths, sources = [], dict.fromkeys(holdings, 0)
        for entry in manifest:
            client, path = self._download(job_uid, entry, cache_dir, holdings, skipped)
            sources[client.base_url] += 1
            paths.append(path)
        used = ", ".join(f"{url} ({count})" for url, count in sources.items() if count)
        logger.info("job %s: %d instance(s) fetched from %s and verified", job_uid, len(paths), used)
        return paths

    def _download(self, job_uid: str, entry: dict[str, Any], cache_dir: Path,
                  holdings: dict[str, set[str]], skipped: list[str]) -> tuple[ReceiverClient, Path]:
        sop = entry["sop_instance_uid"]
        holders = [c for c in self.clients if sop in holdings.get(c.base_url, ())]
        failures: list[ReceiverUnavailable | StudyNotProcessable] = []
        for client in holders:
            try:
                return client, client.download(job_uid, entry, cache_dir)
            except (ReceiverUnavailable, StudyNotProcessable) as exc:
                logger.warning("job %s: instance %s from %s: %s", job_uid, sop, client.base_url, exc)
                failures.append(exc)
        unavailable = [exc for exc in failures if isinstance(exc, ReceiverUnavailable)]
        if unavailable:
            raise unavailable[0]
        if skipped:
            raise ReceiverUnavailable(
                f"instance {sop} is in the spool of no reachable receiving node; {', '.join(skipped)}"
                " could not be reached")
        if failures:
            raise failures[0]
        raise StudyNotProcessable(
            f"instance {sop} is in the spool of none of the receiving nodes"
            f" ({', '.join(c.base_url for c in self.clients)})")

    def upload_results(self, job_uid: str, files: list[str]) -> list[str]:
        """Send a job's result files to the first receiver that takes them all; return their paths there.

        That receiver sends them to the PACS.

        Raises
        ------
        ReceiverUnavailable
            If no receiver can be reached.
        """
        last: ReceiverUnavailable | None = None
        for client in self.clients:
            try:
                return client.upload_results(job_uid, files)
            except ReceiverUnavailable as exc:
                logger.warning("job %s: results not sent to %s: %s", job_uid, client.base_url, exc)
                last = exc
        assert last is not None  # there is at least one client
        raise last


def drop_cache(cache_dir: Path) -> None:
    """Remove a job's cached instances once it has finished."""
    shutil.rmtree(cache_dir, ignore_errors=True)
