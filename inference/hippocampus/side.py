"""Which side a hippocampus crop shows, from where its labelled voxels lie in patient coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The hippocampus lies about 20-35 mm from the midsagittal plane; a labelled centroid closer
#: than this to x = 0 cannot be assigned a side with confidence.
MIN_MIDLINE_DISTANCE_MM = 10.0


@dataclass(frozen=True)
class Side:
    """``"left"``, ``"right"`` or ``"unknown"``, and why (empty when known)."""

    side: str
    reason: str = ""


def determine_side(affine_lps: np.ndarray, labels: np.ndarray) -> Side:
    """Judge the side of the hippocampus from its position relative to the midline.

    The midline is taken as the sagittal plane x = 0 of the patient coordinate system (DICOM
    LPS: +x towards the patient's left). That holds for scanner coordinates, whose origin is
    the magnet's isocentre with the head centred in it; it does not hold for a crop written with
    placeholder coordinates (its first voxel at x = 0, y = 0, as the MSD crops and the demo
    HippoCrop series are), so such a crop, one that spans x = 0, or a hippocampus centred
    within :data:`MIN_MIDLINE_DISTANCE_MM` of it gives "unknown" with the reason.

    Parameters
    ----------
    affine_lps
        4x4 mapping ``(slice, row, column, 1)`` to LPS millimetres (``Volume.affine``).
    labels
        The label map in the same array order (0 background).

    Returns
    -------
    Side
        The side, or ``"unknown"`` with a reason a reader understands.
    """
    affine = np.asarray(affine_lps, dtype=np.float64)
    if affine.shape != (4, 4) or labels.ndim != 3:
        raise ValueError(f"need a 4x4 affine and a 3D label map, got {affine.shape} and {labels.ndim}D")
    if np.allclose(affine[:2, 3], 0.0, atol=1e-3):
        return Side("unknown", "the series' first voxel lies at x = 0, y = 0 mm: placeholder"
                               " coordinates, not a position in the head")
    shape = np.asarray(labels.shape)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    x = (affine @ corners.T)[0]
    if x.min() <= 0.0 <= x.max():
        return Side("unknown", f"the series spans the midline (x from {x.min():.0f} to {x.max():.0f} mm)")
    voxels = np.argwhere(labels > 0)
    if voxels.size == 0:
        return Side("unknown", "no hippocampus was segmented")
    centroid = affine @ np.r_[voxels.mean(axis=0), 1.0]
    if abs(centroid[0]) < MIN_MIDLINE_DISTANCE_MM:
        return Side("unknown", f"the hippocampus lies {abs(centroid[0]):.0f} mm from the midline,"
                               f" closer than {MIN_MIDLINE_DISTANCE_MM:.0f} mm")
    return Side("left" if centroid[0] > 0 else "right")
