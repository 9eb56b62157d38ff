"""The hippocampus analysis with rules that accept almost any series, so bad input reaches the loader."""

from __future__ import annotations

from typing import Any

from inference.base import SeriesRule
from inference.hippocampus.analysis import HippocampusAnalysis


class AnySeriesHippocampus(HippocampusAnalysis):
    """Selects every MR or CT series of two or more images (test use only)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.rule = SeriesRule(modalities=("MR", "CT"), min_slices=2)
