"""CPBD: the published behaviour (sharper scores higher, monotone in blur) and its exact constants."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from training.metrics import cpbd, cpbd_frames
from training.metrics.cpbd import edge_widths, sobel_vertical_edges


def _scene(seed: int = 0, size: tuple[int, int] = (192, 256)) -> np.ndarray:
    """A cartoon-like grey frame: flat shapes drawn at 4x and area-downsampled (antialiased edges)."""
    rng = np.random.default_rng(seed)
    (h, w), s = size, 4
    img = np.full((h * s, w * s), 128, np.uint8)
    for _ in range(30):
        value = int(rng.integers(0, 256))
        x, y = int(rng.integers(0, w * s)), int(rng.integers(0, h * s))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(40, 120)), value, -1)
        else:
            cv2.rectangle(
                img, (x, y), (x + int(rng.integers(40, 200)), y + int(rng.integers(40, 200))), value, -1
            )
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return img if sigma == 0 else cv2.GaussianBlur(img, (0, 0), sigma)


def test_sharp_scores_higher_than_blurred_and_decreases_with_blur():
    img = _scene()
    scores = [cpbd(_blur(img, s)) for s in (0, 0.5, 1.0, 1.5, 2.0)]
    assert scores[0] > 0.8  # sharp antialiased edges are nearly all below the JNB
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert cpbd(_blur(img, 4.0)) <= scores[-1]


def test_flat_and_tiny_frames_score_zero():
    assert cpbd(np.full((128, 128), 77, np.uint8)) == 0.0
    assert cpbd(_scene(size=(48, 48))) == 0.0  # no full 64x64 block
    with pytest.raises(ValueError, match="uint8"):
        cpbd(np.zeros((64, 64), np.float32))


def _edge_image(rise: list[int], low: int) -> np.ndarray:
    """A 64x64 block of vertical edges: a rise through `rise` (offsets above `low`) and its mirror fall."""
    ramp = [low + v for v in rise]
    row = [low] * 10 + ramp + [ramp[-1]] * 16 + ramp[::-1] + [low] * 10
    row += [low] * (64 - len(row))
    return np.tile(np.array(row, np.uint8), (64, 1))


# (offsets of the transition, low level): the width W is the number of pixels of the transition after
# `low`; contrast = the last offset. P = 1 - exp(-(W / W_JNB)^3.6), W_JNB = 5 if contrast <= 50 else 3.
@pytest.mark.parametrize(
    ("rise", "width", "expected"),
    [
        ([0, 3, 14, 34, 46, 50], 5, 1.0),  # contrast 50 -> W_JNB 5: P(5) = 63.2% rounds to 63 <= 63: sharp
        ([0, 2, 8, 20, 34, 45, 50], 6, 0.0),  # contrast 50: P(6) = 85%: blurred
        ([0, 6, 28, 68, 92, 100], 5, 0.0),  # contrast 100 -> W_JNB 3: P(5) ~ 1: blurred
        ([0, 15, 75, 100], 3, 1.0),  # contrast 100: P(3) = 63.2%: sharp (the P_JNB boundary)
        ([0, 10, 40, 80, 100], 4, 0.0),  # contrast 100: P(4) = 94%: blurred
    ],
)
def test_widths_contrast_and_jnb_give_the_published_probabilities(rise, width, expected):
    img = _edge_image(rise, low=60)
    grey = img.astype(np.float64)
    edges = sobel_vertical_edges(grey)
    widths = edge_widths(grey, edges)
    measured = widths[widths > 0]
    assert measured.size == 2 * 62  # one rising and one falling edge per interior row
    assert set(measured.tolist()) == {width}
    p = 1 - math.exp(-((width / (5 if rise[-1] <= 50 else 3)) ** 3.6))
    assert (math.floor(p * 100 + 0.5) <= 63) == (expected == 1.0)
    assert cpbd(img) == expected


def _matlab_round(x: float) -> float:
    return math.copysign(math.floor(abs(x) + 0.5), x)


def _widths_reference_loops(a: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """A loop-for-loop port of the reference `marziliano_method` (0-based indices)."""
    gy, gx = np.gradient(a)
    rows, cols = a.shape
    out = np.zeros_like(a)
    for m in range(1, rows - 1):
        for n in range(1, cols - 1):
            if not edges[m, n]:
                continue
            angle = math.degrees(math.atan2(gy[m, n], gx[m, n])) if gx[m, n] != 0 else 0.0
            q = 45 * _matlab_round(angle / 45)
            if q in (180, -180):
                for k in range(101):
                    if n - 2 - k < 0 or a[m, n - 2 - k] - a[m, n - 1 - k] <= 0:
                        break
                side1 = k + 1
                for k in range(101):
                    if n + 2 + k > cols - 1 or a[m, n + 2 + k] - a[m, n + 1 + k] >= 0:
                        break
                out[m, n] = side1 + k + 1
            if q == 0:
                for k in range(101):
                    if n + 2 + k > cols - 1 or a[m, n + 2 + k] - a[m, n + 1 + k] <= 0:
                        break
                side1 = k + 1
                for k in range(101):
                    if n - 2 - k < 0 or a[m, n - 2 - k] - a[m, n - 1 - k] >= 0:
                        break
                out[m, n] = side1 + k + 1
    return out


def test_vectorised_widths_equal_the_reference_loops():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 6, size=(12, 40)).astype(np.float64)]  # many ties and short runs
    ramp = np.tile(np.arange(240, dtype=np.float64), (6, 1))  # runs past the 100-step cap both ways
    images += [ramp, ramp[:, ::-1].copy(), np.round(_blur(_scene(1, (64, 64)), 1.0).astype(np.float64))]
    for img in images:
        edges = rng.random(img.shape) < 0.3
        np.testing.assert_array_equal(edge_widths(img, edges), _widths_reference_loops(img, edges))
    assert edge_widths(ramp, np.ones_like(ramp, bool)).max() == 202  # 2 x (1 + 100)


def test_cpbd_frames_scores_rgb_videos_per_frame():
    grey = _scene(2, (64, 128))
    video = np.stack([np.repeat(_blur(grey, s)[..., None], 3, axis=-1) for s in (0, 1.0)])[None]  # 1 t h w 3
    scores = cpbd_frames(video)
    assert scores.shape == (1, 2)
    assert scores[0, 0] == pytest.approx(cpbd(grey)) and scores[0, 0] > scores[0, 1]
