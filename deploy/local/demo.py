"""The demo: a local Orthanc routes a real MR study to a local node; the hippocampal volumes come back.

Run from the repository root with ``make demo`` (or ``.venv/bin/python -m deploy.local.demo``).
Everything runs as plain processes under ``.demo/``; Ctrl-C stops it all.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `deploy` importable
    sys.path.insert(0, str(REPO_ROOT))

from dicom_node.state.records import JobState  # noqa: E402
from deploy.local.node_process import NodeProcess  # noqa: E402
from deploy.local.ohif_proxy import DEFAULT_WEB_ROOT, OhifProxyServer  # noqa: E402
from deploy.local.orthanc_process import (  # noqa: E402
    OrthancProcess,
    free_port,
    port_is_free,
    run_storescu,
    wait_until,
)

DEMO_STUDY = REPO_ROOT / "deploy" / "demo-data" / "Study1-HippoCrop"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _port(preferred: int) -> int:
    return preferred if port_is_free(preferred) else free_port()


def result_series(orthanc: OrthancProcess, study_uid: str) -> dict[str, str]:
    """Return the node's result series found in Orthanc for a study.

    Parameters
    ----------
    orthanc
        The running Orthanc the node files its results into.
    study_uid
        StudyInstanceUID of the analysed study.

    Returns
    -------
    dict[str, str]
        ``{"SEG" | "SR" | "SC": Orthanc series ID}`` for each kind of result found so far.
    """
    found: dict[str, str] = {}
    for match in orthanc.lookup(study_uid):
        if match.get("Type") != "Study":
            continue
        for series in orthanc.series(match["ID"]):
            tags = series.get("MainDicomTags", {})
            modality = tags.get("Modality", "")
            if modality in ("SEG", "SR"):
                found[modality] = series["ID"]
            elif series["Instances"]:
                meta = orthanc.metadata("instances", series["Instances"][0])
                if meta.get("SopClassUid") == SECONDARY_CAPTURE:
                    found["SC"] = series["ID"]
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the demo (``make demo``): start the processes, send the study, show the results.

    Parameters
    ----------
    argv
        Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns
    -------
    int
        0 once stopped, 1 when the results did not arrive.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".demo")
    parser.add_argument("--no-wait", action="store_true", help="stop once the results are in")
    args = parser.parse_args(argv)
    if args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    node_port = _port(11112)
    orthanc = OrthancProcess(
        args.work_dir / "orthanc", node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port,
        stable_age_s=2, http_port=_port(8042), dicom_port=_port(4242),
    )
    node = NodeProcess(
        args.work_dir / "node", port=node_port,
        destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
        config={"grouping": {"quiet_period_s": 1.0},
                "node": {"allowed_calling_ae_titles": [orthanc.aet]}},
    )
    viewer: OhifProxyServer | None = None
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        orthanc.start()
        print(f"Orthanc (the PACS) runs at {orthanc.base_url}, DICOM {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        print("Starting dicom-node (loading the hippocampus model)...")
        node.start()
        print(f"dicom-node listens as {node.ae_title}@127.0.0.1:{node_port}; log: {node.log_file}")
        files = sorted(DEMO_STUDY.glob("*.dcm"))
        print(f"Sending the demo study ({len(files)} MR images, TCIA Brain-Tumor-Progression) to Orthanc...")
        start = time.monotonic()
        run_storescu([DEMO_STUDY], orthanc.dicom_port, called_aet=orthanc.aet)
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        print("Orthanc forwards the study once it is stable; the node analyses it and files the results back...")

        def all_results() -> dict[str, str] | None:
            found = result_series(orthanc, study_uid)
            return found if len(found) == 3 else None

        found = wait_until(all_results, deadline_s=300, what="SEG, SC and SR in Orthanc", poll_s=0.5)
        elapsed = time.monotonic() - start
        job = next(j for j in node.ledger().job_rows() if j.state == JobState.DONE)
        summary = job.summary
        volumes = {m["structure"] or m["name"]: m for m in summary["measurements"]}
        print()
        print(f"Results in Orthanc after {elapsed:.1f} s ({', '.join(sorted(found))}):")
        for name, item in volumes.items():
            print(f"  {name:<26} {item['value']:>9.1f} mm³")
        print(f"  model {summary['model_name']} {summary['model_version']}")
        study_id = next(m["ID"] for m in orthanc.lookup(study_uid) if m.get("Type") == "Study")
        print()
        print(f"See them in Orthanc: {orthanc.base_url}/app/explorer.html#study?uuid={study_id}")
        if (DEFAULT_WEB_ROOT / "index.html").is_file():
            viewer = OhifProxyServer(("127.0.0.1", _port(3000)), orthanc_url=orthanc.base_url)
            viewer.start()
            print(f"See them in OHIF:    {viewer.url}/viewer?StudyInstanceUIDs={study_uid}")
        print(f"Node status:         .venv/bin/dicom-node status --config {node.config_file}")
        if not args.no_wait:
            print("Running; press Ctrl-C to stop.")
            while not stopping:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (TimeoutError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        print("--- node log (tail) ---", file=sys.stderr)
        print(node.log_text()[-4000:], file=sys.stderr)
        return 1
    finally:
        print("Stopping the node and Orthanc...")
        if viewer is not None:
            viewer.stop()
        node.stop()
        orthanc.stop()
        print("Stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
