"""The running node: wires receive, schedule, run and deliver around the ledger; starts and stops them."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.errors import LedgerUnavailable
from dicom_node.deliver.delivery import DeliveryLoop
from dicom_node.receive.ingest import Ingestor
from dicom_node.receive.pull import SourcePuller
from dicom_node.receive.recovery import recover_spool
from dicom_node.run.priors import PriorSources
from dicom_node.receive.scp import ReceiveCounters, StorageSCP
from dicom_node.receive.source import OrthancSource
from dicom_node.receive.spool import Spool
from dicom_node.receive.watch import WatchFolder
from dicom_node.run.dispatcher import WorkerPool, resolve_devices
from dicom_node.run.plugins import create_analyses
from dicom_node.schedule.grouper import StudyTracker
from dicom_node.schedule.retention import PURGE_INTERVAL_S, purge_expired
from dicom_node.schedule.scheduler import Scheduler
from dicom_node.service.api import ApiServer, create_app
from dicom_node.service.jobs import JobService
from dicom_node.service.metrics import NodeMetrics
from dicom_node.service.worker import start_local_workers, stop_local_workers
from dicom_node.state.ledger import open_ledger
from dicom_node.state.queue import job_queues
from dicom_node.state.records import Origin

logger = logging.getLogger(__name__)


class Node:
    """A dicom-node: receives studies, analyses them and sends results.

    Building a node opens its ledger and loads its analyses' rules; :meth:`start`
    recovers from the ledger and starts workers, the SCP, delivery, the API and the watch
    folder; :meth:`run` schedules until :meth:`request_stop`; :meth:`stop` drains.

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
        self.spool = Spool(data_dir / "spool", fsync=config.node.fsync)
        self.queued = config.state.backend == "postgresql"  # jobs go through the job queue
        self.ledger = open_ledger(data_dir, config.state,
                                  queues=job_queues(config) if self.queued else None)
        analyses = create_analyses(config.analyses)
        # analyses run on every complete study; tasks only when a job names them
        tasks = {k: v for k, v in config.tasks.items() if k not in config.analyses}
        self.runnable = {**create_analyses(tasks), **analyses}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.scp = StorageSCP(config.node, self.spool, self.ledger, clock=clock,
                              on_stored=lambda _: self._wake.set())
        self.receive_counters = {Origin.DICOM: self.scp.counters, Origin.WATCH: ReceiveCounters(),
                                 Origin.API: ReceiveCounters()}
        self.metrics = NodeMetrics(self.ledger, lambda: self.receive_counters,
                                   stalled_after_s=config.queue.stalled_after_s)
        self.sources = {name: OrthancSource(name, s) for name, s in config.sources.items()}
        self.tracker = StudyTracker(
            self.ledger, config.grouping, {name: a.rule for name, a in analyses.items()},
            config.selection.default_min_slices, clock=clock,
            sources={s.ae_title: name for name, s in config.sources.items()},
            inventory=lambda source, study_uid: self.sources[source].routed_series(study_uid),
            on_answer=self.wake,
        )
        self.scheduler = Scheduler(
            self.ledger, self.tracker, config.runnable(), config.destinations_for, data_dir / "results",
            config.node.ae_title, clock=clock, on_finished=self.metrics.observe_job,
            priors=PriorSources(str(data_dir), config.priors.pacs_url, config.priors.timeout_s)
            if config.priors.enabled else None,
        )
        self.delivery = DeliveryLoop(
            self.ledger, config.destinations, config.delivery, config.node.ae_title,
            job_line=self.scheduler.line, clock=clock, on_sent=self.metrics.observe_send,
            sources=self.sources,
            local_files_only=config.state.backend == "postgresql" and config.queue.instances == "http",
        )
        self.jobs = JobService(
            self.ledger, self.runnable, config.selection.default_min_slices, self.ingestor(Origin.API),
            clock=clock, wake=self.wake,
        )
        rules = {name: a.rule for name, a in analyses.items()}
        self.pullers = [
            SourcePuller(self.sources[name], self.ingestor(Origin.DICOM), self.ledger, rules,
                         config.selection.default_min_slices, clock=clock)
            for name, settings in config.sources.items() if settings.mode == "pull"
        ]
        self.api: ApiServer | None = None
        self.watcher: WatchFolder | None = None
        self.pool: WorkerPool | None = None
        self.local_workers: list[subprocess.Popen[bytes]] = []
        self._next_recovery_at = 0.0
        self.address: tuple[str, int] | None = None
        self._next_purge_at = 0.0

    # -- life cycle ------------------------------------------------------------------

    def start(self, *, ready_timeout_s: float = 300.0) -> tuple[str, int]:
        """Recover from the ledger, start workers, the SCP and delivery; return the address."""
        stale = self.spool.remove_stale_temporaries()
        recovered = recover_spool(self.spool, self.ledger, self.clock())
        requeued = self.ledger.requeue_interrupted()
        if stale or recovered or requeued:
            logger.info(
                "recovered: %d partial file(s) removed, %d instance(s) re-recorded, %d job(s) re-queued",
                stale, recovered, requeued,
            )
        if self.queued:
            self.local_workers = start_local_workers(self.config)
        else:
            devices = resolve_devices(self.config.workers)
            self.pool = WorkerPool(self.config.workers, self.config.runnable(), devices)
            if not self.pool.wait_ready(ready_timeout_s):
                raise RuntimeError("workers did not load their models in time")
            logger.info("%d worker(s) ready on %s", len(devices), ", ".join(devices))
        self.address = self.scp.start()
        self.delivery.start()
        if self.config.api.enabled:
            jobs_root = self.config.api.jobs_folder(self.config.node.data_dir)
            jobs_root.mkdir(parents=True, exist_ok=True)
            app = create_app(self.jobs, self.config.api, ae_title=self.config.node.ae_title,
                             live_figures=self._live_figures, render_metrics=self.metrics.render,
                             jobs_root=jobs_root, stalled_after_s=self.config.queue.stalled_after_s,
                             results_dir=self.config.node.data_dir / "results" if self.queued else None,
                             spool=self.spool)
            self.api = ApiServer(app, self.config.api, self.config.node.tls)
            host, port = self.api.start()
            scheme = "https" if self.config.node.tls is not None else "http"
            logger.info("HTTP API and status page on %s://%s:%d/", scheme, host, port)
        if self.config.watch.dir is not None:
            self.watcher = WatchFolder(self.config.watch, self.ingestor(Origin.WATCH),
                                       rejected_default=self.config.node.data_dir / "watch-rejected")
            self.watcher.start()
        for puller in self.pullers:
            puller.start()
            logger.info("pulling from source %s (%s)", puller.name, puller.source.settings.url)
        return self.address

    def ingestor(self, origin: Origin) -> Ingestor:
        """Return an ingestor that stores files like the SCP does, counted under ``origin``."""
        return Ingestor(self.config.node, self.spool, self.ledger, counters=self.receive_counters[origin],
                        clock=self.clock, on_stored=lambda _: self._wake.set())

    def run(self, poll_s: float = 0.1) -> None:
        """Run the scheduling loop until :meth:`request_stop` is called."""
        while not self._stopping.is_set():
            try:
                self.step()
            except LedgerUnavailable as exc:  # a database restart: wait, then carry on
                logger.warning("scheduling paused: %s", exc)
                self._stopping.wait(1.0)
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
        for puller in self.pullers:
            puller.stop()
        if self.watcher is not None:
            self.watcher.stop()
        self.scp.stop()
        if self.pool is not None:
            deadline = time.monotonic() + drain_s
            while self.pool.busy_count() and time.monotonic() < deadline:
                self.scheduler.finish(self.pool.collect())
                time.sleep(0.05)
            self.pool.close()
            self.pool = None
        stop_local_workers(self.local_workers, self.config.queue.stop_grace_s)
        self.ledger.requeue_interrupted()
        self.delivery.stop(timeout_s=drain_s)
        if self.api is not None:
            self.api.stop()
        self.tracker.close()
        self.ledger.close()
        for source in self.sources.values():
            source.close()
        logger.info("node stopped")

    # -- scheduling ------------------------------------------------------------------

    def step(self) -> None:
        """Complete due studies, hand queued jobs to idle workers, record finished jobs.

        Every :data:`PURGE_INTERVAL_S` it also applies the spool retention.
        """
        self.scheduler.tick()
        if self.queued and self.clock() >= self._next_recovery_at:
            self._next_recovery_at = self.clock() + self.config.queue.recover_interval_s
            self.recover_stalled()
        if self.clock() >= self._next_purge_at:
            self._next_purge_at = self.clock() + PURGE_INTERVAL_S
            self.purge_expired()
        if self.pool is not None and self.scheduler.dispatch(self.pool):
            self._wake.set()

    def recover_stalled(self) -> list[str]:
        """Queue again the jobs of workers that stopped sending heartbeats; return their uids."""
        recover = getattr(self.ledger, "recover_stalled", None)
        if recover is None:
            return []
        try:
            uids: list[str] = recover(self.config.queue.stalled_after_s)
        except LedgerUnavailable as exc:  # the next round tries again
            logger.warning("stalled-job recovery failed: %s", exc)
            return []
        for uid in uids:
            logger.warning("job %s: its worker stopped sending heartbeats; queued again", uid)
        try:
            forget = getattr(self.ledger, "forget_workers")  # with recover_stalled: the queue's ledger
            forgotten: list[int] = forget(self.config.queue.forget_workers_after_s)
        except LedgerUnavailable as exc:
            logger.warning("removing long-silent workers failed: %s", exc)
            return uids
        if forgotten:
            logger.info("removed worker(s) %s from the fleet: silent for %.0f s", forgotten,
                        self.config.queue.forget_workers_after_s)
        return uids

    def purge_expired(self) -> int:
        """Apply the spool retention (``node.retention_days``) now; return how many studies left."""
        return purge_expired(self.spool, self.ledger, self.config.node.retention_days, self.clock())

    def _live_figures(self) -> dict[str, Any]:
        return {"workers_busy": self.pool.busy_count() if self.pool else 0}
