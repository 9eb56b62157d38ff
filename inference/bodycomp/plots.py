"""Pictures of a body-composition result: the slice-selection output along z, and every measured slice as PNGs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from inference.bodycomp.slice_selection import window_hu

logger = logging.getLogger(__name__)


def plot_slice_selection(summary: Mapping[str, Any], path: Path, *, title: str = "") -> None:
    """Plot the slice-selection output along z with each level in its configured colour.

    Sigmoid mode: one probability curve per level, in the level's colour, with the 0.5 line.
    Regression mode: the single output, with each level's ``z_pos`` as a horizontal line in its
    colour. Classical path: the vertebral-body HU profile the discs were found on. In every
    mode the selected position of each level is a vertical line in its colour.

    Parameters
    ----------
    summary
        ``AnalysisResult.summary`` of :class:`inference.bodycomp.analysis.BodyCompositionAnalysis`.
    path
        PNG to write (its folder must exist).
    title
        Shown above the plot.
    """
    selection = summary["slice_selection"]
    z_mm = np.asarray(selection["z_mm"], dtype=np.float64)
    colours: dict[str, str] = selection["colours"]
    mode = selection["mode"]
    figure = Figure(figsize=(7.0, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name, values in selection["curves"].items():
        colour = colours.get(name, "black")
        axes.plot(z_mm, values, color=colour, linewidth=1.5, label=name)
    if mode == "sigmoid":
        axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axes.set_ylabel("P(slice above level)")
    elif mode == "regression":
        for level, z_pos in selection["z_pos"].items():
            axes.axhline(z_pos, color=colours[level], linestyle=":", linewidth=1)
        axes.set_ylabel("regression output")
    else:
        axes.set_ylabel("vertebral body HU")
    for level, values in summary["levels"].items():
        axes.axvline(values["z_mm"], color=colours.get(level, "red"), linestyle="--", linewidth=1.2,
                     label=f"{level} at z = {values['z_mm']:.1f} mm")
    axes.set_xlabel("z (mm, patient LPS, towards the head)")
    axes.set_title(f"{title} slice selection ({summary['path']}, {mode})", fontsize=9)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, format="png")


def save_slice_pngs(
    hu: np.ndarray, labels: np.ndarray, levels: Mapping[str, Any], folder: Path
) -> list[Path]:
    """Write the image (HU windowed L40/W400) and label mask (values 0..3) of every measured slice.

    Parameters
    ----------
    hu, labels
        The source volume and its label map, ``(n_slices, rows, columns)`` in source order.
    levels
        ``summary["levels"]`` of a result: ``source_slices`` per level.
    folder
        Created if needed; files are ``{level}_{slice:04d}_image.png`` and ``..._mask.png``.

    Returns
    -------
    list[pathlib.Path]
        The files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for level, values in levels.items():
        for k in values["source_slices"]:
            image = folder / f"{level}_{k:04d}_image.png"
            mask = folder / f"{level}_{k:04d}_mask.png"
            Image.fromarray(np.round(window_hu(hu[k])).astype(np.uint8)).save(image)
            Image.fromarray(np.asarray(labels[k], dtype=np.uint8)).save(mask)
            written += [image, mask]
    return written
