"""End-to-end latency: last instance acknowledged by the node -> SEG, SC and SR stored in Orthanc.

A HippoCrop study (new UIDs each run) is sent to the node with storescu; the clock starts when
storescu has its last acknowledgement and stops when Orthanc holds all three results. Reported
against the time Orthanc itself takes to store the same three objects sent with storescu, measured
in the same run. Not part of the test suite. From the repository root:

    .venv/bin/python -m benchmarks.end_to_end_latency [--runs 10] [--quiet-period 0.5]

With ``--shipped push`` or ``--shipped pull`` it measures the shipped defaults instead: Orthanc
from its shipped configuration (orthanc/orthanc.json with autoroute.lua for push,
orthanc/orthanc-pull.json for pull; StableAge as shipped),
the node with its default settings and Orthanc declared as a source (``mode`` push or pull), and
the real five-series MR study (HippoCrop and four 512x512 series, new UIDs each run) stored into
Orthanc by storescu. The clock starts when Orthanc records the study's StableStudy change (what
pull mode follows), or, in push mode, when the node received the first routed instance if that
came earlier (Orthanc writes the change only after OnStableStudy returned, once autoroute.lua
has sent every series), and stops when SEG, SC and SR are all in Orthanc. The first study after the node started is reported apart from the median of the others.

    .venv/bin/python -m benchmarks.end_to_end_latency --shipped push [--runs 5]
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
from deploy.local.orthanc_process import (  # noqa: E402
    PULL_CONFIG,
    SHIPPED_CONFIG,
    OrthancProcess,
    free_port,
    run_storescu,
)

CROP = REPO / "deploy" / "demo-data" / "Study1-HippoCrop"
STUDY1 = REPO.parent / "shared" / "data" / "hippocampus-dicom" / "Study1"
STAGES = ("receive", "wait", "queue", "load", "infer", "report", "send")


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


def fresh_study(folder: Path) -> str:
    """Study1 (all five series) under new study, series and instance UIDs; return the study UID."""
    study = str(generate_uid())
    series: dict[str, str] = {}
    folder.mkdir(parents=True)
    for source in sorted(STUDY1.rglob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), str(generate_uid()))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
    return study


def stable_at(orthanc: OrthancProcess, study_uid: str, since: int, deadline_s: float = 120.0) -> tuple[float, int]:
    """Poll Orthanc's change log every 5 ms; return when the study's StableStudy change appeared."""
    (study_id,) = [m["ID"] for m in orthanc.lookup(study_uid) if m.get("Type") == "Study"]
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        answer = orthanc.get_json(f"/changes?since={since}&limit=1000")
        for change in answer["Changes"]:
            if change["ChangeType"] == "StableStudy" and change["ID"] == study_id:
                return time.time(), int(change["Seq"])
        time.sleep(0.005)
    raise TimeoutError(f"study {study_uid} did not become stable in Orthanc")


def shipped_defaults(mode: str, runs: int) -> int:
    """Measure a shipped-defaults node fed by Orthanc in ``mode`` (push or pull); see the module doc."""
    if not STUDY1.is_dir():
        raise SystemExit(f"the study is not at {STUDY1}")
    rows: list[tuple[float, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="dicom-node-e2e-") as tmp:
        root = Path(tmp)
        node_port = free_port()
        # the shipped configuration of the mode: orthanc.json (routing script) or orthanc-pull.json
        orthanc = OrthancProcess(root / "orthanc", node_port=node_port, stable_age_s=None,
                                 overrides={"Plugins": []}, config_path=SHIPPED_CONFIG if mode == "push" else PULL_CONFIG)
        orthanc.start()
        node = NodeProcess(
            root / "node", port=node_port,
            destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
            config={"grouping": {"quiet_period_s": 10.0, "max_wait_s": 600.0},  # the shipped defaults
                    "delivery": {"retry_initial_s": 60.0, "retry_max_s": 3600.0, "max_attempts": 10},
                    "workers": {"job_timeout_s": 600.0},
                    "sources": {"pacs": {"ae_title": orthanc.aet, "url": orthanc.base_url, "mode": mode}}},
        )
        node.start()
        try:
            since = int(orthanc.get_json("/changes?last")["Last"])
            for run in range(runs + 1):
                study = fresh_study(root / f"study-{run}")
                run_storescu([root / f"study-{run}"], orthanc.dicom_port, called_aet=orthanc.aet)
                stable, since = stable_at(orthanc, study, since)
                while results_in_orthanc(orthanc, study) < 3:
                    if time.time() - stable > 120:
                        raise TimeoutError(node.log_text()[-3000:])
                    time.sleep(0.01)
                done = time.time()
                ledger = node.ledger()
                job = next(j for j in ledger.job_rows() if j.study_uid == study and j.analysis == "hippocampus")
                record = ledger.study(study)
                assert record is not None
                # Orthanc writes the StableStudy change only after OnStableStudy has returned, i.e.
                # after autoroute.lua sent every series: in push mode the node's first routed
                # instance comes earlier, and the clock starts at whichever came first
                start = min(stable, record.first_received_at)
                latency = done - start
                stages = {"route": record.first_received_at - start, **job.stage_timings(record)}
                rows.append((latency, stages))
                print(f"{'first' if run == 0 else f'run {run}'}: {latency:.3f} s  (stages: "
                      + ", ".join(f"{k} {stages[k]:.3f}" for k in ("route", *STAGES) if k in stages) + ")",
                      flush=True)
        finally:
            node.stop()
            orthanc.stop()
    first, later = rows[0][0], [latency for latency, _ in rows[1:]]
    median = statistics.median(later)
    print(f"\n{mode}, shipped defaults: StableStudy in Orthanc -> SEG+SC+SR in Orthanc: median {median:.3f} s"
          f" over {len(later)} runs (min {min(later):.3f}, max {max(later):.3f}); first study after start"
          f" {first:.3f} s = {first / median:.2f}x the median")
    for stage in ("route", *STAGES):
        values = [stages[stage] for _, stages in rows[1:] if stage in stages]
        if values:
            print(f"  {stage:8s} median {statistics.median(values):.3f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--quiet-period", type=float, default=0.5)
    parser.add_argument("--shipped", choices=("push", "pull"),
                        help="measure the shipped defaults with Orthanc as a source in this mode")
    args = parser.parse_args()
    if args.shipped:
        return shipped_defaults(args.shipped, args.runs if args.runs != 10 else 5)
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
