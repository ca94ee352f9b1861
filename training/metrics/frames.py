"""Per-frame scores and how they are pooled: PSNR, SSIM, CLIP cosine similarities, frame averaging.

Frames are torch tensors `[..., c, h, w]` (any leading axes, e.g. `b t`); scores come back with the
leading axes kept, so that `frame_average` can pool them over frames and clips. The formulas run in
float64 so that they match the numpy references in the tests to ~1e-10.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.metrics.preprocess import as_tensor


def _pair(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = as_tensor(pred), as_tensor(target)
    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(
            f"expected two [..., c, h, w] tensors of one shape, got {pred.shape} and {target.shape}"
        )
    return pred.to(torch.float64), target.to(pred.device, torch.float64)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per frame, `[..., c, h, w] -> [...]`, in dB.

    MSE over all channels and pixels of a frame (as `skimage.metrics.peak_signal_noise_ratio`); identical
    frames give +inf, which is kept (a finite cap would be a silent protocol change).
    """
    pred, target = _pair(pred, target)
    mse = (pred - target).square().mean(dim=(-3, -2, -1))
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius `int(truncate * sigma + 0.5)`: 11 taps for sigma 1.5.

    The radius rule is scipy.ndimage's, which scikit-image's SSIM uses (its `truncate=3.5`).
    """
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 255.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per frame (Wang et al. 2004), `[..., c, h, w] -> [...]`.

    Gaussian-weighted local statistics (sigma 1.5, 11x11 window), population (biased) variances and
    covariance as in Wang et al.'s reference code, each channel scored separately and the SSIM maps
    averaged over channels and over the pixels whose whole window lies inside the frame. This equals
    `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`: skimage filters the whole frame with
    reflected borders and then crops the window radius, so only full windows count in both.
    """
    pred, target = _pair(pred, target)
    lead, (c, h, w) = pred.shape[:-3], pred.shape[-3:]
    window = gaussian_window(sigma).to(pred.device)
    if min(h, w) < window.numel():
        raise ValueError(f"frames of {h}x{w} are smaller than the {window.numel()}-tap SSIM window")
    kernel_h = window.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kernel_w = window.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # n c h w -> n c (h - 2r) (w - 2r), valid windows only
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_w, groups=c)

    x, y = pred.reshape(-1, c, h, w), target.reshape(-1, c, h, w)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(-3, -2, -1)).reshape(lead)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Raw cosine similarity along the last axis, with broadcasting: not x100, not clamped at 0."""
    a, b = as_tensor(a).to(torch.float64), as_tensor(b).to(torch.float64)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def clip_img_scores(gen_emb: torch.Tensor, gt_emb: torch.Tensor) -> torch.Tensor:
    """CLIP_img per frame: generated frame t vs ground-truth frame t. `[b, t, d], [b, t, d] -> [b, t]`."""
    if gen_emb.shape != gt_emb.shape or gen_emb.ndim != 3:
        raise ValueError(
            f"expected two [b, t, d] embeddings of one shape, got {gen_emb.shape}, {gt_emb.shape}"
        )
    return cosine_similarity(gen_emb, gt_emb)


def clip_txt_scores(gen_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """CLIP_txt per frame: generated frame t vs the clip's caption. `[b, t, d], [b, d] -> [b, t]`."""
    if gen_emb.ndim != 3 or text_emb.shape != (gen_emb.shape[0], gen_emb.shape[2]):
        raise ValueError(
            f"expected [b, t, d] frames and [b, d] captions, got {gen_emb.shape}, {text_emb.shape}"
        )
    return cosine_similarity(gen_emb, text_emb[:, None, :])


def frame_average(scores: np.ndarray | torch.Tensor) -> dict[str, float | None]:
    """Pool per-frame scores `[b, t]` into the protocol's numbers.

    `all`: the mean over every frame of every clip; `interior`: the same without the first and last
    frames (the keyframes, which the model is given). With one T for all clips, the mean over frames then
    clips equals the mean over all (clip, frame) pairs. Non-finite scores (PSNR of identical frames) stay
    in the mean, so they show.
    """
    s = np.asarray(as_tensor(scores).detach().cpu().to(torch.float64))
    if s.ndim != 2:
        raise ValueError(f"expected per-frame scores [b, t], got shape {s.shape}")
    out: dict[str, float | None] = {"all": float(s.mean())}
    out["interior"] = float(s[:, 1:-1].mean()) if s.shape[1] > 2 else None  # two frames: no interior
    return out
