"""OpenCLIP ViT-H-14 towers as ToonCrafter uses them: text tokens and image tokens, never embeddings.

* `CLIPTextEncoder`: tokens of the penultimate text layer, after `ln_final` ([b, 77, 1024]); the SD-2.x
  convention of the reference's FrozenOpenCLIPEmbedder (MODEL.md 1.5).
* `CLIPImageEncoder`: all 257 visual tokens before `ln_post` and `proj` ([b, 257, 1280]), with the
  reference's own preprocessing (antialiased bicubic resize to 224 without crop, CLIP mean/std); the
  reference's FrozenOpenCLIPImageEmbedderV2 (MODEL.md 1.6).

The towers are open_clip's own modules (built without weights), so keys are open_clip's. Each wrapper keeps
the tensors the reference's state dict holds although they are never used (block 23 of the text tower, the
text `text_projection`/`logit_scale`, the image tower's leftover text embedding/`ln_final`, `ln_post`,
`proj`), so that released checkpoints load strictly (MODEL.md 1.2, Appendix B). The keys were recorded with
open_clip 2.22; open_clip 3.3 names every one of them the same way (checked by the key tests).

open_clip is imported when a tower is built: importing this module stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 1024  # joint text/image embedding width (unused projections keep this shape)
    vocab_size: int = 49408  # BPE vocabulary of open_clip's tokenizer
    context_length: int = 77  # text tokens
    text_width: int = 1024  # text transformer width = output token width
    text_heads: int = 16  # text attention heads
    text_layers: int = 24  # text transformer blocks (all stored, not all run)
    text_skip_last: int = 1  # blocks skipped at the end: 1 = penultimate layer (the reference's choice)
    image_size: int = 224  # side of the square the image is resized to
    patch_size: int = 14  # ViT patch side
    vision_width: int = 1280  # vision transformer width = output token width
    vision_layers: int = 32  # vision transformer blocks
    vision_head_width: int = 80  # width per vision attention head (heads = width / head_width)
    antialias: bool = True  # Gaussian pre-blur before downscaling, as kornia.geometry.resize(antialias=True)


CLIP_PRESETS: dict[str, CLIPConfig] = {
    # Tiny towers built from the same open_clip classes; the real vocabulary so open_clip.tokenize works.
    "tiny": CLIPConfig(
        embed_dim=32,
        text_width=32,
        text_heads=2,
        text_layers=2,
        image_size=28,
        vision_width=80,
        vision_layers=2,
        vision_head_width=40,
    ),
    # OpenCLIP ViT-H-14 (laion2b_s32b_b79k), as open_clip's model_configs/ViT-H-14.json.
    "toon-512": CLIPConfig(),
}


def _text_cfg(cfg: CLIPConfig):
    from open_clip.model import CLIPTextCfg

    return CLIPTextCfg(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.text_width,
        heads=cfg.text_heads,
        layers=cfg.text_layers,
    )


def _logit_scale() -> nn.Parameter:
    return nn.Parameter(torch.full((), math.log(1 / 0.07)))


class _TextParts(nn.Module):
    """The text half of open_clip's CLIP, with CLIP's attribute names (the reference deletes `visual`)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        from open_clip.model import _build_text_tower

        text = _build_text_tower(cfg.embed_dim, _text_cfg(cfg))
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection  # unused: tokens are taken before pooling/projection
        self.logit_scale = _logit_scale()  # unused, kept for strict loading
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)  # causal, additive -inf

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)create the non-persistent causal mask, e.g. after loading weights into a meta-built model."""
        n = self.positional_embedding.shape[0]
        self.attn_mask = torch.full((n, n), float("-inf"), device=device).triu_(1)


class _ImageParts(nn.Module):
    """The vision half of open_clip's CLIP plus the text leftovers the reference keeps (it deletes only the
    text `transformer`): token_embedding, positional_embedding, ln_final, text_projection, logit_scale."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        vision = CLIPVisionCfg(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.vision_width,
            layers=cfg.vision_layers,
            head_width=cfg.vision_head_width,
        )
        self.visual = _build_vision_tower(cfg.embed_dim, vision)
        # Leftovers, never used; plain tensors of open_clip's shapes (building the text tower would cost 300M).
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.text_width, cfg.embed_dim))
        self.logit_scale = _logit_scale()


