"""Worker processes: models loaded once, jobs run, hung jobs stopped by the timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.config import AnalysisSettings, SeriesNumbers, WorkerSettings
from dicom_node.run.dispatcher import Completion, WorkerPool, resolve_devices
from dicom_node.run.pipeline import JobSpec
from tests.conftest import HIPPO_CROP_STUDY1

pytestmark = pytest.mark.slow


def crop_job(tmp_path: Path, analysis: str) -> JobSpec:
    import pydicom

    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    out = tmp_path / analysis
    out.mkdir(parents=True)
    return JobSpec("job-" + analysis, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), analysis,
                   tuple(map(str, paths)), str(out), SeriesNumbers())


def wait_for(pool: WorkerPool, deadline_s: float) -> list[Completion]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        done = pool.collect()
        if done:
            return done
        pool.wait(deadline - time.monotonic())
    raise TimeoutError("no completion")


def test_auto_device_without_cuda_uses_cpu_workers() -> None:
    assert resolve_devices(WorkerSettings(device="auto", cpu_workers=2)) == ["cpu", "cpu"]
    assert resolve_devices(WorkerSettings(device="cpu", cpu_workers=1)) == ["cpu"]
    assert resolve_devices(WorkerSettings(device="cuda:1")) == ["cuda:1"]


def test_jobs_run_and_a_hung_job_is_stopped(tmp_path: Path) -> None:
    analyses = {
        "hippocampus": AnalysisSettings(plugin="hippocampus"),
        "slow": AnalysisSettings(plugin="tests.integration.slow_plugin:SlowHippocampus",
                                 options={"delay_s": 60.0}),
    }
    pool = WorkerPool(WorkerSettings(device="cpu", cpu_workers=1, job_timeout_s=10.0), analyses, ["cpu"])
    try:
        assert pool.wait_ready(120)
        assert pool.submit(crop_job(tmp_path, "hippocampus"))
        assert not pool.submit(crop_job(tmp_path / "busy", "slow"))  # the only worker is busy
        waited = time.monotonic()
        pool.wait(60.0)  # returns when the worker answers, with the completion ready to collect
        assert time.monotonic() - waited < 50.0
        (done,) = pool.collect()
        assert done.failure is None and done.outcome is not None
        assert {Path(f).name for f in done.outcome.files} >= {"seg.dcm", "sc.dcm", "sr.dcm"}
        assert set(done.outcome.timings) == {"load", "infer", "report"}

        assert pool.submit(crop_job(tmp_path, "slow"))
        started = time.monotonic()
        (hung,) = wait_for(pool, 40)
        assert hung.failure is not None and hung.failure.message == "timed out after 10 s; the worker was stopped"
        assert 10.0 <= time.monotonic() - started < 20.0
        assert pool.wait_ready(120)  # a fresh worker took its place
        assert pool.submit(crop_job(tmp_path / "again", "hippocampus"))
        (after,) = wait_for(pool, 60)
        assert after.outcome is not None
    finally:
        pool.close()

