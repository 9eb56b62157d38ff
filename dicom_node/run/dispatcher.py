"""Jobs to worker processes: one pool per device, models loaded once per worker, per-job timeouts."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from multiprocessing.process import BaseProcess

from dicom_node.config import AnalysisSettings, WorkerSettings
from dicom_node.errors import DicomNodeError, StudyNotProcessable
from dicom_node.run.pipeline import JobOutcome, JobSpec, run_job

logger = logging.getLogger(__name__)

_READY = "ready"
_DONE = "done"
_FAILED = "failed"


class FailureKind(StrEnum):
    """Why a job failed in a worker: its input cannot be analysed, or the analysis failed."""

    NOT_PROCESSABLE = "StudyNotProcessable"
    INFERENCE_FAILED = "InferenceFailed"


@dataclass(frozen=True)
class WorkerFailure:
    """A job's failure as it crosses the process boundary: its kind and a reason to show."""

    kind: FailureKind
    message: str

    @classmethod
    def from_error(cls, exc: DicomNodeError) -> WorkerFailure:
        """Return the failure an error raised by the pipeline stands for."""
        kind = FailureKind.NOT_PROCESSABLE if isinstance(exc, StudyNotProcessable) else FailureKind.INFERENCE_FAILED
        return cls(kind, str(exc))

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def resolve_devices(settings: WorkerSettings) -> list[str]:
    """Return one device name per worker process.

    ``auto`` means one worker per CUDA device when torch sees any, else ``cpu_workers``
    CPU workers; ``cuda`` means every CUDA device; ``cuda:N`` one worker on that device.
    """
    device = settings.device
    if device == "cpu":
        return ["cpu"] * settings.cpu_workers
    if device.startswith("cuda:"):
        return [device]
    import torch  # only here: the node's main process needs torch for nothing else

    count = torch.cuda.device_count()
    if count == 0:
        if device == "cuda":
            raise DicomNodeError("workers.device is 'cuda' but no CUDA device is available")
        return ["cpu"] * settings.cpu_workers
    return [f"cuda:{index}" for index in range(count)]


