"""GroupNorm that keeps a channels-last input's layout (UNet3D's channels-last mode, set_channels_last)."""

from __future__ import annotations

import torch
from torch import nn


def channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """torch.channels_last (4-D) or channels_last_3d (5-D) when x is stored that way (and not also plain
    contiguous), else None."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose output keeps a channels-last input's layout (the CUDA kernel, and torch's
    decomposition that inductor compiles, return plain contiguous tensors). Same parameters and keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = channels_last_format(x)
        out = super().forward(x)
        return out if fmt is None else out.contiguous(memory_format=fmt)
