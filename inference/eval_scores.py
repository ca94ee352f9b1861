"""Per-clip scores and their pooling into the protocol's numbers (shared/reference/METRICS.md).

`Extractors` bundles the four networks the metrics need behind training/features.py's interfaces, so
that tests inject small functions and the job loads the real ones (`load_extractors`). `score_clip`
turns one (generated, ground truth, caption) triple into per-frame scores and I3D features, which are
cached per clip; `pool_scores` turns the cached per-clip records into FVD, KVD, LPIPS, CLIP_img,
CLIP_txt and CPBD (`pool_decoder_scores`: PSNR, SSIM, LPIPS of the reconstruction). `markdown_table`
puts every run's row beside the paper's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.features import ImageEmbedder, PerceptualDistance, TextEmbedder, VideoFeatures
from training.metrics import (
    clip_img_scores,
    clip_txt_scores,
    cpbd_frames,
    frame_average,
    fvd,
    kvd,
    mmd2_unbiased,
    psnr,
    real_vs_real_floor,
    ssim,
)
from training.metrics.lpips import lpips_frames

# The metrics of a generation run and of a decoder run (--decoder-only), and the extractor each needs.
# PSNR and SSIM of a generation run compare each generated frame with the ground truth's (pooled over
# the interior frames: the keyframes are given): not in the paper's table, but they need no weights.
GENERATION_METRICS = ("fvd", "kvd", "lpips", "clip_img", "clip_txt", "cpbd", "psnr", "ssim")
DECODER_METRICS = ("psnr", "ssim", "lpips")
# the `Extractors` fields a generation metric calls
_EXTRACTOR_FIELDS = {
    "fvd": ("video",),
    "kvd": ("video",),
    "lpips": ("lpips",),
    "clip_img": ("image",),
    "clip_txt": ("image", "text"),
}


def extractors_for(metrics: Sequence[str]) -> list[str]:
    """What `load_extractors` has to load for `metrics` ("video", "clip", "lpips"), in that order."""
    loader = {"video": "video", "image": "clip", "text": "clip", "lpips": "lpips"}  # field -> what loads it
    wanted = {loader[f] for m in metrics for f in _EXTRACTOR_FIELDS.get(m, ())}
    return [name for name in ("video", "clip", "lpips") if name in wanted]


# METRICS.md: the paper's table (512x320, 1,000 clips) and its decoder ablation (256x256).
PAPER_ROWS: list[tuple[str, float, float, float, float, float, float]] = [
    ("AnimeInterp", 196.66, 8.844, 0.1890, 0.8866, 0.3096, 0.5974),
    ("EISAI", 146.65, 5.558, 0.1702, 0.8983, 0.3947, 0.6443),
    ("FILM", 189.88, 8.001, 0.2519, 0.9008, 0.3638, 0.6317),
    ("SEINE", 98.96, 2.93, 0.1733, 0.8531, 0.4262, 0.6403),
    ("ToonCrafter", 43.92, 1.52, 0.1733, 0.9221, 0.4129, 0.6723),
]
PAPER_DECODER_ROWS: list[tuple[str, float, float, float]] = [
    ("full dual-reference decoder", 33.83, 0.9450, 0.0204),
    ("without pseudo-3D", 32.51, 0.9270, 0.0326),
    ("plain image decoder", 29.49, 0.8670, 0.0426),
]


@dataclass
class Extractors:
    """The metric networks; `record` (names, files, hashes) goes into the results JSON."""

    video: VideoFeatures | None = None  # [N, 3, T, H, W] 0..255 -> [N, 400]
    image: ImageEmbedder | None = None  # [N, 3, H, W] [0, 1] -> [N, D]
    text: TextEmbedder | None = None  # N strings -> [N, D]
    lpips: PerceptualDistance | None = None  # two [N, 3, H, W] in [-1, 1] -> [N]
    record: dict[str, Any] = field(default_factory=dict)

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"feature extractors missing: {missing}")


class _OnDevice:
    """Moves a distance's inputs to its module's device and the result back to the CPU."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module.to(device), device

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.module(a.to(self.device), b.to(self.device)).float().cpu()


