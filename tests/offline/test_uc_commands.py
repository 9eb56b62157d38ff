"""The universal classifier's console scripts, called as AUC23 users call them, on real MSD crops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from inference.classifier.dataset import task_roots
from inference.classifier.demo_task import build_demo_task
from offline.uc_commands import plan_and_preprocess_main, predict_main, train_main
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def test_plan_train_validate_and_predict_with_the_original_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    first = build_demo_task(SHARED_DATA / "hippocampus-msd", data, task_id=1, with_roi=False, max_cases=10)
    second = build_demo_task(SHARED_DATA / "hippocampus-msd", data, task_id=2, with_roi=False, max_cases=10)
    # several task ids at once
    assert plan_and_preprocess_main([str(data), "-t", "1", "2", "-tf", "1", "-tl", "1"]) == 0
    for task in (first, second):
        planned = next(p for p in data.rglob("plans.json") if task.name in str(p))
        assert "3d" in json.loads(planned.read_text())["configurations"]
    assert train_main([str(data), "3d_fullres", "ClassifierTrainer", "1", "0", "--epochs", "1",
                       "--threads", "1"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["fold"] == 0
    assert train_main([str(data), "3d_fullres", "ClassifierTrainer", "1", "0", "--validation_only"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == trained  # the same fold, validated again
    out = tmp_path / "predictions"
    assert predict_main([str(data), "-i", str(first / "imagesTs"), "-o", str(out), "-t", "1", "-f", "0"]) == 0
    cases = {p.name.removesuffix("_0000.nii.gz") for p in (first / "imagesTs").glob("*_0000.nii.gz")}
    assert cases and {p.stem for p in out.glob("*.json")} == cases
    one = json.loads(next(out.glob("*.json")).read_text())
    assert "hippocampus_volume" in json.dumps(one)


def test_wrong_configuration_or_trainer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_main([str(tmp_path), "2d", "ClassifierTrainer", "1", "0"])
    assert "configuration '2d' is not one of 3d_fullres, 3d" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([str(tmp_path), "3d_fullres", "nnUNetTrainerV2", "1", "0"])
    assert "trainer 'nnUNetTrainerV2': the only trainer is ClassifierTrainer" in capsys.readouterr().err
    assert predict_main([str(tmp_path), "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-t", "9"]) == 1
    assert "task" in capsys.readouterr().err


def test_console_scripts_are_declared() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["uc_plan_and_preprocess"] == "offline.uc_commands:plan_and_preprocess_main"
    assert scripts["uc_train"] == "offline.uc_commands:train_main"
    assert scripts["uc_predict"] == "offline.uc_commands:predict_main"


def _wrapper(name: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one of the original's shell wrappers as its users do, with this checkout's interpreter."""
    environ = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(["sh", str(REPO / "scripts" / f"{name}.sh"), *map(str, args)], env=environ,
                          capture_output=True, text=True, timeout=600, check=False)


def test_nnunet_layout_through_the_shell_wrappers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    task = build_demo_task(SHARED_DATA / "hippocampus-msd", data / "raw" / "nnUNet_raw_data", task_id=3,
                           with_roi=True, max_cases=10)
    planned = _wrapper("uc_plan_and_preprocess", data, "-t", "3", "-tf", "1", "-tl", "1")
    assert planned.returncode == 0, planned.stderr
    assert (data / "preprocessed" / task.name / "plans.json").is_file()
    trained = _wrapper("uc_train", data, "3d_fullres", "ClassifierTrainer", "3", "0", "--epochs", "1",
                       "--threads", "1")
    assert trained.returncode == 0, trained.stderr
    models = data / "trained_models" / "nnUNet" / "3d_fullres" / task.name / "ClassifierTrainer__nnUNetPlansv2.1"
    assert (models / "fold_0").is_dir() and any((models / "fold_0").glob("*.pt"))
    assert not (data / "results").exists()
    out = tmp_path / "out"
    predicted = _wrapper("uc_predict", data, "-i", task / "imagesTs", "-s", task / "labelsTs", "-o", out,
                         "-t", "3", "-f", "0")
    assert predicted.returncode == 0, predicted.stderr
    cases = {p.name.removesuffix("_0000.nii.gz") for p in (task / "imagesTs").glob("*_0000.nii.gz")}
    assert cases and {p.stem for p in out.glob("*.json")} == cases


def test_nnunet_environment_variables_replace_the_folders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    base, preprocessed, results = tmp_path / "nnUNet_raw", tmp_path / "pp", tmp_path / "models"
    task = build_demo_task(SHARED_DATA / "hippocampus-msd", base / "nnUNet_raw_data", task_id=4,
                           with_roi=False, max_cases=6)
    env = {"nnUNet_raw_data_base": str(base), "nnUNet_preprocessed": str(preprocessed),
           "RESULTS_FOLDER": str(results)}
    planned = _wrapper("uc_plan_and_preprocess", data, "-t", "4", env=env)
    assert planned.returncode == 0, planned.stderr
    assert (preprocessed / task.name / "plans.json").is_file()
    assert f"preprocessed in {preprocessed}" in planned.stderr
    assert list(data.iterdir()) == []  # nothing written under DATA
    roots = task_roots(data, env)
    assert (roots.raw, roots.preprocessed, roots.results) == (base / "nnUNet_raw_data", preprocessed, results)
    # without the variables, DATA alone: the task is not there, and the answer names where it looked
    missing = _wrapper("uc_plan_and_preprocess", data, "-t", "4",
                       env={key: "" for key in env})
    assert missing.returncode == 1
    assert f"{data}: no task folder for task '4'" in missing.stderr


def test_this_projects_layout_is_kept(tmp_path: Path) -> None:
    roots = task_roots(tmp_path, {})
    assert (roots.raw, roots.preprocessed, roots.results, roots.nnunet) == (
        tmp_path, tmp_path / "preprocessed", tmp_path / "results", False)
    (tmp_path / "raw" / "nnUNet_raw_data").mkdir(parents=True)
    roots = task_roots(tmp_path, {})
    assert (roots.raw, roots.preprocessed, roots.results, roots.nnunet) == (
        tmp_path / "raw" / "nnUNet_raw_data", tmp_path / "preprocessed", tmp_path / "trained_models", True)


@pytest.mark.parametrize("name", ["uc_plan_and_preprocess", "uc_train", "uc_predict"])
def test_shell_wrappers_answer_help(name: str) -> None:
    shown = _wrapper(name, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: {name} ")
    assert "``" not in shown.stdout
