"""A study routed by the shipped autoroute.lua is complete when Orthanc says its needed series arrived."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import OrthancProcess, free_port, run_storescu, wait_until
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY1 = HIPPO_DICOM / "Study1"
CROP_SERIES = STUDY1 / "13_HCropVolume"
QUIET_PERIOD_S = 4.0
"""Long enough that a study completed by the quiet period cannot pass for one completed by the source."""



def study_uid() -> str:
    return str(pydicom.dcmread(next(CROP_SERIES.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def job_line(node: NodeProcess, analysis: str = "hippocampus") -> str:
    """Wait for the canonical line of the analysis' job and return it."""
    pattern = re.compile(rf"job \S+ analysis={analysis} .* outcome=(sent|done)[^\n]*")
    return wait_until(lambda: (m := pattern.search(node.log_text())) and m.group(0), deadline_s=120,
                      what=f"the {analysis} job's log line", poll_s=0.2)


def stage(line: str, name: str) -> float:
    match = re.search(rf" {name}=([0-9.]+)s", line)
    assert match is not None, line
    return float(match.group(1))


def source_config(orthanc: OrthancProcess) -> dict[str, Any]:
    return {
        "grouping": {"quiet_period_s": QUIET_PERIOD_S, "max_wait_s": 120.0},
        "sources": {"pacs": {"ae_title": orthanc.aet, "url": orthanc.base_url, "timeout_s": 2.0}},
    }


def test_routed_study_is_analysed_without_a_quiet_period(
    make_orthanc: Callable[..., OrthancProcess], make_node: Callable[..., NodeProcess]
) -> None:
    node_port = free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = make_node(port=node_port, destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
                     config=source_config(orthanc))
    node.start()
    run_storescu([STUDY1], orthanc.dicom_port, called_aet=orthanc.aet)
    line = job_line(node)
    assert stage(line, "wait") < 0.5, line
    uid = study_uid()
    assert f"study {uid} complete: every series an analysis needs arrived from source pacs (1 of 5 series)" \
        in node.log_text()
    # every routed instance arrives, and the series no analysis needed open no new generation
    ledger = node.ledger()
    total = sum(1 for _ in STUDY1.rglob("*.dcm"))
    wait_until(lambda: sum(s.instance_count for s in ledger.series_of_study(uid)) == total, deadline_s=60,
               what=f"all {total} instances in the node")
    wait_until(lambda: "outcome=sent" in job_line(node), deadline_s=60, what="results sent")
    study = ledger.study(uid)
    assert study is not None and study.generation == 1 and study.state == "complete"
    jobs = ledger.job_rows(study_uid=uid)
    assert [(j.analysis, j.generation) for j in jobs if j.analysis == "hippocampus"] == [("hippocampus", 1)]
    assert "cannot ask source" not in node.log_text()


def test_quiet_period_applies_when_orthanc_does_not_answer_and_the_log_says_why(
    make_orthanc: Callable[..., OrthancProcess], make_node: Callable[..., NodeProcess]
) -> None:
    node_port = free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = make_node(port=node_port, destinations={}, config=source_config(orthanc))
    node.start()
    orthanc.stop()  # stopped before the node asks it anything
    # the study arrives from the source's AE title, as Orthanc would have sent it
    run_storescu([CROP_SERIES], node_port, called_aet=node.ae_title, calling_aet=orthanc.aet)
    line = job_line(node)
    assert stage(line, "wait") >= QUIET_PERIOD_S - 0.05, line
    uid = study_uid()
    why = [entry for entry in node.log_text().splitlines() if "cannot ask source pacs" in entry]
    assert len(why) == 1, why  # once per study
    assert f"study {uid}: cannot ask source pacs which series it sends" in why[0]
    assert f"grouping.quiet_period_s = {QUIET_PERIOD_S:g} s" in why[0]
    assert "Connect" in why[0] or "refused" in why[0], why[0]


def test_check_config_says_whether_each_source_answers(
    make_orthanc: Callable[..., OrthancProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli.main import main
    from dicom_node.config import dump_toml

    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=free_port())
    config = tmp_path / "node.toml"
    config.write_text(dump_toml({"node": {"data_dir": str(tmp_path / "data")},
                                 "sources": {"pacs": {"ae_title": orthanc.aet, "url": orthanc.base_url}}}))
    assert main(["check-config", "--config", str(config)]) == 0
    version = orthanc.get_json("/system")["Version"]
    err = capsys.readouterr().err
    assert f"sources.pacs.url: {orthanc.base_url} answers: " in err
    assert f"(AE title {orthanc.aet}, Orthanc {version})" in err
    orthanc.stop()
    assert main(["check-config", "--config", str(config)]) == 0  # reported, not refused
    err = capsys.readouterr().err
    assert f"sources.pacs.url: {orthanc.base_url} does not answer: GET /system: " in err
