"""The running node: wires every way in, the tracker, worker pool and sender around the ledger; shuts down cleanly."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import NodeConfig
from dicom_node.run.dispatcher import Completion, WorkerPool, resolve_devices
from dicom_node.errors import DeliveryFailed, DicomNodeError
from dicom_node.schedule.grouper import StudyTracker
from dicom_node.receive.ingest import Ingestor, series_attributes
from dicom_node.state.ledger import InstanceRecord, Ledger, PlannedJob
from dicom_node.service.metrics import NodeMetrics
from dicom_node.run.pipeline import JobSpec
from dicom_node.run.plugins import create_analyses
from dicom_node.receive.scp import ReceiveCounters, StorageSCP
from dicom_node.schedule.selection import select_series
from dicom_node.deliver.sender import backoff_s, send_files
from dicom_node.receive.spool import Spool
from inference.base import ConfigurableAnalysis

if TYPE_CHECKING:
    from dicom_node.service.api import ApiServer
    from dicom_node.receive.watch import WatchFolder

logger = logging.getLogger(__name__)

#: Jobs that crashed their worker this many times fail instead of crashing it again.
MAX_JOB_ATTEMPTS = 3

#: How often the scheduling loop applies the spool retention (``node.retention_days``).
PURGE_INTERVAL_S = 600.0


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


class InvalidJobRequest(DicomNodeError):
    """A job request that cannot be accepted; ``field`` names the part of the request at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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
        # analyses run on every complete study; tasks only when a job names them
        tasks = {k: v for k, v in config.tasks.items() if k not in config.analyses}
        self.runnable = {**create_analyses(tasks), **self.analyses}
        self.tracker = StudyTracker(
            self.ledger,
            config.grouping,
            {name: a.rule for name, a in self.analyses.items()},
            config.selection.default_min_slices,
            clock=clock,
        )
        self.scp = StorageSCP(config.node, self.spool, self.ledger, clock=clock,
                              on_stored=lambda _: self._wake.set())
        self.receive_counters = {"dicom": self.scp.counters, "watch": ReceiveCounters(),
                                 "api": ReceiveCounters()}
        self.metrics = NodeMetrics(self.ledger, lambda: self.receive_counters)
        self.api: ApiServer | None = None
        self.watcher: WatchFolder | None = None
        self.pool: WorkerPool | None = None
        self.address: tuple[str, int] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None
        self._next_purge_at = 0.0

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
        self.pool = WorkerPool(self.config.workers, self.config.runnable(), devices)
        if not self.pool.wait_ready(ready_timeout_s):
            raise RuntimeError("workers did not load their models in time")
        logger.info("%d worker(s) ready on %s", len(devices), ", ".join(devices))
        self.address = self.scp.start()
        self._sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)
        self._sender.start()
        if self.config.api.enabled:
            from dicom_node.service.api import ApiServer

            self.api = ApiServer(self, self.config.api)
            host, port = self.api.start()
            logger.info("HTTP API and status page on http://%s:%d/", host, port)
        if self.config.watch.dir is not None:
            from dicom_node.receive.watch import WatchFolder

            self.watcher = WatchFolder(self.config.watch, self.ingestor("watch"),
                                       rejected_default=self.config.node.data_dir / "watch-rejected")
            self.watcher.start()
        return self.address

    def ingestor(self, origin: str) -> Ingestor:
        """Return an ingestor that stores files like the SCP does, counted under ``origin``."""
        return Ingestor(self.config.node, self.spool, self.ledger, counters=self.receive_counters[origin],
                        clock=self.clock, on_stored=lambda _: self._wake.set())

    def run(self, poll_s: float = 0.1) -> None:
        """Run the scheduling loop until :meth:`request_stop` is called."""
        while not self._stopping.is_set():
            self.step()
            self._wake.wait(poll_s)
            self._wake.clear()

    def wake(self) -> None:
        """Make the scheduling loop look at the ledger now (a job was queued from outside)."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers)."""
        self._stopping.set()
        self._wake.set()

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop accepting, let running jobs finish for ``drain_s``, then stop everything.

        Jobs still running are re-queued by the next start (the ledger says 'running').
        """
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
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
        if self.api is not None:
            self.api.stop()
        logger.info("node stopped")

    # -- scheduling ------------------------------------------------------------------

    def step(self) -> None:
        """Complete due studies, hand queued jobs to idle workers, record finished jobs.

        Every :data:`PURGE_INTERVAL_S` it also applies the spool retention.
        """
        self.tracker.tick()
        if self.clock() >= self._next_purge_at:
            self._next_purge_at = self.clock() + PURGE_INTERVAL_S
            self.purge_expired()
        pool = self.pool
        if pool is None:
            return
        self._finish(pool.collect())
        while pool.idle_count():
            job = self.ledger.claim_next_job(self.clock(), tuple(self.runnable))
            if job is None:
                break
            if job["attempts"] > MAX_JOB_ATTEMPTS:
                self._record_failure(job, "the job stopped its worker too many times")
                continue
            spec = self._spec(job)
            if spec is None:
                continue
            pool.submit(spec)

    def purge_expired(self) -> int:
        """Delete the instances of studies idle for ``node.retention_days``; return how many studies.

        Results, ``result.json`` and the ledger's history stay. Files go first, then the
        ledger rows: a crash in between leaves rows whose files are gone, purged again on
        the next pass, never files without rows, which start-up recovery would take for
        newly received instances and analyse again.
        """
        days = self.config.node.retention_days
        if days <= 0:
            return 0
        purged = 0
        for study_uid in self.ledger.studies_to_purge(self.clock() - days * 86400.0):
            try:
                self.spool.remove_study(study_uid)
            except (OSError, ValueError) as exc:
                logger.error("retention: cannot delete study %s from the spool: %s", study_uid, exc)
                continue
            count = self.ledger.forget_instances(study_uid, self.clock())
            purged += 1
            logger.info("retention: study %s removed from the spool (%d instances, idle for %g days)",
                        study_uid, count, days)
        return purged

    def _spec(self, job: dict[str, Any]) -> JobSpec | None:
        paths = self.ledger.instance_paths(job["series_uid"])
        missing = [p for p in paths if not p.exists()]
        study = None if paths else self.ledger.study(job["study_uid"])
        if study is not None and study["purged_at"] is not None:
            self._record_failure(job, "the study's images were deleted from the spool by retention"
                                      " (node.retention_days); send the study again")
            return None
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
            series_numbers=self.config.runnable()[job["analysis"]].series_numbers,
            node_name=self.config.node.ae_title,
            options=job["options"],
        )

    def _record_failure(self, job: dict[str, Any], reason: str) -> None:
        state = self.ledger.finish_job(job["id"], self.clock(), state="failed", reason=reason)
        self._observe(job["uid"])
        logger.warning("%s reason=%r", self._line(job["uid"], state), reason)

    def _finish(self, completions: list[Completion]) -> None:
        for done in completions:
            job = self.ledger.job(done.spec.job_uid)
            if job is None:
                continue
            now = self.clock()
            if done.outcome is None:
                state = "failed"
                state = self.ledger.finish_job(
                    job["id"], now, state=state, reason=f"{done.error_kind}: {done.error}",
                    timings={"run": round(done.elapsed_s, 4)},
                )
                self._observe(job["uid"])
                logger.warning("%s reason=%r", self._line(job["uid"], state), done.error)
                continue
            outcome = done.outcome
            dicom_files = [f for f in outcome.files if f.endswith(".dcm")]
            deliveries = [(d, dicom_files) for d in self.config.destinations_for(job["analysis"])]
            state = self.ledger.finish_job(
                job["id"], now, state="done", timings=outcome.timings,
                result_dir=done.spec.result_dir, summary=outcome.summary, deliveries=deliveries,
            )
            self._observe(job["uid"])
            if state != "done" or not deliveries:
                logger.info(self._line(job["uid"], state if state != "done" else "done (no destination)"))
            self._wake.set()

    def _line(self, job_uid: str, outcome: str) -> str:
        job = self.ledger.job(job_uid)
        if job is None:
            return f"job {job_uid} outcome={outcome}"
        return job_line(job, self.ledger.study(job["study_uid"]), outcome)

    def _observe(self, job_uid: str) -> None:
        job = self.ledger.job(job_uid)
        if job is not None:
            self.metrics.observe_job(job, self.ledger.study(job["study_uid"]), job["state"])

    # -- requested jobs (HTTP API) ---------------------------------------------------

    def submit_job(
        self, task: str, *, input_dir: Path | None = None, study_uid: str | None = None,
        series_uid: str | None = None, options: dict[str, Any] | None = None,
    ) -> str:
        """Create a job for one task, like a completed study's jobs; return its uid.

        With ``input_dir`` its files are first ingested exactly like C-STORE instances and
        their study is marked complete (the request says what runs on it); with ``study_uid``
        the study must already be in the ledger. The task's rule selects the series (the
        first it accepts, or ``series_uid``); none gives a ``not_applicable`` job with reasons.

        Raises
        ------
        InvalidJobRequest
            Naming the field: unknown task, bad options, no usable input.
        """
        analysis = self.runnable.get(task)
        if analysis is None:
            raise InvalidJobRequest("task", f"unknown task {task!r} (known: {', '.join(sorted(self.runnable))})")
        chosen: dict[str, Any] = {}
        if options:
            if not isinstance(analysis, ConfigurableAnalysis):
                raise InvalidJobRequest("options", f"{task} takes no options")
            try:
                chosen = analysis.validate_options(dict(options))
            except ValueError as exc:
                name, _, reason = str(exc).partition(": ")
                raise InvalidJobRequest(f"options.{name}", reason or str(exc)) from None
        if input_dir is not None:
            study_uid = self._ingest_request_dir(input_dir)
        if study_uid is None or self.ledger.study(study_uid) is None:
            raise InvalidJobRequest("input.study_instance_uid", f"study {study_uid} was not received by this node")
        series = self.ledger.series_of_study(study_uid)
        if series_uid is not None:
            series = [s for s in series if s.series_uid == series_uid]
            if not series:
                raise InvalidJobRequest("input.series_instance_uid", f"{series_uid} is not a series of the study")
        selection = select_series(series, analysis.rule, self.config.selection.default_min_slices)
        planned = (PlannedJob(task, selection.selected[0].series_uid) if selection.selected else
                   PlannedJob(task, None, "not_applicable", f"no series matches: {selection.explain()}"))
        uid = self.ledger.create_job(study_uid, planned, self.clock(), origin="api", options=chosen,
                                     complete=input_dir is not None)
        logger.info("job %s requested: task=%s study=%s series=%s state=%s", uid, task, study_uid,
                    planned.series_uid, planned.state)
        self._wake.set()
        return uid

    def _ingest_request_dir(self, input_dir: Path) -> str:
        if not input_dir.is_absolute() or not input_dir.is_dir():
            raise InvalidJobRequest("input.dir", f"{input_dir} is not an absolute path to a folder on the node")
        report = self.ingestor("api").ingest_tree(input_dir, origin="api")
        if not report.stored:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in report.rejected[:3]) or "the folder is empty"
            raise InvalidJobRequest("input.dir", f"no DICOM instance could be stored ({reasons})")
        studies = report.study_uids
        if len(studies) > 1:
            raise InvalidJobRequest("input.dir", f"the folder holds {len(studies)} studies; send one study per job")
        return studies[0]

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
            self.metrics.observe_send(time.perf_counter() - start)
            logger.info(self._line(delivery["job_uid"], f"sent to {delivery['destination']}"))
            sent += 1
        return sent
