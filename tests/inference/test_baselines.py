"""Classical baselines: keyframes kept, blend arithmetic, flow warping beats blending on motion."""

from __future__ import annotations

import numpy as np
import pytest

from inference.baselines import BASELINES, flow_warp, linear_blend


def _square_frame(x: int, size: tuple[int, int] = (64, 96)) -> np.ndarray:
    """A flat dark square (24 px) at column `x` on a flat light background: cartoon-like motion."""
    img = np.full((*size, 3), (200, 220, 240), np.uint8)
    img[20:44, x : x + 24] = (30, 60, 150)
    return img


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_keyframes_are_the_first_and_last_outputs(name):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    last = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    out = BASELINES[name](first, last, 16)
    assert out.shape == (16, 32, 48, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], first)
    np.testing.assert_array_equal(out[-1], last)
    as_float = BASELINES[name](first / 255.0, last / 255.0, 4)
    assert as_float.dtype == np.float32 and as_float.shape == (4, 32, 48, 3)
    np.testing.assert_allclose(as_float[[0, -1]], np.stack([first, last]) / 255.0, rtol=1e-6)
    assert as_float.min() >= 0.0 and as_float.max() <= 1.0


def test_linear_blend_midpoint_is_the_mean_and_times_are_even():
    rng = np.random.default_rng(1)
    first, last = rng.random((8, 8, 3)), rng.random((8, 8, 3))
    out = linear_blend(first, last, 5)  # t = 0, 1/4, 1/2, 3/4, 1
    np.testing.assert_allclose(out[2], (first + last) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.75 * first + 0.25 * last, rtol=1e-6)
    a, b = np.full((4, 4, 3), 10, np.uint8), np.full((4, 4, 3), 31, np.uint8)
    assert linear_blend(a, b, 3)[1].tolist() == np.full((4, 4, 3), 20, np.uint8).tolist()  # 20.5 -> 20 (even)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_warp_reproduces_a_translated_square_better_than_blending(method):
    first, last, middle = _square_frame(20), _square_frame(40), _square_frame(30)
    warped = flow_warp(first, last, 5, method=method)[2]
    blended = linear_blend(first, last, 5)[2]
    err = lambda x: np.abs(x.astype(np.float64) - middle).mean()
    assert err(warped) < 0.8 * err(blended)


def test_flow_warp_dis_is_close_on_simple_motion():
    first, last, middle = _square_frame(20), _square_frame(40), _square_frame(30)
    assert np.abs(flow_warp(first, last, 3)[1].astype(np.float64) - middle).mean() < 2.0


def test_bad_inputs_are_rejected():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape|one shape"):
        linear_blend(a, np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="num_frames"):
        flow_warp(a, a, 1)
    with pytest.raises(ValueError, match="flow method"):
        flow_warp(a, a, 3, method="raft")
