"""Change since the prior study: two studies of one patient a year apart, through the report step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.run.pipeline import run_job
from dicom_node.run.priors import PriorResult, PriorSources, read_prior_sr
from inference.hippocampus.analysis import HippocampusAnalysis
from reports.comparison import compare
from tests.conftest import HIPPO_DICOM, sr_content_items
from tests.dicom_node.run.test_pipeline import spec_for
from tests.factories import study_of_patient

CROP1 = HIPPO_DICOM / "Study1" / "13_HCropVolume"
CROP2 = HIPPO_DICOM / "Study2" / "14_HCropVolume"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def analysis() -> HippocampusAnalysis:
    loaded = HippocampusAnalysis()
    loaded.load("cpu")
    return loaded


def numbers(sr_path: Path, concept: str, unit: str) -> dict[str, float]:
    """NUM values of one concept and unit in an SR, by their group's tracking identifier."""
    sr = pydicom.dcmread(sr_path)
    found: dict[str, float] = {}
    for group in sr_content_items(sr.ContentSequence):
        children = list(group.get("ContentSequence", []))
        names = [c.TextValue for c in children if c.get("ValueType") == "TEXT"
                 and c.ConceptNameCodeSequence[0].CodeValue == "112039"]
        for child in children:
            if (child.get("ValueType") == "NUM" and child.ConceptNameCodeSequence[0].CodeValue == concept
                    and child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == unit):
                found[names[0]] = float(child.MeasuredValueSequence[0].NumericValue)
    return found


def test_second_study_shows_the_change_since_the_first(
    tmp_path: Path, analysis: HippocampusAnalysis, dciodvfy: Callable[[Path], list[str]]
) -> None:
    first = study_of_patient(CROP1, tmp_path / "a", patient_id="TRACK-1", patient_name="Track^One",
                             study_date="20190115", seed="track-1-a")
    second = study_of_patient(CROP2, tmp_path / "b", patient_id="TRACK-1", patient_name="Track^One",
                              study_date="20200115", seed="track-1-b")
    nowhere = PriorSources(data_dir=None, pacs_url=None)
    spec_a = spec_for(first, tmp_path / "out-a")
    outcome_a = run_job(spec_for(first, tmp_path / "out-a").__class__(**{**spec_a.__dict__, "priors": nowhere}),
                        analysis)
    assert outcome_a.summary["comparison"] == {"prior": None, "message": "no prior study found"}
    assert outcome_a.summary["patient_id"] == "TRACK-1" and outcome_a.summary["study_date"] == "20190115"
    prior = read_prior_sr(pydicom.dcmread(tmp_path / "out-a" / "sr.dcm"))
    assert prior is not None and prior.origin == "PACS"
    volumes_a = {m["key"]: m["value"] for m in outcome_a.summary["measurements"]}
    assert prior.values == pytest.approx(volumes_a, abs=1e-3)
    assert (prior.model_name, prior.model_version) == (analysis.model_name, analysis.model_version)

    from dicom_node.run.pipeline import load_sources, report_results, run_analysis
    loaded = load_sources(second)
    result = run_analysis(analysis, loaded.volume, {}, name="hippocampus")
    built = report_results(result, loaded.sources, study_uid=str(loaded.sources[0].StudyInstanceUID),
                           series_uid=loaded.volume.series_instance_uid, analysis="hippocampus",
                           series_numbers=spec_a.series_numbers, node_name="DICOMNODE", priors=[prior])
    out = tmp_path / "out-b"
    out.mkdir()
    for name, ds in built.objects.items():
        ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    assert dciodvfy(out / "sr.dcm") == [] and dciodvfy(out / "sc.dcm") == []
    comparison = built.comparison
    assert comparison is not None and comparison.prior is prior and comparison.interval_days == 365
    volumes_b = {m.name: m.value for m in result.measurements}
    changes = {c.name: c for c in comparison.changes}
    assert set(changes) == set(volumes_b)
    for change in comparison.changes:
        before = volumes_a[change.key]
        assert change.change == pytest.approx(volumes_b[change.name] - before)
        assert change.percent == pytest.approx(100 * (volumes_b[change.name] - before) / before)
        assert comparison.percent_per_year(change) == pytest.approx(change.percent * 365.25 / 365)
    # the SR: prior SR in Pertinent Other Evidence, change in mm3, % and %/a per measurement
    sr = pydicom.dcmread(out / "sr.dcm")
    (study,) = sr.PertinentOtherEvidenceSequence
    assert study.StudyInstanceUID == prior.study_instance_uid
    assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        prior.sr_sop_instance_uid
    mm3 = numbers(out / "sr.dcm", "volume-change", "mm3")
    percent = numbers(out / "sr.dcm", "125314", "%")
    per_year = numbers(out / "sr.dcm", "125314", "%/a")
    for change in comparison.changes:
        label = f"Change since prior study 20190115: {change.name}"
        assert mm3[label] == pytest.approx(change.change, abs=1e-6)
        assert percent[label] == pytest.approx(change.percent, abs=1e-6)
        assert per_year[label] == pytest.approx(comparison.percent_per_year(change), abs=1e-6)
    # reading the second SR back gives its own volumes, not the change groups
    again = read_prior_sr(sr)
    assert again is not None and again.values == pytest.approx(
        {m.key: m.current for m in comparison.changes}, abs=1e-3)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(pydicom.dcmread(out / "sc.dcm").pixel_array).save(ARTIFACTS / "report_with_prior.png")


def test_prior_from_another_model_is_flagged_and_later_priors_ignored() -> None:
    from inference.base import Measurement
    from inference.hippocampus.analysis import CUBIC_MILLIMETER, STRUCTURES, VOLUME

    now = [Measurement("Hippocampus anterior volume", VOLUME, 1100.0, CUBIC_MILLIMETER, 1)]
    key = "Hippocampus anterior|118565006|mm3"
    priors = [
        PriorResult("1.1", "20180101", "hippocampus-unet3d", "0.9.0", {key: 1200.0}),
        PriorResult("1.2", "20190101", "hippocampus-unet3d", "0.9.0", {key: 1000.0}),
        PriorResult("1.3", "20250101", "hippocampus-unet3d", "1.0.0", {key: 900.0}),  # after: ignored
        PriorResult("1.4", "not a date", "hippocampus-unet3d", "1.0.0", {key: 900.0}),
    ]
    comparison = compare(now, STRUCTURES, "20200101", "hippocampus-unet3d", "1.0.0", priors)
    assert comparison.prior is priors[1] and comparison.other_model
    (change,) = comparison.changes
    assert (change.change, change.percent) == (100.0, pytest.approx(10.0))
    assert comparison.interval_days == 365
    assert [d.year for d, _ in comparison.history] == [2018, 2019, 2020]
    none = compare(now, STRUCTURES, "20200101", "hippocampus-unet3d", "1.0.0", [])
    assert none.prior is None and none.changes == () and not none.other_model


def test_unreachable_pacs_is_logged_and_gives_no_priors(caplog: pytest.LogCaptureFixture) -> None:
    from deploy.local.orthanc_process import free_port
    from dicom_node.run.priors import find_prior_results

    sources = PriorSources(data_dir=None, pacs_url=f"http://127.0.0.1:{free_port()}", timeout_s=2.0)
    with caplog.at_level("WARNING", logger="dicom_node.run.priors"):
        assert find_prior_results(sources, "hippocampus", "hippocampus-unet3d", "TRACK-1", "1.2.3") == []
    assert "not searched" in caplog.text
    assert find_prior_results(sources, "hippocampus", "hippocampus-unet3d", "", "1.2.3") == []
