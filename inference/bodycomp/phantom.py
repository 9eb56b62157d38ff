"""A synthetic abdomen CT (fat, muscle wall, lumbar spine, iliac wings) that drives the classical path end to end."""

from __future__ import annotations

import numpy as np

#: Slice and pixel spacing of the phantom, in millimetres.
SPACING_MM = (3.0, 3.0, 3.0)
#: Slices (inferior to superior), rows (anterior to posterior) and columns (right to left).
SHAPE = (60, 128, 128)
#: Distance between intervertebral discs along z (a lumbar body with its disc is 25-40 mm).
DISC_SPACING_MM = 30.0
#: z of the first disc; with the iliac wings ending at z 36 mm, the disc at 36 mm is L4/L5.
FIRST_DISC_MM = 6.0
ILIAC_TOP_MM = 36.0


def abdomen_phantom(seed: int = 0) -> np.ndarray:
    """Return a crude axial abdomen CT in HU, shaped :data:`SHAPE` at :data:`SPACING_MM`.

    Each slice holds an elliptical body of subcutaneous fat around a muscle wall around a
    cavity of visceral fat and organs; behind the cavity a vertebral body (bone) with its
    posterior arch, interrupted every :data:`DISC_SPACING_MM` by a disc; in the lowest slices
    the iliac wings on both sides. The classical level finder anchors on the iliac crest, so
    L3 is the second body above it. Anatomy is not the point: the phantom exercises every
    stage of the real path (level finding, segmentation, measurement, reports) without
    patient data, so a worker can warm up on it.

    Parameters
    ----------
    seed
        Seed of the image noise (10 HU).
    """
    slices, rows, columns = SHAPE
    dz, dy, dx = SPACING_MM
    y = (np.arange(rows) - rows / 2 + 0.5)[:, None] * dy  # mm, positive towards posterior
    x = (np.arange(columns) - columns / 2 + 0.5)[None, :] * dx  # mm, positive towards the left

    def ellipse(a_mm: float, b_mm: float, cy_mm: float = 0.0, cx_mm: float = 0.0) -> np.ndarray:
        return np.asarray(((x - cx_mm) / a_mm) ** 2 + ((y - cy_mm) / b_mm) ** 2 <= 1.0)

    body = ellipse(165.0, 120.0)
    section = np.full((rows, columns), -1000.0)
    section[body] = -100.0  # subcutaneous fat
    section[ellipse(140.0, 95.0)] = 45.0  # muscle wall
    cavity = ellipse(120.0, 75.0, cy_mm=-5.0)
    section[cavity] = -90.0  # visceral fat
    section[ellipse(45.0, 30.0, cy_mm=-20.0, cx_mm=-55.0) | ellipse(40.0, 30.0, cy_mm=-20.0, cx_mm=55.0)] = 35.0
    vertebral_body = ellipse(20.0, 16.0, cy_mm=70.0)
    arch = (np.abs(x) <= 6.0) & (y >= 86.0) & (y <= 112.0)
    iliac = (np.abs(x) >= 75.0) & (np.abs(x) <= 110.0) & (y >= 10.0) & (y <= 70.0)
    volume = np.empty(SHAPE, dtype=np.float32)
    for k in range(slices):
        z = k * dz
        image = section.copy()
        at_disc = abs((z - FIRST_DISC_MM + DISC_SPACING_MM / 2) % DISC_SPACING_MM - DISC_SPACING_MM / 2) <= 3.0
        image[vertebral_body] = 80.0 if at_disc else 350.0
        image[arch] = 500.0
        if z <= ILIAC_TOP_MM:
            image[iliac & body] = 450.0
        volume[k] = image
    rng = np.random.default_rng(seed)
    return np.asarray(volume + rng.normal(0.0, 10.0, SHAPE).astype(np.float32))
