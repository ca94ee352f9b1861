"""Stage `sketch`: train the frame-wise sketch encoder (a ControlNet, training/models/sketch.py) on top of
the rectified, frozen ToonCrafter.

* init: the encoder copies the UNet's spatial weights where shapes match and starts with zero output
  convs (`init_from_unet`, ControlNet practice), so that training starts from the plain model.
* sketches are extracted on the fly from the clip's frames, on the training device:
  - Anime2Sketch (Xiang et al. 2021; ToonCrafter's README credits it) when its generator is in the models
    dir: `tooncrafter/sketch_extractor.pth` (ToonCrafter's file) or `anime2sketch/netG.pth` (the
    original). Frames are resized to a 512 square, as Anime2Sketch's own script does, and back.
  - otherwise XDoG (Winnemoeller et al. 2012), a classical line extractor: difference of two Gaussians
    of the luma, soft-thresholded with tanh.
  Either gives a grey sketch (lines dark on white) that is inverted (lines ~1 on 0), the hint convention
  of the community loaders and of inference/sampler.py.
* sparse and dense guidance: per clip a rate r ~ U[frame_prob_min, frame_prob_max], per frame a sketch
  with probability r; the keyframes always get theirs (`keyframe_sketches`, the paper's bisection
  setting). Frames without a sketch get a zero hint and are masked (`sketch_mask`), so they contribute
  no residual, which is what inference does by default. A batch that drew no sketch at all gets one
  (its first clip's first frame): every encoder parameter must take part in each DDP step, so the rate
  never quite reaches 0 (`frame_prob_max=0` still logs a small train/sketch_rate).
* the loss is the diffusion loss of the rectify stage with the encoder's residuals added to the UNet
  (scaled by `control_scale` = 1, ControlNet's training strength; inference uses the app's 0.6). The
  ToonCrafter is frozen entirely; its UNet stays in train mode only so that gradient checkpointing
  applies, with its dropout off.

Paper defaults: lr 5e-5, batch 32, 50K steps (configs/sketch.yaml).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from manifests.files import atomic_path
from training import roles
from training.models.sketch import SKETCH_ENCODER_PRESETS, SketchEncoder, SketchEncoderConfig, init_from_unet
from training.models.tooncrafter import ToonCrafter
from training.stages.common import FrozenParts, Stage, diffusion_step, sample_interpolation, unet_blocks

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {"lr": 5e-5, "global_batch": 32, "steps": 50_000}
ANIME2SKETCH_FILES = ("tooncrafter/sketch_extractor.pth", "anime2sketch/netG.pth")
ANIME2SKETCH_SOURCE = (
    "https://huggingface.co/Doubiiu/ToonCrafter (sketch_extractor.pth) or Mukosame/Anime2Sketch"
)
SKETCH_CONFIG_METADATA = "inbetweener.sketch_config"


@dataclass
class SketchConfig:
    extractor: str = "auto"  # "auto" (Anime2Sketch when its weights are in the models dir, else XDoG), "anime2sketch", "xdog"
    frame_prob_min: float = 0.0  # per clip, the sketch rate is drawn from U[frame_prob_min, frame_prob_max]
    frame_prob_max: float = 1.0
    keyframe_sketches: bool = True  # the first and last frames always have their sketch
    control_scale: float = 1.0  # residual scale while training (ControlNet trains at 1; inference uses 0.6)
    uncond_prob: float = 0.05  # conditioning dropout of text/image, as in the rectify stage
    xdog_sigma: float = 0.8  # XDoG inner Gaussian (pixels at the training resolution)
    xdog_k: float = 1.6  # ratio of the outer to the inner Gaussian
    xdog_tau: float = 0.98  # weight of the outer Gaussian
    xdog_phi: float = 200.0  # tanh sharpness of the soft threshold
    anime2sketch_size: int = 512  # square side frames are resized to for Anime2Sketch


# --- sketch extractors -----------------------------------------------------------------------------------------


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [n, 1, H, W], radius 3 sigma, reflect padding."""
    radius = max(1, int(3 * sigma + 0.5))
    grid = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


class XDoG(nn.Module):
    """Frames [n, 3, H, W] in [-1, 1] -> sketches [n, 1, H, W] in [0, 1], lines dark on white.

    D = G_sigma(Y) - tau G_{k sigma}(Y) on the luma Y in [0, 1]; white where D >= 0, else 1 + tanh(phi D)
    (Winnemoeller et al. 2012, eq. 3-4, with epsilon = 0)."""

    def __init__(self, sigma: float = 0.8, k: float = 1.6, tau: float = 0.98, phi: float = 200.0):
        super().__init__()
        self.sigma, self.k, self.tau, self.phi = sigma, k, tau, phi

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        rgb = (frames.float() + 1) / 2
        luma = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).clamp(0, 1)
        d = _gaussian_blur(luma, self.sigma) - self.tau * _gaussian_blur(luma, self.k * self.sigma)
        return torch.where(d >= 0, torch.ones_like(d), 1 + torch.tanh(self.phi * d))


