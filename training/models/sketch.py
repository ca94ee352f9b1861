"""The sketch encoder: a frame-wise ControlNet whose residuals steer the UNet towards per-frame sketches.

A copy of the UNet's 2-D encoder half (input blocks + middle block, no temporal layers, no image K/V)
that reads the 4-channel noisy latent of each frame, plus a small conv stack (`input_hint_block`) that
brings the one-channel sketch (8x the latent resolution) down to the latent grid and adds it after the
input conv. A 1x1 zero conv after every input block and after the middle block produces one residual
per UNet skip plus one for the middle block: exactly the `control` list that `UNet3D.forward` consumes.

Compatibility target: the released `sketch_encoder.ckpt`, an SD-2.1 ControlNet (lllyasviel's
`cldm.ControlNet`) as the community fork ToonCrafter_with_SketchGuidance configures it
(shared/reference/MODEL.md section 4). State-dict keys equal `state_dict/tooncrafter_sketch_encoder.tsv`.

Usage (residuals are scaled here, by `cfg.control_scale` = 0.6 unless `scale=` says otherwise):

    control = encoder(x_noisy, sketch, timesteps, context, sketch_mask=mask)
    v = unet(torch.cat([x_noisy, concat], 1), timesteps, context, fs=fs, control=control)

Differences from the reference, on purpose:
- `sketch_mask` [b, t] (optional): frames marked False contribute nothing (zero residuals) and are not
  encoded at all. The reference has no mask: a frame without a sketch is an all-zero hint that still
  goes through the network and still yields (non-zero) residuals from the noisy latent. The default
  `sketch_mask=None` reproduces the reference.
- batches of several clips pair each clip with its own context; the fork repeats the context with
  `(repeat b)` ordering, which only pairs correctly for b = 1 (the only size it runs).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.models.attention import SpatialTransformer, TemporalTransformer
from training.models.unet import (
    Downsample,
    ResBlock,
    UNet3D,
    UNetBlock,
    UNetConfig,
    _embedding_mlp,
    _transformers,
    timesteps_embedding_like,
)

# (out width, stride) of the hint convs before the last one (-> model_channels, zero-initialised).
# Hard-coded full size in the reference, whatever model_channels is; the three stride-2 convs take the
# sketch from pixel to latent resolution (8x).
HINT_LAYERS: tuple[tuple[int, int], ...] = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))
HINT_DOWNSAMPLING = 8

# ldm cross-attention has no text/image split: every context token (77 text + 16 image tokens per frame)
# is a key through to_k/to_v. The UNet's attention keeps `text_tokens` tokens when it has no image branch.
_ALL_TOKENS = sys.maxsize


@dataclass(frozen=True)
class SketchEncoderConfig:
    in_channels: int = 4  # the noisy latent only; the UNet's keyframe-concat channels are not seen
    hint_channels: int = 1  # one grayscale sketch per frame, inverted: lines ~1, paper 0
    model_channels: int = 320  # width of level 0; the time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level (must equal the UNet's)
    num_res_blocks: int = 2  # ResBlocks per level (must equal the UNet's: one residual per skip)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a spatial transformer
    num_head_channels: int = 64  # width of one attention head; heads = width // this
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int = 1024  # width of the context tokens (text + image, attended jointly)
    dropout: float = 0.0  # ResBlock dropout, train mode only (the reference ControlNet's default)
    use_linear: bool = True  # Linear (not 1x1 conv) proj_in/proj_out in the transformers
    control_scale: float = (
        0.6  # multiplies every residual (the fork's app default); forward(scale=) overrides
    )
    gradient_checkpointing: bool = False  # recompute each block in backward (train mode only)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


SKETCH_ENCODER_PRESETS: dict[str, SketchEncoderConfig] = {
    # Mirrors UNET_PRESETS["tiny"] (residual counts and widths must match) and the parity fixture.
    "tiny": SketchEncoderConfig(
        model_channels=32,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_head_channels=8,
        context_dim=32,
    ),
    # The released sketch_encoder.ckpt (SD-2.1 ControlNet, hint_channels 1): 364,227,952 parameters.
    "toon-512": SketchEncoderConfig(),
}

# Reference constructor arguments (cldm ControlNet) that this implementation only supports at one value.
_FIXED_REFERENCE_KWARGS: dict[str, Any] = {
    "dims": 2,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_heads": -1,
    "n_embed": None,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
}
_RENAMED_REFERENCE_KWARGS = {
    "use_linear_in_transformer": "use_linear",
    "use_checkpoint": "gradient_checkpointing",
}
# Accepted and ignored: image_size (unused by the network), use_fp16 (precision is the entry point's),
# num_heads_upsample and use_new_attention_order (only for the AttentionBlock variant, not built here).
_IGNORED_REFERENCE_KWARGS = {"image_size", "use_fp16", "num_heads_upsample", "use_new_attention_order"}


def sketch_config_from_reference(kwargs: dict[str, Any], **overrides: Any) -> SketchEncoderConfig:
    """Map the reference `cldm.ControlNet(**kwargs)` constructor arguments (e.g. sketch.json's
    `constructor_kwargs.controlnet`) onto a `SketchEncoderConfig`; `overrides` set our own fields
    (e.g. `control_scale`). Unknown arguments and unsupported values raise ValueError."""
    own = {f.name for f in fields(SketchEncoderConfig)}
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _FIXED_REFERENCE_KWARGS:
            if value != _FIXED_REFERENCE_KWARGS[key]:
                raise ValueError(f"reference ControlNet option {key}={value!r} is not supported")
        elif key in _IGNORED_REFERENCE_KWARGS:
            continue
        elif key in _RENAMED_REFERENCE_KWARGS:
            values[_RENAMED_REFERENCE_KWARGS[key]] = bool(value)
        elif key == "num_res_blocks" and isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise ValueError("per-level num_res_blocks is not supported")
            values[key] = value[0]
        elif key in own:
            values[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"unknown reference ControlNet option {key!r}")
    return replace(SketchEncoderConfig(), **values, **overrides)


def _block_config(cfg: SketchEncoderConfig) -> UNetConfig:
    """The settings under which the UNet's building blocks are the reference ControlNet's 2-D blocks."""
    return UNetConfig(
        in_channels=cfg.in_channels,
        model_channels=cfg.model_channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=cfg.attention_resolutions,
        num_head_channels=cfg.num_head_channels,
        transformer_depth=cfg.transformer_depth,
        context_dim=cfg.context_dim,
        dropout=cfg.dropout,
        use_linear=cfg.use_linear,
        temporal_conv=False,  # frame-wise: no temopral_conv, no temporal transformers, no init_attn
        temporal_attention=False,
        init_attention=False,
        image_cross_attention=False,  # no to_k_ip/to_v_ip
        text_tokens=_ALL_TOKENS,
        fs_condition=False,  # the reference ControlNet does not see the frame stride
    )


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 1))  # key `<name>.0`, as the reference


def _hint_block(hint_channels: int, model_channels: int) -> nn.Sequential:
    """Sketch [n, hint_channels, 8h, 8w] -> [n, model_channels, h, w]; convs at even keys 0..14."""
    layers: list[nn.Module] = []
    width = hint_channels
    for out_width, stride in HINT_LAYERS:
        layers += [nn.Conv2d(width, out_width, 3, stride=stride, padding=1), nn.SiLU()]
        width = out_width
    layers.append(nn.Conv2d(width, model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def _halve(size: int, times: int) -> int:
    for _ in range(times):
        size = (size + 1) // 2  # a 3x3 stride-2 conv with padding 1
    return size


class SketchEncoder(nn.Module):
    """forward(x [b, in_channels, t, h, w], hint [b, hint_channels, t, 8h, 8w], timesteps [b],
    context [b, l, context_dim], sketch_mask [b, t] | None, scale | None)
    -> residuals: len(input_blocks) + 1 tensors [(b t), c_i, h_i, w_i], ready for `UNet3D(control=...)`."""

    def __init__(self, cfg: SketchEncoderConfig):
        super().__init__()
        self.cfg = cfg
        block_cfg = _block_config(cfg)
        ch = cfg.model_channels
        self.time_embed = _embedding_mlp(ch, cfg.time_embed_dim)

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        self.zero_convs = nn.ModuleList([_zero_conv(ch)])
        self.input_hint_block = _hint_block(cfg.hint_channels, ch)
        # (channels, downsamplings) of every residual, for the shapes of an all-masked call
        self.residual_layout: list[tuple[int, int]] = [(ch, 0)]
        downsamplings = 0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * cfg.model_channels, block_cfg)]
                ch = mult * cfg.model_channels
                if 2**downsamplings in cfg.attention_resolutions:
                    layers += _transformers(ch, block_cfg)
                self.input_blocks.append(UNetBlock(*layers))
                self.zero_convs.append(_zero_conv(ch))
                self.residual_layout.append((ch, downsamplings))
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                self.zero_convs.append(_zero_conv(ch))
                downsamplings += 1
                self.residual_layout.append((ch, downsamplings))

        # Like the UNet's middle block minus its temporal transformer: keys middle_block.{0,1,2}.
        self.middle_block = UNetBlock(
            ResBlock(ch, ch, block_cfg), *_transformers(ch, block_cfg), ResBlock(ch, ch, block_cfg)
        )
        self.middle_block_out = _zero_conv(ch)
        self.residual_layout.append((ch, downsamplings))
        self.init_weights()

    def output_convs(self) -> list[nn.Conv2d]:
        """The zero-initialised convs that end every new path: the zero convs, `middle_block_out` and
        the last conv of the hint block. At zero, the encoder leaves the UNet unchanged."""
        return [z[0] for z in self.zero_convs] + [self.middle_block_out[0], self.input_hint_block[-1]]

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's zero_module choices: the output convs, and the last layer of every residual
        branch (ResBlock out conv, transformer proj_out)."""
        zero: list[nn.Module] = list(self.output_convs())
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero.append(module.out_layers[-1])
            elif isinstance(module, SpatialTransformer):
                zero.append(module.proj_out)
        for module in zero:
            for p in module.parameters():
                p.zero_()

    def residual_shapes(self, frames: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the residuals for `frames` latent frames of height x width."""
        return [
            (frames, ch, _halve(height, times), _halve(width, times)) for ch, times in self.residual_layout
        ]

    def _run(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _encode(
        self, x: torch.Tensor, hint: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        # x [n, in_channels, h, w], hint [n, hint_channels, 8h, 8w], emb [n, 4*ch], context [n, l, d]
        guided_hint = self._run(self.input_hint_block, hint)  # [n, model_channels, h, w]
        residuals = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context, 1)  # 1 frame per item: no temporal layers
            if i == 0:
                h = h + guided_hint  # the sketch enters right after the input conv
            residuals.append(zero_conv(h))
        h = self._run(self.middle_block, h, emb, context, 1)
        residuals.append(self.middle_block_out(h))
        return residuals

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        sketch_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> list[torch.Tensor]:
        """x: the noisy latent x_t [b, in_channels, t, h, w] (not the UNet's 8-channel input);
        hint: the sketches [b, hint_channels, t, 8h, 8w], inverted ([0, 1], lines ~1);
        timesteps [b]; context [b, l, context_dim]: every frame attends to all l tokens;
        sketch_mask [b, t] (bool): False marks a frame without a sketch, whose residuals are zero and
        which is not encoded; None (the reference) encodes every frame, a blank hint included;
        scale: multiplies every residual, `cfg.control_scale` when None (1.0 gives the raw outputs).
        -> [(b t), c_i, h_i, w_i] per input block, then the middle block's."""
        b, _, t, height, width = x.shape
        if hint.shape[-2:] != (HINT_DOWNSAMPLING * height, HINT_DOWNSAMPLING * width):
            raise ValueError(
                f"sketch {tuple(hint.shape[-2:])} must be {HINT_DOWNSAMPLING}x the latent {(height, width)}"
            )
        scale = self.cfg.control_scale if scale is None else scale
        x = rearrange(x, "b c t h w -> (b t) c h w")
        hint = rearrange(hint, "b c t h w -> (b t) c h w").type(x.dtype)
        emb = self.time_embed(timesteps_embedding_like(timesteps, self.cfg.model_channels, x))  # [b, 4*ch]
        emb = emb.repeat_interleave(t, dim=0)  # [(b t), 4*ch]
        context = context.repeat_interleave(t, dim=0)  # [(b t), l, d]

        if sketch_mask is None:
            residuals = self._encode(x, hint, emb, context)
        else:
            if sketch_mask.shape != (b, t):
                raise ValueError(f"sketch_mask must be [b, t] = {(b, t)}, got {tuple(sketch_mask.shape)}")
            frames = rearrange(sketch_mask, "b t -> (b t)").nonzero().squeeze(1)  # sketched frame indices
            if frames.numel() == 0:
                return [x.new_zeros(s) for s in self.residual_shapes(b * t, height, width)]
            encoded = self._encode(x[frames], hint[frames], emb[frames], context[frames])
            residuals = [r.new_zeros((b * t, *r.shape[1:])).index_copy(0, frames, r) for r in encoded]
        return [r * scale for r in residuals]


class SketchInit(NamedTuple):
    copied: list[str]  # encoder keys copied from the UNet
    zeroed: list[str]  # keys of the output convs, set to zero
    kept: list[str]  # keys with no UNet counterpart (the hint block), left as they were


def _unet_key_map(encoder: SketchEncoder, unet: UNet3D) -> dict[str, str]:
    """Encoder layer prefix -> UNet layer prefix, pairing the i-th layer of an encoder block with the
    i-th non-temporal layer of the same UNet block (the UNet's middle block is Res, ST, TT, Res)."""
    prefixes = {"time_embed.": "time_embed."}
    pairs = [
        (f"input_blocks.{i}", enc, dit)
        for i, (enc, dit) in enumerate(zip(encoder.input_blocks, unet.input_blocks))
    ]
    pairs.append(("middle_block", encoder.middle_block, unet.middle_block))
    for name, enc_block, unet_block in pairs:
        spatial = [j for j, layer in enumerate(unet_block) if not isinstance(layer, TemporalTransformer)]
        for j, k in zip(range(len(enc_block)), spatial):
            prefixes[f"{name}.{j}."] = f"{name}.{k}."
    return prefixes


@torch.no_grad()
def init_from_unet(encoder: SketchEncoder, unet: UNet3D) -> SketchInit:
    """ControlNet initialisation: copy the UNet's weights into the encoder wherever a layer corresponds
    and the shapes match, and zero the output convs, so that the controlled UNet starts out equal to the
    plain UNet. The input conv copies the UNet's noisy-latent input channels (the leading `in_channels`):
    the UNet applies exactly that to a frame whose keyframe-concat channels are zero."""
    unet_state = unet.state_dict()
    prefixes = _unet_key_map(encoder, unet)
    zero = {id(p) for conv in encoder.output_convs() for p in conv.parameters()}
    copied, zeroed, kept = [], [], []
    for name, p in encoder.named_parameters():
        if id(p) in zero:
            p.zero_()
            zeroed.append(name)
            continue
        prefix = next((pre for pre in prefixes if name.startswith(pre)), None)
        source = unet_state.get(prefixes[prefix] + name[len(prefix) :]) if prefix else None
        if source is not None and name == "input_blocks.0.0.weight" and source.shape[1] > p.shape[1]:
            source = source[:, : p.shape[1]]  # [out, noisy + concat, 3, 3] -> the noisy-latent channels
        if source is not None and source.shape == p.shape:
            p.copy_(source)
            copied.append(name)
        else:
            kept.append(name)
    return SketchInit(copied, zeroed, kept)
