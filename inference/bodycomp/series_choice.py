"""Which one of several usable CT series of a study body composition is measured on (pure rules)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from inference.base import SeriesCandidate

#: Reconstruction kernels that are sharp (bone, lung, edge-enhancing): HU statistics of fat and
#: muscle are noisier on them. Siemens B/Br/I/Ir 50 and up, GE BONE/LUNG/EDGE, Philips YC/YD/L/E,
#: Canon FC5x/FC8x and names that say so.
SHARP_KERNEL = re.compile(
    r"bone|lung|edge|sharp|detail|\b[bi]r?[5-9]\d|\by[cd]\b|fc[5-8]\d", re.IGNORECASE
)


__all__ = ["SHARP_KERNEL", "SeriesCandidate", "choose_series", "is_soft_tissue_kernel"]


def is_soft_tissue_kernel(kernel: str) -> bool:
    """Return whether a ConvolutionKernel is a soft-tissue (not sharp) reconstruction."""
    return not SHARP_KERNEL.search(kernel)


def choose_series(candidates: Sequence[SeriesCandidate]) -> SeriesCandidate:
    """Choose the series to measure among several usable ones.

    Rules, in order: a soft-tissue kernel beats a sharp one; then slices of 2 to 5 mm beat
    thinner ones (noisier HU statistics) and thicker ones (partial volume), unknown thickness
    last; then thinner slices; then more slices (more coverage around the level); then the
    smallest SeriesInstanceUID, so that the choice is deterministic.

    Parameters
    ----------
    candidates
        The usable series; at least one.

    Returns
    -------
    SeriesCandidate

    Raises
    ------
    ValueError
        If ``candidates`` is empty.
    """
    if not candidates:
        raise ValueError("no candidate series to choose from")

    def key(c: SeriesCandidate) -> tuple[bool, int, float, int, str]:
        thickness = c.slice_thickness_mm
        band = 2 if thickness is None else (0 if 2.0 <= thickness <= 5.0 else 1)
        return (
            not is_soft_tissue_kernel(c.kernel),
            band,
            thickness if thickness is not None else float("inf"),
            -c.slice_count,
            c.series_uid,
        )

    return min(candidates, key=key)
