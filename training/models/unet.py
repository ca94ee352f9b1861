"""The DynamiCrafter interpolation UNet (`UNet3D`), the denoiser of ToonCrafter.

A Stable-Diffusion-2.1 style 2-D UNet applied to every frame, interleaved with temporal layers: a
temporal convolution inside every ResBlock and a temporal transformer after every spatial transformer,
plus one extra temporal transformer (`init_attn`) after the input convolution. Cross-attention reads
77 text tokens shared by all frames and 16 image tokens per frame through separate key/value
projections. The frame stride `fs` is embedded like the timestep and added to the time embedding.

State-dict keys equal the reference's (`input_blocks.1.0.temopral_conv...`, misspelling included);
see shared/reference/MODEL.md sections 1.3-1.4.

Layout: frames travel as batch items `(b t) c h w`; temporal layers fold them back to `b c t h w`.
`set_channels_last` (training/models/layout.py) stores those activations channels-last instead
((b t), h, w, c in memory), for a compiled UNet on a GPU: the convolutions' tensor-core kernels read
and write that layout, so nothing converts to and from it around each one, and folding frames to
`b c t h w` and pixels to tokens become views. The values are the same; only the strides change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.models.attention import SpatialTransformer, TemporalTransformer
from training.models.layout import GroupNorm, channels_last_format


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 8  # 4 noisy-latent channels + 4 keyframe-condition channels
    out_channels: int = 4  # v-prediction, latent channels
    model_channels: int = 320  # width of level 0; the time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per resolution level
    num_res_blocks: int = 2  # ResBlocks per level going down (one more per level going up)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get transformers
    num_head_channels: int = 64  # width of one attention head; heads = width // this
    transformer_depth: int = 1  # transformer blocks per spatial/temporal transformer
    context_dim: int = 1024  # width of the text and image context tokens
    dropout: float = 0.1  # ResBlock dropout (train mode only)
    temporal_conv_dropout: float = 0.1  # dropout inside the temporal conv block (hard-coded in the reference)
    use_linear: bool = True  # Linear (not 1x1 conv) proj_in/proj_out in the transformers
    temporal_conv: bool = True  # temporal conv block (`temopral_conv`) inside every ResBlock
    temporal_attention: bool = True  # temporal transformer after every spatial transformer
    temporal_causal: bool = False  # causal mask in temporal attention (reference `use_causal_attention`)
    init_attention: bool = True  # `init_attn`: temporal transformer after the input conv (Conv1d proj)
    init_attention_heads: int = 8  # its heads; head width is num_head_channels (inner 512 at 512)
    image_cross_attention: bool = True  # separate `to_k_ip`/`to_v_ip` for the image tokens
    image_scale_learnable: bool = False  # learned image-branch weight `alpha` (absent in the release)
    text_tokens: int = 77  # text tokens at the start of the context (hard-coded in the reference)
    image_tokens_per_frame: int = 16  # image tokens per frame after the text (hard-coded in the reference)
    fs_condition: bool = True  # frame-stride conditioning through `fps_embedding`
    default_fs: int = 24  # frame stride used when forward gets fs=None
    temporal_length: int = 16  # clip length the model was trained for (forward accepts any t)
    gradient_checkpointing: bool = False  # recompute each block in backward (train mode only)
    # With gradient_checkpointing: recompute only the blocks whose input is at one of the N finest
    # resolution levels (1: the latent resolution only); 0 recomputes every block. Every level costs
    # about the same FLOPs, but the finer a level, the more activation memory per FLOP it holds.
    checkpoint_levels: int = 0

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


UNET_PRESETS: dict[str, UNetConfig] = {
    # A forward pass on CPU in well under a second; same topology as toon-512 (attention everywhere
    # but the deepest level, init_attn, fs, image cross-attention), GroupNorm needs widths % 32 == 0.
    "tiny": UNetConfig(
        model_channels=32,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_head_channels=8,
        context_dim=32,
    ),
    # The released ToonCrafter / DynamiCrafter-512-interp UNet (TC configs/inference_512_v1.0.yaml).
    "toon-512": UNetConfig(),
}

# Reference constructor arguments (lvdm UNetModel) that this implementation only supports at one value.
_FIXED_REFERENCE_KWARGS: dict[str, Any] = {
    "dims": 2,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_relative_position": False,
    "tempspatial_aware": False,
    "num_classes": None,
}
_RENAMED_REFERENCE_KWARGS: dict[str, str] = {
    "use_checkpoint": "gradient_checkpointing",
    "use_causal_attention": "temporal_causal",
    "addition_attention": "init_attention",
    "image_cross_attention_scale_learnable": "image_scale_learnable",
}
# Accepted and ignored: temporal_selfatt_only (the reference hard-codes True), use_fp16 (precision is the
# entry point's choice).
_IGNORED_REFERENCE_KWARGS = {"temporal_selfatt_only", "use_fp16"}


def unet_config_from_reference(kwargs: dict[str, Any]) -> UNetConfig:
    """Map the reference `UNetModel(**kwargs)` constructor arguments onto a `UNetConfig`.

    Unknown arguments and values this implementation does not support raise ValueError.
    """
    own = {f.name for f in fields(UNetConfig)}
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _FIXED_REFERENCE_KWARGS:
            if value != _FIXED_REFERENCE_KWARGS[key]:
                raise ValueError(f"reference UNet option {key}={value!r} is not supported")
        elif key in _IGNORED_REFERENCE_KWARGS:
            continue
        elif key == "num_heads":
            if value != -1:
                raise ValueError("reference option num_heads is not supported; give num_head_channels")
        elif key in _RENAMED_REFERENCE_KWARGS:
            values[_RENAMED_REFERENCE_KWARGS[key]] = bool(value)
        elif key in own:
            values[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"unknown reference UNet option {key!r}")
    return replace(UNetConfig(), **values)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps [n] -> [n, dim] (fp32)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(GroupNorm):
    """GroupNorm(32) computed in fp32 and cast back, as the reference's `normalization`."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _embedding_mlp(model_channels: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(model_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))


