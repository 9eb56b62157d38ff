"""Separable Gaussian filtering in numpy: 1D kernels, padded 1D convolutions, sigma in mm per axis."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Boundary modes as scipy.ndimage names them, and the numpy.pad mode that extends the same way.
#: scipy's "reflect" repeats the edge sample (d c b a | a b c d), which numpy calls "symmetric";
#: scipy's "mirror" does not (d c b | a b c d), which numpy calls "reflect".
PAD_MODES = {
    "reflect": "symmetric",
    "mirror": "reflect",
    "nearest": "edge",
    "wrap": "wrap",
    "constant": "constant",
}


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Return a normalised 1D Gaussian kernel of radius ``int(truncate * sigma + 0.5)``.

    Parameters
    ----------
    sigma
        Standard deviation in samples (> 0).
    truncate
        Kernel half-width in standard deviations (scipy.ndimage's rule).

    Returns
    -------
    numpy.ndarray
        float64 weights summing to 1, length ``2 * radius + 1``.

    Raises
    ------
    ValueError
        If ``sigma`` or ``truncate`` is not positive.
    """
    if not sigma > 0 or not truncate > 0:
        raise ValueError("sigma and truncate must be positive")
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    normalised: np.ndarray = weights / weights.sum()
    return normalised


def convolve1d(array: np.ndarray, kernel: np.ndarray, axis: int, mode: str = "reflect") -> np.ndarray:
    """Convolve ``array`` with an odd-length symmetric ``kernel`` along ``axis``, keeping the shape.

    The array is padded by the kernel radius with ``mode`` (scipy.ndimage names, see
    :data:`PAD_MODES`; ``constant`` pads with zeros), then the output is the weighted sum of
    shifted views, one per kernel tap, accumulated in float64.

    Raises
    ------
    ValueError
        If the kernel length is even or the mode is unknown.
    """
    if kernel.ndim != 1 or kernel.size % 2 == 0:
        raise ValueError("kernel must be 1D with an odd length")
    if mode not in PAD_MODES:
        raise ValueError(f"mode must be one of {', '.join(PAD_MODES)}, not {mode!r}")
    radius = kernel.size // 2
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    n = moved.shape[0]
    pad = [(radius, radius)] + [(0, 0)] * (moved.ndim - 1)
    padded = np.pad(moved, pad, mode=PAD_MODES[mode])  # type: ignore[call-overload]
    out = np.zeros_like(moved)
    # kernel is symmetric, so convolution and correlation agree: out[i] = sum_k w[k] x[i + k - r]
    for tap, weight in enumerate(kernel):
        out += weight * padded[tap : tap + n]
    return np.moveaxis(out, 0, axis)


def sigma_voxels(sigma_mm: Sequence[float], spacing_mm: Sequence[float]) -> tuple[float, ...]:
    """Return per-axis sigmas in voxels from sigmas in millimetres and voxel spacings.

    Raises
    ------
    ValueError
        If the lengths differ, a sigma is negative, or a spacing is not positive.
    """
    if len(sigma_mm) != len(spacing_mm):
        raise ValueError(f"{len(sigma_mm)} sigmas for {len(spacing_mm)} axes")
    if any(s < 0 for s in sigma_mm) or any(not d > 0 for d in spacing_mm):
        raise ValueError("sigmas must be >= 0 and spacings > 0")
    return tuple(float(s) / float(d) for s, d in zip(sigma_mm, spacing_mm, strict=True))


def gaussian_blur(
    array: np.ndarray, sigmas: Sequence[float], *, truncate: float = 4.0, mode: str = "reflect"
) -> np.ndarray:
    """Blur ``array`` with a separable Gaussian, one 1D convolution per axis (sigma 0 skips it).

    Parameters
    ----------
    array
        The image, any numeric dtype.
    sigmas
        Standard deviation per axis, in samples.
    truncate, mode
        As :func:`gaussian_kernel1d` and :func:`convolve1d`; the same values given to
        ``scipy.ndimage.gaussian_filter`` give the same result.

    Returns
    -------
    numpy.ndarray
        float64, same shape as ``array``.
    """
    if len(sigmas) != array.ndim:
        raise ValueError(f"{len(sigmas)} sigmas for a {array.ndim}D array")
    out = np.asarray(array, dtype=np.float64)
    for axis, sigma in enumerate(sigmas):
        if sigma > 0:
            out = convolve1d(out, gaussian_kernel1d(sigma, truncate), axis, mode)
    return out
