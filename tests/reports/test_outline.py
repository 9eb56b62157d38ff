"""Tests for reports.outline: closed outlines along pixel edges, in DICOM image coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from reports.outline import outline_largest_section


def _inside(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, columns = np.indices(shape)
    centres = np.column_stack([columns.ravel() + 0.5, rows.ravel() + 0.5])
    return MplPath(points).contains_points(centres).reshape(shape)


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0


def test_a_rectangle_on_the_largest_section_in_column_row_pixel_coordinates() -> None:
    mask = np.zeros((4, 12, 20), dtype=bool)
    mask[1, 2:5, 3:6] = True  # 9 pixels
    mask[2, 6:10, 10:17] = True  # 28 pixels: rows 6-9, columns 10-16
    outline = outline_largest_section(mask)
    assert outline is not None
    assert (outline.slice_index, outline.pixels) == (2, 28)
    # Pixel [r, c] spans columns c..c+1 and rows r..r+1: the corners of the block.
    assert outline.points.tolist() == [[10, 6], [17, 6], [17, 10], [10, 10], [10, 6]]
    assert _area(outline.points) == 28.0  # clockwise on screen (rows grow downwards)


@pytest.mark.parametrize("seed", range(5))
def test_a_blob_is_enclosed_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((3, 40, 50))
    centre = rng.uniform([1, 12, 15], [2, 28, 35])
    radii = rng.uniform([1.5, 5, 5], [3, 12, 14])
    noise = rng.normal(0, 0.15, size=z.shape)
    mask = (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2 + noise) <= 1.0
    outline = outline_largest_section(mask)
    assert outline is not None
    section = mask[outline.slice_index]
    inside = _inside(outline.points, section.shape)
    assert inside.sum() == outline.pixels == _area(outline.points)
    assert section.sum() == mask.sum(axis=(1, 2)).max()
    parts, _ = ndimage.label(section)
    largest = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
    assert inside[largest].all()  # the largest part is enclosed...
    assert not inside[section & ~largest].any()  # ...without the specks beside it
    assert ndimage.binary_fill_holes(largest)[inside & ~section].all()  # ...nor background but holes


def test_the_largest_part_is_outlined_with_its_holes_filled() -> None:
    mask = np.zeros((1, 30, 30), dtype=bool)
    mask[0, 2:5, 2:5] = True
    mask[0, 10:25, 8:20] = True
    mask[0, 15:18, 12:15] = False  # a hole
    outline = outline_largest_section(mask)
    assert outline is not None
    inside = _inside(outline.points, (30, 30))
    assert inside[10:25, 8:20].all() and not inside[2:5, 2:5].any()
    assert outline.pixels == 15 * 12 == _area(outline.points)


def test_a_region_touching_itself_at_a_corner_gives_one_loop() -> None:
    # A ring whose gap is closed only diagonally: the enclosed background is a hole.
    section = np.zeros((8, 8), dtype=bool)
    section[1:6, 1:6] = True
    section[2:5, 2:5] = False
    section[5, 3] = False
    section[4, 3] = True  # pixel inside touching the ring only at corners
    section[4, 2] = False
    outline = outline_largest_section(section[None])
    assert outline is not None
    assert _area(outline.points) == outline.pixels
    assert np.array_equal(outline.points[0], outline.points[-1])


def test_empty_and_malformed_masks() -> None:
    assert outline_largest_section(np.zeros((3, 5, 5), dtype=bool)) is None
    with pytest.raises(ValueError, match="expected a"):
        outline_largest_section(np.zeros((5, 5), dtype=bool))


def test_no_outline_where_none_is_faithful() -> None:
    ring = np.zeros((1, 40, 40), dtype=bool)
    ring[0, 5:35, 5:35] = True
    ring[0, 9:31, 9:31] = False  # subcutaneous fat around the abdomen
    assert outline_largest_section(ring, max_mismatch=0.1) is None
    full = outline_largest_section(ring)  # filled, it would enclose the whole abdomen
    assert full is not None and full.mismatch == pytest.approx(22 * 22 / (30 * 30 - 22 * 22))
    halves = np.zeros((1, 20, 40), dtype=bool)
    halves[0, 5:15, 2:18] = True
    halves[0, 5:15, 22:36] = True  # muscles on both sides
    assert outline_largest_section(halves, max_mismatch=0.1) is None
    speck = np.zeros((1, 20, 20), dtype=bool)
    speck[0, 2:18, 2:18] = True
    speck[0, 0, 19] = True  # one stray pixel does not matter
    outline = outline_largest_section(speck, max_mismatch=0.1)
    assert outline is not None and outline.mismatch == pytest.approx(1 / 257)
