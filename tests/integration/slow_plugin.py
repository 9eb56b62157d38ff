"""An analysis plugin that takes its time, so tests can kill the node while a job runs."""

from __future__ import annotations

import time
from typing import Any

from inference.base import AnalysisResult, WarmUpInput
from inference.hippocampus.analysis import HippocampusAnalysis
from inference.volume import Volume


class SlowHippocampus(HippocampusAnalysis):
    """The hippocampus analysis, after ``delay_s`` seconds of sleep."""

    def __init__(self, delay_s: float = 5.0, **options: Any) -> None:
        super().__init__(**options)
        self.delay_s = delay_s

    def run(self, volume: Volume) -> AnalysisResult:
        time.sleep(self.delay_s)
        return super().run(volume)

    def warm_up_input(self) -> WarmUpInput | None:
        """No warm-up: the delay stands for a long real job, and a warm-up would only sleep it."""
        return None
