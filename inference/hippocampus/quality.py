"""How far to trust one hippocampus label map: mirror-pass agreement, volume and pieces, against thresholds."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.base import Quality

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityThresholds:
    """Limits outside which a hippocampus result is flagged as low confidence.

    Parameters
    ----------
    min_mirror_agreement
        Lowest acceptable mean Dice (anterior, posterior) between the label map of the image
        and that of its left-right mirror.
    min_volume_mm3, max_volume_mm3
        Range of plausible total (anterior + posterior) volumes in the crop.
    max_outside_largest_piece
        Largest acceptable fraction of the labelled voxels outside the largest connected
        piece of the hippocampus (anterior and posterior together, 26-connectivity).
    derivation
        One line on how the limits were derived, recorded with every result.
    """

    min_mirror_agreement: float
    min_volume_mm3: float
    max_volume_mm3: float
    max_outside_largest_piece: float
    derivation: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_mirror_agreement <= 1.0:
            raise ValueError(f"min_mirror_agreement must lie in [0, 1], got {self.min_mirror_agreement}")
        if not 0.0 <= self.min_volume_mm3 < self.max_volume_mm3:
            raise ValueError(
                f"volume range must satisfy 0 <= min < max, got {self.min_volume_mm3}, {self.max_volume_mm3}"
            )
        if not 0.0 <= self.max_outside_largest_piece <= 1.0:
            raise ValueError(
                f"max_outside_largest_piece must lie in [0, 1], got {self.max_outside_largest_piece}"
            )


def mirror_agreement(labels: np.ndarray, labels_mirror: np.ndarray) -> float:
    """Mean Dice over the anterior (1) and posterior (2) labels of two label maps.

    A label absent from both maps counts as full agreement.

    Parameters
    ----------
    labels, labels_mirror
        Label maps of the same shape: from the image and from its left-right mirror
        (flipped back).

    Returns
    -------
    float
        Mean Dice in ``[0, 1]``.
    """
    if labels.shape != labels_mirror.shape:
        raise ValueError(f"label maps differ in shape: {labels.shape} and {labels_mirror.shape}")
    scores = []
    for value in (1, 2):
        a = labels == value
        b = labels_mirror == value
        total = int(a.sum()) + int(b.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
    return float(np.mean(scores))


def outside_largest_piece(labels: np.ndarray) -> float:
    """Fraction of the labelled voxels outside the largest 26-connected piece.

    Anterior and posterior are one structure here: a healthy hippocampus is a single piece.

    Parameters
    ----------
    labels
        A label map (0 background).

    Returns
    -------
    float
        0.0 for a single piece or an empty map, up to nearly 1.0 for many small pieces.
    """
    mask = labels > 0
    total = int(mask.sum())
    if total == 0:
        return 0.0
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return 0.0
    largest = int(np.bincount(pieces.ravel())[1:].max())
    return float(1.0 - largest / total)


def assess_quality(
    labels: np.ndarray,
    labels_mirror: np.ndarray,
    final_labels: np.ndarray,
    voxel_mm3: float,
    thresholds: QualityThresholds,
) -> Quality:
    """Judge one result against the thresholds.

    Parameters
    ----------
    labels, labels_mirror
        Label maps of the unmirrored and of the mirrored passes (flipped back), model space.
    final_labels
        The label map reported (both passes averaged), model space.
    voxel_mm3
        Volume of one model-space voxel.
    thresholds
        The limits.

    Returns
    -------
    inference.base.Quality
        The checks' values and, when any is outside its limit, ``low_confidence`` with one
        reason per failed check.
    """
    agreement = mirror_agreement(labels, labels_mirror)
    volume_mm3 = float(np.count_nonzero(final_labels)) * voxel_mm3
    fragments = outside_largest_piece(final_labels)
    reasons = []
    if agreement < thresholds.min_mirror_agreement:
        reasons.append(
            f"image and mirror disagree (Dice {agreement:.2f} < {thresholds.min_mirror_agreement:.2f})"
        )
    if not thresholds.min_volume_mm3 <= volume_mm3 <= thresholds.max_volume_mm3:
        reasons.append(
            f"total volume {volume_mm3:.0f} mm3 outside the training range"
            f" {thresholds.min_volume_mm3:.0f}-{thresholds.max_volume_mm3:.0f} mm3"
        )
    if fragments > thresholds.max_outside_largest_piece:
        reasons.append(
            f"hippocampus in several pieces ({fragments * 100:.0f} % outside the largest,"
            f" limit {thresholds.max_outside_largest_piece * 100:.0f} %)"
        )
    quality = Quality(
        low_confidence=bool(reasons),
        reasons=tuple(reasons),
        checks={
            "mirror_agreement_dice": round(agreement, 4),
            "total_volume_mm3": round(volume_mm3, 1),
            "fraction_outside_largest_piece": round(fragments, 4),
        },
        derivation=thresholds.derivation,
    )
    if quality.low_confidence:
        logger.info("low confidence: %s", "; ".join(reasons))
    return quality


#: Derived by ``python -m inference.hippocampus.calibrate_quality`` from the 184 training-pool
#: cases of the model card's split, with the shipped weights: mirror agreement there ranged
#: 0.9187-0.9845 (limit: lowest minus 0.05), manual total volumes 2382-4401 mm3 (limit: /1.5 and
#: x1.5), and every predicted hippocampus was one piece (limit: 5 % outside the largest piece).
#: None of the 46 held-out cases is flagged with these limits.
SHIPPED_THRESHOLDS = QualityThresholds(
    min_mirror_agreement=0.87,
    min_volume_mm3=1590.0,
    max_volume_mm3=6600.0,
    max_outside_largest_piece=0.05,
    derivation=(
        "limits from 184 MSD training-pool cases: lowest mirror agreement (0.92) minus 0.05;"
        " manual total volumes 2382-4401 mm3, divided and multiplied by 1.5; every predicted"
        " hippocampus one piece, so at most 5 % outside the largest piece"
    ),
)
