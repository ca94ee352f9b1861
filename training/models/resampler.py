"""The image-context projector: a Perceiver resampler from CLIP image tokens to per-frame UNet tokens.

Learned queries (`num_queries` per frame x `video_length` frames) cross-attend to the CLIP ViT tokens
and to themselves (IP-Adapter / Flamingo style). Output [b, video_length * num_queries, output_dim],
frame-major: the UNet gives frame i the tokens [16 i, 16 i + 16). Keys follow the reference
(`latents`, `proj_in`, `layers.{i}.0.to_kv`, `layers.{i}.1.{0,1,3}`, `proj_out`, `norm_out`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 1024  # width of the queries inside the resampler
    depth: int = 4  # attention + feed-forward layers
    dim_head: int = 64  # attention head width
    heads: int = 12  # attention heads (inner width heads*dim_head may differ from dim)
    num_queries: int = 16  # output tokens per frame (the UNet expects 16)
    embedding_dim: int = 1280  # width of the CLIP image tokens it reads
    output_dim: int = 1024  # width of the produced tokens (the UNet context_dim)
    ff_mult: int = 4  # feed-forward inner width multiplier
    video_length: int = 16  # frames: there are num_queries * video_length learned queries


RESAMPLER_PRESETS: dict[str, ResamplerConfig] = {
    "tiny": ResamplerConfig(
        dim=64, depth=2, dim_head=16, heads=3, num_queries=16, embedding_dim=80, output_dim=32, video_length=4
    ),
    "toon-512": ResamplerConfig(),  # TC configs/inference_512_v1.0.yaml image_proj_stage_config
}


def resampler_config_from_reference(kwargs: dict[str, Any]) -> ResamplerConfig:
    """Map the reference `Resampler(**kwargs)` constructor arguments onto a `ResamplerConfig`."""
    own = {f.name for f in fields(ResamplerConfig)}
    unknown = set(kwargs) - own
    if unknown:
        raise ValueError(f"unknown reference Resampler options: {sorted(unknown)}")
    if kwargs.get("video_length", 1) is None:
        kwargs = {**kwargs, "video_length": 1}  # the reference's single-image mode
    return replace(ResamplerConfig(), **kwargs)


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys/values from [image tokens; latents]."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x [b, n, dim], latents [b, l, dim] -> [b, l, dim]
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(z, "b l (h d) -> b h l d", h=self.heads) for z in (q, k, v))
        # q and k each scaled by d^-1/4 (steadier in fp16 than scaling the product); softmax in fp32
        scale = self.dim_head**-0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)  # [b, h, l, n + l]
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = rearrange(weight @ v, "b h l d -> b l (h d)")
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(nn.Module):
    """forward(x [b, n, embedding_dim]) -> [b, video_length * num_queries, output_dim]."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        queries = cfg.num_queries * cfg.video_length
        self.latents = nn.Parameter(torch.randn(1, queries, cfg.dim) / cfg.dim**0.5)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), _feed_forward(cfg.dim, cfg.ff_mult)]
            )
            for _ in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)  # [b, (t q), dim]
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
