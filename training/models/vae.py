"""The KL autoencoder of ToonCrafter: the SD-style encoder and the dual-reference 3D decoder (MODEL.md 1.8, 3).

Two decoders share one class and one key layout:
* `dual_ref=False`: the plain SD decoder (DynamiCrafter's first stage); frames are independent images.
* `dual_ref=True`: ToonCrafter's VideoDecoder. Every ResnetBlock gains a temporal residual block (`time_stack`,
  Conv3d (3,1,1)) blended in with a learned sigmoid(`mix_factor`); `conv_out` gains a temporal conv
  (`time_mix_conv`); and `attn_refinement` injects the first/last keyframes' encoder features: cross-attention at
  the low-resolution levels (`ref_attn_levels`), zero-initialised 1x1 convs added to the first/last frame of the
  clip elsewhere and after `norm_out`.

Layouts: the encoder and all frame-wise layers see frames as batch items `(b t) c h w`; temporal layers see
`b c t h w`. Decoder calls take `timesteps` = frames per clip (the reference's name). Module and attribute names
follow the reference so that state-dict keys match `first_stage_model.*` of the released checkpoints.

Reference quirk kept on purpose (MODEL.md 3.6): the reference's `decode()` applies `post_quant_conv` only when
called without keyword arguments, and the dual-reference decoder is always called with `timesteps`, so on the
ToonCrafter path latents go straight into `decoder.conv_in` and `post_quant_conv` (present in the checkpoint) is
unused. `AutoencoderKL.decode` does the same: post_quant_conv runs for the plain decoder only, unless
`VAEConfig.video_post_quant_conv` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from training.models.layout import GroupNorm


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per resolution level (len - 1 downsamplings)
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more per level)
    attn_resolutions: tuple[
        int, ...
    ] = ()  # side lengths (of a `resolution` square) whose levels get self-attention
    resolution: int = 256  # nominal input side, only used to locate attn_resolutions
    z_channels: int = 4  # latent channels of encoder.conv_out (x2 for mean and logvar) and decoder.conv_in
    embed_dim: int = 4  # latent channels after quant_conv
    dropout: float = 0.0  # dropout inside the res blocks
    dual_ref: bool = True  # True: ToonCrafter's dual-reference VideoDecoder; False: the plain SD decoder
    ref_attn_levels: tuple[int, ...] = (
        2,
        3,
    )  # decoder levels refined by cross-attention; the others use Combiner
    ref_attn_heads: int = 8  # heads of the reference cross-attention (fixed, independent of the width)
    ref_attn_head_dim: int = 64  # width per head of the reference cross-attention
    video_kernel_size: tuple[int, int, int] = (3, 1, 1)  # (t, h, w) kernel of time_stack and time_mix_conv
    scale_factor: float = 0.18215  # diffusion latents = scale_factor * VAE latents
    video_post_quant_conv: bool = (
        False  # apply post_quant_conv before the dual-ref decoder too (not the reference)
    )


VAE_PRESETS: dict[str, VAEConfig] = {
    # the parity fixture's shrunk first stage: 4 levels kept so attn_refinement has the released layout
    "tiny": VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, resolution=32),
    # configs/inference_512_v1.0.yaml first_stage_config (AutoencoderKL_Dualref)
    "toon-512": VAEConfig(),
}


def vae_config_from_reference(kwargs: Mapping[str, Any], dual_ref: bool = True) -> VAEConfig:
    """VAEConfig from the reference constructor kwargs {"embed_dim", "ddconfig": {...}} (e.g. vae.json)."""
    dd = kwargs["ddconfig"]
    if not dd.get("double_z", True):
        raise ValueError("the reference AutoencoderKL asserts double_z")
    return VAEConfig(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=tuple(dd["attn_resolutions"]),
        resolution=dd["resolution"],
        z_channels=dd["z_channels"],
        embed_dim=kwargs["embed_dim"],
        dropout=dd.get("dropout", 0.0),
        dual_ref=dual_ref,
    )


# --- blocks ----------------------------------------------------------------------------------------------------


def _per_frame(fn: Callable[[Tensor], Tensor], x: Tensor, frame_chunk: int | None) -> Tensor:
    """fn(x) for a frame-wise fn over x [(b t) ...], run on `frame_chunk` frames at a time to bound memory."""
    if not frame_chunk or x.shape[0] <= frame_chunk:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(frame_chunk)], dim=0)


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 (the reference's name)
    return GroupNorm(32, channels, eps=1e-6)  # keeps a channels-last layout (set_channels_last)


class ResnetBlock(nn.Module):
    """SD VAE residual block without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def spatial(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h

    def forward(self, x: Tensor, timesteps: int | None = None, frame_chunk: int | None = None) -> Tensor:
        return _per_frame(self.spatial, x, frame_chunk)


def resnet_blocks(module: nn.Module) -> list[ResnetBlock]:
    """The residual blocks (dual-reference ones included) inside `module`: the units that regional
    torch.compile fuses (GroupNorm + SiLU + casts around each conv, the VAE's memory-bound work)."""
    return [m for m in module.modules() if isinstance(m, ResnetBlock)]


class TimeStack(nn.Module):
    """Temporal residual block on b c t h w: x + out_layers(in_layers(x)), Conv3d kernel (3,1,1), no time embedding.

    The reference (an openaimodel ResBlock with dims=3) normalises with GroupNorm eps 1e-5 and zero-initialises
    the last conv, so that the block starts as the identity.
    """

    def __init__(self, channels: int, kernel: Sequence[int], dropout: float = 0.0):
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv3d(channels, channels, tuple(kernel), padding=pad)
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv3d(channels, channels, tuple(kernel), padding=pad),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out_layers(self.in_layers(x))


class VideoResBlock(ResnetBlock):
    """ResnetBlock per frame, then a temporal block blended in: a * time_stack(h) + (1 - a) * h, a = sigmoid(mix)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], dropout: float = 0.0):
        super().__init__(in_channels, out_channels, dropout)
        self.time_stack = TimeStack(out_channels, kernel, dropout)
        self.mix_factor = nn.Parameter(torch.zeros(1))  # the reference's alpha=0 init: a = 0.5

    def forward(self, x: Tensor, timesteps: int | None = None, frame_chunk: int | None = None) -> Tensor:
        if timesteps is None:
            raise ValueError("the dual-reference decoder needs timesteps (frames per clip)")
        h = super().forward(x, frame_chunk=frame_chunk)
        h = rearrange(h, "(b t) c h w -> b c t h w", t=timesteps)
        a = torch.sigmoid(self.mix_factor)
        h = a * self.time_stack(h) + (1.0 - a) * h
        return rearrange(h, "b c t h w -> (b t) c h w")


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (SD's AttnBlock / MemoryEfficientAttnBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "n c h w -> n 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [n, 1, hw, c], scale c^-0.5
        out = rearrange(out, "n 1 (h w) c -> n c h w", h=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AE3DConv(nn.Conv2d):
    """conv_out of the video decoder: a per-frame 3x3 conv, then `time_mix_conv` over time (no residual)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__(in_channels, out_channels, 3, padding=1)
        pad = tuple(k // 2 for k in kernel)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, tuple(kernel), padding=pad)

    def forward(self, x: Tensor, timesteps: int | None = None, frame_chunk: int | None = None) -> Tensor:
        h = _per_frame(super().forward, x, frame_chunk)
        h = rearrange(h, "(b t) c h w -> b c t h w", t=timesteps)
        return rearrange(self.time_mix_conv(h), "b c t h w -> (b t) c h w")


class RefCombiner(nn.Module):
    """Adds conv(ref A) to the clip's first frame and conv(ref B) to its last frame (zero-init 1x1 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, context: Tensor, frame_chunk: int | None = None) -> Tensor:
        # x [(b t) c h w], context [b c 2 h w]: the first and the last keyframe's encoder features
        b = context.shape[0]
        ref = self.conv(rearrange(context, "b c l h w -> (b l) c h w"))
        ref = rearrange(ref, "(b l) c h w -> b c l h w", b=b)
        x = rearrange(x, "(b t) c h w -> b c t h w", b=b)
        if x.shape[2] == 1:  # one frame is both the first and the last
            x = x + ref[:, :, :1] + ref[:, :, 1:]
        else:
            x = torch.cat([x[:, :, :1] + ref[:, :, :1], x[:, :, 1:-1], x[:, :, -1:] + ref[:, :, 1:]], dim=2)
        return rearrange(x, "b c t h w -> (b t) c h w")


class RefCrossAttention(nn.Module):
    """Every frame's tokens attend to the tokens of both keyframes' encoder features; zero-init output projection.

    Queries come from GroupNorm(x); keys/values from the raw (un-normalised) encoder features, frame A's tokens
    then frame B's. All frames of a clip share those keys, so their queries are concatenated into one attention
    call per clip instead of repeating the keys per frame (same result, less memory).
    """

    def __init__(self, channels: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = Normalize(channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, channels), nn.Dropout(dropout))
        nn.init.zeros_(self.to_out[0].weight)
        nn.init.zeros_(self.to_out[0].bias)

    def forward(self, x: Tensor, context: Tensor, frame_chunk: int | None = None) -> Tensor:
        b, _, _, h, w = context.shape  # context [b c 2 h w]
        q = rearrange(self.norm(x), "(b t) c h w -> b (t h w) c", b=b)
        ctx = rearrange(context, "b c l h w -> b (l h w) c")  # [b, 2hw, c]
        q, k, v = (
            rearrange(f(z), "b n (nh d) -> b nh n d", nh=self.heads)
            for f, z in ((self.to_q, q), (self.to_k, ctx), (self.to_v, ctx))
        )
        # queries are independent: chunking them by frames gives the same result
        q_chunk = frame_chunk * h * w if frame_chunk else q.shape[2]
        out = torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(q_chunk, dim=2)], dim=2)
        out = self.to_out(rearrange(out, "b nh n d -> b n (nh d)"))  # [b, t hw, c]
        return x + rearrange(out, "b (t h w) c -> (b t) c h w", h=h, w=w)


# --- encoder and decoder ---------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """SD VAE encoder: conv_in, levels of ResnetBlocks (+ attention) and downsamples, mid block, conv_out.
    With `channels_last` (training/models/layout.py) its activations are stored channels-last."""

    channels_last = False

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths_in = (1, *cfg.ch_mult)
        res, block_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = cfg.ch * widths_in[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, cfg.ch * mult, cfg.dropout))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor, return_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x [n, 3, H, W] -> [n, 2z, H/f, W/f] (+ hidden states: each level's last block output, then conv_in's)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        first = h = self.conv_in(x)
        hidden = []
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            hidden.append(h)  # [n, ch * ch_mult[i], H / 2^i, W / 2^i]
            if i != len(self.down) - 1:
                h = level.downsample(h)
        hidden.append(first)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.conv_out(F.silu(self.norm_out(h)))
        h = h.contiguous() if self.channels_last else h
        return (h, hidden) if return_hidden_states else h


class Decoder(nn.Module):
    """SD VAE decoder; with `cfg.dual_ref` the VideoDecoder (temporal blocks + keyframe-feature refinement)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.dual_ref = cfg.dual_ref
        kernel = cfg.video_kernel_size

        def resblock(cin: int, cout: int) -> ResnetBlock:
            return (
                VideoResBlock(cin, cout, kernel, cfg.dropout)
                if cfg.dual_ref
                else ResnetBlock(cin, cout, cfg.dropout)
            )

        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = resblock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = resblock(block_in, block_in)
        ups: list[nn.Module] = []
        refine: list[nn.Module] = []
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(resblock(block_in, cfg.ch * cfg.ch_mult[i]))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, level)
            if i in cfg.ref_attn_levels:
                refine.insert(0, RefCrossAttention(block_in, cfg.ref_attn_heads, cfg.ref_attn_head_dim))
            else:
                refine.insert(0, RefCombiner(block_in))
        self.up = nn.ModuleList(ups)  # up[i] works at level i (up[0] at full resolution)
        self.norm_out = Normalize(block_in)
        if cfg.dual_ref:
            refine.append(RefCombiner(block_in))  # after norm_out + SiLU
            self.attn_refinement = nn.ModuleList(refine)
            self.conv_out = AE3DConv(block_in, cfg.out_channels, kernel)
        else:
            self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(
        self,
        z: Tensor,
        ref_context: Sequence[Tensor] | None = None,
        timesteps: int | None = None,
        frame_chunk: int | None = None,
    ) -> Tensor:
        """z [(b t), z, h, w] -> [(b t), 3, H, W]; ref_context: 5 tensors [b, C_i, 2, H_i, W_i] (see encode_video)."""
        if ref_context is not None and not self.dual_ref:
            raise ValueError("the plain decoder takes no reference features")
        if self.dual_ref and timesteps is None:
            raise ValueError("the dual-reference decoder needs timesteps (frames per clip)")
        T, chunk = timesteps, frame_chunk
        h = self.conv_in(z)
        h = self.mid.block_1(h, T, chunk)
        h = _per_frame(self.mid.attn_1, h, chunk)
        h = self.mid.block_2(h, T, chunk)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h, T, chunk)
                if len(level.attn) > 0:
                    h = _per_frame(level.attn[j], h, chunk)
            if ref_context:
                h = self.attn_refinement[i](h, ref_context[i], chunk)
            if i != 0:
                h = _per_frame(level.upsample, h, chunk)
        h = _per_frame(lambda x: F.silu(self.norm_out(x)), h, chunk)
        if ref_context:
            h = self.attn_refinement[-1](h, ref_context[-1], chunk)
        if self.dual_ref:
            return self.conv_out(h, T, chunk)
        return _per_frame(self.conv_out, h, chunk)


