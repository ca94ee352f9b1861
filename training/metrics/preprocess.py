"""Value range, layout and size conversions that every metric's input goes through.

The model and the data loaders speak `[-1, 1]` float tensors in `b c t h w`; files and OpenCV speak
uint8 `t h w c`; each metric wants its own thing (I3D: 0..255 floats in `b c t h w`, LPIPS: `[-1, 1]`
images, CLIP: `[0, 1]` images, PSNR/SSIM/CPBD: the uint8 grid). Converting through these helpers keeps
the quantisation step explicit: generated frames are rounded to uint8 once, as a saved video would be,
before any metric sees them (`quantize_uint8`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

ValueRange = Literal["[-1,1]", "[0,1]", "[0,255]"]
_RANGES: dict[str, tuple[float, float]] = {
    "[-1,1]": (-1.0, 1.0),
    "[0,1]": (0.0, 1.0),
    "[0,255]": (0.0, 255.0),
}

# Protocol sizes as (height, width). The eval clips are 512 wide, 320 high; the decoder is scored at 256x256.
EVAL_SIZE = (320, 512)
DECODER_SIZE = (256, 256)


def as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A numpy array becomes a tensor sharing its memory; a tensor passes through."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def convert_range(x: np.ndarray | torch.Tensor, src: ValueRange, dst: ValueRange) -> torch.Tensor:
    """Affinely map values from range `src` to range `dst`; the result is floating point.

    A uint8 input is read as "[0,255]" whatever `src` says is wrong, so it must say "[0,255]". Values are
    not clamped: clamping is a visible decision (`quantize_uint8`), not a side effect of a conversion.
    """
    if src not in _RANGES or dst not in _RANGES:
        raise ValueError(f"value range must be one of {sorted(_RANGES)}, got {src!r} -> {dst!r}")
    x = as_tensor(x)
    if x.dtype == torch.uint8 and src != "[0,255]":
        raise ValueError(f"a uint8 input holds [0,255] values, but src={src!r}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    (a0, a1), (b0, b1) = _RANGES[src], _RANGES[dst]
    if (a0, a1) == (b0, b1):
        return x
    return (x - a0) * ((b1 - b0) / (a1 - a0)) + b0


def quantize_uint8(x: np.ndarray | torch.Tensor, src: ValueRange) -> torch.Tensor:
    """Clamp and round to the uint8 grid, as writing a PNG or a video frame does."""
    x = as_tensor(x)
    if x.dtype == torch.uint8:
        return x
    return convert_range(x, src, "[0,255]").clamp(0, 255).round().to(torch.uint8)


def to_layout(x: np.ndarray | torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Rearrange named axes, e.g. `to_layout(v, "b c t h w", "b t c h w")`.

    Both layouts must name the same axes (letters from b, t, c, h, w), so that no axis is folded or lost.
    """
    src_axes, dst_axes = src.split(), dst.split()
    if sorted(src_axes) != sorted(dst_axes) or len(set(src_axes)) != len(src_axes):
        raise ValueError(f"layouts must be permutations of the same axes: {src!r} -> {dst!r}")
    x = as_tensor(x)
    if x.ndim != len(src_axes):
        raise ValueError(f"layout {src!r} has {len(src_axes)} axes, the input has shape {tuple(x.shape)}")
    return rearrange(x, f"{src} -> {dst}")


def resize_frames(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize `[..., c, h, w]` frames to `size = (height, width)`, antialiased when shrinking.

    Leading axes (b, t) are folded for the call and restored. Integer input is resized in float32 and
    returned as float (re-quantise with `quantize_uint8` if the grid matters).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])  # (...) c h w -> n c h w
    if not flat.is_floating_point():
        flat = flat.to(torch.float32)
    antialias = mode in ("bilinear", "bicubic")
    out = F.interpolate(
        flat, size=size, mode=mode, align_corners=False if antialias else None, antialias=antialias
    )
    return out.reshape(*lead, *out.shape[-3:])


def rgb_to_luma_uint8(frames: np.ndarray) -> np.ndarray:
    """8-bit luma of uint8 RGB frames `[..., h, w, 3]` -> `[..., h, w]`, as CPBD expects.

    ITU-R BT.601 weights (0.299, 0.587, 0.114), the weights of MATLAB's rgb2gray (used by the CPBD
    reference code) and of OpenCV's COLOR_RGB2GRAY; rounded to nearest.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [..., h, w, 3], got {frames.dtype} {frames.shape}")
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.floor(luma + 0.5), 0, 255).astype(np.uint8)
