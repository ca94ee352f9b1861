"""What the three stages share: the `Stage` record the training loop works with, and the diffusion-side
helpers of the rectify and sketch stages (latents, the DynamiCrafter interpolation conditioning, the
training step of MODEL.md 2.8, sample videos with DDIM + classifier-free guidance as the release samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from training.data import conditioning_dropout, interp_concat, to_model_range
from training.diffusion.ddim import sample_ddim, uniform_trailing_timesteps
from training.diffusion.guidance import cfg_denoiser
from training.diffusion.schedule import diffusion_loss, training_pair
from training.models.tooncrafter import ToonCrafter


@dataclass
class Stage:
    """A stage as the loop sees it."""

    name: str
    net: nn.Module  # forward(batch on the device) -> {"loss": optimised scalar, other scalars/tensors}
    roles: list[tuple[str, int, int, bool]]  # (role, tensors, numel, trained), printed at start
    export: Callable[[Path, dict[str, str]], None]  # write the inference weights (EMA applied) into a folder
    samples: Callable[[dict[str, Any], torch.Generator], dict[str, torch.Tensor]]  # videos for TensorBoard
    shard_blocks: list[nn.Module] = field(default_factory=list)  # FSDP units (the UNet's blocks)
    discriminator: nn.Module | None = None  # decoder stage: the patch discriminator, trained alongside
    evaluate: Callable[[], dict[str, float]] | None = None  # eval-split metrics (decoder stage)


class FrozenParts(nn.Module):
    """A step module whose frozen submodules stay in eval mode whatever `.train()` says."""

    frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> FrozenParts:
        super().train(mode)
        for name in self.frozen:
            module = self
            for part in name.split("."):
                module = getattr(module, part, None)
            if module is not None:
                module.eval()
        return self


def unet_blocks(model: ToonCrafter) -> list[nn.Module]:
    """The units FSDP shards the UNet into: each block, then the UNet itself (its embeddings, in/out convs)."""
    unet = model.unet
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    if hasattr(unet, "init_attn"):
        blocks.append(unet.init_attn)
    return [*blocks, unet]


@torch.no_grad()
def clip_latents(model: ToonCrafter, video: torch.Tensor) -> torch.Tensor:
    """video [b, 3, t, H, W] in [-1, 1] -> diffusion latents z [b, e, t, h, w]: scale_factor x a posterior
    sample (not the mode, MODEL.md 1.8), noise from the global RNG of the latents' device."""
    b = video.shape[0]
    posterior = model.vae.encode(rearrange(video, "b c t h w -> (b t) c h w"))
    z = posterior.sample(noise=torch.randn_like(posterior.mean))  # [(b t), e, h, w]
    return model.cfg.scale_factor * rearrange(z, "(b t) c h w -> b c t h w", b=b)


def training_context(
    model: ToonCrafter, first: torch.Tensor, captions: list[str], uncond_prob: float
) -> torch.Tensor:
    """Cross-attention context [b, 77 + frames*16, d] with DynamiCrafter's conditioning dropout: dropped
    text is the embedding of "", a dropped image is a zero (mid-grey) image through the CLIP tower; the
    image tokens come from the first keyframe only (rand_cond_frame: false). The towers are frozen; the
    image-context projector gets gradients when it is trained."""
    # drawn on the host: the prompts need the text draw there anyway, so no device sync in the step
    drop_text, drop_image = conditioning_dropout(first.shape[0], uncond_prob)
    prompts = ["" if drop else caption for caption, drop in zip(captions, drop_text.tolist())]
    with torch.no_grad():
        text = model.encode_text(prompts)  # [b, 77, d]
        keep = (~drop_image).to(first.device, first.dtype).view(-1, 1, 1, 1)
        image_tokens = model.embedder(first * keep)  # [b, 257, w]
    return torch.cat([text, model.image_proj_model(image_tokens)], dim=1)


