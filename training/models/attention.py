"""Attention layers of the video UNet: spatial and temporal transformers.

Built on `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
exact math on CPU); no xformers. Module and attribute names follow the reference so that the state-dict
keys match the released checkpoints (`attn1`, `attn2`, `to_k_ip`, `ff.net.0.proj`, ...).

Shapes: spatial layers see frames as batch items `(b t) c h w`; temporal layers see `b c t h w` and
attend over t for every pixel, i.e. batch `(b h w)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from training.models.layout import GroupNorm


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head width). q [n, i, h*d], k/v [n, j, h*d] -> [n, i, h*d]."""
    q, k, v = (rearrange(z, "n l (h d) -> n h l d", h=heads) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [n, h, i, d]
    return rearrange(out, "n h l d -> n l (h d)")


class Attention(nn.Module):
    """Multi-head self- or cross-attention, optionally with a decoupled image branch (IP-Adapter style).

    With `image_context=True`, a cross-attention context of `text_tokens` text tokens followed by image
    tokens is split: `out = attn(q, text) + scale * attn(q, image)`, the image keys/values coming from
    their own projections `to_k_ip` / `to_v_ip`. Without it, only the first `text_tokens` tokens of a
    context are used (the reference truncates the same way).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        image_context: bool = False,
        image_scale: float = 1.0,
        image_scale_learnable: bool = False,
        text_tokens: int = 77,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.text_tokens = text_tokens
        self.image_context = image_context
        self.image_scale = image_scale
        self.image_scale_learnable = image_scale_learnable
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        if image_context:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
            if image_scale_learnable:
                self.alpha = nn.Parameter(torch.zeros(()))  # image weight = scale * (tanh(alpha) + 1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        # x [n, i, query_dim]; context [n, j, context_dim] or None for self-attention
        q = self.to_q(x)
        if context is None:
            return self.to_out(attention(q, self.to_k(x), self.to_v(x), self.heads, causal))
        text = context[:, : self.text_tokens]
        out = attention(q, self.to_k(text), self.to_v(text), self.heads, causal)
        if self.image_context:
            image = context[:, self.text_tokens :]
            out_ip = attention(q, self.to_k_ip(image), self.to_v_ip(image), self.heads, causal)
            weight = self.image_scale
            if self.image_scale_learnable:
                weight = weight * (torch.tanh(self.alpha) + 1)
            out = out + weight * out_ip
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: Linear(dim -> 2*inner), `x * gelu(gate)` (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, (cross-)attention, feed-forward, each residual.

    `attn2` is a cross-attention when `context_dim` is given and a second self-attention otherwise
    (temporal layers). Registration order (attn1, ff, attn2, norms) follows the reference key order.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        image_context: bool = False,
        image_scale_learnable: bool = False,
        text_tokens: int = 77,
    ):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(
            dim,
            context_dim,
            heads,
            dim_head,
            image_context=image_context,
            image_scale_learnable=image_scale_learnable,
            text_tokens=text_tokens,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        x = self.attn1(self.norm1(x), causal=causal) + x
        x = self.attn2(self.norm2(x), context, causal=causal) + x
        return self.ff(self.norm3(x)) + x


def _projection(dim_in: int, dim_out: int, linear: bool, conv: type[nn.Module]) -> nn.Module:
    return nn.Linear(dim_in, dim_out) if linear else conv(dim_in, dim_out, kernel_size=1)


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h*w pixels of each frame, with text (+ image) cross-attention.

    x [(b t), c, h, w], context [(b t), l, context_dim] -> [(b t), c, h, w]. `proj_out` is zero-initialised
    by `init_weights` of the model, so a fresh layer is the identity.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = True,
        image_context: bool = False,
        image_scale_learnable: bool = False,
        text_tokens: int = 77,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm(32, channels, eps=1e-6)
        self.proj_in = _projection(channels, inner, use_linear, nn.Conv2d)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                inner, heads, dim_head, context_dim, image_context, image_scale_learnable, text_tokens
            )
            for _ in range(depth)
        )
        self.proj_out = _projection(inner, channels, use_linear, nn.Conv2d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "n c h w -> n (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "n (h w) c -> n c h w", h=height, w=width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class TemporalTransformer(nn.Module):
    """Transformer over the t frames of every pixel; both attentions are self-attentions.

    x [b, c, t, h, w] -> same. No positional encoding: frame order reaches these layers only through
    the temporal convolutions and the keyframe concat channels. GroupNorm statistics span (t, h, w).
    With `use_linear=False` the projections are 1x1 Conv1d (the `init_attn` layer).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        use_linear: bool = True,
        causal: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.causal = causal
        self.norm = GroupNorm(32, channels, eps=1e-6)
        self.proj_in = _projection(channels, inner, use_linear, nn.Conv1d)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head) for _ in range(depth)
        )
        self.proj_out = _projection(inner, channels, use_linear, nn.Conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, height, width = x.shape
        h = rearrange(self.norm(x), "b c t h w -> (b h w) c t")
        if not self.use_linear:
            h = self.proj_in(h)  # Conv1d over channels: [(b h w), inner, t]
        h = rearrange(h, "n c t -> n t c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, causal=self.causal)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "n t c -> n c t")
        if not self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "(b h w) c t -> b c t h w", b=b, h=height, w=width)
        return x + h
