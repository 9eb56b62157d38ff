"""End-to-end latency: last instance acknowledged by the node -> SEG, SC and SR stored in Orthanc.

A HippoCrop study (new UIDs each run) is sent to the node with storescu; the clock starts when
storescu has its last acknowledgement and stops when Orthanc holds all three results. Reported
against the time Orthanc itself takes to store the same three objects sent with storescu, measured
in the same run. Not part of the test suite. From the repository root:

    .venv/bin/python -m benchmarks.end_to_end_latency [--runs 10] [--quiet-period 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.local.node_process import NodeProcess  # noqa: E402
from deploy.local.orthanc_process import OrthancProcess, free_port, run_storescu  # noqa: E402

CROP = REPO / "deploy" / "demo-data" / "Study1-HippoCrop"


def fresh_copy(folder: Path) -> tuple[str, list[Path]]:
    """The demo crop series under new study, series and instance UIDs."""
    study, series = str(generate_uid()), str(generate_uid())
    folder.mkdir(parents=True)
    paths = []
    for source in sorted(CROP.glob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        paths.append(path)
    return study, paths


def results_in_orthanc(orthanc: OrthancProcess, study_uid: str) -> int:
    matches = [m for m in orthanc.lookup(study_uid) if m.get("Type") == "Study"]
    if not matches:
        return 0
    return sum(1 for s in orthanc.series(matches[0]["ID"]) if s["MainDicomTags"].get("Modality") != "MR"
               or "report" in s["MainDicomTags"].get("SeriesDescription", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--quiet-period", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicom-node-e2e-") as tmp:
        root = Path(tmp)
        node_port = free_port()
        orthanc = OrthancProcess(root / "orthanc", node_port=node_port,
                                 overrides={"LuaScripts": [], "Plugins": []})
        orthanc.start()
        node = NodeProcess(root / "node", port=node_port,
                           destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
                           config={"grouping": {"quiet_period_s": args.quiet_period}})
        node.start()
        latencies, references = [], []
        try:
            for run in range(args.runs + 1):  # the first run warms up
                study, paths = fresh_copy(root / f"study-{run}")
                run_storescu(paths, node_port, called_aet="DICOMNODE")
                acknowledged = time.perf_counter()
                while results_in_orthanc(orthanc, study) < 3:
                    if time.perf_counter() - acknowledged > 60:
                        raise TimeoutError(node.log_text()[-3000:])
                    time.sleep(0.01)
                latency = time.perf_counter() - acknowledged
                # reference: Orthanc storing the same three result files sent by storescu
                job = next(j for j in node.ledger().job_rows() if j.study_uid == study)
                files = [Path(job.result_dir) / f"{k}.dcm" for k in ("seg", "sc", "sr")]
                start = time.perf_counter()
                run_storescu(files, orthanc.dicom_port, called_aet=orthanc.aet, extra_args=("-R",))
                reference = time.perf_counter() - start
                if run:
                    latencies.append(latency)
                    references.append(reference)
                    print(f"run {run:2d}: {latency:.3f} s  (stages: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in job.timings.items()) + ")", flush=True)
        finally:
            node.stop()
            orthanc.stop()
    median = statistics.median(latencies)
    print(f"\nlast instance acknowledged -> SEG+SC+SR in Orthanc: median {median:.3f} s over {len(latencies)} runs"
          f" (min {min(latencies):.3f}, max {max(latencies):.3f}), quiet period {args.quiet_period} s")
    print(f"reference, storescu of the same 3 files into Orthanc: median {statistics.median(references):.3f} s;"
          f" ratio {median / statistics.median(references):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
