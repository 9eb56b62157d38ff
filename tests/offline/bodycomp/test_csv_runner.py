"""The CSV batch runner and ``organize`` on CT studies built from the real abdomen CT in ../shared/data."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.cli.main import build_parser
from dicom_node.errors import ConfigError
from tests.conftest import SHARED_DATA
from tests.factories import series_from_nifti, write_datasets

CT = SHARED_DATA / "ct-abdomen"


def cli(argv: Sequence[str]) -> int:
    """Run one of the body-composition commands through the ``dicom-node`` parser, errors raised."""
    args = build_parser().parse_args(list(argv))
    return int(args.func(args))


def write_ct_study(
    folder: Path, patient_id: str, accession: str, *, seed: int, kernels: Sequence[str] = ("B30f",)
) -> list[str]:
    """Write the real CT as one series per kernel into ``folder`` (nested, odd file names)."""
    study_uid = pydicom.uid.generate_uid(entropy_srcs=["csv-runner", patient_id, accession])
    series_uids = []
    for index, kernel in enumerate(kernels):
        datasets = series_from_nifti(
            CT / "example_ct.nii.gz", modality="CT", series_description=f"Abdomen 3mm {kernel}",
            study_uid=study_uid, series_number=index + 2, seed=seed + index, patient_id=patient_id,
        )
        for ds in datasets:
            ds.AccessionNumber = accession
            ds.ConvolutionKernel = kernel
        paths = write_datasets(datasets, folder / f"sub{index}")
        for number, path in enumerate(paths):  # file names inside a study do not matter
            path.rename(path.with_name(f"IMG{number:04d}"))
        series_uids.append(str(datasets[0].SeriesInstanceUID))
    return series_uids


def write_broken_study(folder: Path) -> None:
    """The native 20-slice JPEG 2000 upper-abdomen series (no L3 in it) plus a file that is not DICOM."""
    folder.mkdir(parents=True)
    study, series = (pydicom.uid.generate_uid(entropy_srcs=["broken", p]) for p in ("st", "se"))
    for index, path in enumerate(sorted((CT / "ct_dicom_j2k").iterdir())):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=["broken", "for"])
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["broken", str(index)])
        ds.save_as(folder / f"x{index}", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("csv-inputs")
    a_series = write_ct_study(root / "in1" / "MRN001_ACC001", "MRN001", "ACC001", seed=1,
                              kernels=("B30f", "B70f"))
    b_series = write_ct_study(root / "in2" / "deeper" / "studyB", "MRN002", "ACC002", seed=5)
    write_broken_study(root / "in2" / "MRN003_ACC003")
    csv_path = root / "studies.csv"
    csv_path.write_text("MRN,ACC,Other\nMRN001,ACC001,x\nMRN003,ACC003,y\nMRN404,ACC404,z\n")
    config = root / "classical.json"
    config.write_text(json.dumps({"sigmoid_output": True, "slice_params": {"L3": {
        "class_names": ["muscle", "subcutaneous_fat", "visceral_fat"], "regression_plot_colour": "red"}}}))
    return {"root": root, "a_series": a_series, "b_series": b_series, "csv": csv_path, "config": config}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def first_run(inputs: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    root = inputs["root"]
    assert isinstance(root, Path)
    results = tmp_path_factory.mktemp("csv-results")
    code = cli(["run-csv", str(inputs["csv"]), str(inputs["config"]), str(results), str(root / "in1"),
                str(root / "in2"), "-R", "-t", "2", "-r", "3", "-d", "--no-progress"])
    return code, results


def test_run_csv_writes_every_output(first_run: tuple[int, Path], inputs: dict[str, object]) -> None:
    code, results = first_run
    assert code == 1  # one study failed and one was not found; the batch went on
    a_series = inputs["a_series"]
    assert isinstance(a_series, list)
    record = json.loads((results / "json_files" / "MRN001_ACC001.json").read_text())
    assert record["error"] is None and len(record["series"]) == 2
    for series in record["series"]:
        assert series["state"] == "done" and series["details"]["path"] == "classical HU thresholds"
        assert series["details"]["levels"]["L3"]["slices"] == 3  # -r 3 at 3 mm
        stem = f"MRN001_ACC001_{series['series_instance_uid']}"
        with Image.open(results / "previews" / f"{stem}_preview.png") as preview:
            assert preview.size[0] > 300
        assert (results / "plots" / f"{stem}_slice_selection.png").stat().st_size > 5000
        slices = sorted((results / "all_slices" / stem).iterdir())
        assert len(slices) == 6  # image + mask for each of the 3 slices
        with Image.open(next(p for p in slices if p.name.endswith("_mask.png"))) as image:
            mask = np.asarray(image)
        assert set(np.unique(mask)) <= {0, 1, 2, 3} and mask.max() == 3
        seg = hd.seg.segread(results / "dicom_seg" / f"{stem}_seg.dcm")
        assert seg.PatientID == "MRN001" and seg.AccessionNumber == "ACC001"
    broken = json.loads((results / "json_files" / "MRN003_ACC003.json").read_text())
    assert "L3 not found" in broken["error"]
    log = {row["study"]: row for row in read_rows(results / "run_log.csv")}
    assert log["MRN001_ACC001"]["series_processed"] == "2" and log["MRN001_ACC001"]["error"] == ""
    assert log["MRN404_ACC404"]["found"] == "False" and "not found" in log["MRN404_ACC404"]["error"]
    assert log["MRN003_ACC003"]["found"] == "True" and log["MRN003_ACC003"]["series_processed"] == "0"
    summary = read_rows(results / "summary.csv")
    done = [row for row in summary if row["state"] == "done"]
    assert len(done) == 2 and all(80.0 < float(r["L3_muscle_area_cm2"]) < 250.0 for r in done)
    assert {"L3_muscle_hu_mean", "L3_visceral_fat_hu_median", "L3_subcutaneous_fat_hu_std"} <= set(done[0])
    assert [r["flags"] for r in summary if r["state"] == "failed"] == ["failed"]
    filtered = read_rows(results / "filtered_summary.csv")
    assert [r["kernel"] for r in filtered] == ["B30f"]  # one series per study, the soft-tissue kernel


def test_keep_existing_skips_and_rerun_exceptions_redoes_failures(
    first_run: tuple[int, Path], inputs: dict[str, object]
) -> None:
    _, results = first_run
    root = inputs["root"]
    assert isinstance(root, Path)
    good, bad = results / "json_files" / "MRN001_ACC001.json", results / "json_files" / "MRN003_ACC003.json"
    for path in (good, bad):
        os.utime(path, (1_000_000, 1_000_000))
    base = ["run-csv", str(inputs["csv"]), str(inputs["config"]), str(results), str(root / "in1"),
            str(root / "in2"), "-R", "--no-progress"]
    cli([*base, "-k"])
    assert good.stat().st_mtime == 1_000_000 and bad.stat().st_mtime == 1_000_000
    assert len(read_rows(results / "summary.csv")) == 3  # summaries still cover the skipped studies
    cli([*base, "-k", "-e"])
    assert good.stat().st_mtime == 1_000_000 and bad.stat().st_mtime > 1_000_000


def test_directory_list_recursive_and_study_names(inputs: dict[str, object], tmp_path: Path) -> None:
    root = inputs["root"]
    assert isinstance(root, Path)
    listing = tmp_path / "dirs.txt"
    listing.write_text(f"# input folders\n{root / 'in1'}\n\n{root / 'in2'}\n")
    names = tmp_path / "names.csv"
    names.write_text("StudyName\nstudyB\n")
    results = tmp_path / "out"
    args = ["run-csv", str(names), str(inputs["config"]), str(results), str(listing), "-l", "--no-progress"]
    assert cli([*args, "-R"]) == 1  # studyB is two levels down: not found without -S
    assert not json.loads((results / "json_files" / "studyB.json").read_text())["found"]
    assert cli([*args, "-S"]) == 1  # found, but its files lie in a sub-folder: read only with -R
    record = json.loads((results / "json_files" / "studyB.json").read_text())
    assert record["found"] and record["error"] == (
        "no usable series: no DICOM images directly in the study folder (-R/--recursive reads its sub-folders)")
    assert cli([*args, "-S", "-R", "-m", "200"]) == 1  # found, but 112 slices < 200: no usable series
    record = json.loads((results / "json_files" / "studyB.json").read_text())
    assert record["found"] and "fewer than the minimum of 200" in record["error"]
    assert cli([*args, "-S", "-R", "-t", "2"]) == 0
    record = json.loads((results / "json_files" / "studyB.json").read_text())
    assert [s["series_instance_uid"] for s in record["series"]] == inputs["b_series"]


def test_bad_csv_and_config_are_config_errors(inputs: dict[str, object], tmp_path: Path) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("Patient,Study\n1,2\n")
    with pytest.raises(ConfigError, match="MRN and ACC, or StudyName"):
        cli(["run-csv", str(bad_csv), str(inputs["config"]), str(tmp_path / "o"), str(tmp_path)])
    bad_config = tmp_path / "model.json"
    bad_config.write_text(json.dumps({"slice_params": {"L3": {"class_names": ["bone"]}}}))
    with pytest.raises(ConfigError, match="slice_params.L3.class_names"):
        cli(["run-csv", str(inputs["csv"]), str(bad_config), str(tmp_path / "o"), str(tmp_path)])
    missing = tmp_path / "weights.json"
    missing.write_text(json.dumps({"slice_selection_weights": "nope.pt"}))
    with pytest.raises(ConfigError, match="nope.pt does not exist"):
        cli(["run-csv", str(inputs["csv"]), str(missing), str(tmp_path / "o"), str(tmp_path)])


def test_organize_sorts_a_dump_into_study_folders(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    first = series_from_nifti(CT / "example_ct_sm.nii.gz", modality="CT", patient_id="A/B 7", seed=2)
    second = series_from_nifti(CT / "example_ct_sm.nii.gz", modality="CT", patient_id="P2", seed=3)
    for ds in second:
        ds.AccessionNumber = "X:9"
    for index, ds in enumerate([*first[:5], *second[:4]]):
        target = dump / ("a" if index % 2 else "b/c") / f"file{index}"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    (dump / "README").write_text("not DICOM")
    assert cli(["organize", str(dump), str(tmp_path / "out")]) == 0
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["A_B_7_ACC00002", "P2_X_9"]
    assert len(list((tmp_path / "out" / "P2_X_9").iterdir())) == 4
    assert len(list((tmp_path / "out" / "A_B_7_ACC00002").iterdir())) == 5


def test_files_directly_in_the_study_folder_without_r_and_the_shipped_configuration(
    inputs: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = inputs["root"]
    assert isinstance(root, Path)
    flat = tmp_path / "in" / "MRN001_ACC001"
    flat.mkdir(parents=True)
    for path in sorted((root / "in1" / "MRN001_ACC001" / "sub0").iterdir()):
        (flat / path.name).symlink_to(path)
    (flat / "old").mkdir()  # a sub-folder holding another series, not read without -R
    for path in sorted((root / "in1" / "MRN001_ACC001" / "sub1").iterdir()):
        (flat / "old" / path.name).symlink_to(path)
    names = tmp_path / "one.csv"
    names.write_text("MRN,ACC\nMRN001,ACC001\n")
    results = tmp_path / "out"
    caplog.set_level("INFO")
    # no CONFIG: the shipped configuration (classical path, L3); -e without -k says it does nothing
    assert cli(["run-csv", str(names), str(results), str(tmp_path / "in"), "-e", "-t", "2", "--no-progress"]) == 0
    record = json.loads((results / "json_files" / "MRN001_ACC001.json").read_text())
    assert [s["kernel"] for s in record["series"]] == ["B30f"]  # only the files directly in the folder
    assert record["series"][0]["details"]["path"] == "classical HU thresholds"
    assert "configs/default.json" in caplog.text
    assert "-e/--rerun_exceptions only applies with -k/--keep_existing" in caplog.text
    # the same configuration given as -c, and as the positional CONFIG
    assert cli(["run-csv", str(names), str(results / "c"), str(tmp_path / "in"), "-c", str(inputs["config"]),
                "-R", "-t", "2", "--no-progress"]) == 0
    record = json.loads((results / "c" / "json_files" / "MRN001_ACC001.json").read_text())
    assert sorted(s["kernel"] for s in record["series"]) == ["B30f", "B70f"]  # -R: the sub-folder too
    with pytest.raises(ConfigError, match="two model configurations"):
        cli(["run-csv", str(names), str(inputs["config"]), str(results), str(tmp_path / "in"),
             "-c", str(inputs["config"])])
    with pytest.raises(ConfigError, match="give RESULTS_DIR and at least one INPUT_DIR"):
        cli(["run-csv", str(names), str(inputs["config"]), str(results)])


def test_several_levels_on_an_abdomen_ct_keep_l3_and_one_preview(inputs: dict[str, object], tmp_path: Path) -> None:
    root = inputs["root"]
    assert isinstance(root, Path)
    config = tmp_path / "levels.json"
    config.write_text(json.dumps({"slice_params": {
        "T5": {"class_names": ["muscle", "subcutaneous_fat"], "regression_plot_colour": "blue"},
        "T8": {"class_names": ["muscle", "subcutaneous_fat"], "regression_plot_colour": "green"},
        "T10": {"class_names": ["muscle", "subcutaneous_fat"], "regression_plot_colour": "orange"},
        "L1": {"regression_plot_colour": "purple"},
        "L3": {"regression_plot_colour": "red"}}}))
    names = tmp_path / "one.csv"
    names.write_text("StudyName\nstudyB\n")
    results = tmp_path / "out"
    assert cli(["run-csv", str(names), str(config), str(results), str(root / "in2" / "deeper"), "-R", "-r", "3",
                "-t", "2", "--no-progress"]) == 0
    record = json.loads((results / "json_files" / "studyB.json").read_text())
    (series,) = record["series"]
    assert series["state"] == "done" and list(series["details"]["levels"]) == ["L1", "L3"]
    assert list(series["details"]["levels_not_found"]) == ["T5", "T8", "T10"]
    assert [p.name for p in (results / "previews").iterdir()] == [f"studyB_{series['series_instance_uid']}_preview.png"]
    (row,) = read_rows(results / "summary.csv")
    assert row["levels_not_found"] == "T5 T8 T10" and "level_not_found" in row["flags"].split(";")
    assert 80.0 < float(row["L3_muscle_area_cm2"]) < 250.0 and float(row["L1_muscle_area_cm2"]) > 0
