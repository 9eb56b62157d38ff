"""The body-composition plugin end to end: a real CT as DICOM through the pipeline, and the native JPEG 2000 series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import SeriesNumbers
from dicom_node.run.pipeline import JobSpec, run_job
from inference.base import Analysis
from inference.errors import InputError
import torch

from inference.bodycomp.analysis import CLASSICAL_METHOD, BodyCompositionAnalysis, LevelFinding, missing_level_reason
from inference.bodycomp.config import ModelConfigError, parse_model_config
from inference.bodycomp.segmentation import UNet2D
from inference.bodycomp.segmentation import save_checkpoint as save_segmentation
from inference.volume import load_series
from tests.conftest import SHARED_DATA
from tests.factories import series_from_nifti, write_datasets

CT = SHARED_DATA / "ct-abdomen"


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    datasets = series_from_nifti(CT / "example_ct.nii.gz", modality="CT", series_description="Abdomen 3mm")
    return write_datasets(datasets, tmp_path_factory.mktemp("ct"))


def spec_for(paths: list[Path], out: Path) -> JobSpec:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    out.mkdir(parents=True, exist_ok=True)
    return JobSpec(
        job_uid="bodycomp-test", study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        analysis="body-composition", paths=tuple(map(str, paths)), result_dir=str(out),
        series_numbers=SeriesNumbers(seg=401, sc=402, sr=403),
    )


def test_l3_through_the_pipeline_gives_valid_seg_sc_sr(
    tmp_path: Path, ct_series: list[Path], dciodvfy: Callable[[Path], list[str]]
) -> None:
    analysis = BodyCompositionAnalysis(range_mm=3.0)
    assert isinstance(analysis, Analysis)
    analysis.load("cpu")
    outcome = run_job(spec_for(ct_series, tmp_path), analysis)
    for name in ("seg.dcm", "sc.dcm", "sr.dcm"):
        assert dciodvfy(tmp_path / name) == [], name
    details = outcome.summary["details"]
    assert details["path"] == CLASSICAL_METHOD
    assert CLASSICAL_METHOD in outcome.summary["method"]
    level = details["levels"]["L3"]
    assert level["slices"] == 3  # +/- 3 mm at 3 mm spacing
    # L3 found at the body the vertebra map puts below L2 (slice 73.5 of example_ct, RAS z 314.8).
    assert abs(level["z_mm"] - 314.8) <= 6.0
    areas = {m["name"]: m for m in outcome.summary["measurements"]}
    muscle = areas["L3 Skeletal muscle area"]
    assert muscle["unit"] == "cm2" and 80.0 < muscle["value"] < 250.0
    assert areas["L3 Skeletal muscle mean HU"]["unit"] == "[hnsf'U]"
    assert -29.0 <= areas["L3 Skeletal muscle mean HU"]["value"] <= 150.0
    assert -190.0 <= level["compartments"]["visceral_fat"]["hu_mean"] <= -30.0
    # The SEG covers exactly the selected slices and reads back onto the source images.
    volume = load_series([pydicom.dcmread(p) for p in ct_series])
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    labels = np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), combine_segments=True,
        assert_missing_frames_are_empty=True,
    ))
    assert np.count_nonzero(labels.any(axis=(1, 2))) == 3
    # areas use the true pixel spacing: recount one compartment from the SEG
    pixel_cm2 = volume.spacing_mm[1] * volume.spacing_mm[2] / 100.0
    assert muscle["value"] == pytest.approx(np.count_nonzero(labels == 1) * pixel_cm2 / 3, abs=0.01)


def test_native_jpeg2000_series_decodes_and_fails_clearly_without_l3() -> None:
    datasets = [pydicom.dcmread(p) for p in sorted((CT / "ct_dicom_j2k").iterdir())]
    study, series, frame = (generate_uid(entropy_srcs=["j2k", part]) for part in ("st", "se", "for"))
    for index, ds in enumerate(datasets):  # the UIDs are blanked in the shared copy
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["j2k", str(index)])
    assert str(datasets[0].file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"
    volume = load_series(datasets)
    assert volume.shape == (20, 512, 512)
    body = volume.array[10][200:300, 200:300]
    assert -200.0 < float(np.median(body)) < 200.0  # decoded HU, not raw stored values
    analysis = BodyCompositionAnalysis(levels=["L3"])
    analysis.load("cpu")
    with pytest.raises(InputError, match="L3 not found"):
        analysis.run(volume)


def test_levels_outside_an_abdomen_ct_are_reported_and_l3_is_measured(ct_series: list[Path]) -> None:
    volume = load_series([pydicom.dcmread(p) for p in ct_series])
    analysis = BodyCompositionAnalysis(levels=["T5", "T8", "T10", "L3"], range_mm=3.0)
    analysis.load("cpu")
    result = analysis.run(volume)
    assert list(result.summary["levels"]) == ["L3"]
    missing = result.summary["levels_not_found"]
    assert list(missing) == ["T5", "T8", "T10"]
    for level, message in missing.items():
        assert message.startswith(f"vertebral level {level} not found in the scanned range z ")
        assert "found in the scan: " in message and "L3 (z " in message and "T12 (z " in message
    assert {m.name.split()[0] for m in result.measurements} == {"L3"}
    l3 = result.summary["levels"]["L3"]
    assert l3["slices"] == 3 and len(l3["source_slices"]) == 3
    # the preview and the SC show the chosen (centre) slice, not the first slices of the range
    assert result.key_slices == (l3["centre_slice"],) and l3["centre_slice"] == l3["source_slices"][1]


def test_the_preview_shows_the_centre_slice_of_every_level(ct_series: list[Path]) -> None:
    volume = load_series([pydicom.dcmread(p) for p in ct_series])
    analysis = BodyCompositionAnalysis(levels=["L1", "L3"])
    analysis.load("cpu")
    result = analysis.run(volume)
    levels = result.summary["levels"]
    assert result.key_slices == (levels["L1"]["centre_slice"], levels["L3"]["centre_slice"])
    assert levels["L1"]["centre_slice"] != levels["L3"]["centre_slice"]


def test_no_level_in_the_scan_fails_naming_each(ct_series: list[Path]) -> None:
    volume = load_series([pydicom.dcmread(p) for p in ct_series])
    analysis = BodyCompositionAnalysis(levels=["T5", "T8"])
    analysis.load("cpu")
    with pytest.raises(InputError, match="level T5 not found in the scanned range .*; vertebral level T8 not found"):
        analysis.run(volume)


def test_a_level_placed_just_beyond_the_scan_says_where() -> None:
    finding = LevelFinding(positions={}, method="vertebral level from the spine, anchor: pelvis",
                           mode="classical", curves={}, found={"L2": 10.0, "L1": 20.0, "T12": 30.4})
    to_lps = np.eye(4)
    to_lps[2] = [3.0, 0.0, 0.0, 100.0]  # z = 100 mm + 3 mm per slice
    assert missing_level_reason("T12", 30.4, finding, 30, to_lps) == (
        "vertebral level T12 not found in the scan: placed at z 191.2 mm, above the scanned range z 100.0 to "
        "187.0 mm (vertebral level from the spine, anchor: pelvis; found in the scan: L2 (z 130.0 mm), "
        "L1 (z 160.0 mm); placed beyond its ends: T12 (z 191.2 mm))"
    )


FOUR_CLASSES = ["muscle", "subcutaneous_fat", "visceral_fat", "intermuscular_fat"]


def test_a_trained_class_beyond_the_known_three_is_measured_and_coded_generically(
    tmp_path: Path, ct_series: list[Path], dciodvfy: Callable[[Path], list[str]]
) -> None:
    # an untrained network whose outputs vary over the image: this checks the plumbing of a fourth
    # class (label value, measurements, SEG segment, SR), not a segmentation's quality
    torch.manual_seed(1)
    net = UNet2D(len(FOUR_CLASSES) + 1, base=4)
    with torch.no_grad():
        net.out.weight.mul_(100.0)
        net.out.bias.zero_()
    weights = tmp_path / "four.pt"
    save_segmentation(weights, net, class_names=FOUR_CLASSES, input_px=32, base=4)
    analysis = BodyCompositionAnalysis(model={"slice_params": {"L3": {"class_names": FOUR_CLASSES,
                                                                      "model_weights": str(weights)}}})
    analysis.load("cpu")
    out = tmp_path / "out"
    outcome = run_job(spec_for(ct_series, out), analysis)
    for name in ("seg.dcm", "sc.dcm", "sr.dcm"):
        assert dciodvfy(out / name) == [], name
    areas = {m["name"]: m["value"] for m in outcome.summary["measurements"]}
    extra = outcome.summary["details"]["levels"]["L3"]["compartments"]["intermuscular_fat"]
    assert areas["L3 Intermuscular fat area"] == extra["area_cm2"] > 0
    seg = hd.seg.segread(out / "seg.dcm")
    described = {d.segment_label: d for d in seg.SegmentSequence}
    segment = described["Intermuscular fat"]
    assert segment.SegmentNumber == 4
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # SCT Tissue, generic
    assert described["Skeletal muscle"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "127954009"
    findings: dict[str, str] = {}  # tracking identifier -> finding code of each SR measurement group

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if "ContentSequence" not in item:
                continue
            children = {c.ConceptNameCodeSequence[0].CodeMeaning: c for c in item.ContentSequence
                        if "ConceptNameCodeSequence" in c}
            if "Tracking Identifier" in children and "Finding" in children:
                findings[children["Tracking Identifier"].TextValue] = (
                    children["Finding"].ConceptCodeSequence[0].CodeValue)
            walk(item.ContentSequence)

    walk(pydicom.dcmread(out / "sr.dcm").ContentSequence)
    assert findings["Intermuscular fat"] == "85756007" and findings["Skeletal muscle"] == "127954009"


def test_class_names_beyond_the_three_need_trained_weights_and_snake_case() -> None:
    with pytest.raises(ModelConfigError, match="slice_params.L3.class_names: Value error, \\['intermuscular_fat'\\]: "
                                               "only a trained model"):
        parse_model_config({"slice_params": {"L3": {"class_names": FOUR_CLASSES}}})
    with pytest.raises(ModelConfigError, match="slice_params.L3.class_names: .*distinct snake_case names"):
        parse_model_config({"slice_params": {"L3": {"class_names": ["muscle", "Bone marrow"],
                                                    "model_weights": "x.pt"}}})
