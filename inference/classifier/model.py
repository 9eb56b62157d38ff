"""An inflated-3D (I3D-style) CNN over image and ROI-mask channels with one head per classification label."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Unit3d(nn.Sequential):
    """Convolution, batch norm and ReLU: I3D's basic unit.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts.
    kernel_size
        Cubic kernel size.
    stride
        Convolution stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class InceptionBlock(nn.Module):
    """An inflated Inception module (I3D "Mixed" block): four parallel branches, concatenated.

    Branches: 1x1x1; 1x1x1 then 3x3x3; 1x1x1 then two 3x3x3 (the inflated "5x5"); 3x3x3 max
    pooling then 1x1x1. Each branch has ``out_channels // 4`` channels.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts; ``out_channels`` must be divisible by 4.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"out_channels must be divisible by 4, got {out_channels}")
        branch = out_channels // 4
        self.branch0 = Unit3d(in_channels, branch)
        self.branch1 = nn.Sequential(Unit3d(in_channels, branch), Unit3d(branch, branch, 3))
        self.branch2 = nn.Sequential(
            Unit3d(in_channels, branch // 2 or 1), Unit3d(branch // 2 or 1, branch, 3), Unit3d(branch, branch, 3)
        )
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), Unit3d(in_channels, branch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches along the channel axis."""
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


class I3dClassifier(nn.Module):
    """A compact I3D-style classifier for 3D volumes, trained from scratch.

    The layout follows Carreira and Zisserman's I3D (2017) scaled to small CPU-trainable
    volumes: a 5x5x5 stem, Inception blocks separated by stride-2 max pooling, global
    average pooling, dropout and one linear head per classification label. No 2D ImageNet
    weights are inflated: nothing is downloaded, and medical volumes differ from photos.

    The input holds the normalised images followed by one binary channel per ROI label.

    Parameters
    ----------
    in_channels
        Image modalities plus ROI channels.
    head_classes
        Number of classes of each classification label, in label order.
    width
        Channels of the stem; doubled at each of the three stages.
    dropout
        Dropout before the heads.
    """

    def __init__(self, in_channels: int, head_classes: Sequence[int], width: int = 16, dropout: float = 0.3) -> None:
        super().__init__()
        if not head_classes or any(k < 2 for k in head_classes):
            raise ValueError(f"every head needs at least two classes, got {list(head_classes)}")
        if width < 4 or width % 4:
            raise ValueError(f"width must be a positive multiple of 4, got {width}")
        self.features = nn.Sequential(
            Unit3d(in_channels, width, 5),
            nn.MaxPool3d(2),
            InceptionBlock(width, 2 * width),
            InceptionBlock(2 * width, 2 * width),
            nn.MaxPool3d(2),
            InceptionBlock(2 * width, 4 * width),
            InceptionBlock(4 * width, 4 * width),
            nn.MaxPool3d(2),
            InceptionBlock(4 * width, 8 * width),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.heads = nn.ModuleList([nn.Linear(8 * width, k) for k in head_classes])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return one logits tensor ``(batch, classes)`` per classification label.

        Parameters
        ----------
        x
            ``(batch, in_channels, d0, d1, d2)``; every spatial size at least 8.
        """
        features = self.features(x)
        return [head(features) for head in self.heads]


def roi_channels(roi: torch.Tensor, n_labels: int) -> torch.Tensor:
    """One-hot ROI channels (labels 1 .. ``n_labels``) from a label map ``(batch, d0, d1, d2)``."""
    return torch.stack([(roi == k).to(torch.float32) for k in range(1, n_labels + 1)], dim=1)
