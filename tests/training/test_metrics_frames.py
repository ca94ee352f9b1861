"""PSNR/SSIM against scikit-image, cosine similarities against numpy, pooling over frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.metrics import (
    clip_img_scores,
    clip_txt_scores,
    cosine_similarity,
    frame_average,
    psnr,
    ssim,
)


@pytest.fixture(scope="module")
def frame_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Three uint8 RGB frame pairs [3, 40, 56, 3]: a frame and a noisy, shifted, darker copy of it."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(3, 40, 56, 3)).astype(np.float64)
    base = (base + np.roll(base, 1, axis=1) + np.roll(base, 1, axis=2)) / 3  # some spatial structure
    other = np.roll(base, 2, axis=2) * 0.8 + rng.normal(0, 12, size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8), np.clip(other, 0, 255).astype(np.uint8)


def _chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)  # n h w c -> n c h w


def test_psnr_equals_skimage(frame_pairs):
    a, b = frame_pairs
    got = psnr(_chw(a), _chw(b), data_range=255)
    expected = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert math.isinf(psnr(_chw(a), _chw(a)).max())


def test_ssim_equals_skimage_gaussian_population_covariance(frame_pairs):
    a, b = frame_pairs
    got = ssim(_chw(a), _chw(b), data_range=255)
    expected = [
        structural_similarity(
            x,
            y,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=-1,
        )
        for x, y in zip(a, b)
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # Sample covariances (skimage's default) give another number: the protocol's choice is visible.
    sample = structural_similarity(
        a[0],
        b[0],
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=True,
        data_range=255,
        channel_axis=-1,
    )
    assert abs(sample - expected[0]) > 1e-4
    np.testing.assert_allclose(ssim(_chw(a), _chw(a)).numpy(), 1.0, rtol=1e-12)


def test_ssim_keeps_leading_axes():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 3, 16, 16)).astype(np.float64))  # b t c h w
    y = x.flip(-1)
    got = ssim(x, y)
    assert got.shape == (2, 3)
    assert got[1, 2] == pytest.approx(float(ssim(x[1, 2][None], y[1, 2][None])[0]), rel=1e-12)


def test_cosine_similarity_is_raw_and_matches_numpy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 5, 8)), rng.normal(size=(4, 5, 8))
    expected = np.einsum("btd,btd->bt", a, b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    got = cosine_similarity(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert (got < 0).any(), "negative similarities must not be clamped"
    assert cosine_similarity(torch.tensor([3.0, 0.0]), torch.tensor([5.0, 0.0])) == pytest.approx(
        1.0
    )  # not x100


def test_clip_scores_pair_the_right_frames():
    rng = np.random.default_rng(3)
    gen, gt = rng.normal(size=(2, 16, 6)), rng.normal(size=(2, 16, 6))
    text = rng.normal(size=(2, 6))
    img = clip_img_scores(torch.from_numpy(gen), torch.from_numpy(gt)).numpy()
    txt = clip_txt_scores(torch.from_numpy(gen), torch.from_numpy(text)).numpy()
    cos = lambda u, v: u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    assert img.shape == txt.shape == (2, 16)
    assert img[1, 5] == pytest.approx(cos(gen[1, 5], gt[1, 5]), rel=1e-12)
    assert txt[1, 5] == pytest.approx(cos(gen[1, 5], text[1]), rel=1e-12)
    with pytest.raises(ValueError):
        clip_txt_scores(torch.from_numpy(gen), torch.from_numpy(text[:1]))


def test_frame_average_all_and_interior():
    scores = np.arange(2 * 16, dtype=np.float64).reshape(2, 16)
    pooled = frame_average(scores)
    assert pooled["all"] == pytest.approx(scores.mean())
    assert pooled["interior"] == pytest.approx(scores[:, 1:15].mean())
    assert pooled["interior"] != pytest.approx(pooled["all"] + 1)