# --- the autoencoder -------------------------------------------------------------------------------------------


@dataclass
class LatentPosterior:
    """Diagonal Gaussian q(z | x) from quant_conv's moments ([n, 2e, h, w] or [b, 2e, t, h, w]: mean then logvar)."""

    moments: Tensor

    @property
    def mean(self) -> Tensor:
        return self.moments.chunk(2, dim=1)[0]

    @property
    def logvar(self) -> Tensor:
        return self.moments.chunk(2, dim=1)[1].clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise. Without `noise`, it is drawn on the CPU (the reference's RNG stream) and moved."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    # reference-shaped calls: frames as batch items ------------------------------------------------------------

    def encode(
        self, x: Tensor, return_hidden_states: bool = False, frame_chunk: int | None = None
    ) -> LatentPosterior | tuple[LatentPosterior, list[Tensor]]:
        """x [n, 3, H, W] in [-1, 1] -> posterior over [n, e, H/8, W/8] (+ the 5 encoder hidden states, [n, ...])."""
        chunks = x.split(frame_chunk) if frame_chunk else (x,)
        if not return_hidden_states:
            return LatentPosterior(self.quant_conv(torch.cat([self.encoder(part) for part in chunks])))
        outs = [self.encoder(part, return_hidden_states=True) for part in chunks]
        moments = self.quant_conv(torch.cat([h for h, _ in outs]))
        hidden = [torch.cat(level) for level in zip(*(hs for _, hs in outs))]
        return LatentPosterior(moments), hidden

    def decode(
        self,
        z: Tensor,
        ref_context: Sequence[Tensor] | None = None,
        timesteps: int | None = None,
        frame_chunk: int | None = None,
    ) -> Tensor:
        """VAE latents z [(b t), e, h, w] (NOT scaled by scale_factor) -> pixels [(b t), 3, H, W].

        timesteps: frames per clip (required by the dual-reference decoder). post_quant_conv is skipped for the
        dual-reference decoder, as on the reference's ToonCrafter path (module docstring). frame_chunk: run
        frame-wise layers on that many frames at a time; the math is unchanged (same result up to rounding:
        kernels may pick other algorithms for other batch sizes, e.g. TF32 convs on a GPU).
        """
        if not self.config.dual_ref or self.config.video_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z, ref_context, timesteps, frame_chunk)

    # video calls: b c t h w ---------------------------------------------------------------------------------

    def encode_video(
        self, video: Tensor, frame_chunk: int | None = None
    ) -> tuple[LatentPosterior, list[Tensor]]:
        """video [b, 3, t, H, W] in [-1, 1] -> (posterior over [b, e, t, h, w], reference features).

        Reference features: the 5 encoder hidden states of the clip's first and last frames, [b, C_i, 2, H_i, W_i]
        (MODEL.md 3.1). Encoding only the two keyframes gives the same features.
        """
        b = video.shape[0]
        posterior, hidden = self.encode(rearrange(video, "b c t h w -> (b t) c h w"), True, frame_chunk)
        moments = rearrange(posterior.moments, "(b t) c h w -> b c t h w", b=b)
        return LatentPosterior(moments), reference_features(hidden, b)

    def decode_video(
        self,
        z: Tensor,
        ref_context: Sequence[Tensor] | None = None,
        clip_length: int = 16,
        frame_chunk: int | None = None,
    ) -> Tensor:
        """Diffusion latents z [b, e, t, h, w] (scaled) -> pixels [b, 3, t, H, W], as the reference's decode_core.

        Frames are decoded in consecutive groups of `clip_length` (the reference's temporal_length), each an
        independent clip for the temporal layers and the keyframe refinement. With t <= clip_length (ToonCrafter:
        16 frames) this is one group. `frame_chunk` bounds transient memory only (see `decode`); the temporal
        layers still see the whole clip. Measured on an H200, 16 frames at 320x512 in fp32: peak 11.5 GiB
        unchunked, 10.9 GiB with frame_chunk=4; the full-resolution activations of all frames dominate.
        """
        b = z.shape[0]
        z = z / self.config.scale_factor
        outs = []
        for part in z.split(clip_length, dim=2):
            flat = rearrange(part, "b c t h w -> (b t) c h w")
            dec = self.decode(flat, ref_context, timesteps=part.shape[2], frame_chunk=frame_chunk)
            outs.append(rearrange(dec, "(b t) c h w -> b c t h w", b=b))
        return torch.cat(outs, dim=2)

    def decode_inbetween(
        self, z: Tensor, ref_context: Sequence[Tensor], clip_length: int = 16, frame_chunk: int | None = None
    ) -> Tensor:
        """The ToonCrafter app's decode: full decode, plus a re-decode without latents 1 and t-2 whose frames
        t/2-1 and t/2 replace the middle pair (MODEL.md 3.6). z [b, e, t, h, w] scaled -> [b, 3, t, H, W]."""
        full = self.decode_video(z, ref_context, clip_length, frame_chunk)
        dropped = self.decode_video(
            z[:, :, dropped_frame_indices(z.shape[2])], ref_context, clip_length, frame_chunk
        )
        return replace_middle_frames(full, dropped)

    # initialisation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_dual_ref_from_plain(self, plain_state_dict: Mapping[str, Tensor]) -> list[str]:
        """Start this dual-reference VAE from a plain (DynamiCrafter / SD) AutoencoderKL state dict.

        Shared keys are copied. The added layers (returned, sorted) are initialised so that the decoder computes
        exactly the plain decoder: time_stack's last conv is zero (the reference's zero_module), so
        time_stack(h) = h and the blend a*h + (1-a)*h = h for any mix_factor; mix_factor = 0 (a = 0.5, the
        reference's init, so gradients reach the temporal branch); time_mix_conv = the identity temporal kernel
        (the one added layer the reference does not zero; identity makes conv_out the plain conv); the Combiner
        convs and the cross-attention output projections are zero (the reference's zero init), so the keyframe
        refinement adds nothing. The other added weights (time_stack in_layers, to_q/to_k/to_v, norms) get their
        default init. The reference still skips post_quant_conv on this path: set `video_post_quant_conv` to make
        `decode` equal the plain `decode` too.
        """
        if not self.config.dual_ref:
            raise ValueError("init_dual_ref_from_plain needs a dual_ref=True model")
        own = self.state_dict()
        unexpected = sorted(set(plain_state_dict) - set(own))
        if unexpected:
            raise KeyError(f"keys not in the dual-reference VAE: {unexpected[:5]} ...")
        added = sorted(set(own) - set(plain_state_dict))
        for module in self.decoder.modules():
            if isinstance(module, TimeStack):
                for layer in (module.in_layers[0], module.in_layers[2], module.out_layers[0]):
                    layer.reset_parameters()
                nn.init.zeros_(module.out_layers[3].weight)
                nn.init.zeros_(module.out_layers[3].bias)
            elif isinstance(module, VideoResBlock):
                module.mix_factor.zero_()
            elif isinstance(module, AE3DConv):
                conv = module.time_mix_conv
                conv.weight.zero_()
                center = tuple(k // 2 for k in conv.kernel_size)
                conv.weight[(slice(None), slice(None), *center)] = torch.eye(conv.out_channels)
                conv.bias.zero_()
            elif isinstance(module, RefCombiner):
                nn.init.zeros_(module.conv.weight)
                nn.init.zeros_(module.conv.bias)
            elif isinstance(module, RefCrossAttention):
                for layer in (module.norm, module.to_q, module.to_k, module.to_v):
                    layer.reset_parameters()
                nn.init.zeros_(module.to_out[0].weight)
                nn.init.zeros_(module.to_out[0].bias)
        self.load_state_dict(dict(plain_state_dict), strict=False)
        return added


# --- helpers of the interpolation path -------------------------------------------------------------------------


def reference_features(hidden_states: Sequence[Tensor], batch: int) -> list[Tensor]:
    """Encoder hidden states [(b t), C, h, w] -> first and last frame of each clip, [b, C, 2, h, w]."""
    out = []
    for hs in hidden_states:
        hs = rearrange(hs, "(b t) c h w -> b c t h w", b=batch)
        out.append(torch.cat([hs[:, :, :1], hs[:, :, -1:]], dim=2))
    return out


def dropped_frame_indices(num_frames: int) -> list[int]:
    """Latent indices of the app's second decode: all but 1 and t-2 (t=16: [0, 2, 3, ..., 13, 15])."""
    return [i for i in range(num_frames) if i not in (1, num_frames - 2)]


def replace_middle_frames(full: Tensor, dropped: Tensor) -> Tensor:
    """full [b, c, t, H, W] with frames t/2-1, t/2 taken from dropped [b, c, t-2, H, W] (same latents, other
    temporal neighbours), exactly as the reference's batch_ddim_sampling post-processing."""
    t = full.shape[2]
    mid = dropped[:, :, t // 2 - 2 : t // 2]
    return torch.cat([full[:, :, : t // 2 - 1], mid, full[:, :, t // 2 + 1 :]], dim=2)
