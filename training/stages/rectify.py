"""Stage `rectify` (cartoon rectification): adapt DynamiCrafter-interp to cartoons without touching motion.

Starts from a DynamiCrafter-interp checkpoint (its plain decoder becomes a dual-reference decoder that
starts as the plain one, training/checkpoint.py). Trains the image-context projector and the UNet's
spatial layers, the image key/value projections included; freezes the temporal convs, the temporal
transformers and `init_attn`, the VAE and both CLIP towers (the paper; roles in training/roles.py).
The loss is DynamiCrafter's interpolation training step (MODEL.md 2.8): v-MSE, first/last latents in the
concat channels and zeros between, 5/5/5 % text/both/image conditioning dropout. The whole UNet runs in
train mode (its dropout on), as in the reference; the frozen towers run in eval mode.

Paper defaults: lr 1e-6, batch 32, 50K steps (configs/rectify.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import roles
from training.models.tooncrafter import ToonCrafter
from training.stages.common import (
    FrozenParts,
    Stage,
    diffusion_step,
    sample_interpolation,
    save_model,
    unet_blocks,
)

TRAIN_DEFAULTS = {"lr": 1e-6, "global_batch": 32, "steps": 50_000}


@dataclass
class RectifyConfig:
    train_roles: tuple[str, ...] = roles.STAGE_ROLES["rectify"]  # parameter roles trained (roles.py)
    uncond_prob: float = 0.05  # p of each conditioning-dropout event (DC config_interp.yaml: 0.05)
    sample_cfg: float = 7.5  # classifier-free guidance scale of the sample videos (the release's)
    sample_guidance_rescale: float = 0.7  # guidance rescale of the sample videos (the release's)


class RectifyNet(FrozenParts):
    """forward(batch) -> {"loss"}: the ToonCrafter's diffusion loss on one batch of windows."""

    frozen = ("model.first_stage_model", "model.cond_stage_model", "model.embedder")

    def __init__(self, model: ToonCrafter, cfg: RectifyConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return diffusion_step(self.model, batch, self.cfg.uncond_prob)


def build(model: ToonCrafter, run: Any, models_dir: Path | None) -> Stage:
    cfg: RectifyConfig = run.rectify
    roles.set_trainable(model, cfg.train_roles)
    net = RectifyNet(model, cfg).train()

    def export(folder: Path, metadata: dict[str, str]) -> None:
        save_model(model, folder / "model.safetensors", metadata)

    def samples(batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        video = sample_interpolation(
            model, batch, generator, run.train.sample_steps, cfg.sample_cfg, cfg.sample_guidance_rescale
        )
        return {"samples/interpolation": video}

    shard = [*unet_blocks(model), model.image_proj_model]
    return Stage("rectify", net, roles.role_table(model), export, samples, shard_blocks=shard)