class TowerCLIP(torch.nn.Module):
    """OpenCLIP's `encode_image` / `encode_text` over the ViT-H-14 towers inside a ToonCrafter checkpoint
    (METRICS.md: no extra download). The image tower is open_clip's VisionTransformer itself (pooled token,
    ln_post, proj); the text tower runs all 24 blocks (the model's conditioner stops one early), ln_final,
    the end-of-text token and text_projection, as open_clip's TextTransformer."""

    def __init__(self, text_encoder: torch.nn.Module, image_encoder: torch.nn.Module):
        super().__init__()
        self.text_parts = text_encoder.model
        self.visual = image_encoder.model.visual

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images.to(next(self.visual.parameters()).dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        from training.models.clip import _run_blocks

        m = self.text_parts
        x = m.token_embedding(tokens) + m.positional_embedding
        x = _run_blocks(m.transformer, x, len(m.transformer.resblocks), m.attn_mask.to(x.dtype))
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj


def missing_weights(needs: Sequence[str], root: str | os.PathLike | None, clip_fallback: bool) -> list[str]:
    """What `load_extractors(needs, root)` would miss or find damaged (empty, cut short, not weights), every
    file at once (it stops at the first), read from the models dir before any clip is decoded. `clip_fallback`: the CLIP towers of the interpolation
    checkpoint serve when the CLIP file is absent."""
    from training import features

    files = []
    if "video" in needs:
        files.append(features.I3D_FILE)
    if "lpips" in needs:
        files += features.LPIPS_FILES["alex"]
    if "clip" in needs and not clip_fallback:
        files.append(features.CLIP_FILE)
    elif "clip" in needs and (features.models_dir(root) / features.CLIP_FILE.relpath).is_file():
        files.append(features.CLIP_FILE)  # there: it serves, not the towers, so it must be whole
    from manifests.weights import quick_problem

    out = []
    for weight in files:
        try:
            path = features.require_file(weight, root)
        except FileNotFoundError as exc:
            out.append(str(exc))
            continue
        if problem := quick_problem(
            path
        ):  # empty or cut short: it stopped the run after every clip was decoded
            out.append(f"{path}: {problem}")
    return out


# record["clip"]["model"] when CLIP runs on the interpolation checkpoint's towers
CLIP_TOWERS = "ViT-H-14 towers of the interpolation checkpoint (see weights.checkpoint)"


def load_extractors(
    needs: Sequence[str],
    root: str | os.PathLike | None,
    device: torch.device,
    clip_model: Callable[[], torch.nn.Module] | None = None,
    hash_file: Callable[[Path], str] | None = None,
) -> Extractors:
    """The real extractors named in `needs` ("video", "clip", "lpips") from the models dir, on `device`.

    CLIP: the models dir's OpenCLIP ViT-H-14 file when present, else `clip_model()` (the interpolation
    checkpoint's towers, see TowerCLIP) when given; otherwise the missing file's error."""
    from training import features
    from training.metrics.lpips import load_lpips

    ex = Extractors()

    def note(name: str, weight: features.WeightFile, extra: dict | None = None) -> None:
        path = features.require_file(weight, root)
        ex.record[name] = {
            "file": str(path),
            "sha256": hash_file(path) if hash_file else None,
            **(extra or {}),
        }

    if "video" in needs:
        ex.video = features.load_i3d(root).to(device)
        note("i3d", features.I3D_FILE)
    if "lpips" in needs:
        ex.lpips = _OnDevice(load_lpips(root, "alex"), device)
        for weight in features.LPIPS_FILES["alex"]:
            note(f"lpips:{Path(weight.relpath).name}", weight)
    if "clip" in needs:
        import open_clip

        clip_path = features.models_dir(root) / features.CLIP_FILE.relpath
        if clip_path.is_file() or clip_model is None:
            encoder = features.load_open_clip(root)
            note("clip", features.CLIP_FILE, {"model": "ViT-H-14 laion2b_s32b_b79k"})
        else:
            encoder = features.OpenClipEncoder(clip_model(), open_clip.get_tokenizer("ViT-H-14"))
            ex.record["clip"] = {"model": CLIP_TOWERS}
        encoder.model = encoder.model.to(device)
        ex.image, ex.text = encoder.embed_images, encoder.embed_texts
    return ex


# --- one clip --------------------------------------------------------------------------------------------------


def _as_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [1, T, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames, dtype=np.float32)).permute(0, 3, 1, 2)[None] / 127.5 - 1.0


