"""Stage `decoder`: train the dual-reference decoder to reconstruct 16-frame clips (MODEL.md 3, 3.9).

The encoder is frozen; the decoder gets the first and last frames' encoder features as references, as at
inference. It starts from the plain decoder's weights with the added layers initialised so that it starts
as the plain decoder (training/checkpoint.py does this when the init checkpoint has a plain decoder; a
ToonCrafter checkpoint brings its own dual-reference decoder). Latents are posterior samples, as the
release decodes.

Loss (the reference's is unreleased; this is SD's VAE recipe, stated as the issue asks):
    l1_weight x L1(recon, clip) + lpips_weight x LPIPS(recon, clip) [+ disc_weight x hinge G loss]
* LPIPS: the VGG16 network of LPIPS v0.1 by default (SD/taming's perceptual loss), per frame, from the
  models dir (`lpips/vgg.pth` + `lpips/vgg16-397923af.pth`; `lpips_net: alex` uses the AlexNet files).
  Missing files stop the run with the file names, unless LPIPS is switched off (`--no-lpips`).
* patch discriminator (optional, on by default from `disc_start`): pix2pix's 3-layer PatchGAN on single
  frames with GroupNorm instead of BatchNorm (no running statistics: nothing to synchronise between ranks,
  nothing that breaks an exact resume), hinge losses, a fixed generator weight (SD's adaptive weight needs
  a second backward through the last layer; left out). Its own AdamW (betas 0.5, 0.9, as SD's).
Eval (every train.eval_every steps, rank 0): PSNR / SSIM at 256x256 and LPIPS (AlexNet) of the EMA
decoder's reconstructions of the first eval-split clips (training/metrics; METRICS.md's protocol).

Paper defaults: lr 4.5e-6, batch 16, 60K steps (configs/decoder.yaml).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from training import roles
from training.data import collate, eval_windows, to_model_range
from training.models.tooncrafter import ToonCrafter
from training.models.vae import RefCrossAttention, ResnetBlock
from training.shards import list_shards
from training.stages.common import FrozenParts, Stage, save_model

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {"lr": 4.5e-6, "global_batch": 16, "steps": 60_000, "eval_every": 1000}


@dataclass
class DecoderConfig:
    l1_weight: float = 1.0  # pixel L1 (SD's reconstruction term)
    lpips_weight: float = 1.0  # LPIPS term (SD: perceptual_weight 1.0); 0 = no LPIPS (--no-lpips)
    lpips_net: str = "vgg"  # LPIPS backbone of the loss: "vgg" (SD/taming) or "alex"
    disc_start: int = (
        30_000  # step from which the patch discriminator trains and the G term applies; -1: never
    )
    disc_weight: float = 0.5  # weight of the generator's hinge term (SD kl-f8: 0.5)
    disc_lr: float = 0.0  # discriminator learning rate; 0 = train.lr
    disc_channels: int = 64  # width of the first discriminator layer (pix2pix ndf)
    disc_layers: int = 3  # strided layers of the discriminator (pix2pix n_layers)
    eval_lpips_net: str = "alex"  # LPIPS backbone of the eval metric (METRICS.md: AlexNet)
    eval_size: int = 256  # eval PSNR/SSIM/LPIPS on frames resized to this square (METRICS.md)


class PatchDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator (Isola et al. 2017) with GroupNorm: [n, 3, H, W] -> logits [n, 1, h, w]."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.GroupNorm(32, out),
                nn.LeakyReLU(0.2, True),
            ]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def missing_weights(cfg: DecoderConfig, models_dir: Path | None, evaluates: bool = True) -> str | None:
    """Why the loss's LPIPS cannot load (its files absent, empty or cut short) or, for a run that
    `evaluates`, the eval LPIPS's files, when there, would not, said before the run takes its folder; None:
    fine. (A damaged file stopped the run, exit 1, after it had taken its folder and loaded the model.)"""
    from manifests.weights import quick_problem
    from training.features import MissingWeightsError, require_file
    from training.features import models_dir as resolve
    from training.metrics.lpips import LPIPS_FILES

    missing = []
    for weight in LPIPS_FILES[cfg.lpips_net] if cfg.lpips_weight > 0 else ():
        try:
            path = require_file(weight, models_dir)
        except MissingWeightsError as exc:
            missing.append(str(exc))
            continue
        if problem := quick_problem(path):
            missing.append(f"{path}: {problem}")
    if missing:
        return _lpips_advice(cfg.lpips_net, "\n".join(missing))
    for weight in LPIPS_FILES[cfg.eval_lpips_net] if evaluates else ():  # absent: no eval LPIPS (a warning)
        path = resolve(models_dir) / weight.relpath
        if path.is_file() and (problem := quick_problem(path)):
            return (
                f"train decoder: the eval LPIPS ({cfg.eval_lpips_net}) weights {path}: {problem}; replace it,"
                " or move it aside to evaluate without LPIPS"
            )
    return None


def _lpips_advice(net: str, problem: object) -> str:
    return (
        f"train decoder: LPIPS ({net}) needs its weights: {problem}\n"
        "Or train without it: --no-lpips (= --set decoder.lpips_weight=0)."
    )


def load_perceptual(net: str, models_dir: Path | None) -> nn.Module:
    """LPIPS from training/metrics/lpips.py with its weights from the models dir; a clear error otherwise."""
    from manifests.weights import WeightsError
    from training.features import MissingWeightsError
    from training.metrics.lpips import load_lpips

    try:
        return load_lpips(models_dir, net=net)
    except (MissingWeightsError, WeightsError) as exc:
        raise SystemExit(_lpips_advice(net, exc)) from exc


def checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module` in backward (its forward is wrapped in place; state-dict keys are unchanged)."""
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    module.forward = forward


