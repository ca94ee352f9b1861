"""CPBD: cumulative probability of blur detection (Narvekar & Karam, IEEE TIP 20(9), 2011).

A no-reference sharpness score in [0, 1], higher is sharper. Steps, as in the authors' reference code
(`CPBD_compute.m`, Oct. 2009):

1. Canny edges decide which 64x64 blocks are edge blocks (more than 0.2% edge pixels).
2. Vertical Sobel edges (threshold 2 grey levels, thinned) are where edge widths are measured, by
   Marziliano et al.'s method: along the row, count the pixels on each side of the edge over which the
   intensity keeps rising (or falling) monotonically, for edges whose gradient is horizontal (angle
   rounded to 0 or 180 degrees).
3. Each width w in a block with contrast C (max - min of the block) gives a probability of detecting
   blur `P = 1 - exp(-|w / W_JNB(C)|^beta)`, beta = 3.6, W_JNB = 5 for C <= 50 and 3 above.
4. CPBD = the fraction of edges whose P (rounded to 1/100) is at most P_JNB = 63%.

Edge detection uses OpenCV (its version goes into the protocol record). Where the reference relies on
MATLAB built-ins, this module says what it does instead:
- `edge(I, 'canny')`: Gaussian smoothing with sigma sqrt(2), 3x3 Sobel derivatives, MATLAB's automatic
  thresholds (the high threshold leaves 70% of the pixels below it on a 64-bin histogram of the
  normalised gradient magnitude; low = 0.4 x high), then OpenCV's non-maximum suppression and hysteresis.
- `edge(I, 'Sobel', 2, 'vertical')`: |d/dx| of the 3x3 Sobel kernel divided by 8 above 2, thinned to
  pixels that are strict maxima of the strength horizontally or vertically (as Octave's `edge`).
- MATLAB's `round` rounds halves away from zero (numpy's rounds to even): reproduced.
Unlike the PyPI `cpbd` port, widths are always measured (the port skips the whole image when every
gradient angle is 0, a mistranslation of `numel(angle_A) ~= 0`), and a frame with no edge block scores 0,
as in the reference.
"""

from __future__ import annotations

import math

import numpy as np

from training.metrics.preprocess import rgb_to_luma_uint8

BLOCK = 64  # block side in pixels; partial blocks at the right/bottom borders are ignored
EDGE_BLOCK_FRACTION = 0.002  # a block is an edge block with more Canny pixels than this fraction
BETA = 3.6  # slope of the psychometric function of blur detection
JNB_LOW_CONTRAST = 50  # block contrast up to which the just-noticeable blur width is 5, else 3
P_JNB_PERCENT = 63  # edges with a blur probability up to 63% count as sharp
MAX_SIDE_STEPS = 100  # the reference caps each side of an edge width at 101 pixels
SOBEL_THRESHOLD = 2.0  # grey levels of the normalised (/8) horizontal Sobel response
CANNY_SIGMA = math.sqrt(2.0)
CANNY_NON_EDGE_FRACTION = 0.7
CANNY_LOW_RATIO = 0.4


def _cv2():
    try:
        import cv2
    except ImportError as err:  # the GPU machine has no OpenCV: score CPBD where it is installed
        raise ImportError("CPBD needs OpenCV (`pip install opencv-python-headless`)") from err
    return cv2


