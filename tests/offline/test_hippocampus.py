"""The ``train hippocampus`` command, through ``dicom-node``."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.cli.main import main

pytestmark = pytest.mark.slow


def test_train_hippocampus_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from tests.conftest import SHARED_DATA

    out = tmp_path / "w.pt"
    assert main(["train", "hippocampus", "--data", str(SHARED_DATA / "hippocampus-msd"), "--out", str(out),
                 "--epochs", "1", "--max-cases", "6", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed
    meta = torch.load(out, map_location="cpu", weights_only=True)["meta"]
    assert meta["epochs"] == 1 and meta["axcodes"] == ("R", "A", "S")
    assert "CC-BY-SA 4.0" in meta["attribution"]
