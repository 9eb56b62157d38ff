"""The ``gaussian-blur`` processing task: a volume in, the same volume blurred by sigma millimetres out."""

from __future__ import annotations

from typing import Any

import numpy as np

from inference.base import AnalysisResult, SeriesRule
from inference.blur.filter import PAD_MODES, gaussian_blur, sigma_voxels
from inference.volume import Volume

VERSION = "1.0"


def _sigma_triplet(value: Any) -> tuple[float, float, float]:
    if isinstance(value, bool):
        raise ValueError("sigma_mm: must be a number or three numbers (slice, row, column)")
    if isinstance(value, (int, float)):
        values = [float(value)] * 3
    elif isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        values = [float(v) for v in value]
    else:
        raise ValueError("sigma_mm: must be a number or three numbers (slice, row, column)")
    if any(not np.isfinite(v) or v < 0 for v in values) or not any(values):
        raise ValueError("sigma_mm: must be finite, not negative, and not all zero")
    return values[0], values[1], values[2]


class GaussianBlurTask:
    """3D Gaussian blur with sigma in millimetres, converted per axis from the voxel spacing.

    Runs on MR and CT series of any description (it is a processing task: it runs when a job
    asks for it, or on every study when configured under ``[analyses]``).

    Parameters
    ----------
    sigma_mm
        Default sigma, one value for every axis or (slice, row, column), in millimetres.
    truncate
        Kernel half-width in sigmas.
    mode
        Boundary handling, scipy.ndimage's names (``reflect``, ``nearest``, ``mirror``,
        ``wrap``, ``constant``).
    min_slices
        Fewest slices a series must have.
    """

    name = "gaussian-blur"
    model_name = "gaussian-blur"
    model_version = VERSION

    def __init__(
        self,
        sigma_mm: float | list[float] = 2.0,
        truncate: float = 4.0,
        mode: str = "reflect",
        min_slices: int = 2,
    ) -> None:
        self.defaults = self.validate_options({"sigma_mm": sigma_mm, "truncate": truncate, "mode": mode},
                                              defaults={})
        self.rule = SeriesRule(modalities=("MR", "CT"), min_slices=min_slices)

    def validate_options(
        self, options: dict[str, Any], defaults: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Return ``options`` completed with the defaults, or raise naming the bad option.

        Raises
        ------
        ValueError
            ``"<option>: <problem>"`` for an unknown option or a bad value.
        """
        known = {"sigma_mm", "truncate", "mode"}
        for key in options:
            if key not in known:
                raise ValueError(f"{key}: unknown option (known: {', '.join(sorted(known))})")
        merged = {**(self.defaults if defaults is None else defaults), **options}
        sigma = _sigma_triplet(merged.get("sigma_mm"))
        truncate = merged.get("truncate", 4.0)
        if isinstance(truncate, bool) or not isinstance(truncate, (int, float)) or not 0 < truncate <= 10:
            raise ValueError("truncate: must be a number in (0, 10]")
        mode = merged.get("mode", "reflect")
        if mode not in PAD_MODES:
            raise ValueError(f"mode: must be one of {', '.join(PAD_MODES)}")
        return {"sigma_mm": list(sigma), "truncate": float(truncate), "mode": str(mode)}

    def load(self, device: str) -> None:
        """Nothing to load: the filter is numpy on the CPU whatever the device."""

    def run(self, volume: Volume) -> AnalysisResult:
        """Blur with the default options."""
        return self.run_with_options(volume, self.defaults)

    def run_with_options(self, volume: Volume, options: dict[str, Any]) -> AnalysisResult:
        """Blur ``volume`` with ``options`` (see :meth:`validate_options`)."""
        chosen = self.validate_options(options)
        sigma_mm = chosen["sigma_mm"]
        sigmas = sigma_voxels(sigma_mm, volume.spacing_mm)
        blurred = gaussian_blur(volume.array, sigmas, truncate=chosen["truncate"], mode=chosen["mode"])
        sigma_text = (f"{sigma_mm[0]:g} mm" if len(set(sigma_mm)) == 1
                      else "(" + ", ".join(f"{s:g}" for s in sigma_mm) + ") mm")
        return AnalysisResult(
            analysis=self.name,
            title="Gaussian blur",
            model_name=self.model_name,
            model_version=self.model_version,
            method=f"separable 3D Gaussian, sigma {sigma_text}, truncate {chosen['truncate']:g}, "
                   f"{chosen['mode']} padding",
            derived_image=blurred.astype(np.float32),
            derived_description=f"Gaussian blur sigma {sigma_text}",
            summary={"options": chosen, "sigma_voxels": [round(s, 4) for s in sigmas],
                     "spacing_mm": [round(s, 4) for s in volume.spacing_mm]},
        )