def score_clip(
    gen: np.ndarray,
    gt: np.ndarray,
    caption: str,
    ex: Extractors,
    metrics: Sequence[str] = GENERATION_METRICS,
) -> dict[str, np.ndarray]:
    """Generated and ground-truth uint8 clips [T, H, W, 3] -> per-frame scores [T] and I3D features [D],
    for `metrics` only (FVD and KVD pool the I3D features over clips)."""
    wanted = set(metrics)
    ex.require(*sorted({name for m in wanted for name in _EXTRACTOR_FIELDS.get(m, ())}))
    gen_t, gt_t = _as_model_range(gen), _as_model_range(gt)  # [1, T, 3, H, W]
    out: dict[str, np.ndarray] = {}
    if wanted & {"fvd", "kvd"}:
        videos = torch.from_numpy(np.stack([gen, gt]).astype(np.float32)).permute(
            0, 4, 1, 2, 3
        )  # [2, 3, T, H, W]
        out["i3d_gen"], out["i3d_real"] = np.asarray(ex.video(videos), dtype=np.float64)
    if "lpips" in wanted:
        out["lpips"] = lpips_frames(ex.lpips, gen_t, gt_t)[0].double().numpy()
    if wanted & {"clip_img", "clip_txt"}:
        img = torch.cat([(gen_t[0] + 1) / 2, (gt_t[0] + 1) / 2])  # [2T, 3, H, W] in [0, 1]
        emb = torch.as_tensor(ex.image(img)).double()
        t = gen.shape[0]
        if "clip_img" in wanted:
            out["clip_img"] = clip_img_scores(emb[None, :t], emb[None, t:])[0].numpy()
        if "clip_txt" in wanted and not caption.strip():  # a split curated with --skip caption
            out["clip_txt"] = np.full(t, np.nan)  # no text to compare with: left out of the mean, counted
        elif "clip_txt" in wanted:
            text = torch.as_tensor(ex.text([caption])).double()  # [1, D]
            out["clip_txt"] = clip_txt_scores(emb[None, :t], text)[0].numpy()
    if "cpbd" in wanted:
        out["cpbd"], out["cpbd_real"] = cpbd_frames(gen), cpbd_frames(gt)
    if wanted & {"psnr", "ssim"}:
        gen_c, gt_c = torch.from_numpy(gen).permute(0, 3, 1, 2), torch.from_numpy(gt).permute(0, 3, 1, 2)
        if "psnr" in wanted:
            out["psnr"] = psnr(gen_c, gt_c).numpy()
        if "ssim" in wanted:
            out["ssim"] = ssim(gen_c, gt_c).numpy()
    return out


def score_reconstruction(
    rec: np.ndarray, gt: np.ndarray, ex: Extractors, metrics: Sequence[str] = DECODER_METRICS
) -> dict[str, np.ndarray]:
    """Decoder reconstruction vs input, uint8 [T, H, W, 3] each -> per-frame PSNR, SSIM, LPIPS (of
    `metrics`)."""
    rec_c, gt_c = torch.from_numpy(rec).permute(0, 3, 1, 2), torch.from_numpy(gt).permute(0, 3, 1, 2)
    out: dict[str, np.ndarray] = {}
    if "psnr" in metrics:
        out["psnr"] = psnr(rec_c, gt_c).numpy()
    if "ssim" in metrics:
        out["ssim"] = ssim(rec_c, gt_c).numpy()
    if "lpips" in metrics:
        ex.require("lpips")
        out["lpips"] = lpips_frames(ex.lpips, _as_model_range(rec), _as_model_range(gt))[0].double().numpy()
    return out


# --- pooling ---------------------------------------------------------------------------------------------------