def _run_blocks(transformer: nn.Module, x: torch.Tensor, count: int, attn_mask: torch.Tensor | None):
    """The first `count` residual blocks of an open_clip Transformer on x [b, l, d] (batch first)."""
    batch_first = getattr(transformer, "batch_first", False)
    if not batch_first:
        x = x.transpose(0, 1)  # open_clip < 2.24 runs [l, b, d]
    for block in transformer.resblocks[:count]:
        x = block(x, attn_mask=attn_mask)
    return x if batch_first else x.transpose(0, 1)


class CLIPTextEncoder(nn.Module):
    """forward(tokens [b, context_length] int64) -> [b, context_length, text_width]. Keys `model.*`."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _TextParts(cfg)

    @staticmethod
    def tokenize(prompts: list[str]) -> torch.Tensor:
        """open_clip's BPE tokenizer, 77 tokens, zero-padded: [len(prompts), 77] int64 (on the CPU)."""
        import open_clip

        return open_clip.tokenize(prompts)

    @staticmethod
    def token_count(prompt: str) -> int:
        """How many BPE tokens the prompt is, start and end tokens left out (`tokenize` keeps 75)."""
        from open_clip.tokenizer import _tokenizer

        return len(_tokenizer.encode(prompt))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # [b, l, w]
        count = len(m.transformer.resblocks) - self.cfg.text_skip_last
        x = _run_blocks(m.transformer, x, count, m.attn_mask.to(x.dtype))
        return m.ln_final(x)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [len(prompts), 77, text_width] on this module's device."""
        return self(self.tokenize(prompts).to(self.model.positional_embedding.device))

    def init_buffers(self, device: torch.device | str) -> None:
        self.model.init_buffers(device)


def _gaussian_kernel1d(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def antialiased_resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bicubic resize (align_corners=True) of x [b, c, H, W], Gaussian pre-blurred when shrinking.

    The same computation as kornia.geometry.resize(x, size, "bicubic", align_corners=True, antialias=True),
    which the reference uses: sigma = (factor - 1) / 2 per axis, odd kernel >= 3, reflect padding.
    """
    h, w = x.shape[-2:]
    factors = (h / size[0], w / size[1])
    if antialias and max(factors) > 1:
        sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
        sizes = [int(max(4.0 * s, 3)) for s in sigmas]
        sizes = [k if k % 2 else k + 1 for k in sizes]
        c = x.shape[1]
        ky = _gaussian_kernel1d(sizes[0], sigmas[0], x).view(1, 1, -1, 1).expand(c, 1, -1, 1)
        kx = _gaussian_kernel1d(sizes[1], sigmas[1], x).view(1, 1, 1, -1).expand(c, 1, 1, -1)
        py, px = sizes[0] // 2, sizes[1] // 2
        x = F.pad(x, (px, px, py, py), mode="reflect")
        x = F.conv2d(F.conv2d(x, ky, groups=c), kx, groups=c)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


class CLIPImageEncoder(nn.Module):
    """forward(images [b, 3, H, W] in [-1, 1], any H, W) -> [b, 1 + (image_size/patch)^2, vision_width].

    Keys `model.*`; the preprocessing mean/std are non-persistent buffers (absent from checkpoints).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _ImageParts(cfg)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)create the non-persistent mean/std, e.g. after loading weights into a meta-built model."""
        self.mean = torch.tensor(CLIP_MEAN, device=device)
        self.std = torch.tensor(CLIP_STD, device=device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] at any size -> CLIP-normalised [b, 3, image_size, image_size]; squashes, never crops."""
        size = (self.cfg.image_size, self.cfg.image_size)
        x = (antialiased_resize(images, size, self.cfg.antialias) + 1.0) / 2.0
        return (x - self.mean[:, None, None].to(x)) / self.std[:, None, None].to(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.conv1(self.preprocess(images))  # [b, w, g, g]
        x = x.flatten(2).transpose(1, 2)  # [b, g*g, w]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [b, 1 + g*g, w]
        x = v.ln_pre(v.patch_dropout(x))
        return _run_blocks(v.transformer, x, len(v.transformer.resblocks), None)
