"""Derive the hippocampus quality thresholds from the training pool and check them on held-out cases.

The thresholds in :data:`inference.hippocampus.quality.SHIPPED_THRESHOLDS` were derived by this
module from the 184 training-pool cases of the model card's split (training and validation,
never the held-out cases) and then checked on the 46 held-out cases. From the repository root:

    .venv/bin/python -m inference.hippocampus.calibrate_quality [--data ../shared/data/hippocampus-msd]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference.hippocampus.predict import HippocampusEnsemble, list_cases, load_case
from inference.hippocampus.quality import (
    QualityThresholds,
    assess_quality,
    mirror_agreement,
    outside_largest_piece,
)
from inference.hippocampus.train import split_cases

#: Margins applied to the extremes seen on the training pool (see :func:`derive_thresholds`).
AGREEMENT_MARGIN = 0.05
VOLUME_FACTOR = 1.5
PIECES_MARGIN = 0.05


def case_checks(
    segmenter: HippocampusEnsemble, data_dir: Path, case_ids: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Run the checks (and the reference volume) on some MSD cases.

    Returns
    -------
    dict
        ``{case_id: {"agreement", "volume_mm3", "pieces", "reference_volume_mm3"}}``; the
        MSD crops are at 1 mm, so a voxel is 1 mm3.
    """
    rows: dict[str, dict[str, float]] = {}
    for case_id in case_ids:
        image, label = load_case(data_dir, case_id)
        final, unmirrored, mirrored = segmenter.segment_with_passes(image)
        rows[case_id] = {
            "agreement": mirror_agreement(unmirrored, mirrored),
            "volume_mm3": float(np.count_nonzero(final)),
            "pieces": outside_largest_piece(final),
            "reference_volume_mm3": float(np.count_nonzero(label)),
        }
    return rows


def derive_thresholds(pool: dict[str, dict[str, float]]) -> QualityThresholds:
    """The limits from the training pool's extremes, widened by fixed margins.

    Mirror agreement: the lowest seen minus :data:`AGREEMENT_MARGIN`. Volume: the smallest
    reference (manual) volume divided by :data:`VOLUME_FACTOR` to the largest times it.
    Pieces: the largest fraction outside the largest piece seen plus :data:`PIECES_MARGIN`.
    """
    agreement = min(row["agreement"] for row in pool.values()) - AGREEMENT_MARGIN
    volumes = [row["reference_volume_mm3"] for row in pool.values()]
    pieces = max(row["pieces"] for row in pool.values()) + PIECES_MARGIN
    return QualityThresholds(
        min_mirror_agreement=round(agreement, 2),
        min_volume_mm3=float(round(min(volumes) / VOLUME_FACTOR, -1)),
        max_volume_mm3=float(round(max(volumes) * VOLUME_FACTOR, -1)),
        max_outside_largest_piece=round(min(pieces, 1.0), 2),
        derivation=(
            f"{len(pool)} MSD training-pool cases: lowest mirror agreement minus {AGREEMENT_MARGIN},"
            f" manual volumes from min/{VOLUME_FACTOR} to max*{VOLUME_FACTOR}, largest fraction"
            f" outside the largest piece plus {PIECES_MARGIN}"
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    from inference.hippocampus.analysis import DEFAULT_WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[3] / "shared" / "data" / "hippocampus-msd")
    args = parser.parse_args(argv)
    segmenter = HippocampusEnsemble(DEFAULT_WEIGHTS, "cpu")
    split = split_cases(list_cases(args.data))
    pool = case_checks(segmenter, args.data, [*split["train"], *split["validation"]])
    for key in ("agreement", "volume_mm3", "pieces", "reference_volume_mm3"):
        values = np.array([row[key] for row in pool.values()])
        print(f"training pool {key}: min {values.min():.4f}, 1st pct {np.percentile(values, 1):.4f},"
              f" median {np.median(values):.4f}, 99th pct {np.percentile(values, 99):.4f}, max {values.max():.4f}")
    thresholds = derive_thresholds(pool)
    print(thresholds)
    held_out = case_checks(segmenter, args.data, split["test"])
    flagged = []
    for case_id, row in held_out.items():
        image, _ = load_case(args.data, case_id)
        final, unmirrored, mirrored = segmenter.segment_with_passes(image)
        quality = assess_quality(unmirrored, mirrored, final, 1.0, thresholds)
        if quality.low_confidence:
            flagged.append(f"{case_id}: {'; '.join(quality.reasons)}")
    print(f"held-out cases flagged: {len(flagged)} of {len(held_out)}")
    for line in flagged:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