def _frame_averages(records: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> dict[str, Any]:
    """Each frame score pooled over all and interior frames; None for a score the records lack (a
    metric left out with --metrics). PSNR of a frame reproduced exactly is infinite (a baseline's
    keyframes, a held drawing decoded bit for bit): such frames are left out of its means and counted
    (`psnr_exact_frames`), or one of them would make the run's PSNR infinite. CLIP_txt of a clip without a
    caption is NaN: the mean is over the captioned clips, counted in `clip_txt_clips` (the similarity of
    frames to an empty string was pooled as if it were the metric)."""
    out: dict[str, Any] = {}
    for name in names:
        if name not in records[0]:
            out[name] = None
            continue
        scores = np.stack([r[name] for r in records]).astype(np.float64)
        if name == "clip_txt":
            scores = scores[~np.isnan(scores).all(axis=1)]
            out["clip_txt_clips"] = len(scores)
            out[name] = frame_average(scores) if len(scores) else None
            continue
        if name == "psnr":
            exact = np.isinf(scores)
            out["psnr_exact_frames"] = {"all": int(exact.sum()), "interior": int(exact[:, 1:-1].sum())}
            scores = np.where(exact, np.nan, scores)
            interior = scores[:, 1:-1]
            out[name] = {
                "all": float(np.nanmean(scores)) if (~exact).any() else None,
                "interior": float(np.nanmean(interior))
                if interior.size and (~exact[:, 1:-1]).any()
                else None,
            }
            continue
        out[name] = frame_average(scores)
    return out


FVD_FEW_CLIPS = 100  # below this many clips FVD and KVD are marked as small-sample numbers


def pool_scores(records: Sequence[Mapping[str, np.ndarray]], floor_seed: int = 0) -> dict[str, Any]:
    """Per-clip records -> the protocol's numbers (frame scores pooled over all and interior frames)."""
    n = len(records)
    out: dict[str, Any] = {"n_clips": n, "fvd": None, "kvd": None, "kvd_mmd2": None}
    if "i3d_real" in records[0]:
        real = np.stack([r["i3d_real"] for r in records])
        gen = np.stack([r["i3d_gen"] for r in records])
        if n >= 2:
            mmd2 = mmd2_unbiased(real, gen)
            out.update(fvd=fvd(real, gen), kvd=kvd(real, gen), kvd_mmd2=mmd2)
            if n < FVD_FEW_CLIPS:  # a covariance of rank n-1 in 400 dimensions: the bias dominates
                out["fvd_note"] = (
                    f"N={n}: FVD and KVD of so few clips are mostly their small-sample bias; compare only runs"
                    " of the same N (the paper's: 1,000)"
                )
        else:
            out["fvd_note"] = "needs at least 2 clips"
        out["real_vs_real_floor"] = (
            real_vs_real_floor(real, floor_seed) if n >= 4 else {"note": "needs at least 4 clips"}
        )
    else:
        out["fvd_note"] = "not computed (--metrics)"
    out.update(
        _frame_averages(records, ("lpips", "clip_img", "clip_txt", "cpbd", "cpbd_real", "psnr", "ssim"))
    )
    return out


# Pooled numbers each metric of --metrics gives (a metric not listed gives the entry of its name).
POOLED_BY_METRIC = {
    "fvd": ("fvd", "fvd_note", "real_vs_real_floor"),
    "kvd": ("kvd", "kvd_mmd2", "fvd_note", "real_vs_real_floor"),
    "clip_txt": ("clip_txt", "clip_txt_clips"),
    "cpbd": ("cpbd", "cpbd_real"),
    "psnr": ("psnr", "psnr_exact_frames"),
}


def with_earlier_metrics(result: Mapping[str, Any], earlier: Mapping[str, Any]) -> dict[str, Any]:
    """`result` with the metrics that an earlier run of the same method, settings and clips computed and
    this one did not (`--metrics lpips` after a full run replaced FVD, CLIP... with blanks); their weights'
    record comes along. An earlier run of other clips, another protocol or other scoring code (a metric
    fixed since) is not mixed in."""
    keys = ("kind", "generation", "protocol", "scoring_code")
    same = all(result.get(k) == earlier.get(k) for k in keys) and clip_set(result) == clip_set(earlier)
    carried = [m for m in earlier.get("metrics_computed", []) if m not in result.get("metrics_computed", [])]
    if not same or not carried:
        return dict(result)
    metrics = dict(result["metrics"])
    for name in carried:
        for key in POOLED_BY_METRIC.get(name, (name,)):
            if key in earlier["metrics"]:
                metrics[key] = earlier["metrics"][key]
            else:  # e.g. this run's "not computed" note on FVD
                metrics.pop(key, None)
    return {
        **result,
        "metrics": metrics,
        "metrics_computed": sorted({*result["metrics_computed"], *carried}),
        "metrics_carried": {"metrics": sorted(carried), "from_code_version": earlier.get("code_version")},
        "weights": {**earlier.get("weights", {}), **result.get("weights", {})},
    }


def pool_decoder_scores(records: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    return {"n_clips": len(records), **_frame_averages(records, ("psnr", "ssim", "lpips"))}


# --- tables ----------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pooled(m: Mapping[str, Any], name: str, part: str = "all") -> float | None:
    """A frame score pooled over `part` ("all" or "interior"); None when the run did not compute it."""
    value = m.get(name)
    return value.get(part) if value else None


def clip_set(result: Mapping[str, Any]) -> str | None:
    """What identifies a run's clips: their keys and bytes (clips_sha256; a re-curated split keeps its
    keys), else, for results of earlier versions, their keys."""
    data = result.get("data", {})
    return data.get("clips_sha256") or data.get("keys_sha256")


def clip_sets(results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """clip_set -> a letter, when the runs were measured on more than one set of clips (another eval
    split after `select`, another --limit or source, the split re-curated): their rows are then not
    comparable. Beside results of an earlier version (keys only), keys are compared."""
    by_bytes = all(r.get("data", {}).get("clips_sha256") for r in results)
    keys = list(
        dict.fromkeys(clip_set(r) if by_bytes else r.get("data", {}).get("keys_sha256") for r in results)
    )
    return {k: chr(ord("A") + i) for i, k in enumerate(keys)} if len(keys) > 1 else {}


def _window(result: Mapping[str, Any]) -> str | None:
    """The run's window when it is not the paper's (16 frames at 320x512, stride 1), e.g. "8 frames,
    stride 2, 160x256"; None for the paper's."""
    data = result.get("data", {})
    frames, stride, size = data.get("frames", 16), data.get("stride", 1), data.get("size", [320, 512])
    if result.get("kind") == "decoder" or (frames, stride, list(size)) == (16, 1, [320, 512]):
        return None
    return f"{frames} frames" + (f", stride {stride}" if stride != 1 else "") + f", {size[0]}x{size[1]}"


def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The paper's rows and every run's row (generation runs, then decoder runs), with N and notes."""
    gen = [r for r in results if r.get("kind") == "generation"]
    dec = [r for r in results if r.get("kind") == "decoder"]
    sets = clip_sets([*gen, *dec])

    by_bytes = all(r.get("data", {}).get("clips_sha256") for r in [*gen, *dec])

    def row_name(r: Mapping[str, Any]) -> str:
        mark = sets.get(clip_set(r) if by_bytes else r.get("data", {}).get("keys_sha256"))
        window = _window(r)
        return f"**{r['label']}**" + (f" (clips {mark})" if mark else "") + (f" [{window}]" if window else "")

    # runs of one method that differ in what the row does not show (another checkpoint, --steps, --cfg,
    # --seed) carry their run name, or two "ToonCrafter (ours)" rows could not be told apart
    names = [row_name(r) for r in [*gen, *dec]]

    def label(r: Mapping[str, Any]) -> str:
        return row_name(r) + (f" (run {r['run']})" if names.count(row_name(r)) > 1 else "")

    def few(m: Mapping[str, Any], text: str) -> str:  # FVD/KVD of few clips carry a mark
        return text + " †" if text != "-" and m["n_clips"] < FVD_FEW_CLIPS else text

    def captioned(m: Mapping[str, Any], text: str) -> str:  # CLIP_txt of the captioned clips only
        k = m.get("clip_txt_clips", m["n_clips"])
        return f"{text} ({k} of {m['n_clips']} captioned)" if k < m["n_clips"] else text

    lines = ["# Evaluation", ""]
    if sets:
        lines += [
            f"These runs were measured on {len(sets)} different sets of clips ({', '.join(sorted(sets.values()))}:"
            " another eval split, --limit or source); compare only rows of one set.",
            "",
        ]
    lines += [
        "Generation (16 frames; LPIPS and CLIP over all 16 frames; METRICS.md). Paper rows: 1,000 clips at 320x512"
        " (height x width, as --size and the brackets write it; the paper writes 512x320). A run with another"
        " window says it in brackets; its numbers do not compare with the paper's.",
        "",
        "| method | N | FVD | KVD | LPIPS | CLIP_img | CLIP_txt | CPBD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, *vals in PAPER_ROWS:
        f, k, lp, ci, ct, cp = vals
        lines.append(
            f"| {name} (paper) | 1000 | {f:.2f} | {k:.3f} | {lp:.4f} | {ci:.4f} | {ct:.4f} | {cp:.4f} |"
        )
    for r in gen:
        m = r["metrics"]
        lines.append(
            f"| {label(r)} | {m['n_clips']} | {few(m, _fmt(m['fvd'], 2))} | {few(m, _fmt(m['kvd'], 3))} | "
            f"{_fmt(_pooled(m, 'lpips'), 4)} | {_fmt(_pooled(m, 'clip_img'), 4)} | "
            f"{captioned(m, _fmt(_pooled(m, 'clip_txt'), 4))} | {_fmt(_pooled(m, 'cpbd'), 4)} |"
        )
    if any(r["metrics"]["n_clips"] < FVD_FEW_CLIPS and r["metrics"].get("fvd") is not None for r in gen):
        lines += [
            "",
            f"† fewer than {FVD_FEW_CLIPS} clips: FVD and KVD are then mostly their small-sample bias (the"
            " paper's are of 1,000 clips); compare only runs of the same N.",
        ]
    if gen:
        lines += ["", "Our runs, more numbers:", ""]
        for r in gen:
            m = r["metrics"]
            floor = m.get("real_vs_real_floor", {})
            lines.append(
                f"- {label(r)}: LPIPS interior {_fmt(_pooled(m, 'lpips', 'interior'), 4)}, CLIP_img interior "
                f"{_fmt(_pooled(m, 'clip_img', 'interior'), 4)}, PSNR interior "
                f"{_fmt(_pooled(m, 'psnr', 'interior'), 2)}, SSIM interior {_fmt(_pooled(m, 'ssim', 'interior'), 4)},"
                f" ground-truth CPBD {_fmt(_pooled(m, 'cpbd_real'), 4)}, "
                f"real-vs-real floor FVD {_fmt(floor.get('fvd'), 2)} / KVD {_fmt(floor.get('kvd'), 3)} "
                f"(halves of {floor.get('n_half', '-')}); results/{r.get('file', r['run'] + '.json')}"
            )
    if dec:
        lines += [
            "",
            "Decoder reconstruction (PSNR / SSIM / LPIPS; the paper's at 256x256):",
            "",
            "| decoder | N | size | PSNR | SSIM | LPIPS |",
            "|---|---|---|---|---|---|",
        ]
        for name, p, s, lp in PAPER_DECODER_ROWS:
            lines.append(f"| {name} (paper) | - | 256x256 | {p:.2f} | {s:.4f} | {lp:.4f} |")
        for r in dec:
            m = r["metrics"]
            size = "x".join(str(v) for v in r["data"]["size"])
            lines.append(
                f"| {label(r)} | {m['n_clips']} | {size} | {_fmt(_pooled(m, 'psnr'), 2)} | "
                f"{_fmt(_pooled(m, 'ssim'), 4)} | {_fmt(_pooled(m, 'lpips'), 4)} |"
            )
    return "\n".join(lines) + "\n"
