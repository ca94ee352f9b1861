"""Channels-last activations (`set_channels_last`, train.channels_last): the UNet and the VAE encoder
store their 4-D activations (b, h, w, c) in memory instead of (b, c, h, w), the layout the GPU's
tensor-core convolutions read and write, so that no convolution converts its input and output. The
values are the same; only the strides change. `GroupNorm` keeps that layout where torch's kernel does
not."""

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


def set_channels_last(net: nn.Module, enabled: bool = True) -> None:
    """Store the activations of every module in `net` that supports it (a class attribute
    `channels_last`: UNet3D, the VAE Encoder) channels-last, or plain contiguous again with
    `enabled=False`. Meant for compiled networks on a GPU: eager GroupNorm there converts to contiguous
    and back. Their inputs and outputs keep their usual layout."""
    for module in net.modules():
        if hasattr(type(module), "channels_last"):
            module.channels_last = enabled