TEMPORAL_CONV_IMPLS = ("conv3d", "conv2d")


class TemporalConvBlock(nn.Module):
    """Four GroupNorm-SiLU-Conv3d(3,1,1) layers over time, residual (from ModelScope). x [b c t h w].

    `impl` picks the kernel, not the math: "conv3d" calls the Conv3d modules; "conv2d" runs the same
    weights as a (3, 1) Conv2d over [b, c, t, h*w] (on an H100 not faster: BENCHMARKS.md; kept so that
    training.profile_unet compares them on each card). The parameters (and so the checkpoint keys) are
    the Conv3d's either way; `set_temporal_conv` sets it."""

    impl = "conv3d"

    def __init__(self, channels: int, dropout: float):
        super().__init__()

        def layer(with_dropout: bool) -> nn.Sequential:
            drop = [nn.Dropout(dropout)] if with_dropout else []
            conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))  # zero padding beyond the clip
            return nn.Sequential(GroupNorm(32, channels), nn.SiLU(), *drop, conv)

        self.conv1 = layer(with_dropout=False)
        self.conv2 = layer(with_dropout=True)
        self.conv3 = layer(with_dropout=True)
        self.conv4 = layer(with_dropout=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = channels_last_format(x)  # a channels-last input's layout stays (a CPU Conv3d drops it)
        h = x
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            if self.impl == "conv3d":
                h = layer(h)
            else:
                *pre, conv = layer
                for module in pre:
                    h = module(h)
                h = temporal_conv2d(h, conv)
            h = h if fmt is None else h.contiguous(memory_format=fmt)
        return x + h


def temporal_conv2d(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A (k, 1, 1) Conv3d over x [b, c, t, h, w] computed as a (k, 1) Conv2d over [b, c, t, h*w]."""
    b, _, t, height, width = x.shape
    y = F.conv2d(
        x.reshape(b, x.shape[1], t, height * width),
        conv.weight.squeeze(-1),
        conv.bias,
        padding=(conv.padding[0], 0),
    )
    return y.view(b, y.shape[1], t, height, width)


def set_temporal_conv(net: nn.Module, impl: str) -> None:
    """Run every temporal conv block of `net` with `impl` (one of TEMPORAL_CONV_IMPLS)."""
    if impl not in TEMPORAL_CONV_IMPLS:
        raise ValueError(f"temporal conv implementation {impl!r}: one of {TEMPORAL_CONV_IMPLS}")
    for module in net.modules():
        if isinstance(module, TemporalConvBlock):
            module.impl = impl


class ResBlock(nn.Module):
    """Spatial residual block with an additive time embedding, then the temporal conv block.

    x [(b t), c_in, h, w], emb [(b t), time_embed_dim] -> [(b t), c_out, h, w].
    """

    def __init__(self, channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        if cfg.temporal_conv:
            self.temopral_conv = TemporalConvBlock(
                out_channels, cfg.temporal_conv_dropout
            )  # reference spelling

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if hasattr(self, "temopral_conv"):
            h = rearrange(h, "(b t) c h w -> b c t h w", t=frames)
            h = self.temopral_conv(h)
            h = rearrange(h, "b c t h w -> (b t) c h w")
        return h


class Downsample(nn.Module):
    """Strided 3x3 conv, halves h and w."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / output_blocks / middle_block: layers that each get what they need."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        frames: int,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Layers [start:stop] (all by default)."""
        for layer in list(self)[start:stop]:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
                x = rearrange(layer(x), "b c t h w -> (b t) c h w")
            else:
                x = layer(x)
        return x

    def layers_before_context(self) -> int:
        """How many leading layers run without reading the context (all, when none reads it)."""
        for i, layer in enumerate(self):
            if isinstance(layer, SpatialTransformer):
                return i
        return len(self)


def _transformers(channels: int, cfg: UNetConfig) -> list[nn.Module]:
    heads = channels // cfg.num_head_channels
    layers: list[nn.Module] = [
        SpatialTransformer(
            channels,
            heads,
            cfg.num_head_channels,
            cfg.transformer_depth,
            cfg.context_dim,
            cfg.use_linear,
            image_context=cfg.image_cross_attention,
            image_scale_learnable=cfg.image_scale_learnable,
            text_tokens=cfg.text_tokens,
        )
    ]
    if cfg.temporal_attention:
        layers.append(
            TemporalTransformer(
                channels,
                heads,
                cfg.num_head_channels,
                cfg.transformer_depth,
                cfg.use_linear,
                causal=cfg.temporal_causal,
            )
        )
    return layers


class UNet3D(nn.Module):
    """forward(x [b, in_channels, t, h, w], timesteps [b], context [b, l, context_dim], fs [b] | None,
    control list | None) -> [b, out_channels, t, h, w]."""

    channels_last = False  # activations stored channels-last: set_channels_last

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        self.time_embed = _embedding_mlp(ch, cfg.time_embed_dim)
        if cfg.fs_condition:
            self.fps_embedding = _embedding_mlp(ch, cfg.time_embed_dim)

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        if cfg.init_attention:
            init_attn = TemporalTransformer(
                ch, cfg.init_attention_heads, cfg.num_head_channels, cfg.transformer_depth, use_linear=False
            )
            self.init_attn = UNetBlock(init_attn)
        skip_channels = [ch]
        ds = 1  # current downsampling factor
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * cfg.model_channels, cfg)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers += _transformers(ch, cfg)
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        # The middle block always has both transformers, whatever attention_resolutions says.
        self.middle_block = UNetBlock(ResBlock(ch, ch, cfg), *_transformers(ch, cfg), ResBlock(ch, ch, cfg))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * cfg.model_channels, cfg)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers += _transformers(ch, cfg)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Zero the last layer of every residual branch, so that a fresh block is the identity and the
        frame-stride embedding starts as a no-op (the reference's zero_module choices)."""
        zero: list[nn.Module] = [self.out[-1]]
        if self.cfg.fs_condition:
            zero.append(self.fps_embedding[-1])
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero.append(module.out_layers[-1])
            elif isinstance(module, TemporalConvBlock):
                zero.append(module.conv4[-1])
            elif isinstance(module, SpatialTransformer | TemporalTransformer):
                zero.append(module.proj_out)
        for module in zero:
            for p in module.parameters():
                p.zero_()

    def set_gradient_checkpointing(self, enabled: bool = True, levels: int = 0) -> None:
        """Recompute blocks' activations in backward (train mode); results are unchanged. `levels` > 0
        limits it to the blocks at the `levels` finest resolutions (UNetConfig.checkpoint_levels)."""
        if levels < 0:
            raise ValueError(f"checkpoint levels must be >= 0 (0 = every block), got {levels}")
        self.cfg = replace(self.cfg, gradient_checkpointing=enabled, checkpoint_levels=levels)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by kind (MODEL.md 5.4), for freezing by role: `temporal_conv`, `temporal_attention`,
        `init_attention` (all three temporal), `image_kv` (to_k_ip/to_v_ip) and `spatial` (everything else)."""
        owners: list[tuple[str, str]] = []  # (module prefix, group)
        for name, module in self.named_modules():
            if isinstance(module, TemporalConvBlock):
                owners.append((name + ".", "temporal_conv"))
            elif isinstance(module, TemporalTransformer):
                owners.append(
                    (name + ".", "init_attention" if name.startswith("init_attn.") else "temporal_attention")
                )
            elif name.endswith((".to_k_ip", ".to_v_ip")):
                owners.append((name + ".", "image_kv"))
        groups: dict[str, list[str]] = {
            g: [] for g in ("temporal_conv", "temporal_attention", "init_attention")
        }
        groups.update(image_kv=[], spatial=[])
        for name, _ in self.named_parameters():
            group = next((g for prefix, g in owners if name.startswith(prefix)), "spatial")
            groups[group].append(name)
        return groups

    def _run(
        self,
        block: UNetBlock,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        t: int,
        width: int,
        start: int = 0,
        stop: int | None = None,
    ):
        if self._recompute(h, width):
            return checkpoint(block, h, emb, context, t, start, stop, use_reentrant=False)
        return block(h, emb, context, t, start, stop)

    def _run_parting(
        self,
        block: UNetBlock,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        t: int,
        width: int,
        skips: list[torch.Tensor],
        branches: int,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
        """`_run` for inputs shared by `branches` contexts (forward's docstring): where the block's first
        context-reading layer starts, h, emb and the skips so far are repeated for each branch."""
        split = block.layers_before_context() if branches > 1 else len(block)
        if split == len(block):
            return self._run(block, h, emb, context, t, width), emb, skips, branches
        if split:
            h = self._run(block, h, emb, context, t, width, stop=split)
        h, emb = self._layout(h.repeat(branches, 1, 1, 1)), emb.repeat(branches, 1)
        skips = [self._layout(s.repeat(branches, 1, 1, 1)) for s in skips]
        return self._run(block, h, emb, context, t, width, start=split), emb, skips, 1

    def _layout(self, h: torch.Tensor) -> torch.Tensor:
        """h [(b t), c, h, w] in the layout the activations are kept in (a no-op when it already is)."""
        return h.contiguous(memory_format=torch.channels_last) if self.channels_last else h

    def _recompute(self, h: torch.Tensor, width: int) -> bool:
        """Whether the block taking `h` recomputes in backward; `width` is the latent's (level 0) width."""
        cfg = self.cfg
        if not (cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return False
        if cfg.checkpoint_levels <= 0:
            return True
        return resolution_level(width, h.shape[-1]) < cfg.checkpoint_levels

    def _frame_context(self, context: torch.Tensor, t: int) -> torch.Tensor:
        """[b, l, d] -> [(b t), l', d]: every frame gets the text tokens and, when the context holds
        exactly `image_tokens_per_frame` image tokens per frame, its own image tokens."""
        cfg = self.cfg
        if context.shape[1] == cfg.text_tokens + t * cfg.image_tokens_per_frame:
            text = context[:, : cfg.text_tokens].repeat_interleave(t, dim=0)
            image = rearrange(context[:, cfg.text_tokens :], "b (t l) d -> (b t) l d", t=t)
            return torch.cat([text, image], dim=1)
        return context.repeat_interleave(t, dim=0)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fs: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`control`: optional residuals of a frame-wise control encoder (sketch), one per input block
        plus one for the middle block, each [(b t), c, h, w] (or [b, c, t, h, w]), one row per context
        row: the last is added to the middle-block output, the others in reverse order to the skips
        before concatenation.

        `context` may hold k contexts per sample ([k b, l, d]: the guidance branches, branch-major), for
        inputs that are the same in every branch (x, timesteps, fs): the layers before the first one that
        reads the context (the input conv, the temporal attention after it, the first res-block) then run
        once on b samples instead of k times, and the output is [k b, ...] in the context's order, what
        `forward(x repeated k times, ...)` returns (two guidance branches of toon-512 at 16x320x512: 2.8% of
        the call's FLOPs saved)."""
        cfg = self.cfg
        b, _, t, _, _ = x.shape
        branches, rest = divmod(context.shape[0], b)
        if rest or not branches:
            raise ValueError(f"context holds {context.shape[0]} rows for a batch of {b}: expected a multiple")
        emb = self.time_embed(timesteps_embedding_like(timesteps, cfg.model_channels, x))  # [b, 4*ch]
        if cfg.fs_condition:
            if fs is None:
                fs = torch.full((b,), cfg.default_fs, dtype=torch.long, device=x.device)
            emb = emb + self.fps_embedding(timesteps_embedding_like(fs, cfg.model_channels, x))
        emb = emb.repeat_interleave(t, dim=0)  # [(b t), 4*ch]
        context = self._frame_context(context, t)  # [(b t), l, d]

        h = self._layout(rearrange(x, "b c t h w -> (b t) c h w"))
        width = h.shape[-1]
        skips = []

        for i, block in enumerate(self.input_blocks):
            h, emb, skips, branches = self._run_parting(block, h, emb, context, t, width, skips, branches)
            if i == 0 and cfg.init_attention:
                h, emb, skips, branches = self._run_parting(
                    self.init_attn, h, emb, context, t, width, skips, branches
                )
            skips.append(h)
        # the middle block always reads the context: the branches have parted by its end
        h, emb, skips, branches = self._run_parting(
            self.middle_block, h, emb, context, t, width, skips, branches
        )

        residuals = _control_residuals(control, len(skips) + 1, t)
        if residuals:
            h = h + residuals.pop()
        for block in self.output_blocks:
            skip = skips.pop()
            if residuals:
                skip = skip + residuals.pop()
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, t, width)
        y = rearrange(self.out(h), "(b t) c h w -> b c t h w", t=t)
        return y.contiguous() if self.channels_last else y


def resolution_level(latent_width: int, width: int) -> int:
    """How many 2x downsamplings separate a feature map of `width` from the latent's (0 = the same)."""
    level = 0
    while latent_width > width:
        latent_width = (latent_width + 1) // 2  # a stride-2 conv with padding 1 rounds up
        level += 1
    return level


def timesteps_embedding_like(timesteps: torch.Tensor, dim: int, x: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of [b] timesteps in the dtype of x."""
    return timestep_embedding(timesteps, dim).type(x.dtype)


def _control_residuals(control: list[torch.Tensor] | None, expected: int, t: int) -> list[torch.Tensor]:
    if control is None:
        return []
    if len(control) != expected:
        raise ValueError(
            f"control must hold {expected} residuals (one per input block + middle), got {len(control)}"
        )
    return [rearrange(c, "b c t h w -> (b t) c h w") if c.ndim == 5 else c for c in control]
