"""Plan, train (short), validate and predict a real demo task through the CLI, the Python API and the node."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.cli.main import build_parser
from dicom_node.config import AnalysisSettings, SeriesNumbers
from dicom_node.run.pipeline import JobSpec, run_job
from dicom_node.run.plugins import create_analysis
from inference.errors import InputError
from inference.classifier import predict
from inference.classifier.analysis import ClassifierAnalysis
from inference.classifier.dataset import ArtifactError, find_task_dir, load_dataset
from inference.classifier.planning import five_fold_split
from tests.conftest import HIPPO_CROP_STUDY1, SHARED_DATA

MSD = SHARED_DATA / "hippocampus-msd"
ROI_TASK = "Task001_HippocampusVolume"
NO_ROI_TASK = "Task002_HippocampusVolumeNoROI"


def cli(*args: object) -> int:
    """Run ``dicom-node classifier ...`` through the ``dicom-node`` parser."""
    parsed = build_parser().parse_args(["classifier", *map(str, args)])
    return int(parsed.func(parsed))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real demo tasks (with and without ROIs), planned and trained for a few epochs."""
    data = tmp_path_factory.mktemp("classifier")
    assert cli("make-demo-task", data, "--source", MSD, "--max-cases", 24) == 0
    assert cli("make-demo-task", data, "--source", MSD, "--max-cases", 16, "--task-id", 2, "--without-roi") == 0
    assert cli("plan-and-preprocess", data, "-t", 1) == 0
    assert cli("plan-and-preprocess", data, "-t", "Task002_HippocampusVolumeNoROI", "-tf", 2, "-tl", 2) == 0
    assert cli("train", data, "3d", 1, 0, "--epochs", 2, "--threads", 1) == 0
    for fold in (0, 1):
        assert cli("train", data, "3d", 2, fold, "--epochs", 1, "--threads", 1) == 0
    return data


def artifact(root: Path, task: str) -> Path:
    return root / "results" / task / "3d"


def test_plans_and_preprocessed_cases(root: Path) -> None:
    pre = root / "preprocessed" / ROI_TASK
    plans = json.loads((pre / "plans.json").read_text())
    assert plans["target_spacing_mm"] == [1.0, 1.0, 1.0] and plans["axcodes"] == ["R", "A", "S"]
    assert plans["uses_roi"] is True and plans["normalisation"][0]["scheme"] == "zscore"
    patch = plans["configurations"]["3d"]["patch_size"]
    assert all(side % 8 == 0 for side in patch)
    splits = json.loads((pre / "splits_final.json").read_text())
    assert splits == five_fold_split(load_dataset(find_task_dir(root, 1)))
    cases = json.loads((pre / "cases.json").read_text())
    for case_id, properties in cases.items():
        data = np.load(pre / "cases" / f"{case_id}.npy")
        roi = np.load(pre / "cases" / f"{case_id}_roi.npy")
        assert data.shape[1:] == roi.shape == tuple(properties["preprocessed_shape"])
        # cropped to the ROI with a margin: smaller than the crop, background on every side
        assert all(a <= b for a, b in zip(roi.shape, properties["shape"], strict=True))
        assert roi.max() == 1 and roi[0].max() == 0 and roi[-1].max() == 0
        assert abs(float(data.mean())) < 1e-3 and abs(float(data.std()) - 1.0) < 1e-3


def test_without_rois_an_all_foreground_mask_and_labels_are_generated(root: Path) -> None:
    pre = root / "preprocessed" / NO_ROI_TASK
    assert json.loads((pre / "dataset.json").read_text())["labels"] == {"0": "background", "1": "foreground"}
    assert "labels" not in json.loads((root / NO_ROI_TASK / "dataset.json").read_text())
    assert json.loads((pre / "plans.json").read_text())["uses_roi"] is False
    for roi_file in (pre / "cases").glob("*_roi.npy"):
        assert np.all(np.load(roi_file) == 1)


