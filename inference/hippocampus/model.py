"""A compact 3D U-Net that labels the anterior and posterior hippocampus in 1 mm MR crops."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: Default architecture; stored in the weights file's metadata and used to rebuild the net.
DEFAULT_ARCHITECTURE: dict[str, int] = {
    "in_channels": 1,
    "num_classes": 3,
    "base_channels": 16,
    "levels": 3,
    "max_channels": 128,
}


class InstanceNorm3d(nn.InstanceNorm3d):
    """Instance normalisation computed as a group norm with one group per channel.

    The same normalisation as :class:`torch.nn.InstanceNorm3d` with ``affine=True`` and no
    running statistics (same parameters, same ``state_dict`` keys), but much faster on CPU:
    torch 2.13's ``instance_norm`` reshapes to ``(1, batch * channels, ...)`` and runs batch
    norm, about 15 ms per full-resolution layer of a two-volume batch on this project's CPU,
    against about 1 ms for ``group_norm`` (measured, see ``benchmarks/inference_time.py``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each channel of each volume of ``x`` (``(batch, channels, d0, d1, d2)``)."""
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by instance norm and LeakyReLU.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts.
    stride
        Stride of the first convolution; 2 halves every spatial dimension.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
            InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
            InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3d(nn.Module):
    """A 3D U-Net with strided-convolution downsampling and transposed-convolution upsampling.

    Each of the ``levels`` downsamplings halves every spatial dimension, so the network needs
    input sizes that are multiples of ``2 ** levels`` (8 by default). :meth:`forward` pads
    any other size internally (replicating the border) and crops the logits back, so callers
    may pass any shape.

    Parameters
    ----------
    in_channels
        Input channels (1: one normalised MR image).
    num_classes
        Output channels, background included (3: background, anterior, posterior).
    base_channels
        Channels at full resolution; doubled at every level.
    levels
        Number of downsamplings.
    max_channels
        Upper bound on the channels at any level.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        base_channels: int = 16,
        levels: int = 3,
        max_channels: int = 128,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        widths = [min(base_channels * 2**i, max_channels) for i in range(levels + 1)]
        self.levels = levels
        self.encoders = nn.ModuleList([ConvBlock(in_channels, widths[0])])
        for i in range(1, levels + 1):
            self.encoders.append(ConvBlock(widths[i - 1], widths[i], stride=2))
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(levels, 0, -1):
            self.upsamplers.append(
                nn.ConvTranspose3d(widths[i], widths[i - 1], kernel_size=2, stride=2)
            )
            self.decoders.append(ConvBlock(2 * widths[i - 1], widths[i - 1]))
        self.head = nn.Conv3d(widths[0], num_classes, kernel_size=1)

    @property
    def multiple(self) -> int:
        """The factor every spatial input size must be divisible by before downsampling."""
        return int(2**self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of volumes.

        Parameters
        ----------
        x
            Tensor of shape ``(batch, in_channels, d0, d1, d2)``, any spatial size.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(batch, num_classes, d0, d1, d2)``.
        """
        size = x.shape[2:]
        pads: list[int] = []
        for dim in reversed(size):
            pads += [0, (-dim) % self.multiple]
        if any(pads):
            x = F.pad(x, pads, mode="replicate")
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders, strict=True):
            x = decoder(torch.cat([upsample(x), skips.pop()], dim=1))
        logits: torch.Tensor = self.head(x)
        return logits[:, :, : size[0], : size[1], : size[2]]