def _matlab_round(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def canny_edges(image: np.ndarray) -> np.ndarray:
    """MATLAB-style Canny edge map of a float64 grey image `[h, w]` -> bool `[h, w]`."""
    cv2 = _cv2()
    smooth = cv2.GaussianBlur(image, (0, 0), CANNY_SIGMA, borderType=cv2.BORDER_REPLICATE)
    dx = cv2.Sobel(smooth, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dy = cv2.Sobel(smooth, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = np.hypot(dx, dy)
    peak = magnitude.max()
    if peak == 0:
        return np.zeros(image.shape, dtype=bool)
    counts, _ = np.histogram(magnitude / peak, bins=64, range=(0.0, 1.0))
    high = (np.argmax(np.cumsum(counts) > CANNY_NON_EDGE_FRACTION * magnitude.size) + 1) / 64
    # OpenCV's Canny takes int16 derivatives: scale so that the peak magnitude is 2^14 (no overflow).
    scale = 2.0**14 / peak
    dx16 = np.rint(dx * scale).astype(np.int16)
    dy16 = np.rint(dy * scale).astype(np.int16)
    edges = cv2.Canny(dx16, dy16, CANNY_LOW_RATIO * high * 2.0**14, high * 2.0**14, L2gradient=True)
    return edges > 0


def sobel_vertical_edges(image: np.ndarray) -> np.ndarray:
    """Thinned vertical Sobel edges of a float64 grey image `[h, w]` -> bool `[h, w]`."""
    cv2 = _cv2()
    strength = (cv2.Sobel(image, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8) ** 2
    strength[strength <= SOBEL_THRESHOLD**2] = 0
    padded = np.pad(strength, 1)  # zeros outside the frame, as Octave's thinning
    centre = padded[1:-1, 1:-1]
    across = (centre > padded[1:-1, :-2]) & (centre > padded[1:-1, 2:])
    along = (centre > padded[:-2, 1:-1]) & (centre > padded[2:, 1:-1])
    return (across | along) & (strength > 0)


def _run_right(flags: np.ndarray) -> np.ndarray:
    """Per position, how many consecutive True values start there going right. `[h, m] -> [h, m]`."""
    idx = np.arange(flags.shape[1])
    next_false = np.where(flags, flags.shape[1], idx)
    next_false = np.minimum.accumulate(next_false[:, ::-1], axis=1)[:, ::-1]
    return next_false - idx


def _run_left(flags: np.ndarray) -> np.ndarray:
    """Per position, how many consecutive True values end there coming from the left. `[h, m] -> [h, m]`."""
    idx = np.arange(flags.shape[1])
    prev_false = np.maximum.accumulate(np.where(flags, -1, idx), axis=1)
    return idx - prev_false


def edge_widths(image: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Marziliano edge widths at `edges` of a float64 grey image: `[h, w]`, 0 where no width is measured.

    For an edge at column n rising left to right (gradient angle ~0 degrees) the width is
    `(1 + pixels of strict rise right of n + 1) + (1 + pixels of strict rise left of n - 1)`, each run capped
    at 100 steps; falling edges (~180 degrees) count falling runs. Border pixels and edges at other angles
    get no width, as in the reference.
    """
    h, w = image.shape
    grad_y, grad_x = np.gradient(image)  # central differences, one-sided at the borders (MATLAB's gradient)
    with np.errstate(invalid="ignore"):
        angle = np.where(grad_x != 0, np.degrees(np.arctan2(grad_y, grad_x)), 0.0)
    quantised = 45 * _matlab_round(angle / 45)
    rising, falling = quantised == 0, np.abs(quantised) == 180

    step = np.diff(image, axis=1)  # [h, w-1]: step[:, c] = A[:, c+1] - A[:, c]
    widths = np.zeros((h, w))
    for mask, up in ((rising, step > 0), (falling, step < 0)):
        right, left = np.zeros((h, w), np.int64), np.zeros((h, w), np.int64)
        right[:, : w - 2] = _run_right(up)[:, 1:]  # column n reads the run starting at step n + 1
        left[:, 2:] = _run_left(up)[:, : w - 2]  # column n reads the run ending at step n - 2
        side_sum = 2 + np.minimum(right, MAX_SIDE_STEPS) + np.minimum(left, MAX_SIDE_STEPS)
        widths = np.where(edges & mask, side_sum, widths)
    widths[[0, -1], :] = 0
    widths[:, [0, -1]] = 0
    return widths


def cpbd(luma: np.ndarray) -> float:
    """CPBD of one 8-bit grey image `[h, w]` (uint8 luma). Frames smaller than a 64x64 block score 0."""
    luma = np.asarray(luma)
    if luma.ndim != 2 or luma.dtype != np.uint8:
        raise ValueError(f"CPBD takes one uint8 grey image [h, w], got {luma.dtype} {luma.shape}")
    image = luma.astype(np.float64)
    rows, cols = image.shape[0] // BLOCK, image.shape[1] // BLOCK
    if rows == 0 or cols == 0:
        return 0.0
    widths = edge_widths(image, sobel_vertical_edges(image))

    def blocks(x: np.ndarray) -> np.ndarray:  # [h, w] -> [rows, cols, BLOCK * BLOCK]
        x = x[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK)
        return x.transpose(0, 2, 1, 3).reshape(rows, cols, BLOCK * BLOCK)

    edge_block = blocks(canny_edges(image)).sum(-1) > EDGE_BLOCK_FRACTION * BLOCK * BLOCK  # [rows, cols]
    grey = blocks(image)
    contrast = grey.max(-1) - grey.min(-1)
    jnb = np.where(contrast <= JNB_LOW_CONTRAST, 5.0, 3.0)  # [rows, cols]
    block_widths = blocks(widths)
    measured = (block_widths > 0) & edge_block[..., None]
    if not measured.any():
        return 0.0
    w, w_jnb = block_widths[measured], np.broadcast_to(jnb[..., None], block_widths.shape)[measured]
    p_blur = 1 - np.exp(-(np.abs(w / w_jnb) ** BETA))
    percent = np.floor(p_blur * 100 + 0.5)  # the reference's histogram bin (MATLAB round)
    return float(np.mean(percent <= P_JNB_PERCENT))


def cpbd_frames(frames: np.ndarray) -> np.ndarray:
    """CPBD per frame of uint8 RGB frames `[..., h, w, 3]` -> `[...]`, on their BT.601 8-bit luma."""
    luma = rgb_to_luma_uint8(frames)
    flat = luma.reshape(-1, *luma.shape[-2:])
    return np.array([cpbd(f) for f in flat]).reshape(luma.shape[:-2])
