"""Value range, layout and resize helpers on synthetic tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import (
    DECODER_SIZE,
    EVAL_SIZE,
    convert_range,
    quantize_uint8,
    resize_frames,
    rgb_to_luma_uint8,
    to_layout,
)


def test_value_ranges_round_trip():
    x = torch.tensor([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(convert_range(x, "[-1,1]", "[0,1]"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(convert_range(x, "[-1,1]", "[0,255]"), [0.0, 127.5, 255.0])
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8)
    np.testing.assert_allclose(convert_range(u8, "[0,255]", "[-1,1]"), [-1.0, 51 / 127.5 - 1, 1.0], rtol=1e-6)
    back = convert_range(convert_range(x, "[-1,1]", "[0,255]"), "[0,255]", "[-1,1]")
    np.testing.assert_allclose(back, x)
    with pytest.raises(ValueError, match="uint8"):
        convert_range(u8, "[0,1]", "[-1,1]")
    with pytest.raises(ValueError, match="value range"):
        convert_range(x, "[-1,1]", "0..1")


def test_quantize_clamps_and_rounds():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 2.0])
    q = quantize_uint8(x, "[-1,1]")
    assert q.dtype == torch.uint8
    assert q.tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even in torch: 128


def test_layouts():
    v = torch.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)  # b c t h w
    btchw = to_layout(v, "b c t h w", "b t c h w")
    assert btchw.shape == (2, 4, 3, 5, 6)
    assert btchw[1, 2, 0, 3, 4] == v[1, 0, 2, 3, 4]
    thwc = to_layout(v[0], "c t h w", "t h w c")
    assert thwc.shape == (4, 5, 6, 3) and thwc[2, 3, 4, 1] == v[0, 1, 2, 3, 4]
    assert to_layout(np.zeros((2, 3, 4)), "h w c", "c h w").shape == (4, 2, 3)
    with pytest.raises(ValueError, match="same axes"):
        to_layout(v, "b c t h w", "b t c h")
    with pytest.raises(ValueError, match="axes"):
        to_layout(v, "b t c h", "b c t h")


def test_resize_to_protocol_sizes():
    assert EVAL_SIZE == (320, 512) and DECODER_SIZE == (256, 256)
    frames = torch.rand(2, 3, 3, 64, 96)  # b t c h w
    out = resize_frames(frames, DECODER_SIZE)
    assert out.shape == (2, 3, 3, 256, 256)
    const = torch.full((1, 3, 40, 64), 0.25)
    np.testing.assert_allclose(resize_frames(const, (20, 32)), 0.25, atol=1e-6)  # a flat frame stays flat
    u8 = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    assert resize_frames(u8, (4, 4), mode="bilinear").dtype == torch.float32
    assert resize_frames(frames, (64, 96)) is frames


def test_luma_is_bt601_rounded():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    luma = rgb_to_luma_uint8(rgb)
    expected = np.floor(
        np.array([0.299 * 255, 0.587 * 255, 0.114 * 255, 0.299 * 10 + 0.587 * 20 + 0.114 * 30]) + 0.5
    )
    assert luma.dtype == np.uint8 and luma.tolist() == [expected.astype(int).tolist()]
