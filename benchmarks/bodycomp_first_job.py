"""A worker's first body-composition job against its later ones, with and without the warm-up, on the abdomen CT.

Each run is a fresh Python process, as a freshly spawned worker is: it loads the analysis, warms
it up on its synthetic phantom (or not, with ``cold``), then runs the same job path a worker runs
(:func:`dicom_node.run.pipeline.run_job`: read the files, analyse, write SEG, SC and SR) on the
real CT (../shared/data/ct-abdomen/example_ct.nii.gz written as DICOM) ``--jobs`` times, and
prints load+infer+report of the first job and the median of the others. Not part of the test
suite. From the repository root:

    .venv/bin/python -m benchmarks.bodycomp_first_job [--runs 2] [--jobs 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CT = REPO.parent / "shared" / "data" / "ct-abdomen" / "example_ct.nii.gz"
STAGES = ("load", "infer", "report")


def one_worker(warm: bool, jobs: int) -> dict[str, object]:
    """Run in a fresh process: optional warm-up, then ``jobs`` jobs; return the timings."""
    from dicom_node.config import AnalysisSettings
    from dicom_node.run.pipeline import JobSpec, run_job
    from dicom_node.run.plugins import create_analysis
    from dicom_node.run.warmup import warm_up
    from tests.factories import series_from_nifti, write_datasets

    work = Path(tempfile.mkdtemp(prefix="bodycomp-first-job-"))
    series = series_from_nifti(CT, modality="CT", orientation="axial", series_description="Abdomen 3mm", seed=7)
    paths = tuple(str(p) for p in write_datasets(series, work / "ct"))
    settings = AnalysisSettings(plugin="body-composition")
    analysis = create_analysis("body-composition", settings)
    analysis.load("cpu")
    warm_up_timings = warm_up(analysis, "body-composition", settings) if warm else None
    totals = []
    for index in range(jobs):
        result_dir = work / f"results-{index}"
        result_dir.mkdir()
        spec = JobSpec(job_uid=f"job-{index}", study_uid=str(series[0].StudyInstanceUID),
                       series_uid=str(series[0].SeriesInstanceUID), analysis="body-composition",
                       paths=paths, result_dir=str(result_dir), series_numbers=settings.series_numbers,
                       node_name="BENCHMARK", options={})
        timings = run_job(spec, analysis).timings
        totals.append(round(sum(timings[stage] for stage in STAGES), 4))
    return {"warm_up": warm_up_timings, "jobs": totals}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per mode")
    parser.add_argument("--jobs", type=int, default=4, help="jobs per process (the first, then warm ones)")
    parser.add_argument("--child", choices=("warm", "cold"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_worker(args.child == "warm", args.jobs)))
        return 0
    for mode in ("cold", "warm"):
        for run in range(args.runs):
            answer = subprocess.run(
                [sys.executable, "-m", "benchmarks.bodycomp_first_job", "--child", mode, "--jobs", str(args.jobs)],
                cwd=REPO, check=True, capture_output=True, text=True,
            )
            figures = json.loads(answer.stdout.strip().splitlines()[-1])
            first, later = figures["jobs"][0], statistics.median(figures["jobs"][1:])
            warm_up_s = figures["warm_up"]["warm_up"] if figures["warm_up"] else None
            print(f"{'with' if mode == 'warm' else 'without'} warm-up, run {run + 1}: first job {first:.3f} s,"
                  f" later median {later:.3f} s, ratio {first / later:.2f}"
                  + (f" (warm-up {warm_up_s:.3f} s)" if warm_up_s is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