def test_training_writes_checkpoint_progress_and_validation_metrics(root: Path) -> None:
    fold = artifact(root, ROI_TASK) / "fold_0"
    assert (fold / "checkpoint_final.pt").is_file() and not (fold / "checkpoint_latest.pt").exists()
    assert [epoch["epoch"] for epoch in json.loads((fold / "progress.json").read_text())] == [1, 2]
    metrics = json.loads((fold / "validation_metrics.json").read_text())
    val = json.loads((root / "preprocessed" / ROI_TASK / "splits_final.json").read_text())[0]["val"]
    assert metrics["n_validation_cases"] == len(val) and metrics["epochs_trained"] == 2
    assert set(metrics["labels"]) == {"hippocampus_volume", "posterior_anterior_ratio"}
    for scores in metrics["labels"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["balanced_accuracy"] <= 1.0
        assert scores["auc"] is None or 0.0 <= scores["auc"] <= 1.0  # None: one class in the fold
    predictions = json.loads((fold / "validation_predictions.json").read_text())
    assert sorted(predictions) == sorted(val)
    # --validation_only re-scores the same weights and gets the same numbers
    before = metrics["mean_over_labels"]
    assert cli("train", root, "3d", 1, 0, "--validation_only") == 0
    after = json.loads((fold / "validation_metrics.json").read_text())["mean_over_labels"]
    for key, value in before.items():
        assert (after[key] is None and value is None) or after[key] == pytest.approx(value)


def test_validation_only_needs_a_trained_fold(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("train", root, "3d", 1, 3, "--validation_only") == 1
    assert "train fold 3 first" in capsys.readouterr().err
    assert cli("train", root, "2d", 1, 0) == 1
    assert "no configuration '2d' (known: 3d)" in capsys.readouterr().err


def test_predict_cli_writes_one_json_per_case_and_requires_rois(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = root / ROI_TASK
    assert cli("predict", root, "-i", task / "imagesTs", "-s", task / "labelsTs", "-o", tmp_path, "-t", 1,
               "-f", 0) == 0
    outputs = sorted(tmp_path.glob("*.json"))
    assert [p.stem for p in outputs] == sorted(p.name.removesuffix("_0000.nii.gz") for p in (task / "imagesTs").iterdir())
    for path in outputs:
        result = json.loads(path.read_text())
        assert result["folds"] == [0]
        for label, probabilities in result["probabilities"].items():
            assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert result["predicted_class"][label] == max(probabilities, key=probabilities.__getitem__)
        # the Python API gives the same probabilities for the same case
        case = result["case"]
        api = predict(artifact(root, ROI_TASK), [task / "imagesTs" / f"{case}_0000.nii.gz"],
                      task / "labelsTs" / f"{case}.nii.gz")
        assert api["hippocampus_volume"] == pytest.approx(result["probabilities"]["hippocampus_volume"])
    assert cli("predict", root, "-i", task / "imagesTs", "-o", tmp_path / "x", "-t", 1, "-f", 0) == 1
    assert "trained with ROI segmentations, so each case needs one" in capsys.readouterr().err
    assert cli("predict", root, "-i", task / "imagesTs", "-o", tmp_path / "x", "-t", 1, "-f", 0, 4) == 1
    assert "fold 4 is not trained" in capsys.readouterr().err


def test_python_api_ensembles_folds_and_enforces_the_roi_rule(root: Path) -> None:
    task = root / NO_ROI_TASK
    image = next((task / "imagesTs").glob("*_0000.nii.gz"))
    probabilities = predict(artifact(root, NO_ROI_TASK), [str(image)])
    assert set(probabilities) == {"hippocampus_volume", "posterior_anterior_ratio"}
    assert set(probabilities["hippocampus_volume"]) == {"at or below median", "above median"}
    with pytest.raises(InputError, match="trained without ROI segmentations"):
        predict(artifact(root, NO_ROI_TASK), [image], MSD / "labels" / image.name.replace("_0000", ""))
    with pytest.raises(InputError, match="trained with ROI segmentations"):
        predict(artifact(root, ROI_TASK), [image])
    with pytest.raises(InputError, match=r"needs 1 image file\(s\) in the order \['MR'\], got 2"):
        predict(artifact(root, NO_ROI_TASK), [image, image])
    with pytest.raises(ArtifactError, match="no plans.json"):
        predict(root, [image])


def test_classifier_runs_in_the_node_and_files_sr_and_sc(
    root: Path, tmp_path: Path, dciodvfy: Callable[[Path], list[str]]
) -> None:
    with pytest.raises(ValueError, match="artifact: .* trained with ROI segmentations"):
        ClassifierAnalysis(artifact=str(artifact(root, ROI_TASK)))
    analysis = create_analysis("hippo-volume", AnalysisSettings(
        plugin="inference.classifier.analysis:ClassifierAnalysis",
        options={"artifact": str(artifact(root, NO_ROI_TASK)), "name": "hippo-volume",
                 "description_pattern": "hippo|hcrop"},
    ))
    assert analysis.rule.modalities == ("MR",)
    assert analysis.model_version.startswith("2folds-")  # two trained folds, digest of their weights
    analysis.load("cpu")
    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    spec = JobSpec(job_uid="clf-job", study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                   analysis="hippo-volume", paths=tuple(map(str, paths)), result_dir=str(tmp_path),
                   series_numbers=SeriesNumbers(seg=301, sc=302, sr=303))
    outcome = run_job(spec, analysis)
    assert sorted(Path(f).name for f in outcome.files) == ["sc.dcm", "sr.dcm"]
    for name in ("sc.dcm", "sr.dcm"):
        assert dciodvfy(tmp_path / name) == [], name
    findings = outcome.summary["findings"]
    assert [f["name"] for f in findings] == ["hippocampus_volume", "posterior_anterior_ratio"]
    assert sum(findings[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    assert "above median" in str(sr.ContentSequence) or "at or below median" in str(sr.ContentSequence)
