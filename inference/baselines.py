"""Classical in-betweening baselines: T frames from the first and last keyframes, no learning, no weights.

Both take two RGB keyframes `[H, W, 3]` and return `[T, H, W, 3]` in the dtype of the input: uint8 in,
uint8 out (rounded), float in, float32 out (same value range). Frame i sits at time `t_i = i / (T - 1)`,
so frame 0 is the first keyframe and frame T - 1 the last, exactly, as in the model's 16-frame output
(ToonCrafter's first and last frames are the given keyframes). The evaluation scores these outputs with
the same code as the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np


def _keyframes(first: np.ndarray, last: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    first, last = np.asarray(first), np.asarray(last)
    if first.shape != last.shape or first.ndim != 3 or first.shape[-1] != 3:
        raise ValueError(
            f"expected two RGB keyframes [H, W, 3] of one shape, got {first.shape}, {last.shape}"
        )
    if first.dtype != last.dtype:
        raise ValueError(f"keyframes differ in dtype: {first.dtype} vs {last.dtype}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2 (the two keyframes), got {num_frames}")
    return first, last


def _times(num_frames: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, num_frames)


def _finish(frames: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Cast to the keyframes' dtype and put the keyframes themselves at both ends."""
    out = (
        np.clip(np.rint(frames), 0, 255).astype(np.uint8)
        if first.dtype == np.uint8
        else frames.astype(np.float32)
    )
    out[0], out[-1] = first, last
    return out


def linear_blend(first: np.ndarray, last: np.ndarray, num_frames: int = 16) -> np.ndarray:
    """Cross-fade: frame i = (1 - t_i) first + t_i last."""
    first, last = _keyframes(first, last, num_frames)
    t = _times(num_frames)[:, None, None, None]
    frames = (1 - t) * first.astype(np.float64) + t * last.astype(np.float64)
    return _finish(frames, first, last)


def _luma_u8(frame: np.ndarray) -> np.ndarray:
    import cv2

    if frame.dtype != np.uint8:  # float frames: flow is estimated on their uint8 rendering
        lo, hi = float(frame.min()), float(frame.max())
        frame = np.clip(np.rint((frame - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


DIS_MIN_SIDE = 16  # OpenCV's DIS (4.12, medium preset) on a frame under 16 pixels high raises or segfaults


def optical_flow(
    source: np.ndarray, target: np.ndarray, method: Literal["dis", "farneback"] = "dis"
) -> np.ndarray:
    """Dense flow `[H, W, 2]` (dx, dy) such that `source(p) ~ target(p + flow(p))`, on luma.

    DIS (Kroeger et al. 2016) at OpenCV's "medium" preset, or Farneback (2003) with 5 pyramid levels.
    """
    import cv2

    a, b = _luma_u8(source), _luma_u8(target)
    if method == "dis" and min(a.shape) < DIS_MIN_SIDE:  # e.g. 12x64 killed the process with SIGSEGV
        raise ValueError(f"DIS flow needs frames of at least {DIS_MIN_SIDE}x{DIS_MIN_SIDE}, got {a.shape}")
    if method == "dis":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(a, b, None)
    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 5, 15, 3, 5, 1.2, 0)
    raise ValueError(f"flow method must be 'dis' or 'farneback', got {method!r}")


def backward_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample `image` at `p + flow(p)` (bilinear, borders replicated): `[H, W, C], [H, W, 2] -> [H, W, C]`."""
    import cv2

    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + flow[..., 0].astype(np.float32)
    map_y = grid_y + flow[..., 1].astype(np.float32)
    src = image.astype(np.float32)
    return cv2.remap(src, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def flow_warp(
    first: np.ndarray, last: np.ndarray, num_frames: int = 16, method: Literal["dis", "farneback"] = "dis"
) -> np.ndarray:
    """Bidirectional flow warping: both keyframes warped to time t and blended by time.

    Flow is estimated both ways (F_01 first -> last, F_10 last -> first). The flows from the unknown frame
    at time t back to the keyframes are approximated from them as in Super SloMo (Jiang et al. 2018, eq. 4):
        F_t0 = -(1 - t) t F_01 + t^2 F_10,    F_t1 = (1 - t)^2 F_01 - t (1 - t) F_10,
    and frame t = (1 - t) warp(first, F_t0) + t warp(last, F_t1), without occlusion reasoning.
    """
    first, last = _keyframes(first, last, num_frames)
    f01, f10 = optical_flow(first, last, method), optical_flow(last, first, method)
    frames = np.empty((num_frames, *first.shape), dtype=np.float64)
    for i, t in enumerate(_times(num_frames)):
        f_t0 = -(1 - t) * t * f01 + t * t * f10
        f_t1 = (1 - t) ** 2 * f01 - t * (1 - t) * f10
        frames[i] = (1 - t) * backward_warp(first, f_t0) + t * backward_warp(last, f_t1)
    return _finish(frames, first, last)


Baseline = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
BASELINES: dict[str, Baseline] = {"linear_blend": linear_blend, "flow_warp": flow_warp}
