"""Orthanc's shipped config and autoroute.lua forward stable studies to the node, and only those."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.local.orthanc_process import (
    NODE_MODALITY,
    PULL_CONFIG,
    SHIPPED_CONFIG,
    OrthancProcess,
    StoreScpProcess,
    run_storescu,
    wait_until,
)

pytestmark = pytest.mark.integration

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
STUDY_DIR = DATA_DIR / "hippocampus-dicom" / "Study1"
LATE_SERIES_DIR = STUDY_DIR / "12-T1post-05670"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ROUTE_DEADLINE_S = 20.0
"""Upper bound for StableAge (1 s in tests) + stability check (1 s) + sending 120 instances."""


@pytest.fixture(scope="module")
def source_uids() -> dict[str, str]:
    """SOPInstanceUID -> SeriesInstanceUID of every file of the test study."""
    if not STUDY_DIR.is_dir():
        pytest.fail(f"test study not found: {STUDY_DIR}")
    uids = {}
    for path in sorted(STUDY_DIR.rglob("*.dcm")):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        uids[str(dataset.SOPInstanceUID)] = str(dataset.SeriesInstanceUID)
    return uids


@pytest.fixture(scope="module")
def study_uid() -> str:
    """StudyInstanceUID of the test study."""
    first = next(STUDY_DIR.rglob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def received_uids(files: list[Path]) -> Counter[tuple[str, str]]:
    """How often each (SeriesInstanceUID, SOPInstanceUID) arrived."""
    counts: Counter[tuple[str, str]] = Counter()
    for path in files:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        counts[(str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))] += 1
    return counts


def summary_pattern(study_uid: str) -> str:
    """Regex for the one line autoroute.lua logs per OnStableStudy call of the study."""
    return rf"^autoroute: study {re.escape(study_uid)} \(.*\): \d+ series sent"


def route_study(orthanc: OrthancProcess, storescp: StoreScpProcess, study_uid: str, expected: int) -> list[Path]:
    """C-STORE the test study into Orthanc and wait until the node has all of it."""
    run_storescu([STUDY_DIR], orthanc.dicom_port, called_aet=orthanc.aet)
    files = storescp.wait_for_count(expected, ROUTE_DEADLINE_S)
    (summary,) = orthanc.wait_for_lua_lines(summary_pattern(study_uid), 1, ROUTE_DEADLINE_S)
    assert summary.endswith(": 5 series sent, 0 unchanged, 0 skipped, 0 failed")
    return files


def derived_copy(source: Path, out: Path, **changes: str) -> pydicom.Dataset:
    """Write a copy of ``source`` as a new instance of a new series, with ``changes`` applied."""
    dataset = pydicom.dcmread(source)
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(out)
    return dataset


def test_stable_study_reaches_the_node_once(
    orthanc: OrthancProcess, storescp: StoreScpProcess, source_uids: dict[str, str], study_uid: str
) -> None:
    started = time.monotonic()
    files = route_study(orthanc, storescp, study_uid, len(source_uids))
    elapsed_s = time.monotonic() - started

    assert received_uids(files) == Counter((series, sop) for sop, series in source_uids.items())
    for series in orthanc.series():
        assert orthanc.metadata("series", series["ID"])["AiRouted"] == str(len(series["Instances"]))
    assert not [job for job in orthanc.jobs() if job["State"] != "Success"]
    # smallest series first, ties by Orthanc ID: the order of the "sent" lines
    sizes = {s["ID"]: int(orthanc.get_json(f"/series/{s['ID']}/statistics")["DiskSize"]) for s in orthanc.series()}
    sent_order = [re.search(r"\(([0-9a-f-]+)\): sent ", line).group(1)  # type: ignore[union-attr]
                  for line in orthanc.lua_lines(r": sent \d+ instances ")]
    assert sent_order == sorted(sizes, key=lambda series_id: (sizes[series_id], series_id))
    assert len(set(sizes.values())) > 1, "the test study's series must differ in size"
    if orthanc.config["Plugins"]:  # the DICOMweb plugin from the shipped config is loaded
        (study,) = orthanc.get_json("/dicom-web/studies")
        assert study["0020000D"]["Value"] == [study_uid]
    print(f"{len(files)} instances stored, stable and routed in {elapsed_s:.1f} s")


def test_results_filed_back_are_not_routed(
    orthanc: OrthancProcess,
    storescp: StoreScpProcess,
    source_uids: dict[str, str],
    study_uid: str,
    tmp_path: Path,
) -> None:
    route_study(orthanc, storescp, study_uid, len(source_uids))
    source = sorted(LATE_SERIES_DIR.glob("*.dcm"))[0]
    results = tmp_path / "results"
    results.mkdir()
    seg = derived_copy(source, results / "seg.dcm", Modality="SEG", SeriesDescription="result v1")
    derived_copy(source, results / "made-by-node.dcm", Manufacturer="dicom-node", SeriesDescription="node")
    derived_copy(source, results / "sc.dcm", SOPClassUID=SECONDARY_CAPTURE, Modality="OT")

    run_storescu([results], orthanc.dicom_port, called_aet=orthanc.aet, calling_aet="DICOMNODE")
    (summary,) = orthanc.wait_for_lua_lines(summary_pattern(study_uid), 2, ROUTE_DEADLINE_S)[1:]
    assert summary.endswith(": 0 series sent, 5 unchanged, 3 skipped, 0 failed")
    assert len(orthanc.lua_lines(r": skipped, ")) == 3

    # The node supersedes a result by filing it again under the same UIDs (OverwriteInstances).
    seg.SeriesDescription = "result v2"
    seg.save_as(results / "seg.dcm")
    run_storescu([results / "seg.dcm"], orthanc.dicom_port, called_aet=orthanc.aet, calling_aet="DICOMNODE")
    orthanc.wait_for_lua_lines(summary_pattern(study_uid), 3, ROUTE_DEADLINE_S)
    (instance,) = orthanc.lookup(str(seg.SOPInstanceUID))
    assert orthanc.instance_tags(instance["ID"])["SeriesDescription"] == "result v2"

    assert len(storescp.received()) == len(source_uids)


def test_late_instance_resends_its_series(
    orthanc: OrthancProcess,
    storescp: StoreScpProcess,
    source_uids: dict[str, str],
    study_uid: str,
    tmp_path: Path,
) -> None:
    first_delivery = set(route_study(orthanc, storescp, study_uid, len(source_uids)))
    sources = sorted(LATE_SERIES_DIR.glob("*.dcm"))
    late = pydicom.dcmread(sources[-1])
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.InstanceNumber = 1000
    late.save_as(tmp_path / "late.dcm")

    run_storescu([tmp_path / "late.dcm"], orthanc.dicom_port, called_aet=orthanc.aet)
    series_size = len(sources) + 1
    files = storescp.wait_for_count(len(source_uids) + series_size, ROUTE_DEADLINE_S)
    (summary,) = orthanc.wait_for_lua_lines(summary_pattern(study_uid), 2, ROUTE_DEADLINE_S)[1:]
    assert summary.endswith(": 1 series sent, 4 unchanged, 0 skipped, 0 failed")

    resent = received_uids([path for path in files if path not in first_delivery])
    expected = {(str(late.SeriesInstanceUID), sop) for sop, series in source_uids.items() if series == late.SeriesInstanceUID}
    assert resent == Counter(expected | {(str(late.SeriesInstanceUID), str(late.SOPInstanceUID))})
    (series,) = orthanc.lookup(str(late.SeriesInstanceUID))
    assert orthanc.metadata("series", series["ID"])["AiRouted"] == str(series_size)


def test_failed_send_is_logged_and_resubmit_delivers(
    make_orthanc: Callable[..., OrthancProcess], tmp_path: Path, study_uid: str
) -> None:
    node = StoreScpProcess(tmp_path / "late-node")  # port reserved, not listening yet
    orthanc = make_orthanc(node_aet=node.aet, node_host=node.host, node_port=node.port)
    run_storescu([LATE_SERIES_DIR], orthanc.dicom_port, called_aet=orthanc.aet)

    (failure,) = orthanc.wait_for_lua_lines(r"^autoroute: ERROR store job .*/resubmit$", 1, ROUTE_DEADLINE_S)
    orthanc.wait_for_lua_lines(summary_pattern(study_uid) + r".* 1 failed$", 1, ROUTE_DEADLINE_S)
    (series,) = orthanc.series()
    assert "AiRouted" not in orthanc.metadata("series", series["ID"])

    job_id = re.search(r"POST /jobs/([0-9a-f-]+)/resubmit", failure)
    assert job_id is not None
    with node:
        orthanc.post(f"/jobs/{job_id.group(1)}/resubmit", {})
        node.wait_for_count(len(series["Instances"]), ROUTE_DEADLINE_S)
        wait_until(lambda: orthanc.get_json(f"/jobs/{job_id.group(1)}")["State"] == "Success", 10, "job success")
        # the resubmitted job flags the series, so its next stable event sends nothing again
        wait_until(lambda: orthanc.metadata("series", series["ID"]).get("AiRouted") == str(len(series["Instances"])),
                   10, "AiRouted after the resubmitted job")


def test_shipped_config_is_json_and_names_existing_lua() -> None:
    with SHIPPED_CONFIG.open(encoding="utf-8") as stream:
        config = json.load(stream)

    assert config["DicomAet"] == "ORTHANC"
    assert (config["DicomPort"], config["HttpPort"]) == (4242, 8042)
    assert config["DicomModalities"][NODE_MODALITY] == ["DICOMNODE", "127.0.0.1", 11112]
    assert 1024 <= config["UserMetadata"]["AiRouted"] <= 65535
    assert config["OverwriteInstances"] is True  # superseding results replace the old ones
    assert config["JobsHistorySize"] > 0  # synchronous store jobs and resubmit need a history
    assert [Path(plugin).name for plugin in config["Plugins"]] == ["libOrthancDicomWeb.so"]
    assert config["LuaScripts"] == ["autoroute.lua"]
    lua = (SHIPPED_CONFIG.parent / config["LuaScripts"][0]).read_text(encoding="utf-8")
    assert f"local TARGET_MODALITY = '{NODE_MODALITY}'" in lua
    assert "local ROUTED_METADATA = 'AiRouted'" in lua


def test_shipped_pull_config_is_the_push_one_without_routing() -> None:
    push = json.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    pull = json.loads(PULL_CONFIG.read_text(encoding="utf-8"))
    # Orthanc does not push: no script, no routing flag, no node to send to; the rest agrees, so
    # a site switching modes changes nothing else (storage, ports, StableAge, OverwriteInstances)
    assert pull["LuaScripts"] == [] and pull["DicomModalities"] == {} and "UserMetadata" not in pull
    differing = {key for key in push.keys() | pull.keys() if push.get(key) != pull.get(key)}
    assert differing == {"Name", "LuaScripts", "DicomModalities", "UserMetadata"}
    assert pull["DicomAlwaysAllowStore"] is True  # the node files its results by C-STORE too