def diffusion_step(
    model: ToonCrafter,
    batch: dict[str, Any],
    uncond_prob: float,
    control_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]
    | None = None,
) -> dict[str, torch.Tensor]:
    """One DynamiCrafter-interp training loss (MODEL.md 2.8): v-MSE at a uniform timestep, concat = first and
    last latents with zeros between, dynamic rescale of x0. `control_fn(x_t, t, context, video)` gives the
    sketch encoder's residuals."""
    video = to_model_range(batch["video"])  # [b, 3, t, H, W]
    z = clip_latents(model, video)  # [b, e, t, h, w]
    c_concat = interp_concat(z)
    context = training_context(model, to_model_range(batch["first"]), batch["caption"], uncond_prob)
    t = torch.randint(0, model.cfg.schedule.num_timesteps, (z.shape[0],), device=z.device)
    noise = torch.randn_like(z)
    x_t, target = training_pair(z, t, noise, model.schedule(), model.cfg.schedule)
    control = control_fn(x_t, t, context, video) if control_fn is not None else None
    v = model(x_t, t, c_concat, context, fs=batch["fs"], control=control)
    return {"loss": diffusion_loss(v, target)}


@torch.no_grad()
def sample_interpolation(
    model: ToonCrafter,
    batch: dict[str, Any],
    generator: torch.Generator,
    steps: int,
    cfg_scale: float = 7.5,
    guidance_rescale: float = 0.7,
    eta: float = 1.0,
    control_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """In-betweens of each clip's first and last frames and caption, as the release samples (DDIM
    uniform-trailing, CFG with text and image dropped together, guidance rescale, dual-reference decode)
    -> [b, 3, t, H, W] in [-1, 1]. `control_fn(x_t, t, context)` adds sketch residuals."""
    video = to_model_range(batch["video"])
    b, _, frames = video.shape[:3]
    first, last = video[:, :, 0], video[:, :, -1]
    posterior, refs = model.vae.encode_video(torch.stack([first, last], dim=2))  # 2 frames
    noise = torch.randn(posterior.mean.shape, generator=generator, device=video.device)
    z = model.cfg.scale_factor * posterior.sample(noise=noise)  # [b, e, 2, h, w]
    c_concat = z.new_zeros(b, z.shape[1], frames, *z.shape[3:])
    c_concat[:, :, 0], c_concat[:, :, -1] = z[:, :, 0], z[:, :, 1]
    cond = {"c_concat": c_concat, "c_crossattn": model.context(batch["caption"], first), "fs": batch["fs"]}
    uncond_ctx = torch.cat([model.encode_text([""] * b), model.encode_image(torch.zeros_like(first))], dim=1)
    uncond = {**cond, "c_crossattn": uncond_ctx}

    def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
        control = control_fn(x, t, c["c_crossattn"]) if control_fn is not None else None
        return model(x, t, c["c_concat"], c["c_crossattn"], fs=c["fs"], control=control).float()

    denoiser = cfg_denoiser(model_fn, cond, uncond, cfg_scale, guidance_rescale)
    x = torch.randn(c_concat.shape, generator=generator, device=video.device)
    timesteps = uniform_trailing_timesteps(steps, model.cfg.schedule.num_timesteps)
    z0 = sample_ddim(
        denoiser,
        x,
        timesteps,
        model.schedule(),
        eta=eta,
        generator=generator,
        dynamic_rescale=model.cfg.schedule.dynamic_rescale,
    )
    return model.vae.decode_video(z0, refs).clamp(-1, 1)


class _Gathered:
    """What checkpoint.save_safetensors reads from a model, with FSDP shards gathered into whole tensors
    (a collective: every rank builds one; only rank 0's is written)."""

    def __init__(self, model: ToonCrafter):
        from training.engine import full

        self.cfg = model.cfg
        self._state = {k: full(v) for k, v in model.state_dict().items()}
        self._params = [name for name, _ in model.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def named_parameters(self):
        return ((name, None) for name in self._params)


def save_model(model: ToonCrafter, path: Path, metadata: dict[str, str]) -> None:
    """The whole ToonCrafter as inference loads it (training/checkpoint.py's safetensors with the model
    config and code version), plus the run's metadata. Every rank calls it; rank 0 writes."""
    import torch.distributed as dist

    from training.checkpoint import save_safetensors

    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    source = _Gathered(model) if sharded else model
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_safetensors(source, path, metadata=metadata)
