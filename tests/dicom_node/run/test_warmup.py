"""A worker warms each analysis up on a synthetic series, reports included, before it is ready."""

from __future__ import annotations

import logging

import pytest

from dicom_node.config import AnalysisSettings
from dicom_node.run.warmup import synthetic_series, warm_up
from inference.base import SeriesRule, WarmUpInput, warm_up_input
from inference.bodycomp.analysis import BodyCompositionAnalysis
from inference.hippocampus.analysis import HippocampusAnalysis
from inference.volume import load_series


def test_synthetic_series_is_a_valid_volume_of_the_asked_shape() -> None:
    spec = WarmUpInput("CT", (21, 40, 30), (2.5, 0.8, 0.7))
    volume = load_series(synthetic_series(spec))
    assert volume.array.shape == (21, 40, 30)
    assert volume.modality == "CT"
    assert tuple(round(s, 3) for s in volume.spacing_mm) == (2.5, 0.8, 0.7)
    assert volume.array.max() > 0 > volume.array.min()  # HU: soft tissue in air


def test_default_warm_up_input_follows_the_rule() -> None:
    class RuleOnly:
        name = "x"
        model_name = "x"
        model_version = "1"
        rule = SeriesRule(modalities=("CT", "MR"), min_slices=40, max_matrix=32)

        def load(self, device: str) -> None: ...

        def run(self, volume: object) -> object: ...

    assert warm_up_input(RuleOnly()) == WarmUpInput("CT", (40, 32, 32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape must be three positive sizes"):
        WarmUpInput("MR", (0, 10, 10))


def test_hippocampus_warm_up_runs_model_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    analysis = HippocampusAnalysis()
    analysis.load("cpu")
    with caplog.at_level(logging.INFO, logger="dicom_node.run.warmup"):
        timings = warm_up(analysis, "hippocampus", AnalysisSettings(plugin="hippocampus"))
    assert timings is not None
    assert set(timings) == {"load", "infer", "report", "warm_up"}
    assert all(value > 0 for value in timings.values())
    assert "warmed up hippocampus on a synthetic MR series (32, 51, 35)" in caplog.text


def test_body_composition_warms_up_on_a_phantom_through_its_real_path(caplog: pytest.LogCaptureFixture) -> None:
    analysis = BodyCompositionAnalysis()
    spec = warm_up_input(analysis)
    assert spec is not None and spec.modality == "CT" and spec.image is not None
    # the phantom, written as DICOM and read back, has a spine the classical finder names from the pelvis
    result = analysis.run(load_series(synthetic_series(spec)))
    assert result.summary["level_anchor"] == "pelvis"
    level = result.summary["levels"]["L3"]
    assert set(level["compartments"]) == {"muscle", "subcutaneous_fat", "visceral_fat"}
    assert all(c["area_cm2"] > 10 for c in level["compartments"].values()), level
    analysis.load("cpu")
    with caplog.at_level(logging.INFO, logger="dicom_node.run.warmup"):
        timings = warm_up(analysis, "body-composition", AnalysisSettings(plugin="body-composition"))
    assert timings is not None and set(timings) == {"load", "infer", "report", "warm_up"}  # reports built
    assert "warmed up body-composition on a synthetic CT series (60, 128, 128)" in caplog.text


def test_a_warm_up_the_analysis_refuses_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class ChoosesCT(HippocampusAnalysis):
        def warm_up_input(self) -> WarmUpInput:
            return WarmUpInput("CT", (20, 40, 40))

    refusing = ChoosesCT()
    refusing.load("cpu")
    with caplog.at_level(logging.WARNING, logger="dicom_node.run.warmup"):
        assert warm_up(refusing, "hippocampus", AnalysisSettings(plugin="hippocampus")) is None
    assert "warm-up of hippocampus on a synthetic CT series (20, 40, 40) failed" in caplog.text
    assert "is CT, not MR" in caplog.text
