"""ToonCrafter: the container of all networks and the diffusion schedule, with the reference's state-dict layout.

| attribute (state-dict prefix)   | what                                                                  |
|---------------------------------|-----------------------------------------------------------------------|
| `model.diffusion_model.*`       | UNet3D, the denoiser (input: noisy latent ++ keyframe latents)        |
| `first_stage_model.*`           | AutoencoderKL: SD encoder + dual-reference (or plain) decoder         |
| `cond_stage_model.model.*`      | OpenCLIP ViT-H-14 text tower (penultimate tokens)                     |
| `embedder.model.*`              | OpenCLIP ViT-H-14 image tower (tokens before ln_post)                 |
| `image_proj_model.*`            | Resampler: CLIP image tokens -> 16 context tokens per frame           |
| 13 root buffers                 | the diffusion schedule (betas, alphas_cumprod, ..., scale_arr)        |

The released ToonCrafter checkpoint loads strictly into `ToonCrafter(TOONCRAFTER_PRESETS["toon-512"])`, the
DynamiCrafter-512-interp one into the same preset with `dual_ref_decoder=False` (see training/checkpoint.py for
starting a dual-reference decoder from a plain one). The class holds networks only: sampling and training
live in training/diffusion and the training stages.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from training.diffusion.schedule import SCHEDULE_PRESETS, ScheduleConfig, schedule_buffers
from training.models.clip import CLIP_PRESETS, CLIPConfig, CLIPImageEncoder, CLIPTextEncoder
from training.models.resampler import RESAMPLER_PRESETS, Resampler, ResamplerConfig
from training.models.unet import UNET_PRESETS, UNet3D, UNetConfig
from training.models.vae import VAE_PRESETS, AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class ToonCrafterConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # the denoiser
    vae: VAEConfig = field(default_factory=VAEConfig)  # first stage (its dual_ref is set by dual_ref_decoder)
    clip: CLIPConfig = field(default_factory=CLIPConfig)  # text and image towers
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)  # image-context projector
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # noise schedule, v-prediction, rescale
    scale_factor: float = 0.18215  # diffusion latents = scale_factor * VAE latents
    dual_ref_decoder: bool = True  # ToonCrafter's dual-reference decoder (False: DynamiCrafter's plain one)

    @property
    def frames(self) -> int:
        """Clip length the image context is laid out for (16 image tokens per frame)."""
        return self.resampler.video_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ToonCrafterConfig:
        """Inverse of to_dict (e.g. from a checkpoint's JSON); unknown keys are an error."""
        return _dataclass_from_dict(cls, values)


def _dataclass_from_dict(cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _dataclass_from_dict(hint, value)
        elif isinstance(value, list) and _is_tuple_hint(hint):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _is_tuple_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_hint(arg) for arg in typing.get_args(hint))
    return False


TOONCRAFTER_PRESETS: dict[str, ToonCrafterConfig] = {
    "tiny": ToonCrafterConfig(
        unet=UNET_PRESETS["tiny"],
        vae=VAE_PRESETS["tiny"],
        clip=CLIP_PRESETS["tiny"],
        resampler=RESAMPLER_PRESETS["tiny"],
        schedule=SCHEDULE_PRESETS["tiny"],
    ),
    # TC configs/inference_512_v1.0.yaml; with dual_ref_decoder=False: DynamiCrafter-512-interp.
    "toon-512": ToonCrafterConfig(
        unet=UNET_PRESETS["toon-512"],
        vae=VAE_PRESETS["toon-512"],
        clip=CLIP_PRESETS["toon-512"],
        resampler=RESAMPLER_PRESETS["toon-512"],
        schedule=SCHEDULE_PRESETS["toon-512"],
    ),
}


def tooncrafter_config(preset: str, **overrides: Any) -> ToonCrafterConfig:
    """A named preset with top-level field overrides, e.g. tooncrafter_config("toon-512", dual_ref_decoder=False)."""
    if preset not in TOONCRAFTER_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(TOONCRAFTER_PRESETS)}")
    return replace(TOONCRAFTER_PRESETS[preset], **overrides)


def size_step(cfg: ToonCrafterConfig) -> int:
    """Frame sides must be multiples of this: the VAE's downsampling times the UNet's."""
    return 2 ** (len(cfg.vae.ch_mult) - 1) * 2 ** (len(cfg.unet.channel_mult) - 1)


class DiffusionWrapper(nn.Module):
    """The reference's hybrid conditioning: the keyframe latents are concatenated to the noisy latent as
    channels, the text + image tokens go to cross-attention. Holds the UNet as `diffusion_model`."""

    def __init__(self, unet: UNet3D):
        super().__init__()
        self.diffusion_model = unet

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c_concat: torch.Tensor,
        context: torch.Tensor,
        fs: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # x_t, c_concat [b, 4, t, h, w] -> UNet input [b, 8, t, h, w] -> v [b, 4, t, h, w]
        return self.diffusion_model(torch.cat([x_t, c_concat], dim=1), t, context, fs=fs, control=control)


class ToonCrafter(nn.Module):
    def __init__(self, cfg: ToonCrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNet3D(cfg.unet))
        vae_cfg = replace(cfg.vae, dual_ref=cfg.dual_ref_decoder, scale_factor=cfg.scale_factor)
        self.first_stage_model = AutoencoderKL(vae_cfg)
        self.cond_stage_model = CLIPTextEncoder(cfg.clip)
        self.embedder = CLIPImageEncoder(cfg.clip)
        self.image_proj_model = Resampler(cfg.resampler)
        for name, value in schedule_buffers(cfg.schedule).items():
            if name == "scale_arr" and not cfg.schedule.dynamic_rescale:
                continue  # the reference registers scale_arr only with dynamic rescale
            self.register_buffer(name, value)

    @property
    def unet(self) -> UNet3D:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)create the buffers that checkpoints do not hold (CLIP's causal mask and mean/std) on `device`:
        needed after loading weights with `assign=True` into a model built on the meta device."""
        self.cond_stage_model.init_buffers(device)
        self.embedder.init_buffers(device)

    def schedule(self) -> dict[str, torch.Tensor]:
        """The schedule buffers by name (on the model's device)."""
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text tokens [b, 77, context_dim]."""
        return self.cond_stage_model.encode(prompts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Keyframe images [b, 3, H, W] in [-1, 1] -> image context tokens [b, frames * 16, context_dim]."""
        return self.image_proj_model(self.embedder(images))

    def context(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """Cross-attention context [b, 77 + frames * 16, context_dim]: text tokens, then image tokens."""
        return torch.cat([self.encode_text(prompts), self.encode_image(images)], dim=1)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c_concat: torch.Tensor,
        context: torch.Tensor,
        fs: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The denoiser: v-prediction [b, 4, t, h, w] for noisy latents x_t at timesteps t [b]."""
        return self.model(x_t, t, c_concat, context, fs=fs, control=control)


def build_tooncrafter(preset: str = "toon-512", **overrides: Any) -> ToonCrafter:
    """ToonCrafter from a named preset (fp32, on the current default device; use `torch.device("meta")` to
    build the 2.6 B-parameter model without memory)."""
    return ToonCrafter(tooncrafter_config(preset, **overrides))
