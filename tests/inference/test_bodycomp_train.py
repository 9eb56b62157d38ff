"""Both body-composition trainers end to end: prepare from the real CT, train, and run the weights through run-csv."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.cli.main import build_parser
from dicom_node.errors import ConfigError
from inference.bodycomp.config import load_model_config
from inference.bodycomp.segmentation import load_segmenter
from inference.bodycomp.slice_selection import load_slice_selector
from tests.conftest import SHARED_DATA
from tests.factories import series_from_nifti, write_datasets

CT = SHARED_DATA / "ct-abdomen"
#: RAS z of the L3 body centre of example_ct: L3 is not in the vertebra map (T11 to L2); this is
#: one body below its L2, where test_bodycomp_analysis finds L3 on the classical path.
L3_Z_MM = 314.8


def cli(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The CI machine is shared: one torch thread is faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bodycomp-data")
    tissue = CT / "tissue_types_on_ct_sm"
    assert cli(["prepare", str(out / "small"), "--tissue-volume", str(CT / "example_ct_sm.nii.gz"),
                "--muscle", str(tissue / "skeletal_muscle.nii.gz"),
                "--subcutaneous-fat", str(tissue / "subcutaneous_fat.nii.gz"),
                "--visceral-fat", str(tissue / "torso_fat.nii.gz"),
                "--volume", str(CT / "example_ct_sm.nii.gz"),
                "--vertebrae", str(CT / "totalseg_fast_on_ct_sm.nii.gz"), "-L", "L1", "T12"]) == 0
    assert cli(["prepare", str(out / "full"), "--volume", str(CT / "example_ct.nii.gz"),
                "--level-z", f"L3={L3_Z_MM}", "-L", "L3", "--val-every", "4"]) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_prepared_sets_follow_the_trainers_contract(data: Path) -> None:
    images = np.load(data / "small" / "segmentation" / "train_images.npy")
    masks = np.load(data / "small" / "segmentation" / "train_masks.npy")
    assert images.shape == (24, 512, 512, 1) and images.dtype == np.int16
    assert masks.shape == images.shape and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1, 2, 3}
    muscle = images[masks == 1]
    assert -29 <= np.median(muscle) <= 150  # raw HU, labels on the right pixels
    rows = read_csv(data / "small" / "slice_selection" / "meta" / "train.csv")
    assert len(rows) == 24 and len(list((data / "small" / "slice_selection" / "images" / "train").iterdir())) == 24
    offsets = np.array([[float(r["ZOffset_L1"]), float(r["ZOffset_T12"])] for r in rows])
    # T12 lies one vertebra (25-40 mm) above L1; the 30 slices run from below L1 to above T12
    assert 20.0 < float(np.median(offsets[:, 0] - offsets[:, 1])) < 40.0
    assert offsets[:, 0].min() < 0 < offsets[:, 0].max()


def test_train_body_segmentation_one_epoch(data: Path, tmp_path: Path) -> None:
    assert cli(["train", "body-segmentation", str(data / "small" / "segmentation"), str(tmp_path),
                "-a", "seg", "-b", "8", "-l", "0.003", "--epochs", "1", "--input-size", "64",
                "--base-channels", "8"]) == 0
    history = read_csv(tmp_path / "seg" / "history.csv")
    assert [row["epoch"] for row in history] == ["1"]
    assert 0.0 <= float(history[0]["val_dice_mean"]) <= 1.0 and "val_dice_visceral_fat" in history[0]
    config = load_model_config(tmp_path / "seg" / "config_fragment.json")
    assert config.slice_params["L3"].class_names == ("muscle", "subcutaneous_fat", "visceral_fat")
    segmenter = load_segmenter(Path(str(config.slice_params["L3"].model_weights)), "cpu")
    assert segmenter.input_px == 64 and (tmp_path / "seg" / "last.pt").is_file()


def test_train_slice_selection_regression_one_epoch(data: Path, tmp_path: Path) -> None:
    assert cli(["train", "slice-selection", str(data / "small" / "slice_selection"), str(tmp_path),
                "-L", "L1", "T12", "--regression", "--epochs", "1", "--input-size", "64"]) == 0
    assert "val_mae_mm" in read_csv(tmp_path / "bodycomp_slice_selection" / "history.csv")[0]
    config = load_model_config(tmp_path / "bodycomp_slice_selection" / "config_fragment.json")
    assert not config.sigmoid_output and config.levels == ("L1", "T12")
    assert config.slice_params["L1"].z_pos == 0.0 and 0.2 < config.slice_params["T12"].z_pos < 0.4
    selector = load_slice_selector(Path(str(config.slice_selection_weights)), "cpu")
    assert not selector.sigmoid_output and selector.levels == ("L1", "T12")


def test_trained_weights_run_through_run_csv(data: Path, tmp_path: Path) -> None:
    """Weights trained here (on this same CT: a smoke test, not a claim of accuracy) drive run-csv."""
    models = tmp_path / "models"
    assert cli(["train", "slice-selection", str(data / "full" / "slice_selection"), str(models), "-a", "ss",
                "-L", "L3", "-b", "16", "-l", "0.003", "--epochs", "12", "--input-size", "64"]) == 0
    accuracy = [float(r["val_accuracy_L3"]) for r in read_csv(models / "ss" / "history.csv")]
    assert max(accuracy) > 0.85
    assert cli(["train", "body-segmentation", str(data / "small" / "segmentation"), str(models), "-a", "seg",
                "-b", "8", "--epochs", "1", "--input-size", "64", "--base-channels", "8"]) == 0
    config = json.loads((models / "ss" / "config_fragment.json").read_text())
    config["slice_params"]["L3"].update(json.loads((models / "seg" / "config_fragment.json").read_text())
                                        ["slice_params"]["L3"])
    config["slice_params"]["L3"]["regression_plot_colour"] = "blue"
    (tmp_path / "model.json").write_text(json.dumps(config))
    datasets = series_from_nifti(CT / "example_ct.nii.gz", modality="CT", patient_id="DL1")
    for ds in datasets:
        ds.AccessionNumber = "A1"
    write_datasets(datasets, tmp_path / "in" / "DL1_A1")
    (tmp_path / "studies.csv").write_text("MRN,ACC\nDL1,A1\n")
    results = tmp_path / "results"
    assert cli(["run-csv", str(tmp_path / "studies.csv"), str(tmp_path / "model.json"), str(results),
                str(tmp_path / "in"), "--no-progress"]) == 0
    record = json.loads((results / "json_files" / "DL1_A1.json").read_text())
    series = record["series"][0]
    assert series["model_name"] == "bodycomp-dl" and series["details"]["path"] == "deep learning"
    assert series["method"].startswith("deep learning (levels: slice-selection network (sigmoid output)")
    assert abs(series["details"]["levels"]["L3"]["z_mm"] - L3_Z_MM) <= 9.0
    assert series["details"]["slice_selection"]["colours"] == {"L3": "blue"}
    row = read_csv(results / "summary.csv")[0]
    assert row["path"] == "deep learning" and float(row["L3_muscle_area_cm2"]) >= 0.0
    uid = series["series_instance_uid"]
    assert (results / "plots" / f"DL1_A1_{uid}_slice_selection.png").is_file()
    assert (results / "previews" / f"DL1_A1_{uid}_preview.png").is_file()


def test_broken_training_inputs_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_images.npy"):
        cli(["train", "body-segmentation", str(tmp_path), str(tmp_path / "m"), "--epochs", "1"])
    with pytest.raises(ConfigError, match="meta/train.csv"):
        cli(["train", "slice-selection", str(tmp_path), str(tmp_path / "m"), "--epochs", "1"])
    with pytest.raises(ConfigError, match=r"positions of \['L3'\] unknown"):  # the map covers T11 to L2
        cli(["prepare", str(tmp_path / "p"), "--volume", str(CT / "example_ct_sm.nii.gz"),
             "--vertebrae", str(CT / "totalseg_fast_on_ct_sm.nii.gz"), "-L", "L3"])
