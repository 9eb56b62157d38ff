"""Two studies of one patient a year apart through a real Orthanc: the second shows the change since the first."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import OrthancProcess, free_port, run_storescu, wait_until
from dicom_node.run.priors import read_prior_sr
from tests.conftest import HIPPO_DICOM
from tests.factories import study_of_patient
from tests.integration.test_end_to_end import study_results

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CROP1 = HIPPO_DICOM / "Study1" / "13_HCropVolume"
CROP2 = HIPPO_DICOM / "Study2" / "14_HCropVolume"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"



def result_file(orthanc: OrthancProcess, study_uid: str, kind: str) -> Dataset:
    """The node's SR or SC of a study, downloaded from Orthanc once it is there."""
    results = wait_until(lambda: (r := study_results(orthanc, study_uid)) and r[kind] and r,
                         deadline_s=180, what=f"{kind} of {study_uid} in Orthanc", poll_s=0.5)
    instance = results[kind][0]["Instances"][0]
    return pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{instance}/file")))


def two_studies(tmp_path: Path) -> tuple[Path, Path, str, str]:
    first = study_of_patient(CROP1, tmp_path / "a", patient_id="TRACK-7", patient_name="Track^Seven",
                             study_date="20190310", seed=f"{tmp_path}-a")
    second = study_of_patient(CROP2, tmp_path / "b", patient_id="TRACK-7", patient_name="Track^Seven",
                              study_date="20200309", seed=f"{tmp_path}-b")
    return (tmp_path / "a", tmp_path / "b", str(pydicom.dcmread(first[0]).StudyInstanceUID),
            str(pydicom.dcmread(second[0]).StudyInstanceUID))


def check_change(prior_sr: Dataset, sr: Dataset) -> None:
    """The second SR references the first and carries its change, equal to the two SRs' volumes."""
    before = read_prior_sr(prior_sr)
    after = read_prior_sr(sr)
    assert before is not None and after is not None
    (study,) = sr.PertinentOtherEvidenceSequence
    assert study.StudyInstanceUID == prior_sr.StudyInstanceUID
    reference = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == prior_sr.SOPInstanceUID
    changes: dict[str, float] = {}
    for item in sr.ContentSequence:
        for group in item.get("ContentSequence", []):
            children = list(group.get("ContentSequence", []))
            label = next((c.TextValue for c in children if c.get("ValueType") == "TEXT"
                          and c.ConceptNameCodeSequence[0].CodeValue == "112039"), "")
            for child in children:
                if child.get("ValueType") == "NUM" and child.ConceptNameCodeSequence[0].CodeValue == "volume-change":
                    changes[label] = float(child.MeasuredValueSequence[0].NumericValue)
    assert len(changes) == 3
    assert all(label.startswith("Change since prior study 20190310: ") for label in changes)
    volume_keys = sorted(k for k in after.values if k.split("|")[1] == "118565006")
    expected = sorted(after.values[k] - before.values[k] for k in volume_keys)
    assert sorted(changes.values()) == pytest.approx(expected, abs=1e-6)


def test_prior_found_in_the_pacs_after_the_data_folder_was_wiped(
    tmp_path: Path, make_orthanc: Callable[..., OrthancProcess], make_node: Callable[..., NodeProcess]
) -> None:
    node_port = free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = make_node(port=node_port, destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
                     config={"node": {"allowed_calling_ae_titles": [orthanc.aet]},
                             "priors": {"pacs_url": orthanc.base_url, "timeout_s": 10.0}})
    folder_a, folder_b, study_a, study_b = two_studies(tmp_path)
    node.start()
    run_storescu([folder_a], orthanc.dicom_port, called_aet=orthanc.aet)
    prior_sr = result_file(orthanc, study_a, "SR")
    assert "PertinentOtherEvidenceSequence" not in prior_sr
    node.stop(timeout_s=30)
    shutil.rmtree(node.data_dir)  # the node forgets everything: only the PACS knows the first result
    node.start()
    run_storescu([folder_b], orthanc.dicom_port, called_aet=orthanc.aet)
    sr = result_file(orthanc, study_b, "SR")
    check_change(prior_sr, sr)
    (job,) = [j for j in node.ledger().job_rows() if j.study_uid == study_b]
    comparison = job.summary["comparison"]
    assert comparison["prior"]["origin"] == "PACS" and comparison["interval_days"] == 365
    assert comparison["other_model"] is False
    sc = result_file(orthanc, study_b, "SC")
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(sc.pixel_array).save(ARTIFACTS / "report_prior_from_pacs.png")


def test_prior_found_in_the_ledger_without_a_pacs_url(
    tmp_path: Path, make_orthanc: Callable[..., OrthancProcess], make_node: Callable[..., NodeProcess]
) -> None:
    node_port = free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = make_node(port=node_port, destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
                     config={"node": {"allowed_calling_ae_titles": [orthanc.aet]}})
    folder_a, folder_b, study_a, study_b = two_studies(tmp_path)
    node.start()
    run_storescu([folder_a], orthanc.dicom_port, called_aet=orthanc.aet)
    prior_sr = result_file(orthanc, study_a, "SR")
    (job_a,) = [j for j in node.ledger().job_rows() if j.study_uid == study_a]
    assert job_a.summary["comparison"] == {"prior": None, "message": "no prior study found"}
    run_storescu([folder_b], orthanc.dicom_port, called_aet=orthanc.aet)
    sr = result_file(orthanc, study_b, "SR")
    check_change(prior_sr, sr)
    (job_b,) = [j for j in node.ledger().job_rows() if j.study_uid == study_b]
    assert job_b.summary["comparison"]["prior"]["origin"] == "ledger"
