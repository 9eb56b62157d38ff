"""A worker host of the scaled-out mode: takes jobs of its analyses and device class from the procrastinate queue and runs them.

``dicom-node worker`` builds one :class:`QueueWorker` per device. Its models stay loaded
in a worker process (:class:`dicom_node.run.dispatcher.WorkerPool`, which also enforces
``workers.job_timeout_s``); procrastinate hands it one job at a time, sends its heartbeat,
and on SIGTERM lets the current job finish for up to ``queue.stop_grace_s``. Outcomes go to
the ledger exactly as on one box (:class:`dicom_node.schedule.scheduler.Scheduler`); the
receiving node delivers the results.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import NodeConfig, dump_toml
from dicom_node.errors import (
    ConfigError,
    LedgerUnavailable,
    ReceiverUnavailable,
    ReceiverUntrusted,
    StudyNotProcessable,
)
from dicom_node.run.dispatcher import Completion, WorkerPool
from dicom_node.run.fetch import ReceiverClient, Receivers, drop_cache, receiver_tls_context
from dicom_node.schedule.grouper import StudyTracker
from dicom_node.schedule.scheduler import MAX_JOB_ATTEMPTS, Scheduler
from dicom_node.state import queue
from dicom_node.state.ledger import open_ledger
from dicom_node.state.records import JobRecord, JobState, StudyRecord

if TYPE_CHECKING:
    from dicom_node.state.postgres import PostgresLedger

logger = logging.getLogger(__name__)


class QueueWorker:
    """Runs queued jobs on one device until stopped.

    Parameters
    ----------
    config
        The node's configuration (the same file on every host).
    device
        ``cpu`` or ``cuda:N``: where this worker's models run.
    data_dir
        This host's data directory: results are written under ``results/``.
    clock
        Wall-clock time source.

    Raises
    ------
    ConfigError
        If the ledger is not in PostgreSQL, no configured analysis may run on ``device``, or
        a receiving node's HTTPS certificate is not signed by a CA of ``node.tls``.
    """

    def __init__(self, config: NodeConfig, device: str, data_dir: Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        if config.state.backend != "postgresql":
            raise ConfigError('state.backend: workers take jobs from the PostgreSQL queue; set'
                              ' backend = "postgresql" (one box needs no separate worker)')
        self.config = config
        self.device = device
        self.device_class = queue.device_class(device)
        self.queues = queue.worker_queues(config, self.device_class)
        if not self.queues:
            raise ConfigError(f"analyses.*.devices: no enabled analysis may run on {self.device_class}"
                              f" (device {device})")
        self.name = f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.clock = clock
        self.receivers: Receivers | None = None
        if config.queue.instances == "http":
            self.receivers = self._receivers(config)
        from dicom_node.state.postgres import PostgresLedger  # psycopg: the scaled-out mode only

        ledger = open_ledger(data_dir, config.state, queues=queue.job_queues(config))
        assert isinstance(ledger, PostgresLedger)  # state.backend is postgresql
        self.ledger: PostgresLedger = ledger
        served = {n: a for n, a in config.runnable().items() if self.device_class in a.devices}
        tracker = StudyTracker(self.ledger, config.grouping, {}, config.selection.default_min_slices,
                               clock=clock)
        self.scheduler = Scheduler(
            self.ledger, tracker, served, config.destinations_for, data_dir / "results",
            config.node.ae_title, clock=clock, on_finished=self._finished,
        )
        self.data_dir = data_dir
        self.pool = WorkerPool(config.workers, served, [device])

    @staticmethod
    def _receivers(config: NodeConfig) -> Receivers:
        """The receiving nodes, each checked once: a certificate this worker does not trust stops it."""
        token = config.api.bearer_token()
        if token is None:
            raise ConfigError('api.token: workers with queue.instances = "http" need the'
                              " receiving node's bearer token (api.token or api.token_file)")
        context = receiver_tls_context(config.node.tls)
        receivers = Receivers([ReceiverClient(url, token, timeout_s=config.queue.transfer_timeout_s,
                                              tls_context=context)
                               for url in config.queue.receivers()])
        try:
            receivers.check()
        except ReceiverUntrusted as exc:
            raise ConfigError(f"queue.receiver_urls: {exc}") from None
        return receivers

    def _finished(self, job: JobRecord, study: StudyRecord | None, state: JobState) -> None:
        logger.debug("job %s finished on %s: %s", job.uid, self.name, state)

    def run_job(self, job_uid: str) -> None:
        """Run one job the queue handed to this worker; record its outcome in the ledger.

        A job that was cancelled or superseded meanwhile is skipped. A job that stopped its
        workers :data:`MAX_JOB_ATTEMPTS` times fails instead of running again.
        """
        # Instances are fetched before the job counts as started: a receiving node that cannot
        # be reached sends the job back to the queue without using up one of its attempts.
        current = self.ledger.job(job_uid)
        if current is None or current.state not in (JobState.QUEUED, JobState.RUNNING):
            logger.info("job %s skipped on %s: no longer queued", job_uid, self.name)
            return
        cache = self.data_dir / "cache" / job_uid
        try:
            paths, unprocessable = None, None
            if self.receivers is not None:
                try:
                    paths = self.receivers.fetch_instances(job_uid, cache)
                except StudyNotProcessable as exc:
                    unprocessable = exc
            job = self.ledger.start_job(job_uid, self.clock())
            if job is None:
                logger.info("job %s skipped on %s: no longer queued", job_uid, self.name)
                return
            if unprocessable is not None:
                self.ledger.finish_job(job.id, self.clock(), state=JobState.FAILED, reason=str(unprocessable))
                logger.warning("job %s failed on %s: %s", job_uid, self.name, unprocessable)
                return
            if job.attempts > MAX_JOB_ATTEMPTS:
                self.ledger.finish_job(job.id, self.clock(), state=JobState.FAILED,
                                       reason="the job stopped its worker too many times")
                return
            spec = self.scheduler.prepare(job, paths)
            if spec is None:
                return
            logger.info("job %s running on %s (attempt %d)", job_uid, self.name, job.attempts)
            while not self.pool.submit(spec):  # the worker process is (re)loading its models
                time.sleep(0.05)
            while not (done := self.pool.collect()):
                self.pool.wait(1.0)  # wakes as the worker process answers, not up to a poll later
            if self.receivers is not None:
                done = [self._returned(completion) for completion in done]
            self.scheduler.finish(done)
        finally:
            drop_cache(cache)

    def _returned(self, completion: Completion) -> Completion:
        """The completion with its result files uploaded to a receiving node, named as there."""
        if completion.outcome is None or self.receivers is None:
            return completion
        files = self.receivers.upload_results(completion.spec.job_uid, completion.outcome.files)
        return replace(completion, outcome=replace(completion.outcome, files=files))

    def _register(self, worker_id: int) -> None:
        """Record who procrastinate's worker ``worker_id`` is, for the fleet view."""
        try:
            self.ledger.register_worker(worker_id, host=socket.gethostname(), device=self.device,
                                        analyses=sorted(self.pool.analyses), pid=os.getpid(),
                                        now=self.clock())
        except LedgerUnavailable as exc:  # the fleet view shows it without host and device
            logger.warning("worker %s: its identity could not be recorded: %s", self.name, exc)
            return
        logger.info("worker %s registered as queue worker %d", self.name, worker_id)

    def serve(self) -> None:
        """Load the models, then take jobs until SIGTERM or SIGINT; finish the current job first.

        Raises
        ------
        RuntimeError
            If the worker process does not load its models within ten minutes.
        """
        import procrastinate
        from procrastinate.worker import Worker

        if not self.pool.wait_ready(600.0):
            self.pool.close()
            raise RuntimeError(f"the worker on {self.device} did not load its models in time")
        state = self.config.state
        assert state.dsn is not None
        connector = procrastinate.PsycopgConnector(
            conninfo=state.dsn, kwargs={"password": state.password(os.environ)},
            min_size=1, max_size=3,
        )
        app = procrastinate.App(connector=connector)
        # A job that met a database restart, or a receiving node it could not reach, goes
        # back to the queue after a pause (the ledger accepts a running job again), rather
        # than failing in procrastinate.
        retry = procrastinate.RetryStrategy(max_attempts=100, wait=2,
                                            retry_exceptions={LedgerUnavailable, ReceiverUnavailable})
        app.task(name=queue.TASK_NAME, pass_context=False, retry=retry)(self.run_job)
        settings = self.config.queue

        async def work() -> None:
            # App.run_worker's steps, kept open to learn the worker id procrastinate assigns
            worker = Worker(
                app=app, queues=self.queues, concurrency=1, wait=True, name=self.name,
                install_signal_handlers=True, shutdown_graceful_timeout=settings.stop_grace_s,
                update_heartbeat_interval=settings.heartbeat_s,
                stalled_worker_timeout=settings.stalled_after_s,
                fetch_job_polling_interval=1.0,
            )
            async with app.open_async():
                running = asyncio.create_task(worker.run())  # type: ignore[no-untyped-call]  # procrastinate leaves it unannotated
                while worker.worker_id is None and not running.done():  # registering
                    await asyncio.sleep(0.05)
                if worker.worker_id is not None:
                    await asyncio.to_thread(self._register, worker.worker_id)
                    logger.info("worker %s ready; taking jobs from %s", self.name, ", ".join(self.queues))
                await running

        try:
            asyncio.run(work())
        finally:
            self.pool.close()
            self.ledger.close()
            logger.info("worker %s stopped", self.name)


def start_local_workers(config: NodeConfig) -> list[subprocess.Popen[bytes]]:
    """Start ``dicom-node worker`` processes on this host when ``queue.serve_runs_analyses`` asks.

    One per device of ``workers.device`` (as on one box); each gets the effective
    configuration through a file in the data directory. Returns the processes (none when
    the setting is off).
    """
    if not config.queue.serve_runs_analyses:
        return []
    from dicom_node.run.dispatcher import resolve_devices

    data_dir = config.node.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / "worker.toml"
    config_file.write_text(dump_toml(config.model_dump(mode="json", exclude={"api"})), encoding="utf-8")
    workers = []
    for device in resolve_devices(config.workers):
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(config_file),
             "--device", device],
        ))
        logger.info("started a local worker on %s (pid %d)", device, workers[-1].pid)
    return workers


def stop_local_workers(workers: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM the local workers, let their current jobs finish for ``grace_s``, then kill them."""
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in workers:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    workers.clear()
