"""Evaluation metrics of `shared/reference/METRICS.md`, as small functions on arrays.

- `distributions`: FVD (Frechet distance of Gaussians fitted to I3D features), KVD (cubic-kernel MMD)
- `frames`: PSNR, SSIM, CLIP cosine similarities, pooling over frames and clips
- `lpips`: LPIPS v0.1 over the standard weight files
- `cpbd`: Narvekar & Karam's no-reference sharpness
- `preprocess`: value range, layout, resize, luma

`protocol_record()` is the description of every protocol choice that goes into the results JSON next to
the numbers.
"""

from __future__ import annotations

from training.metrics.cpbd import cpbd, cpbd_frames
from training.metrics.distributions import (
    KVD_SCALE,
    frechet_distance,
    fvd,
    gaussian_stats,
    kvd,
    mmd2_unbiased,
    polynomial_kernel,
    real_vs_real_floor,
)
from training.metrics.frames import (
    clip_img_scores,
    clip_txt_scores,
    cosine_similarity,
    frame_average,
    psnr,
    ssim,
)
from training.metrics.preprocess import (
    DECODER_SIZE,
    EVAL_SIZE,
    convert_range,
    quantize_uint8,
    resize_frames,
    rgb_to_luma_uint8,
    to_layout,
)

__all__ = [
    "DECODER_SIZE",
    "EVAL_SIZE",
    "KVD_SCALE",
    "clip_img_scores",
    "clip_txt_scores",
    "convert_range",
    "cosine_similarity",
    "cpbd",
    "cpbd_frames",
    "frame_average",
    "frechet_distance",
    "fvd",
    "gaussian_stats",
    "kvd",
    "mmd2_unbiased",
    "polynomial_kernel",
    "protocol_record",
    "psnr",
    "quantize_uint8",
    "real_vs_real_floor",
    "resize_frames",
    "rgb_to_luma_uint8",
    "ssim",
    "to_layout",
]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def protocol_record(frames: int = 16, size: tuple[int, int] = (320, 512), stride: int = 1) -> dict:
    """Every choice the numbers depend on, with library versions, for the results JSON (`frames`, `size`,
    `stride`: the run's window; the paper's is 16 frames at 320x512, stride 1)."""
    paper = (frames, tuple(size), stride) == (16, (320, 512), 1)
    return {
        "frames": f"{frames} frames per clip (every {stride}. frame) at {size[0]}x{size[1]} (h x w); generated"
        " frames rounded to uint8 before scoring"
        + ("" if paper else "; the paper's protocol is 16 frames at 320x512, stride 1"),
        "paper_window": paper,
        "fvd": {
            "features": "Kinetics-400 I3D logits (400-d, time-averaged), StyleGAN-V i3d_torchscript.pt",
            "detector_call": "uint8-range float [N,3,T,H,W], rescale=True, resize=True (224x224), return_features=True",
            "statistic": "|mu_r-mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), covariances normalised by N-1",
            "sqrtm": "Tr (S_r^(1/2) S_g S_r^(1/2))^(1/2) by symmetric eigendecomposition, float64",
            "sets": "real and generated sets of equal size N (reported)",
            "floor": "real vs real: two halves of a seeded permutation of the real set (seed reported)",
        },
        "kvd": {
            "features": "the FVD features",
            "kernel": "(x.y/d + 1)^3, d = feature size",
            "estimator": "unbiased MMD^2 over the full sets (no subsets)",
            "reported": f"{KVD_SCALE:g} x MMD^2 (raw MMD^2 stored too)",
        },
        "lpips": {
            "net": "AlexNet backbone (torchvision ImageNet weights), LPIPS v0.1 linear layers",
            "input": "[-1, 1], per frame at the evaluation size, generated frame t vs ground-truth frame t",
            "pooling": "mean over frames and clips; over all frames and over the interior ones (not the keyframes)",
        },
        "clip": {
            "encoder": "OpenCLIP ViT-H-14 laion2b_s32b_b79k (configurable)",
            "preprocess": "whole frame resized to 224x224 (bicubic, antialiased, no crop), OpenAI mean/std",
            "similarity": "raw cosine (not x100, not clamped)",
            "clip_img": "generated frame t vs ground-truth frame t, all frames, mean over frames and clips",
            "clip_txt": "generated frame t vs the clip's caption, all frames, mean over frames and clips",
        },
        "cpbd": {
            "reference": "Narvekar & Karam 2011, reference CPBD_compute.m (2009); implemented in this project",
            "input": "8-bit BT.601 luma per frame, mean over frames and clips",
            "parameters": "64x64 blocks, edge block > 0.2% Canny pixels, beta 3.6, W_JNB 5 (contrast <= 50) else 3, P_JNB 63%",
            "edges": "Canny: Gaussian sigma sqrt(2), MATLAB auto thresholds (70% non-edge, low 0.4 high); "
            "widths at thinned vertical Sobel edges (threshold 2 grey levels), Marziliano's method",
            "no_edge_frame": "scores 0, as the reference",
            "edge_detector": f"opencv {_version('cv2')}",
        },
        "psnr_ssim": {
            "size": "the decoder run's size (the paper's: 256x256); a generation run's: the evaluation size;"
            " uint8 range, data_range 255",
            "psnr": "per frame (MSE over RGB and pixels), averaged",
            "ssim": "Gaussian window sigma 1.5 (11 taps), population covariances, K1 0.01, K2 0.03, "
            "per RGB channel averaged, pixels with a full window only (as skimage)",
        },
        "baselines": {
            "times": "frame i at t = i/(T-1); frames 0 and T-1 are the keyframes",
            "linear_blend": "(1-t) first + t last",
            "flow_warp": "OpenCV DIS (medium) flow both ways, Super SloMo approximation of F_t0/F_t1, "
            "cv2.remap bilinear backward warps blended (1-t), t",
        },
        "versions": {m: _version(m) for m in ("numpy", "torch", "cv2")},
    }
