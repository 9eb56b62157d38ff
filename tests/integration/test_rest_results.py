"""Results filed into an Orthanc source through its REST API (destination "source:NAME")."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import OrthancProcess, free_port, run_storescu, wait_until
from dicom_node.config import SourceSettings
from dicom_node.deliver.rest import store_files
from dicom_node.errors import DeliveryFailed
from dicom_node.receive.source import OrthancSource
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CROP_SERIES = HIPPO_DICOM / "Study1" / "13_HCropVolume"
USERS = {"dicom-node": "s3cret-pw"}


def authenticated_orthanc(make_orthanc: Callable[..., OrthancProcess]) -> OrthancProcess:
    return make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=free_port(),
                        overrides={"LuaScripts": [], "AuthenticationEnabled": True, "RegisteredUsers": USERS})


def test_results_go_by_rest_to_the_source_with_its_credentials(
    make_orthanc: Callable[..., OrthancProcess], tmp_path: Path
) -> None:
    orthanc = authenticated_orthanc(make_orthanc)
    password = tmp_path / "orthanc-password"
    password.write_text(USERS["dicom-node"] + "\n")
    node = NodeProcess(tmp_path / "node", port=free_port(), destinations={}, config={
        "grouping": {"quiet_period_s": 0.5},
        "sources": {"pacs": {"ae_title": orthanc.aet, "url": orthanc.base_url, "username": "dicom-node",
                             "password_file": str(password)}},
        "analyses": {"hippocampus": {"plugin": "hippocampus", "destinations": ["source:pacs"]}},
    })
    try:
        node.start()
        run_storescu([CROP_SERIES], node.port, called_aet=node.ae_title)
        line = wait_until(lambda: (m := re.search(r"job \S+ analysis=hippocampus .*outcome=sent to source:pacs",
                                                  node.log_text())) and m.group(0), 120, "results sent")
        assert " send=" in line
        study_uid = str(pydicom.dcmread(next(CROP_SERIES.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        client = OrthancSource("pacs", SourceSettings(ae_title=orthanc.aet, url=orthanc.base_url,
                                                      username="dicom-node", password_file=password))
        try:
            study_id = client.study_id(study_uid)
            modalities = sorted(s["MainDicomTags"]["Modality"] for s in client.client.get_studies_id_series(study_id))
        finally:
            client.close()
        # the three results only (the series was sent to the node directly): SC report (OT), SEG, SR
        assert modalities == ["OT", "SEG", "SR"]
    finally:
        node.stop(timeout_s=30)


def test_refused_credentials_dead_letter_and_unreachable_retries(
    make_orthanc: Callable[..., OrthancProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc = authenticated_orthanc(make_orthanc)
    result = next(CROP_SERIES.glob("*.dcm"))
    monkeypatch.setenv("NODE_TEST_PW", "wrong")
    wrong = OrthancSource("pacs", SourceSettings(ae_title="ORTHANC", url=orthanc.base_url,
                                                 username="dicom-node", password_env="NODE_TEST_PW"))
    with pytest.raises(DeliveryFailed) as refused:
        store_files([result], wrong)
    assert not refused.value.retryable and "HTTP code: 401" in str(refused.value)
    wrong.close()
    orthanc.stop()
    monkeypatch.setenv("NODE_TEST_PW", USERS["dicom-node"])
    down = OrthancSource("pacs", SourceSettings(ae_title="ORTHANC", url=orthanc.base_url,
                                                username="dicom-node", password_env="NODE_TEST_PW"))
    with pytest.raises(DeliveryFailed) as unreachable:
        store_files([result], down)
    assert unreachable.value.retryable and "cannot reach source pacs" in str(unreachable.value)
    down.close()
