"""The classifier's task format and its validation, planning pieces, metrics and network, on real MSD crops."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from inference.classifier.dataset import DatasetError, find_task_dir, list_input_cases, load_dataset
from inference.classifier.demo_task import build_demo_task
from inference.classifier.metrics import binary_auc, classification_metrics
from inference.classifier.model import I3dClassifier, roi_channels
from inference.classifier.planning import five_fold_split, plan_and_preprocess, roi_box
from inference.classifier.predictor import fit_to_patch
from tests.conftest import SHARED_DATA

MSD = SHARED_DATA / "hippocampus-msd"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-case demo task built once; tests copy it before changing anything."""
    return build_demo_task(MSD, tmp_path_factory.mktemp("pristine"), max_cases=12)


@pytest.fixture
def task(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / pristine.name
    shutil.copytree(pristine, copy)
    return copy


def edit(task: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((task / "dataset.json").read_text())
    change(raw)
    (task / "dataset.json").write_text(json.dumps(raw))


def first_case(task: Path) -> str:
    image = json.loads((task / "dataset.json").read_text())["training"][0]["image"]
    return str(image).removeprefix("./imagesTr/").removesuffix(".nii.gz")


def test_demo_task_is_valid_and_labels_come_from_the_segmentations(task: Path) -> None:
    dataset = load_dataset(task)
    assert dataset.task_id == 1 and dataset.uses_roi and dataset.modalities == ("MR",)
    assert [label.name for label in dataset.classification_labels] == [
        "hippocampus_volume", "posterior_anterior_ratio"]
    assert len(dataset.training) == 11 and len(dataset.test) == 1
    assert "DEMONSTRATION" in dataset.description
    # The volume label is the MSD segmentation's volume against the median of the 12 cases.
    volumes = {}
    for case in (*dataset.training, *dataset.test):
        msd_label = np.asarray(nib.load(MSD / "labels" / f"{case.case_id}.nii.gz").dataobj)  # type: ignore[attr-defined]
        volumes[case.case_id] = int(np.count_nonzero(msd_label))
        roi = np.asarray(nib.load(case.roi_file).dataobj)  # type: ignore[attr-defined,arg-type]
        assert set(np.unique(roi)) <= {0, 1} and np.count_nonzero(roi) == volumes[case.case_id]
    median = float(np.median(list(volumes.values())))
    for case in dataset.training:
        assert case.targets["hippocampus_volume"] == int(volumes[case.case_id] > median)


def test_task_is_found_by_id_or_name(task: Path) -> None:
    root = task.parent
    assert find_task_dir(root, 1) == find_task_dir(root, "001") == find_task_dir(root, task.name) == task
    with pytest.raises(DatasetError, match="no task folder for task '7'"):
        find_task_dir(root, 7)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["training"][0].update(hippocampus_volume=2),
         r"training\[0\] \(case {case}\): field 'hippocampus_volume': 2 is not one of 0, 1"),
        (lambda d: d["training"][1].pop("label"), r"training \(case \w+\): field 'label' missing"),
        (lambda d: d["training"][0].pop("posterior_anterior_ratio"),
         r"training\[0\] \(case {case}\): missing field 'posterior_anterior_ratio'"),
        (lambda d: d["training"][0].update(grade=1), r"\(case {case}\): unknown field\(s\) \['grade'\]"),
        (lambda d: d["training"][0].update(image="imagesTr/x/y.nii.gz"),
         r"training\[0\]: field 'image': expected ./imagesTr/CASE.nii.gz"),
        (lambda d: d.pop("classification_labels"), "missing field 'classification_labels'"),
        (lambda d: d.update(modality={"1": "MR"}), r"field 'modality': keys must be consecutive from 0"),
        (lambda d: d["classification_labels"][0].update(values={"0": "only"}), "at least two classes"),
        (lambda d: d.pop("labels"), "missing field 'labels'"),
        (lambda d: [e.update(hippocampus_volume=0) for e in d["training"]],
         "'hippocampus_volume': every training case has the same value"),
    ],
)
def test_validation_names_the_case_and_the_field(
    task: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    case = first_case(task)
    edit(task, change)
    with pytest.raises(DatasetError, match=message.format(case=case)):
        load_dataset(task)


def test_ordinal_may_be_left_out_of_the_labels(task: Path) -> None:
    edit(task, lambda d: [label.pop("ordinal") for label in d["classification_labels"]])
    labels = load_dataset(task).classification_labels
    assert [label.ordinal for label in labels] == [False, False] and len(labels[0].classes) == 2
    edit(task, lambda d: d["classification_labels"][0].update(ordinal="yes"))
    with pytest.raises(DatasetError, match=r"classification_labels\[0\]: field 'ordinal' must be a bool, not 'yes'"):
        load_dataset(task)


def test_missing_image_file_is_named(task: Path) -> None:
    case = first_case(task)
    (task / "imagesTr" / f"{case}_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=rf"\(case {case}\): field 'image': file imagesTr/{case}_0000.nii.gz is missing"):
        load_dataset(task)


def test_planning_refuses_an_roi_on_another_grid_or_with_unknown_values(task: Path) -> None:
    case = first_case(task)
    roi_path = task / "labelsTr" / f"{case}.nii.gz"
    original: Any = nib.load(roi_path)
    roi = np.asarray(original.dataobj).copy()
    nib.save(nib.Nifti1Image(roi[:-2], original.affine), roi_path)  # type: ignore[no-untyped-call]
    with pytest.raises(DatasetError, match=rf"case {case}: field 'label': .* different geometry"):
        plan_and_preprocess(task.parent, 1)
    roi[roi > 0] = 3
    nib.save(nib.Nifti1Image(roi, original.affine), roi_path)  # type: ignore[no-untyped-call]
    with pytest.raises(DatasetError, match=rf"case {case}: field 'label': values \[3\] are not in 'labels'"):
        plan_and_preprocess(task.parent, 1)


def test_input_folder_must_hold_every_modality(tmp_path: Path, task: Path) -> None:
    shutil.copy(next((task / "imagesTs").glob("*_0000.nii.gz")), tmp_path / "a_0001.nii.gz")
    with pytest.raises(DatasetError, match=r"case a: has modalities \[1\], the model needs exactly \[0\]"):
        list_input_cases(tmp_path, 1)
    (tmp_path / "a_0001.nii.gz").rename(tmp_path / "a_0000.nii.gz")
    assert list(list_input_cases(tmp_path, 1)) == ["a"]


def test_five_fold_split_is_fixed_and_partitions_the_cases(task: Path) -> None:
    dataset = load_dataset(task)
    split = five_fold_split(dataset)
    assert split == five_fold_split(load_dataset(task))
    validation = [case for fold in split for case in fold["val"]]
    assert sorted(validation) == sorted(case.case_id for case in dataset.training)
    for fold in split:
        assert not set(fold["train"]) & set(fold["val"])


def test_roi_box_keeps_a_five_percent_margin() -> None:
    roi = np.zeros((100, 50, 30), dtype=np.uint8)
    roi[20:60, 10:30, 0:30] = 1
    box = roi_box(roi, "c")
    assert [(s.start, s.stop) for s in box] == [(18, 62), (9, 31), (0, 30)]


def test_binary_auc_is_the_pairwise_probability_with_ties_as_half() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)
    labels = rng.random(40) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert binary_auc(scores, labels) == pytest.approx(expected)
    assert np.isnan(binary_auc(scores, np.ones(40, dtype=bool)))


def test_classification_metrics_balanced_accuracy_and_macro_auc() -> None:
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    metrics = classification_metrics(probabilities, np.array([0, 1, 2, 2]))
    assert metrics["accuracy"] == 0.75
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert 0.0 <= metrics["auc"] <= 1.0


def test_network_has_one_head_per_label_and_takes_roi_channels() -> None:
    model = I3dClassifier(in_channels=3, head_classes=[2, 4], width=8).eval()
    roi = torch.zeros(2, 24, 32, 16, dtype=torch.long)
    roi[:, 4:10] = 1
    roi[:, 12:20] = 2
    x = torch.cat([torch.randn(2, 1, 24, 32, 16), roi_channels(roi, 2)], dim=1)
    with torch.inference_mode():
        outputs = model(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 2), (2, 4)]
    with pytest.raises(ValueError, match="at least two classes"):
        I3dClassifier(in_channels=1, head_classes=[1])


def test_fit_to_patch_centres_small_cases_and_crops_large_ones() -> None:
    data = np.ones((1, 4, 10, 6), dtype=np.float32)
    roi = np.ones((4, 10, 6), dtype=np.uint8)
    fitted, fitted_roi = fit_to_patch(data, roi, (8, 8, 8))
    assert fitted.shape == (1, 8, 8, 8) and fitted_roi.shape == (8, 8, 8)
    assert fitted[0, :, 3, 3].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert fitted[0, 2, :, 3].tolist() == [1] * 8
    assert fitted[0, 2, 3, :].tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    assert np.array_equal(fitted_roi, fitted[0].astype(np.uint8))