class DecoderNet(FrozenParts):
    """forward(batch, discriminator=None) -> {"loss", "l1", "lpips", "g_adv", "recon"}."""

    frozen = ("model", "perceptual")

    def __init__(self, model: ToonCrafter, cfg: DecoderConfig, perceptual: nn.Module | None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.perceptual = perceptual

    def train(self, mode: bool = True) -> DecoderNet:
        super().train(mode)
        self.model.first_stage_model.decoder.train(mode)  # the one trained part
        return self

    def forward(
        self, batch: dict[str, Any], discriminator: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        vae = self.model.vae
        video = to_model_range(batch["video"])  # [b, 3, t, H, W]
        with torch.no_grad():
            posterior, refs = vae.encode_video(video)
            z = vae.config.scale_factor * posterior.sample(noise=torch.randn_like(posterior.mean))
        recon = vae.decode_video(z, refs, clip_length=z.shape[2])  # [b, 3, t, H, W]
        flat_recon = rearrange(recon, "b c t h w -> (b t) c h w")
        flat_video = rearrange(video, "b c t h w -> (b t) c h w")
        l1 = (flat_recon.float() - flat_video).abs().mean()
        loss = self.cfg.l1_weight * l1
        out = {"l1": l1.detach()}
        if self.perceptual is not None and self.cfg.lpips_weight > 0:
            p = self.perceptual(flat_recon, flat_video).float().mean()
            loss = loss + self.cfg.lpips_weight * p
            out["lpips"] = p.detach()
        if discriminator is not None:
            g_adv = -discriminator(flat_recon).float().mean()
            loss = loss + self.cfg.disc_weight * g_adv
            out["g_adv"] = g_adv.detach()
        return {"loss": loss, **out, "recon": flat_recon.detach()}


def build(model: ToonCrafter, run: Any, models_dir: Path | None) -> Stage:
    cfg: DecoderConfig = run.decoder
    if not model.cfg.dual_ref_decoder:
        raise ValueError(
            "the decoder stage trains the dual-reference decoder: build with dual_ref_decoder=True"
        )
    roles.set_trainable(model, roles.STAGE_ROLES["decoder"])
    if run.train.gradient_checkpointing:
        for module in model.vae.decoder.modules():
            if isinstance(module, ResnetBlock | RefCrossAttention):
                checkpoint_forward(module)
    perceptual = load_perceptual(cfg.lpips_net, models_dir) if cfg.lpips_weight > 0 else None
    net = DecoderNet(model, cfg, perceptual).train()
    discriminator = None
    if cfg.disc_start >= 0 and cfg.disc_weight > 0:
        torch.manual_seed(run.train.seed + 1)  # its init does not depend on what was built before
        discriminator = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
    extra = {"lpips (loss)": perceptual} if perceptual is not None else {}
    if discriminator is not None:
        extra["discriminator"] = discriminator

    def export(folder: Path, metadata: dict[str, str]) -> None:
        save_model(model, folder / "model.safetensors", metadata)

    @torch.no_grad()
    def samples(batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        video = to_model_range(batch["video"])
        posterior, refs = model.vae.encode_video(video)
        recon = model.vae.decode_video(model.cfg.scale_factor * posterior.mode(), refs).clamp(-1, 1)
        return {
            "samples/reconstruction": torch.cat([video, recon], dim=3)
        }  # clip above, reconstruction below

    evaluate = None
    if run.train.eval_every > 0:
        eval_shards = list_shards(run.data.eval) if run.data.eval else []
        if eval_shards:
            evaluate = _evaluator(net, run, eval_shards, models_dir)
        else:
            log.warning(
                "decoder eval is on (train.eval_every) but there is no eval split (data.eval): skipped"
            )
    return Stage(
        "decoder",
        net,
        roles.role_table(model, extra),
        export,
        samples,
        shard_blocks=[],
        discriminator=discriminator,
        evaluate=evaluate,
    )


def _evaluator(net: DecoderNet, run: Any, shards: list[str], models_dir: Path | None):  # None: no window
    """PSNR / SSIM / LPIPS of reconstructions of the first eval clips (loaded once, decoded in order)."""
    from training.features import MissingWeightsError
    from training.metrics import psnr, quantize_uint8, resize_frames, ssim
    from training.metrics.lpips import load_lpips

    cfg: DecoderConfig = run.decoder
    windows = eval_windows(shards, run.data, run.train.eval_clips)
    if not windows:  # it logged an empty eval every eval_every steps
        log.warning(
            "decoder eval: no clip of the eval split (%s) gives a window of data.frames=%d: skipped",
            run.data.eval,
            run.data.frames,
        )
        return None
    try:
        metric_lpips = load_lpips(models_dir, net=cfg.eval_lpips_net)
    except MissingWeightsError as exc:
        log.warning("decoder eval: no LPIPS metric (%s)", exc)
        metric_lpips = None

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        device = next(net.model.vae.decoder.parameters()).device
        size = (cfg.eval_size, cfg.eval_size)
        scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
        for window in windows:
            batch = collate([window])
            video = to_model_range(batch["video"].to(device))
            posterior, refs = net.model.vae.encode_video(video)
            recon = net.model.vae.decode_video(posterior.mode() * net.model.cfg.scale_factor, refs)
            gen = quantize_uint8(rearrange(recon.float().cpu(), "b c t h w -> (b t) c h w"), "[-1,1]")
            ref = rearrange(batch["video"], "b c t h w -> (b t) c h w")
            gen, ref = (
                resize_frames(gen, size).round().clamp(0, 255),
                resize_frames(ref, size).round().clamp(0, 255),
            )
            scores["psnr"].append(psnr(gen, ref))
            scores["ssim"].append(ssim(gen, ref))
            if metric_lpips is not None:
                scores["lpips"].append(metric_lpips(gen / 127.5 - 1, ref / 127.5 - 1))
        return {f"eval/{k}": float(torch.cat(v).float().mean()) for k, v in scores.items() if v}

    return evaluate
