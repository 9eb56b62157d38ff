"""The universal classifier's console scripts, called as AUC23 users call them, on real MSD crops."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

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
