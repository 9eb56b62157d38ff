"""The running node: wires receiver, tracker, worker pool and sender around the ledger, and shuts down cleanly."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import NodeConfig
from dicom_node.dispatcher import Completion, WorkerPool, resolve_devices
from dicom_node.errors import DeliveryFailed
from dicom_node.grouper import StudyTracker
from dicom_node.ledger import InstanceRecord, Ledger
from dicom_node.pipeline import JobSpec
from dicom_node.plugins import create_analyses
from dicom_node.receiver import StorageSCP, series_attributes
from dicom_node.sender import backoff_s, send_files
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

#: Jobs that crashed their worker this many times fail instead of crashing it again.
MAX_JOB_ATTEMPTS = 3


def job_line(job: dict[str, Any], study: dict[str, Any] | None, outcome: str) -> str:
    """Return the one canonical log line of a finished job: ids, stage timings, outcome."""
    timings = dict(job.get("timings") or {})
    if study is not None:
        timings.setdefault("receive", study["last_received_at"] - study["first_received_at"])
        if study.get("completed_at"):
            timings.setdefault("wait", study["completed_at"] - study["last_received_at"])
    if job.get("started_at"):
        timings.setdefault("queue", job["started_at"] - job["created_at"])
    order = ("receive", "wait", "queue", "load", "infer", "report", "send")
    parts = " ".join(f"{k}={timings[k]:.3f}s" for k in order if k in timings)
    return (
        f"job {job['uid']} analysis={job['analysis']} study={job['study_uid']}"
        f" series={job['series_uid']} {parts} outcome={outcome}"
    )


def recover_spool(spool: Spool, ledger: Ledger, now: float) -> int:
    """Record spool files the ledger lacks (a commit lost to a power cut); return how many.

    A file in the spool was fsynced before it was acknowledged, so it was received; its
    study then completes and is analysed like any other.
    """
    known = ledger.recorded_paths()
    recovered = 0
    for path in sorted(spool.root.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            logger.error("spool file %s is unreadable, left in place: %s", path, exc)
            continue
        record = InstanceRecord(
            sop_instance_uid=path.stem, series_uid=path.parent.name,
            study_uid=path.parent.parent.name, sop_class_uid=str(ds.get("SOPClassUID", "")),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")), path=str(path),
            size_bytes=path.stat().st_size, calling_ae_title="(recovered)", received_at=now,
        )
        ledger.record_instance(record, series_attributes(ds))
        recovered += 1
    return recovered


class Node:
    """A dicom-node: receives studies, analyses them and sends results.

    Parameters
    ----------
    config
        The validated configuration.
    clock
        Wall-clock time source for the ledger (injected in tests).
    """

    def __init__(self, config: NodeConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        data_dir = config.node.data_dir
        self.results_dir = data_dir / "results"
        self.spool = Spool(data_dir / "spool", fsync=config.node.fsync)
        self.ledger = Ledger(data_dir / "ledger.sqlite3")
        self.analyses = create_analyses(config.analyses)
        self.tracker = StudyTracker(
            self.ledger,
            config.grouping,
            {name: a.rule for name, a in self.analyses.items()},
            config.selection.default_min_slices,
            clock=clock,
        )
        self.scp = StorageSCP(config.node, self.spool, self.ledger, clock=clock,
                              on_stored=lambda _: self._wake.set())
        self.pool: WorkerPool | None = None
        self.address: tuple[str, int] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------

    def start(self, *, ready_timeout_s: float = 300.0) -> tuple[str, int]:
        """Recover from the ledger, start workers, the SCP and the sender; return the address."""
        stale = self.spool.remove_stale_temporaries()
        recovered = recover_spool(self.spool, self.ledger, self.clock())
        requeued = self.ledger.requeue_interrupted()
        if stale or recovered or requeued:
            logger.info(
                "recovered: %d partial file(s) removed, %d instance(s) re-recorded, %d job(s) re-queued",
                stale, recovered, requeued,
            )
        devices = resolve_devices(self.config.workers)
        self.pool = WorkerPool(self.config.workers, self.config.analyses, devices)
        if not self.pool.wait_ready(ready_timeout_s):
            raise RuntimeError("workers did not load their models in time")
        logger.info("%d worker(s) ready on %s", len(devices), ", ".join(devices))
        self.address = self.scp.start()
        self._sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)
        self._sender.start()
        return self.address

    def run(self, poll_s: float = 0.1) -> None:
        """Run the scheduling loop until :meth:`request_stop` is called."""
        while not self._stopping.is_set():
            self.step()
            self._wake.wait(poll_s)
            self._wake.clear()

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers)."""
        self._stopping.set()
        self._wake.set()

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop accepting, let running jobs finish for ``drain_s``, then stop everything.

        Jobs still running are re-queued by the next start (the ledger says 'running').
        """
        self._stopping.set()
        self.scp.stop()
        if self.pool is not None:
            deadline = time.monotonic() + drain_s
            while self.pool.busy_count() and time.monotonic() < deadline:
                self._finish(self.pool.collect())
                time.sleep(0.05)
            self.pool.close()
            self.pool = None
        self.ledger.requeue_interrupted()
        if self._sender is not None:
            self._sender.join(timeout=drain_s)
        logger.info("node stopped")

    # -- scheduling ------------------------------------------------------------------

    def step(self) -> None:
        """Complete due studies, hand queued jobs to idle workers, record finished jobs."""
        self.tracker.tick()
        pool = self.pool
        if pool is None:
            return
        self._finish(pool.collect())
        while pool.idle_count():
            job = self.ledger.claim_next_job(self.clock(), tuple(self.analyses))
            if job is None:
                break
            if job["attempts"] > MAX_JOB_ATTEMPTS:
                self._record_failure(job, "the job stopped its worker too many times")
                continue
            spec = self._spec(job)
            if spec is None:
                continue
            pool.submit(spec)

    def _spec(self, job: dict[str, Any]) -> JobSpec | None:
        paths = self.ledger.instance_paths(job["series_uid"])
        missing = [p for p in paths if not p.exists()]
        if not paths or missing:
            self._record_failure(job, f"{len(missing)} of {len(paths)} instance files are missing")
            return None
        result_dir = self.results_dir / job["uid"]
        result_dir.mkdir(parents=True, exist_ok=True)
        return JobSpec(
            job_uid=job["uid"],
            study_uid=job["study_uid"],
            series_uid=job["series_uid"],
            analysis=job["analysis"],
            paths=tuple(str(p) for p in paths),
            result_dir=str(result_dir),
            series_numbers=self.config.analyses[job["analysis"]].series_numbers,
            node_name=self.config.node.ae_title,
        )

    def _record_failure(self, job: dict[str, Any], reason: str) -> None:
        self.ledger.finish_job(job["id"], self.clock(), state="failed", reason=reason)
        logger.warning("%s reason=%r", self._line(job["uid"], "failed"), reason)

    def _finish(self, completions: list[Completion]) -> None:
        for done in completions:
            job = self.ledger.job(done.spec.job_uid)
            if job is None:
                continue
            now = self.clock()
            if done.outcome is None:
                state = "failed"
                self.ledger.finish_job(
                    job["id"], now, state=state, reason=f"{done.error_kind}: {done.error}",
                    timings={"run": round(done.elapsed_s, 4)},
                )
                logger.warning("%s reason=%r", self._line(job["uid"], state), done.error)
                continue
            outcome = done.outcome
            dicom_files = [f for f in outcome.files if f.endswith(".dcm")]
            deliveries = [(d, dicom_files) for d in self.config.destinations_for(job["analysis"])]
            state = self.ledger.finish_job(
                job["id"], now, state="done", timings=outcome.timings,
                result_dir=done.spec.result_dir, summary=outcome.summary, deliveries=deliveries,
            )
            if state != "done" or not deliveries:
                logger.info(self._line(job["uid"], state if state != "done" else "done (no destination)"))
            self._wake.set()

    def _line(self, job_uid: str, outcome: str) -> str:
        job = self.ledger.job(job_uid)
        if job is None:
            return f"job {job_uid} outcome={outcome}"
        return job_line(job, self.ledger.study(job["study_uid"]), outcome)

    # -- delivery --------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self.deliver_due()
            self._stopping.wait(0.1)

    def deliver_due(self) -> int:
        """Attempt every delivery that is due; return how many were sent."""
        sent = 0
        settings = self.config.delivery
        for delivery in self.ledger.due_deliveries(self.clock()):
            destination = self.config.destinations.get(delivery["destination"])
            start = time.perf_counter()
            try:
                if destination is None:
                    raise DeliveryFailed(
                        f"destination {delivery['destination']!r} is no longer configured",
                        retryable=False,
                    )
                send_files(
                    [Path(f) for f in delivery["files"]], destination,
                    calling_ae_title=self.config.node.ae_title, timeout_s=settings.timeout_s,
                )
            except DeliveryFailed as exc:
                attempts = delivery["attempts"] + 1
                retry = exc.retryable and attempts < settings.max_attempts
                retry_at = (
                    self.clock() + backoff_s(attempts, settings.retry_initial_s, settings.retry_max_s)
                    if retry else None
                )
                self.ledger.delivery_failed(delivery["id"], self.clock(), str(exc), retry_at=retry_at)
                if retry:
                    logger.warning(
                        "delivery of job %s to %s failed (attempt %d), retry in %.0f s: %s",
                        delivery["job_uid"], delivery["destination"], attempts,
                        (retry_at or 0) - self.clock(), exc,
                    )
                else:
                    logger.error(
                        "%s reason=%r",
                        self._line(delivery["job_uid"], f"dead-letter ({delivery['destination']})"),
                        str(exc),
                    )
                continue
            self.ledger.delivery_succeeded(delivery["id"], self.clock())
            self.ledger.add_timing(delivery["job_uid"], "send", time.perf_counter() - start)
            logger.info(self._line(delivery["job_uid"], f"sent to {delivery['destination']}"))
            sent += 1
        return sent
