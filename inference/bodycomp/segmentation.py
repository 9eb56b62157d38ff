"""The deep-learning segmentation: a 2D U-Net labels muscle and fat compartments on axial slices."""

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

from inference.bodycomp import classical
from inference.bodycomp.config import KNOWN_CLASSES, check_weights_format
from inference.bodycomp.slice_selection import pad_square

logger = logging.getLogger(__name__)

#: Label value of each class name in every label map of this package (and in training masks).
CLASS_LABELS = {
    "muscle": classical.MUSCLE,
    "subcutaneous_fat": classical.SUBCUTANEOUS_FAT,
    "visceral_fat": classical.VISCERAL_FAT,
}
#: HU range the network sees, scaled to -1..1: air and anything below fat saturate at -1.
INPUT_HU = (-250.0, 250.0)
CHECKPOINT_KIND = "bodycomp-segmentation"


def normalise_hu(hu: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HU to the network's input scale."""
    tensor = torch.as_tensor(hu, dtype=torch.float32)
    low, high = INPUT_HU
    return (tensor.clamp(low, high) - (low + high) / 2.0) / ((high - low) / 2.0)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """A 2D U-Net with four resolutions (``base``, 2, 4, 8 x ``base`` channels).

    Parameters
    ----------
    n_classes
        Output channels: background plus one per class name.
    base
        Channels of the first level.
    """

    def __init__(self, n_classes: int, base: int = 16) -> None:
        super().__init__()
        widths = [base, base * 2, base * 4, base * 8]
        self.down = nn.ModuleList()
        c_in = 1
        for width in widths:
            self.down.append(_block(c_in, width))
            c_in = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c_in, width, 2, stride=2))
            self.merge.append(_block(width * 2, width))
            c_in = width
        self.out = nn.Conv2d(c_in, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(n, n_classes, h, w)``; ``h`` and ``w`` must be multiples of 8."""
        skips = []
        for index, block in enumerate(self.down):
            x = block(x)
            if index < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        logits: torch.Tensor = self.out(x)
        return logits


@dataclass
class Segmenter:
    """A loaded segmentation network and the classes of its output channels (after background)."""

    net: UNet2D
    class_names: tuple[str, ...]
    input_px: int
    device: torch.device


def save_checkpoint(
    path: Path, net: UNet2D, *, class_names: Sequence[str], input_px: int, base: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write weights with what inference needs to use them (``torch.load(weights_only=True)`` safe)."""
    torch.save({
        "kind": CHECKPOINT_KIND,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "class_names": list(class_names),
        "input_px": int(input_px),
        "base": int(base),
        **dict(extra or {}),
    }, path)


def load_segmenter(path: Path, device: str, class_names: Sequence[str] | None = None) -> Segmenter:
    """Load segmentation weights.

    Parameters
    ----------
    class_names
        The configured class names; must match the checkpoint's when given.

    Raises
    ------
    ValueError
        If the file is not a segmentation checkpoint or its classes differ from ``class_names``.
    """
    check_weights_format(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a {CHECKPOINT_KIND} checkpoint")
    names = tuple(checkpoint["class_names"])
    if class_names is not None and tuple(class_names) != names:
        raise ValueError(f"{path} outputs {list(names)}, configured class_names are {list(class_names)}")
    net = UNet2D(len(names) + 1, int(checkpoint["base"]))
    net.load_state_dict(checkpoint["state_dict"])
    target = torch.device(device)
    net.to(target).eval()
    return Segmenter(net, names, int(checkpoint["input_px"]), target)


def mask_to_target(mask: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """Training masks (0 background, 1 muscle, 2 subcutaneous, 3 visceral fat) to channel indices.

    A class the model does not output (visceral fat in thoracic mode) becomes background.
    """
    source = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    lookup = torch.zeros(len(KNOWN_CLASSES) + 1, dtype=torch.long)
    for channel, name in enumerate(class_names, start=1):
        lookup[CLASS_LABELS[name]] = channel
    return lookup[source.clamp(0, len(KNOWN_CLASSES))]


def segment_slices(
    segmenter: Segmenter, hu_slices: np.ndarray, batch_size: int = 4,
    label_values: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Label axial slices ``(n, rows, cols)`` in HU.

    Each slice is centred in a square (padded with air), resized to the network's input,
    segmented; the logits are resized back and cropped, so the labels lie on the source pixels.

    Parameters
    ----------
    label_values
        Label value of each class name beyond :data:`CLASS_LABELS` the model outputs.

    Returns
    -------
    numpy.ndarray
        uint8 labels of the same shape, values from :data:`CLASS_LABELS` and ``label_values``.

    Raises
    ------
    ValueError
        If the model outputs a class that has no label value.
    """
    n, rows, cols = hu_slices.shape
    square, (top, left) = pad_square(np.asarray(hu_slices, dtype=np.float32), -1024.0)
    side = square.shape[-1]
    values = {**CLASS_LABELS, **dict(label_values or {})}
    unknown = [name for name in segmenter.class_names if name not in values]
    if unknown:
        raise ValueError(f"no label value for the classes {unknown}")
    lookup = np.array([0] + [values[name] for name in segmenter.class_names], dtype=np.uint8)
    labels = np.zeros((n, rows, cols), dtype=np.uint8)
    size = segmenter.input_px
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = normalise_hu(square[start : start + batch_size])[:, None]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            logits = segmenter.net(x.to(segmenter.device)).float().cpu()
            logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
            channel = logits.argmax(dim=1).numpy()[:, top : top + rows, left : left + cols]
            labels[start : start + channel.shape[0]] = lookup[channel]
    return labels
