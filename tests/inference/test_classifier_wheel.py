"""The built wheel installs into a clean virtual environment and runs ``inference.classifier.predict`` there.

How: the source tree (pyproject, README, the three packages) is copied to a temporary folder and
built with ``pip wheel --no-deps --no-build-isolation`` (no index needed, the repository stays
clean); a fresh venv without pip gets the wheel with ``pip --python VENV install --no-deps
--no-index``. Its third-party dependencies (torch 2.13.0, numpy, ...) come from this project's
venv through a ``.pth`` line appended *after* the new venv's own site-packages, so the wheel's
``inference`` package shadows the editable checkout; the test checks where it was imported from.
Installing torch afresh would take minutes and gigabytes for no extra assurance.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dicom_node.cli.main import build_parser
from tests.conftest import REPO, SHARED_DATA

MSD = SHARED_DATA / "hippocampus-msd"


def cli(*args: object) -> int:
    parsed = build_parser().parse_args(["classifier", *map(str, args)])
    return int(parsed.func(parsed))


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]
    assert completed.returncode == 0, f"{command}\n{completed.stdout}\n{completed.stderr}"
    return completed  # type: ignore[no-any-return]


@pytest.mark.slow
def test_wheel_installs_and_predicts_in_a_clean_venv(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cli("make-demo-task", data, "--source", MSD, "--max-cases", 10, "--without-roi") == 0
    assert cli("plan-and-preprocess", data, "-t", 1) == 0
    assert cli("train", data, "3d", 1, 0, "--epochs", 1, "--threads", 1) == 0
    trained = data / "results" / "Task001_HippocampusVolumeNoROI" / "3d"

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("dicom_node", "inference", "reports", "offline", "universalclassifier"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
         str(source)])
    wheel = next(dist.glob("dicom_node-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "inference/classifier/__init__.py" in names and "offline/classifier.py" in names
        assert {"universalclassifier/__init__.py", "universalclassifier/requirements.txt"} <= set(names)
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "classifier = inference.classifier.analysis:ClassifierAnalysis" in archive.read(entry_points).decode()

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)])
    venv_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (venv_site / "zz_project_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    script = (
        "import json, sys\n"
        "import inference.classifier as c\n"
        "from inference.classifier import predict\n"
        "import universalclassifier as uc\n"
        "print(json.dumps({'file': c.__file__, 'p': predict(sys.argv[1], [sys.argv[2]]),\n"
        "                  'uc_file': uc.__file__,\n"
        "                  'uc': uc.predict(sys.argv[1], [sys.argv[2]], roi_segmentation_file=None)}))\n"
    )
    image = next((data / "Task001_HippocampusVolumeNoROI" / "imagesTs").glob("*_0000.nii.gz"))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    out = run([str(python), "-c", script, str(trained), str(image)], cwd=tmp_path, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(venv), result["file"]
    probabilities = result["p"]["hippocampus_volume"]
    assert set(probabilities) == {"at or below median", "above median"}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # the AUC23 spelling: ``import universalclassifier``, from the wheel, with the same answer
    assert Path(result["uc_file"]).is_relative_to(venv), result["uc_file"]
    assert result["uc"] == result["p"]
    for script_name in ("uc_plan_and_preprocess", "uc_train", "uc_predict"):  # console scripts of the wheel
        shown = run([str(venv / "bin" / script_name), "--help"], cwd=tmp_path, env=env)
        assert shown.stdout.startswith(f"usage: {script_name} ") and "DATA" in shown.stdout


def test_universalclassifier_requirements_agree_with_the_project() -> None:
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (REPO / "universalclassifier" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and set(lines) <= set(declared), set(lines) - set(declared)
    assert "torch==2.13.0" in lines
