"""Outline a structure on the slice where it is largest, along its pixels' edges."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceOutline:
    """A closed outline of a region on one slice of a label map.

    Attributes
    ----------
    slice_index
        Index along the label map's first axis (the source image it lies on).
    points
        ``(n, 2)`` array of (column, row) image coordinates, as SR SCOORD graphic
        data: (0.0, 0.0) is the top left corner of the top left pixel, so pixel
        ``[r, c]`` covers columns ``c`` to ``c + 1`` and rows ``r`` to ``r + 1``. The
        outline runs along pixel edges, clockwise on screen; the last point repeats the
        first.
    pixels
        Number of pixels inside the outline (its area in pixels, exactly).
    mismatch
        Pixels on which the outline and the section disagree (parts left outside, holes
        enclosed), as a fraction of the section's pixels: 0.0 when the section is one
        part without holes.
    """

    slice_index: int
    points: np.ndarray
    pixels: int
    mismatch: float


def _largest_part(section: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of a 2D mask, with its holes filled."""
    parts, count = ndimage.label(section)
    if count > 1:
        sizes = np.bincount(parts.ravel())[1:]
        section = parts == 1 + int(np.argmax(sizes))
    filled: np.ndarray = ndimage.binary_fill_holes(section)
    return filled


def _trace(region: np.ndarray) -> np.ndarray:
    """The boundary of a 4-connected, hole-free 2D region along pixel edges.

    Every boundary edge is directed with the region on its right (clockwise on screen,
    rows growing downwards). Because the region is 4-connected and its background
    holes are filled (background 4-connectivity), no corner is shared by two boundary
    loops, so each corner starts at most one edge and the edges form one simple loop.
    """
    padded: np.ndarray = np.pad(region, 1)
    height, width = region.shape
    inner = padded[1:-1, 1:-1]
    following: dict[tuple[int, int], tuple[int, int]] = {}
    # (neighbour offset, edge start, edge end) for the top, right, bottom and left sides.
    sides = (
        ((-1, 0), (0, 0), (1, 0)),
        ((0, 1), (1, 0), (1, 1)),
        ((1, 0), (1, 1), (0, 1)),
        ((0, -1), (0, 1), (0, 0)),
    )
    for (dr, dc), (sx, sy), (ex, ey) in sides:
        outside = inner & ~padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]
        rows, columns = np.nonzero(outside)
        for r, c in zip(rows.tolist(), columns.tolist(), strict=True):
            following[(c + sx, r + sy)] = (c + ex, r + ey)
    start = min(following, key=lambda corner: (corner[1], corner[0]))
    loop = [start]
    corner = following[start]
    while corner != start:
        loop.append(corner)
        corner = following[corner]
    if len(loop) != len(following):
        raise RuntimeError("region boundary is not one simple loop")
    points = np.asarray(loop + [start], dtype=np.float64)
    # Keep only the corners where the direction changes.
    steps = np.diff(points, axis=0)
    turns = np.any(steps[1:] != steps[:-1], axis=1)
    keep = np.concatenate([[True], turns, [True]])
    corners: np.ndarray = points[keep]
    return corners


def outline_largest_section(mask: np.ndarray, max_mismatch: float = math.inf) -> SliceOutline | None:
    """Outline `mask` on the slice with the most of its pixels.

    On that slice the largest 4-connected part of the region is outlined, holes filled,
    along the edges of its pixels. The outline encloses exactly those pixels, so its area
    in pixels is exact. A section in several parts or with holes (a ring of fat, muscles
    on both sides) has no outline that is faithful to it: `max_mismatch` bounds how much
    the outline may disagree with the section.

    Parameters
    ----------
    mask
        Boolean (or 0/1) array of shape ``(slices, rows, columns)``.
    max_mismatch
        Largest accepted :attr:`SliceOutline.mismatch` (default: any).

    Returns
    -------
    SliceOutline | None
        The outline, or ``None`` when the mask is empty or the outline disagrees with the
        section by more than `max_mismatch`.

    Raises
    ------
    ValueError
        If `mask` is not three-dimensional.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) mask, got shape {mask.shape}")
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if counts.size == 0 or counts.max() == 0:
        return None
    index = int(np.argmax(counts))  # the first of equally large sections
    section = mask[index]
    region = _largest_part(section)
    mismatch = float(np.count_nonzero(region != section)) / float(counts[index])
    if mismatch > max_mismatch:
        return None
    return SliceOutline(slice_index=index, points=_trace(region), pixels=int(region.sum()),
                        mismatch=mismatch)
