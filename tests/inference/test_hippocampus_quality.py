"""Tests for the hippocampus confidence flag: its checks, its limits, real and deliberately bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.hippocampus.analysis import HippocampusAnalysis
from inference.hippocampus.quality import (
    SHIPPED_THRESHOLDS,
    QualityThresholds,
    assess_quality,
    mirror_agreement,
    outside_largest_piece,
)
from inference.volume import Volume, load_series
from tests.conftest import HIPPO_DICOM

CROPS = {"Study1": HIPPO_DICOM / "Study1" / "13_HCropVolume", "Study2": HIPPO_DICOM / "Study2" / "14_HCropVolume"}


@pytest.fixture(scope="module")
def analysis() -> HippocampusAnalysis:
    loaded = HippocampusAnalysis()
    loaded.load("cpu")
    return loaded


def crop(study: str) -> Volume:
    folder = CROPS[study]
    if not folder.is_dir():
        pytest.fail(f"real data not found at {folder} (../shared beside the repository)")
    return load_series([pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))])


def test_mirror_agreement_is_mean_dice_of_both_labels() -> None:
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[0, :2] = 1
    a[2, :2] = 2
    assert mirror_agreement(a, a) == 1.0
    b = a.copy()
    b[b == 2] = 0  # posterior lost entirely, anterior identical
    assert mirror_agreement(a, b) == pytest.approx(0.5)
    assert mirror_agreement(np.zeros_like(a), np.zeros_like(a)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        mirror_agreement(a, a[:2])


def test_outside_largest_piece_counts_anterior_and_posterior_as_one() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:3, 1:5, 1:5] = 1  # 32 voxels
    labels[3:5, 1:5, 1:5] = 2  # 32 voxels touching it: one piece
    assert outside_largest_piece(labels) == 0.0
    labels[8:10, 8:10, 8:10] = 2  # 8 voxels apart
    assert outside_largest_piece(labels) == pytest.approx(8 / 72)
    assert outside_largest_piece(np.zeros_like(labels)) == 0.0


def test_each_failed_check_gives_its_reason() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:12, 2:12, 2:12] = 1  # 1000 voxels
    labels[15:20, 15:20, 15:20] = 2  # 125 voxels apart
    thresholds = dataclasses.replace(SHIPPED_THRESHOLDS, min_volume_mm3=1500.0)
    quality = assess_quality(labels, np.zeros_like(labels), labels, 1.0, thresholds)
    assert quality.low_confidence
    assert len(quality.reasons) == 3
    assert "disagree" in quality.reasons[0] and "1125 mm3" in quality.reasons[1]
    assert "several pieces" in quality.reasons[2]
    assert quality.checks["total_volume_mm3"] == 1125.0
    good = assess_quality(labels, labels, labels, 2.0, dataclasses.replace(thresholds, max_outside_largest_piece=0.2))
    assert not good.low_confidence and good.reasons == ()


def test_thresholds_refuse_impossible_limits() -> None:
    with pytest.raises(ValueError, match="min_mirror_agreement"):
        dataclasses.replace(SHIPPED_THRESHOLDS, min_mirror_agreement=1.5)
    with pytest.raises(ValueError, match="volume range"):
        QualityThresholds(0.9, 5000.0, 1000.0, 0.05, "")


@pytest.mark.parametrize("study", sorted(CROPS))
def test_real_studies_are_not_flagged(analysis: HippocampusAnalysis, study: str) -> None:
    result = analysis.run(crop(study))
    assert result.quality is not None
    assert not result.quality.low_confidence, result.quality.reasons
    assert result.quality.checks["mirror_agreement_dice"] > SHIPPED_THRESHOLDS.min_mirror_agreement


@pytest.mark.parametrize("study", sorted(CROPS))
@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_volume_is_flagged(analysis: HippocampusAnalysis, study: str, seed: int) -> None:
    volume = crop(study)
    voxels = volume.array.copy().ravel()
    np.random.default_rng(seed).shuffle(voxels)
    result = analysis.run(dataclasses.replace(volume, array=voxels.reshape(volume.array.shape)))
    assert result.quality is not None and result.quality.low_confidence
    assert any("disagree" in reason for reason in result.quality.reasons)


@pytest.mark.parametrize("study", sorted(CROPS))
@pytest.mark.parametrize("seed", [0, 1])
def test_heavily_noised_volume_is_flagged(analysis: HippocampusAnalysis, study: str, seed: int) -> None:
    volume = crop(study)
    noise = np.random.default_rng(seed).normal(0.0, 3.0 * float(volume.array.std()), volume.array.shape)
    result = analysis.run(dataclasses.replace(volume, array=(volume.array + noise).astype(np.float32)))
    assert result.quality is not None and result.quality.low_confidence