def _worker_main(
    device: str,
    analyses: dict[str, AnalysisSettings],
    torch_threads: int,
    conn: Connection,
) -> None:
    """Worker process: load and warm up every analysis once on ``device``, then run jobs until told to stop."""
    import logging as worker_logging

    from dicom_node.run.plugins import create_analyses
    from dicom_node.run.warmup import warm_up

    worker_logging.basicConfig(
        level=worker_logging.INFO, format=f"%(asctime)s worker[{device}] %(levelname)s %(name)s: %(message)s"
    )
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    loaded = create_analyses(analyses)
    for analysis in loaded.values():
        analysis.load(device)
    # ready only once every model ran and its reports were built: the first real job is
    # then as fast as later ones (lazy initialisation, kernels compiled for the shape, imports)
    for name, analysis in loaded.items():
        warm_up(analysis, name, analyses[name])
    conn.send((_READY, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        spec: JobSpec = message
        try:
            outcome = run_job(spec, loaded[spec.analysis])
        except DicomNodeError as exc:
            conn.send((_FAILED, WorkerFailure.from_error(exc)))
        except Exception as exc:  # report, never die: the parent decides what happens next
            worker_logging.getLogger(__name__).exception("job %s crashed", spec.job_uid)
            conn.send((_FAILED, WorkerFailure(FailureKind.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}")))
        else:
            conn.send((_DONE, outcome))


@dataclass
class _Worker:
    device: str
    process: BaseProcess
    conn: Connection
    ready: bool = False
    job: JobSpec | None = None
    started_at: float = 0.0


@dataclass(frozen=True)
class Completion:
    """A job that finished in a worker (``outcome`` set) or failed (``failure`` set)."""

    spec: JobSpec
    outcome: JobOutcome | None
    failure: WorkerFailure | None
    elapsed_s: float


class WorkerPool:
    """Worker processes (spawned) that keep their models loaded.

    Whoever creates a pool shuts it down (:meth:`close`). A job that runs longer than
    ``job_timeout_s`` gets its worker killed and replaced; the job is reported failed.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        analyses: Mapping[str, AnalysisSettings],
        devices: list[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.analyses = {k: v for k, v in analyses.items() if v.enabled}
        self.clock = clock
        self._context = mp.get_context("spawn")
        self._workers = [self._spawn(device) for device in devices]

    def _spawn(self, device: str) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(device, self.analyses, self.settings.torch_threads, child),
            name=f"dicom-node-worker-{device}",
            daemon=True,
        )
        process.start()
        child.close()
        logger.info("started worker pid %s on %s", process.pid, device)
        return _Worker(device, process, parent)

    def idle_count(self) -> int:
        """Return how many workers can take a job now."""
        self.poll_ready()
        return sum(1 for w in self._workers if w.ready and w.job is None)

    def busy_count(self) -> int:
        """Return how many jobs are running."""
        return sum(1 for w in self._workers if w.job is not None)

    def poll_ready(self) -> None:
        for worker in self._workers:
            if not worker.ready and worker.job is None and worker.conn.poll():
                try:
                    kind, _ = worker.conn.recv()
                except EOFError:
                    continue
                worker.ready = kind == _READY

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every worker has loaded its models; return whether they all did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll_ready()
            if all(w.ready for w in self._workers):
                return True
            time.sleep(0.05)
        return False

    def submit(self, spec: JobSpec) -> bool:
        """Give a job to an idle worker; return ``False`` when none is idle."""
        for worker in self._workers:
            if worker.ready and worker.job is None:
                worker.conn.send(spec)
                worker.job = spec
                worker.started_at = self.clock()
                return True
        return False

    def wait(self, timeout_s: float) -> None:
        """Block until a busy worker reports or dies, its job's time is up, or ``timeout_s`` passed.

        Lets a caller wait for :meth:`collect` to have something without polling it.
        """
        busy = [w for w in self._workers if w.job is not None]
        if not busy:
            return
        left = min(self.settings.job_timeout_s - (self.clock() - w.started_at) for w in busy)
        ready: list[Connection | int] = [w.conn for w in busy] + [w.process.sentinel for w in busy]
        wait_for(ready, timeout=max(0.0, min(timeout_s, left)))

    def collect(self) -> list[Completion]:
        """Return the jobs that finished, failed, timed out or lost their worker since last time."""
        done = []
        for index, worker in enumerate(self._workers):
            if worker.job is None:
                continue
            spec = worker.job
            elapsed = self.clock() - worker.started_at
            if worker.conn.poll():
                try:
                    kind, payload = worker.conn.recv()
                except (EOFError, OSError):
                    kind, payload = _FAILED, _died("")
                worker.job = None
                if kind == _DONE:
                    done.append(Completion(spec, payload, None, elapsed))
                else:
                    done.append(Completion(spec, None, payload, elapsed))
                continue
            if not worker.process.is_alive():
                code = worker.process.exitcode
                done.append(Completion(spec, None, _died(f" (exit code {code})"), elapsed))
                self._replace(index)
            elif elapsed > self.settings.job_timeout_s:
                timeout = f"timed out after {self.settings.job_timeout_s:g} s; the worker was stopped"
                done.append(Completion(spec, None, WorkerFailure(FailureKind.INFERENCE_FAILED, timeout), elapsed))
                self._replace(index)
        return done

    def _replace(self, index: int) -> None:
        worker = self._workers[index]
        _stop_process(worker.process)
        worker.conn.close()
        self._workers[index] = self._spawn(worker.device)

    def close(self) -> None:
        """Stop every worker: ask politely, then terminate what does not exit."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            _stop_process(worker.process, grace_s=5.0)
            worker.conn.close()
        self._workers = []


def _died(detail: str) -> WorkerFailure:
    return WorkerFailure(FailureKind.INFERENCE_FAILED, f"the worker process died{detail}")


def _stop_process(process: BaseProcess, grace_s: float = 0.0) -> None:
    process.join(grace_s)
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive() and process.pid is not None:
        os.kill(process.pid, 9)
        process.join(5.0)