class _UnetSkip(nn.Module):
    """One level of pix2pix's U-Net generator (the layout of Anime2Sketch's netG.pth): down, inner, up."""

    def __init__(
        self,
        outer: int,
        inner: int,
        in_ch: int | None = None,
        sub: nn.Module | None = None,
        outermost: bool = False,
    ):
        super().__init__()
        self.outermost = outermost
        in_ch = in_ch or outer
        norm = lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)  # noqa: E731
        down = nn.Conv2d(in_ch, inner, 4, 2, 1, bias=True)
        if outermost:
            layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif sub is None:  # innermost
            layers = [
                nn.LeakyReLU(0.2, True),
                down,
                nn.ReLU(True),
                nn.ConvTranspose2d(inner, outer, 4, 2, 1),
                norm(outer),
            ]
        else:
            layers = [
                nn.LeakyReLU(0.2, True),
                down,
                norm(inner),
                sub,
                nn.ReLU(True),
                nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1),
                norm(outer),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], dim=1)


class Anime2Sketch(nn.Module):
    """Anime2Sketch's generator (pix2pix U-Net, 8 levels, 64 filters, instance norm), keys `model.model...`.
    forward(frames [n, 3, H, W] in [-1, 1]) -> sketches [n, 1, H, W] in [0, 1], lines dark on white."""

    def __init__(self, size: int = 512, filters: int = 64, levels: int = 8):
        super().__init__()
        self.size = size
        block = _UnetSkip(filters * 8, filters * 8)
        for _ in range(levels - 5):
            block = _UnetSkip(filters * 8, filters * 8, sub=block)
        for mult in (4, 2, 1):
            block = _UnetSkip(filters * mult, filters * mult * 2, sub=block)
        self.model = _UnetSkip(1, filters, in_ch=3, sub=block, outermost=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        x = F.interpolate(frames.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        y = self.model(x)  # [n, 1, size, size] in [-1, 1]
        y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False)
        return ((y + 1) / 2).clamp(0, 1)


def _models_dir(models_dir: Path | None) -> Path:
    if models_dir is not None:
        return Path(models_dir).expanduser()
    return Path(os.environ.get("INBETWEENER_MODELS") or "~/.cache/inbetweener/models").expanduser()


def missing_weights(cfg: SketchConfig, models_dir: Path | None) -> str | None:
    """Why `load_extractor` would stop (Anime2Sketch asked for, its weights absent; its file empty or cut
    short); None: fine."""
    from manifests.weights import quick_problem

    base = _models_dir(models_dir)
    found = next((base / f for f in ANIME2SKETCH_FILES if (base / f).is_file()), None)
    if cfg.extractor == "anime2sketch" and found is None:
        return (
            f"train sketch: Anime2Sketch weights not found: put {' or '.join(ANIME2SKETCH_FILES)} under the "
            f"models dir {base} (from {ANIME2SKETCH_SOURCE}), or use --set sketch.extractor=xdog"
        )
    if cfg.extractor != "xdog" and found is not None and (problem := quick_problem(found)):
        return (  # `auto` would load it: a damaged file stopped the run after it had taken its folder
            f"train sketch: Anime2Sketch weights {found}: {problem}; replace it (from {ANIME2SKETCH_SOURCE}),"
            " or use --set sketch.extractor=xdog"
        )
    return None


def load_extractor(cfg: SketchConfig, models_dir: Path | None) -> tuple[str, nn.Module]:
    """(name, extractor) per `cfg.extractor`; "anime2sketch" without its weights is an error."""
    if cfg.extractor not in ("auto", "anime2sketch", "xdog"):
        raise ValueError(f"sketch.extractor must be auto, anime2sketch or xdog, got {cfg.extractor!r}")
    if cfg.extractor != "xdog":
        base = _models_dir(models_dir)
        found = next((base / f for f in ANIME2SKETCH_FILES if (base / f).is_file()), None)
        if found is not None:
            from manifests.weights import load_module_weights

            net = Anime2Sketch(cfg.anime2sketch_size)
            load_module_weights(net, found, prefix="module.")  # WeightsError naming the file if it is not
            return f"anime2sketch ({found})", net.eval().requires_grad_(False)
        if cfg.extractor == "anime2sketch":
            raise SystemExit(missing_weights(cfg, models_dir))
    return "xdog", XDoG(cfg.xdog_sigma, cfg.xdog_k, cfg.xdog_tau, cfg.xdog_phi)


def sketch_mask(b: int, t: int, cfg: SketchConfig, device: torch.device) -> torch.Tensor:
    """[b, t] bool: which frames get a sketch (module docstring); never all False in a batch."""
    rate = cfg.frame_prob_min + (cfg.frame_prob_max - cfg.frame_prob_min) * torch.rand(b, 1, device=device)
    mask = torch.rand(b, t, device=device) < rate
    if cfg.keyframe_sketches:
        mask[:, 0] = mask[:, -1] = True
    if not mask.any():
        mask[0, 0] = True  # every encoder parameter must take part in each step (DDP)
    return mask


# --- the step module -------------------------------------------------------------------------------------------


class SketchNet(FrozenParts):
    """forward(batch) -> {"loss", "sketch_rate"}: the diffusion loss with the sketch encoder's residuals."""

    frozen = (
        "model.first_stage_model",
        "model.cond_stage_model",
        "model.embedder",
        "model.image_proj_model",
        "extractor",
    )

    def __init__(self, model: ToonCrafter, encoder: SketchEncoder, extractor: nn.Module, cfg: SketchConfig):
        super().__init__()
        self.model, self.encoder, self.extractor, self.cfg = model, encoder, extractor, cfg

    def train(self, mode: bool = True) -> SketchNet:
        super().train(mode)
        for module in self.model.unet.modules():  # train mode for checkpointing, dropout off: frozen
            if isinstance(module, nn.Dropout):
                module.eval()
        return self

    @torch.no_grad()
    def hints(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """video [b, 3, t, H, W] in [-1, 1], mask [b, t] -> hint [b, 1, t, H, W] (lines ~1, zeros unsketched)."""
        b = video.shape[0]
        sketches = self.extractor(rearrange(video, "b c t h w -> (b t) c h w"))  # [(b t), 1, H, W]
        hint = 1.0 - rearrange(sketches, "(b t) c h w -> b c t h w", b=b)
        return hint * mask[:, None, :, None, None].to(hint.dtype)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        video = batch["video"]
        mask = sketch_mask(video.shape[0], video.shape[2], self.cfg, video.device)

        def control(x_t, t, context, clip):
            hint = self.hints(clip, mask)
            return self.encoder(x_t, hint, t, context, sketch_mask=mask, scale=self.cfg.control_scale)

        out = diffusion_step(self.model, batch, self.cfg.uncond_prob, control)
        return {**out, "sketch_rate": mask.float().mean()}


def encoder_config(preset: str, checkpointing: bool) -> SketchEncoderConfig:
    if preset not in SKETCH_ENCODER_PRESETS:
        raise ValueError(f"no sketch encoder preset {preset!r}; presets: {sorted(SKETCH_ENCODER_PRESETS)}")
    return replace(SKETCH_ENCODER_PRESETS[preset], gradient_checkpointing=checkpointing)


def save_encoder(encoder: SketchEncoder, path: Path, metadata: dict[str, str]) -> None:
    """The encoder's state dict as safetensors with its config (JSON) and the code version in the metadata;
    keys as in the released sketch_encoder.ckpt, which inference/weights.py loads strictly."""
    import dataclasses

    import torch.distributed as dist
    from safetensors.torch import save_file

    from training.checkpoint import VERSION_METADATA, code_version
    from training.engine import full

    state = {k: full(v).detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    cfg = dataclasses.replace(encoder.cfg, gradient_checkpointing=False)
    meta = {
        "format": "pt",
        SKETCH_CONFIG_METADATA: json.dumps(dataclasses.asdict(cfg)),
        VERSION_METADATA: code_version(),
        **metadata,
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def build(model: ToonCrafter, run: Any, models_dir: Path | None) -> Stage:
    cfg: SketchConfig = run.sketch
    roles.set_trainable(model, roles.STAGE_ROLES["sketch"])  # the ToonCrafter is frozen entirely
    torch.manual_seed(run.train.seed + 2)
    encoder = SketchEncoder(encoder_config(run.train.preset, run.train.gradient_checkpointing))
    init = init_from_unet(encoder, model.unet)
    log.info(
        "sketch encoder: %d tensors copied from the UNet, %d zeroed, %d new",
        len(init.copied),
        len(init.zeroed),
        len(init.kept),
    )
    name, extractor = load_extractor(cfg, models_dir)
    log.info("sketch extractor: %s", name)
    net = SketchNet(model, encoder, extractor, cfg).train()

    def export(folder: Path, metadata: dict[str, str]) -> None:
        save_encoder(
            encoder, folder / "sketch_encoder.safetensors", {**metadata, "inbetweener.extractor": name}
        )

    def samples(batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        video = batch["video"]
        b, t = video.shape[0], video.shape[2]
        mask = torch.zeros(b, t, dtype=torch.bool, device=video.device)
        mask[:, [0, t // 2, t - 1]] = True  # sparse guidance: the keyframes and the middle frame
        hint = net.hints(video.float() / 127.5 - 1, mask)

        def control(x, timesteps, context):
            return encoder(x, hint, timesteps, context, sketch_mask=mask)  # inference's scale (0.6)

        out = sample_interpolation(model, batch, generator, run.train.sample_steps, control_fn=control)
        return {"samples/sketch_guided": torch.cat([out, hint.expand_as(out) * 2 - 1], dim=3)}

    table = roles.role_table(model, {"sketch_encoder": encoder, f"extractor ({name.split()[0]})": extractor})
    shard = [*unet_blocks(model), *encoder.input_blocks, encoder.middle_block, encoder]
    return Stage("sketch", net, table, export, samples, shard_blocks=shard)
