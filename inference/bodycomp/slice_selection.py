"""The deep-learning slice selection: a small 2D CNN scores every axial slice, levels are where its output crosses."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.bodycomp.config import BodyCompModelConfig, check_weights_format

logger = logging.getLogger(__name__)

#: Display window of the training PNGs and of the network input (level 40, width 400 HU).
WINDOW_LEVEL_HU = 40.0
WINDOW_WIDTH_HU = 400.0
#: Side of the square the network sees; the 512 PNGs (or any slice) are resized to it.
SLICE_INPUT_PX = 128
#: Regression target is the slice's offset from the level in mm divided by this.
Z_SCALE_MM = 100.0
CHECKPOINT_KIND = "bodycomp-slice-selection"


def window_hu(hu: np.ndarray) -> np.ndarray:
    """Window HU at level 40 / width 400 to 0..255 (float32), as the training PNGs are."""
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / WINDOW_WIDTH_HU)
    return np.asarray(np.clip(scaled, 0.0, 255.0), dtype=np.float32)


def pad_square(image: np.ndarray, fill: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre a 2D image (or a stack of them, last two axes) in a square; return it and the offsets."""
    rows, cols = image.shape[-2:]
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    width = [(0, 0)] * (image.ndim - 2) + [(top, side - rows - top), (left, side - cols - left)]
    return np.pad(image, width, constant_values=fill), (top, left)


def to_network_input(windowed: np.ndarray, size_px: int) -> torch.Tensor:
    """Windowed slices ``(n, rows, cols)`` in 0..255 to a ``(n, 1, size, size)`` tensor in 0..1."""
    square, _ = pad_square(np.asarray(windowed, dtype=np.float32), 0.0)
    tensor = torch.from_numpy(np.ascontiguousarray(square))[:, None] / 255.0
    return F.interpolate(tensor, size=(size_px, size_px), mode="bilinear", align_corners=False)


class SliceSelectionNet(nn.Module):
    """Four conv blocks (16-32-64-64 channels, each halving the size), global pooling, a linear head.

    Parameters
    ----------
    n_outputs
        One per level (sigmoid mode) or one (regression mode).
    """

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [1, 16, 32, 64, 64]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return raw scores ``(n, n_outputs)`` (logits in sigmoid mode)."""
        pooled = self.features(x).mean(dim=(2, 3))
        out: torch.Tensor = self.head(pooled)
        return out


@dataclass
class SliceSelector:
    """A loaded slice-selection network and how it was trained."""

    net: SliceSelectionNet
    sigmoid_output: bool
    input_px: int
    levels: tuple[str, ...]
    device: torch.device


def save_checkpoint(
    path: Path, net: SliceSelectionNet, *, sigmoid_output: bool, levels: Sequence[str], input_px: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write weights with what inference needs to use them (``torch.load(weights_only=True)`` safe)."""
    torch.save({
        "kind": CHECKPOINT_KIND,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "n_outputs": int(net.head.out_features),
        "sigmoid_output": bool(sigmoid_output),
        "levels": list(levels),
        "input_px": int(input_px),
        "z_scale_mm": Z_SCALE_MM,
        **dict(extra or {}),
    }, path)


def load_slice_selector(path: Path, device: str) -> SliceSelector:
    """Load slice-selection weights.

    Raises
    ------
    ValueError
        If the file is not a slice-selection checkpoint of this package.
    """
    check_weights_format(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a {CHECKPOINT_KIND} checkpoint")
    net = SliceSelectionNet(int(checkpoint["n_outputs"]))
    net.load_state_dict(checkpoint["state_dict"])
    target = torch.device(device)
    net.to(target).eval()
    return SliceSelector(
        net, bool(checkpoint["sigmoid_output"]), int(checkpoint["input_px"]),
        tuple(checkpoint["levels"]), target,
    )


def predict_outputs(selector: SliceSelector, stack_hu: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Score every axial slice of a stack ``(n, rows, cols)`` in HU.

    Returns
    -------
    numpy.ndarray
        ``(n, n_outputs)``: probabilities in sigmoid mode, regression values otherwise.
    """
    outputs = []
    with torch.inference_mode():
        for start in range(0, stack_hu.shape[0], batch_size):
            x = to_network_input(window_hu(stack_hu[start : start + batch_size]), selector.input_px)
            y = selector.net(x.to(selector.device))
            outputs.append((torch.sigmoid(y) if selector.sigmoid_output else y).float().cpu().numpy())
    return np.concatenate(outputs, axis=0)


def crossing(values: np.ndarray, target: float) -> float | None:
    """Fractional index where ``values`` rises through ``target``; ``None`` if it never does.

    With several rises (a noisy output), the one that best splits the curve into a part below
    ``target`` and a part above it (most slices on the expected side) is taken.
    """
    above = values >= target
    rises = np.nonzero(~above[:-1] & above[1:])[0]
    if rises.size == 0:
        return None
    below_before = np.cumsum(~above)
    above_after = np.cumsum(above[::-1])[::-1]
    scores = [int(below_before[k]) + int(above_after[k + 1]) for k in rises]
    k = int(rises[int(np.argmax(scores))])
    step = float(values[k + 1] - values[k])
    return float(k + (target - values[k]) / step) if step > 0 else float(k)


def locate_levels(outputs: np.ndarray, config: BodyCompModelConfig) -> dict[str, float | None]:
    """Slice position of each configured level from the per-slice outputs.

    With ``sigmoid_output`` each level's output is the probability that a slice lies above
    the level (trained on ``ZOffset > 0``): the level is where it rises through 0.5. Without,
    the single output regresses the slice's offset from the reference level
    (``ZOffset / Z_SCALE_MM``): a level is where it rises through that level's ``z_pos``.
    Outputs are smoothed over 3 slices first; a level the scan does not reach gets ``None``.
    """
    kernel = np.ones(3) / 3.0
    positions: dict[str, float | None] = {}
    for level, params in config.slice_params.items():
        index = params.slice_selection_model_output_index if config.sigmoid_output else 0
        if index >= outputs.shape[1]:
            raise ValueError(f"slice_params.{level}.slice_selection_model_output_index: {index} is "
                             f"not an output of the network ({outputs.shape[1]} outputs)")
        curve = outputs[:, index]
        if curve.size >= 3:
            curve = np.convolve(np.pad(curve, 1, mode="edge"), kernel, mode="valid")
        target = 0.5 if config.sigmoid_output else params.z_pos
        positions[level] = crossing(curve, target)
    return positions
