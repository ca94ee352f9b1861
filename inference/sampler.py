"""Keyframes + prompt (+ sketches) -> in-between frames: ToonCrafter's sampling path, reusable by every job.

The story, as the reference runs it (MODEL.md 2 and 3.6), one function each:

1. `encode_context`: text tokens of the prompt and CLIP image tokens of the first keyframe (the last keyframe
   is not CLIP-encoded), and the unconditional context [text(""), image tokens of a zero image];
2. `encode_keyframes`: the VAE encodes the two keyframes; their latents, sampled from the posterior and
   scaled by 0.18215, fill frames 0 and T-1 of the concat channels (the others are zero), and their encoder
   hidden states are the decoder's reference features;
3. `sample_latents`: DDIM (`uniform_trailing` steps, eta 1) on the v-prediction UNet with classifier-free
   guidance 7.5 and guidance rescale 0.7, the concat latents and the frame stride `fs` = 10 in both
   branches, the dynamic-rescale correction; optionally the sketch encoder's residuals;
4. `decode_latents`: the dual-reference decoder on all T latents, then the reference app's second decode
   without latents 1 and T-2 whose frames replace the middle pair (`reference_decode`, MODEL.md 3.6; it
   costs a second decode, turn it off with `reference_decode=False`).

`interpolate` runs the four on one pair of keyframes; `interpolate_chain` joins several pairs.
`InferenceModel` places the networks: denoiser, image projector and VAE on the device (the denoiser and
projector in the run's dtype, the VAE's weights in fp32 with its convs under the same autocast), the CLIP
towers on the CPU except while they encode. One autocast context (`precision`) owns the precision.

Deviations from the reference, stated:
* only the two keyframes are VAE-encoded, not 8 copies of each (same latents and features, MODEL.md 3.6);
* all noise (posterior sample, x_T, per-step DDIM noise) is drawn from one seeded CPU generator and moved,
  so a seed gives the same clip on any device up to kernel rounding; the reference's RNG stream differs;
* bf16 weights and autocast on the GPU by default (the reference: fp32 weights, fp16 autocast);
* the two guidance branches run as one UNet call (`batch_cfg`; the reference: two sequential calls), which
  gets the noisy latent once and both contexts: the layers before the first cross-attention run once.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inference.cuda_graph import GraphedCall
from inference.media import DTYPES, InputError
from training.compilation import compile_blocks
from training.diffusion.ddim import StepInfo, sample_ddim, uniform_trailing_timesteps
from training.diffusion.guidance import batched_cfg_denoiser, cfg_denoiser
from training.models.layout import set_channels_last
from training.models.vae import resnet_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    """What a sample depends on besides the inputs and the seed. Defaults = the released model's (MODEL.md 2.7)."""

    steps: int = 50  # DDIM steps (uniform_trailing: 50 -> [19, 39, ..., 999])
    cfg: float = 7.5  # classifier-free guidance scale (text + image context dropped together)
    guidance_rescale: float = 0.7  # Lin et al. 2023 rescale, in v-space; 0 turns it off
    eta: float = 1.0  # DDIM stochasticity (1: ancestral-like, the reference's default)
    fs: int = 10  # frame-stride condition (the reference's --frame_stride; 5-30, smaller = larger motion)
    frames: int = 16  # frames per segment, keyframes included (the model is trained on 16)
    reference_decode: bool = True  # the app's second decode that replaces the middle frames (MODEL.md 3.6)
    decode_chunk: int | None = 4  # frames per chunk in the VAE decoder's frame-wise layers (memory only)
    sketch_scale: float = 0.6  # multiplies the sketch encoder's residuals (the community app's default)
    sketch_blank_frames: bool = False  # True: frames without a sketch go through the encoder as blank hints
    # (the reference); False: they contribute nothing and cost nothing
    batch_cfg: bool = True  # both guidance branches in one UNet call (the reference: two calls;
    # same math up to kernel rounding)

    def check(self) -> None:
        if self.steps < 1 or self.steps > 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps}")
        if self.frames < 2:
            raise ValueError(f"frames must be at least 2 (the two keyframes), got {self.frames}")
        if not (0 <= self.eta < math.inf and 0 <= self.cfg < math.inf and 0 <= self.guidance_rescale <= 1):
            # written so that NaN fails too: a NaN cfg sampled every step before its NaN frames were refused
            raise ValueError(
                "eta and cfg must be finite and >= 0 and guidance_rescale in [0, 1], got eta"
                f" {self.eta}, cfg {self.cfg}, guidance_rescale {self.guidance_rescale}"
            )
        if not math.isfinite(self.sketch_scale):
            raise ValueError(f"sketch_scale must be a finite number, got {self.sketch_scale}")
        if self.fs < 1:
            raise ValueError(f"fs (the frame stride) must be >= 1 (trained on 5-30), got {self.fs}")
        if self.decode_chunk is not None and self.decode_chunk < 0:
            raise ValueError(f"decode_chunk must be >= 0 (0: all frames at once), got {self.decode_chunk}")


# --- placement and precision -----------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (range of fp32, tensor cores), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """`--device` and `--dtype` as given (None: the defaults), checked against this machine: an InputError
    naming the flag for a device it lacks, or a half precision on the CPU (which the model does not run:
    its fp32 islands meet bf16 weights there)."""
    try:
        chosen = torch.device(device) if device else default_device()
    except RuntimeError as exc:
        raise InputError(f"--device {device!r}: {exc}") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    precision_ = DTYPES[dtype] if dtype else default_dtype(chosen)
    if chosen.type == "cpu" and precision_ != torch.float32:
        raise InputError(f"--dtype {dtype} runs on a GPU; on the CPU the model runs in fp32 (--dtype fp32)")
    return chosen, precision_


def precision(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The one autocast context of a run; fp32 runs without autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# A CUDA device with at least this much memory keeps the CLIP towers resident by default: a sample's peak
# is then 10.6 GiB allocated, 12.0 reserved (toon-512, 16x320x512, bf16, compiled; BENCHMARKS.md), which
# leaves a 24 GiB card room; below it, the towers' ~2 GB visit for each sample instead.
CLIP_RESIDENT_MIN_GIB = 24


def offload_clip_by_default(device: torch.device) -> bool:
    """Whether the CLIP towers should live in host memory on `device` when the caller does not say: only
    on a CUDA device with less than CLIP_RESIDENT_MIN_GIB of memory (a CPU run has nowhere to move them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < CLIP_RESIDENT_MIN_GIB * 2**30


class InferenceModel:
    """A ToonCrafter (training/models/tooncrafter.py) placed for sampling.

    The denoiser and the image projector live on `device` in `dtype`; the VAE lives on `device` with fp32
    weights (its convs still run in `dtype` under autocast). The CLIP towers (1 B parameters, ~2 GB in bf16,
    used once per clip) live on the device too when it has room (`offload_clip=None`: a CUDA device of at
    least CLIP_RESIDENT_MIN_GIB); on a smaller card (or with `offload_clip=True`) they stay in pinned CPU
    memory and visit the device only while they encode, ~0.05-0.1 s per sample on an H100.

    `compile=True` wraps the UNet in torch.compile and compiles each residual block of the VAE decoder (the
    first sample pays the compilation; with `compile_decoder=False` the decoder stays eager).
    `cuda_graph=True` replays the UNet call (compiled or not) as a CUDA graph on a CUDA device
    (inference/cuda_graph.py); elsewhere it changes nothing. `channels_last=True` keeps the UNet's
    activations channels-last (training/models/layout.py; the same numbers, for a compiled UNet).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        dtype: torch.dtype,
        compile: bool = False,
        sketch_encoder: nn.Module | None = None,
        offload_clip: bool | None = None,
        compile_decoder: bool = True,
        cuda_graph: bool = False,
        channels_last: bool = False,
    ):
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        if offload_clip is None:
            offload_clip = offload_clip_by_default(self.device)
        self.offload_clip = offload_clip and self.device.type != "cpu"
        model.model.to(device=self.device, dtype=dtype)  # the DiffusionWrapper holding the UNet
        model.image_proj_model.to(device=self.device, dtype=dtype)
        model.first_stage_model.to(device=self.device, dtype=torch.float32)
        clip_device = torch.device("cpu") if self.offload_clip else self.device
        for tower in self._towers():
            tower.to(device=clip_device, dtype=dtype)  # kept in dtype on the CPU: half the bytes to move
        self._clip_host = HostResident(self._towers(), pin=self.offload_clip)
        self.schedule = {k: v.to(self.device, torch.float32) for k, v in model.schedule().items()}
        set_channels_last(model.unet, channels_last)
        self.channels_last = channels_last
        self.unet: Callable[..., Tensor] = model.unet
        self.compiled_decoder_blocks = 0
        if compile:
            self.unet = torch.compile(model.unet)
        if compile and compile_decoder:
            # The decoder's residual blocks, one graph each: its time goes to fp32 GroupNorm + SiLU around the
            # convs at full resolution, which compile fuses; far less compile time than the whole decoder.
            decoder = model.first_stage_model.decoder
            self.compiled_decoder_blocks = compile_blocks(resnet_blocks(decoder), "inductor")
        self.cuda_graph = cuda_graph and GraphedCall.applies(self.device)
        if self.cuda_graph:
            self.unet = GraphedCall(self.unet)
        self.sketch_encoder = None
        if sketch_encoder is not None:
            self.sketch_encoder = sketch_encoder.eval().requires_grad_(False).to(self.device, dtype)

    @property
    def vae(self) -> nn.Module:
        return self.model.first_stage_model

    @property
    def multiple(self) -> int:
        """Frame sides must be multiples of this (`size_step`)."""
        from training.models.tooncrafter import size_step

        return size_step(self.model.cfg)

    def _towers(self) -> list[nn.Module]:
        # A container without CLIP towers (None) is accepted: bench_gpu.py runs where open_clip is absent.
        return [t for t in (self.model.cond_stage_model, self.model.embedder) if t is not None]

    def keep_clip_on_device(self) -> None:
        """From now on the CLIP towers stay on the device: ~2 GB of its memory (bf16) for the ~0.1 s per
        sample their visits cost (the same as `offload_clip=False` at construction)."""
        if self.offload_clip:
            for tower in self._towers():
                tower.to(self.device)
            self.offload_clip = False

    @contextlib.contextmanager
    def clip_on_device(self) -> Iterator[None]:
        if not self.offload_clip:
            yield
            return
        with self._clip_host.visit(self.device):
            yield
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class HostResident:
    """Modules whose weights live in host memory and visit a device for a while.

    The host copies stay where they are (pinned when `pin`, so that the upload runs at full bus speed
    without waiting); a visit puts device copies in the modules' parameter and buffer slots and, on
    leaving, the host tensors back: nothing is copied back, since inference does not change weights.
    Measured on an H100: moving the 1 B-parameter CLIP towers there and back with `.to()` took ~0.9 s
    per sample."""

    def __init__(self, modules: Sequence[nn.Module], pin: bool):
        self.slots: list[tuple[dict, str]] = []  # (a module's _parameters or _buffers, name)
        for module in (m for top in modules for m in top.modules()):
            for table in (module._parameters, module._buffers):
                self.slots += [(table, name) for name, t in table.items() if t is not None]
        if pin:
            for table, name in self.slots:
                tensor = table[name]
                pinned = tensor.detach().pin_memory()
                table[name] = (
                    nn.Parameter(pinned, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else pinned
                )

    @contextlib.contextmanager
    def visit(self, device: torch.device) -> Iterator[None]:
        host = [table[name] for table, name in self.slots]
        try:
            for (table, name), tensor in zip(self.slots, host, strict=True):
                moved = tensor.detach().to(device, non_blocking=True)
                table[name] = (
                    nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
                )
            yield
        finally:
            for (table, name), tensor in zip(self.slots, host, strict=True):
                table[name] = tensor


# --- the four steps --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_context(im: InferenceModel, prompts: Sequence[str], first: Tensor) -> tuple[Tensor, Tensor]:
    """prompts (b) and first keyframes [b, 3, H, W] in [-1, 1] -> (context, unconditional context), each
    [b, 77 + image tokens, d] on the device. Only the first keyframe is CLIP-encoded (MODEL.md 2.3)."""
    model = im.model
    with im.clip_on_device(), precision(im.device, im.dtype):
        images = first.to(im.device)
        text = model.cond_stage_model.encode(list(prompts))
        empty = model.cond_stage_model.encode([""] * len(prompts))
        clip_tokens = model.embedder(torch.cat([images, torch.zeros_like(images)]))
    with precision(im.device, im.dtype):
        image = model.image_proj_model(clip_tokens.to(im.device))  # [2b, frames * 16, d]
    b = len(prompts)
    context = torch.cat([text.to(im.device), image[:b]], dim=1)
    uncond = torch.cat([empty.to(im.device), image[b:]], dim=1)
    return context.float(), uncond.float()


@torch.no_grad()
def encode_keyframes(
    vae: nn.Module, first: Tensor, last: Tensor, frames: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, list[Tensor]]:
    """Keyframes [b, 3, H, W] in [-1, 1] -> (concat latents [b, e, frames, h, w]: z_first, zeros, z_last;
    the decoder's reference features: 5 tensors [b, C_i, 2, H_i, W_i]). The VAE runs in fp32."""
    video = torch.stack([first, last], dim=2).to(device, torch.float32)  # [b, 3, 2, H, W]
    posterior, refs = vae.encode_video(video)
    z = vae.config.scale_factor * posterior.sample(generator=generator)  # [b, e, 2, h, w]
    c_concat = z.new_zeros(z.shape[0], z.shape[1], frames, *z.shape[3:])
    c_concat[:, :, 0], c_concat[:, :, -1] = z[:, :, 0], z[:, :, 1]
    return c_concat, refs


@dataclass
class SketchGuide:
    """Sketches of some frames: hint [b, 1, T, H, W] in [0, 1] (lines ~1), mask [b, T] (True: sketched)."""

    hint: Tensor
    mask: Tensor


def _model_fn(im: InferenceModel, settings: SamplerSettings):
    """(x_t, t, cond) -> v in fp32: the hybrid conditioning of the reference, plus the sketch residuals
    (cond["hint"], cond["sketch_mask"]) computed for each guidance branch with that branch's context
    (MODEL.md 4)."""

    def model_fn(x: Tensor, t: Tensor, cond: Mapping[str, Any]) -> Tensor:
        # cond["c_crossattn"] may hold k contexts per sample (the guidance branches,
        # training/diffusion/guidance.batched_cfg_denoiser):
        # everything else is then each branch's, given once
        branches = cond["c_crossattn"].shape[0] // x.shape[0]
        control = None
        if cond.get("hint") is not None and im.sketch_encoder is not None:
            mask = None if settings.sketch_blank_frames else cond["sketch_mask"]
            xs, ts, hint, mask = (_rows(v, branches) for v in (x, t, cond["hint"], mask))
            control = im.sketch_encoder(
                xs, hint, ts, cond["c_crossattn"], sketch_mask=mask, scale=settings.sketch_scale
            )
        x_in = torch.cat([x, cond["c_concat"]], dim=1)  # [b, 8, t, h, w]
        return im.unet(x_in, t, cond["c_crossattn"], fs=cond["fs"], control=control).float()

    return model_fn


def _rows(value: Tensor | None, times: int) -> Tensor | None:
    """The batch repeated `times` times (branch-major), as the context rows of the guidance branches."""
    if value is None or times == 1:
        return value
    return value.repeat(times, *[1] * (value.ndim - 1))


@torch.no_grad()
def sample_latents(
    im: InferenceModel,
    c_concat: Tensor,
    context: Tensor,
    uncond: Tensor,
    settings: SamplerSettings,
    generator: torch.Generator,
    sketch: SketchGuide | None = None,
    progress: bool | Callable[[StepInfo], None] = True,
) -> Tensor:
    """DDIM with CFG from x_T ~ N(0, I) to the clean latent [b, e, T, h, w] (fp32). Noise comes from the
    CPU `generator`: x_T first, then one draw per step (when eta > 0)."""
    fs = torch.full((c_concat.shape[0],), settings.fs, dtype=torch.long, device=im.device)
    hint = mask = None
    if sketch is not None:
        hint, mask = sketch.hint.to(im.device), sketch.mask.to(im.device)
    cond = {"c_concat": c_concat, "c_crossattn": context, "fs": fs, "hint": hint, "sketch_mask": mask}
    uncond_dict = {**cond, "c_crossattn": uncond}  # the concat latents, fs and sketches stay (MODEL.md 2.6)
    guidance = batched_cfg_denoiser if settings.batch_cfg and settings.cfg != 1.0 else cfg_denoiser
    denoiser = guidance(_model_fn(im, settings), cond, uncond_dict, settings.cfg, settings.guidance_rescale)
    shape = tuple(c_concat.shape)
    x_t = torch.randn(shape, generator=generator).to(im.device)
    noises = None
    drawing = ThreadPoolExecutor(1, thread_name_prefix="ddim-noise")
    if settings.eta > 0:
        # The per-step noise, drawn on the CPU (the same numbers on any device), right after x_T: ~8 M numbers
        # for 50 steps at 16x320x512, ~35 ms of one core, drawn in a thread while the first step runs.
        noises = drawing.submit(_draw_noise, (settings.steps, *shape), generator, im.device.type == "cuda")
    callback, bar = _progress(progress, settings.steps)
    try:
        with precision(im.device, im.dtype):
            return sample_ddim(
                denoiser,
                x_t,
                uniform_trailing_timesteps(settings.steps, len(im.schedule["alphas_cumprod"])),
                im.schedule,
                eta=settings.eta,
                dynamic_rescale=True,
                noises=noises,
                callback=callback,
            )
    finally:
        drawing.shutdown(wait=True)  # the generator is free again, whatever happened
        if bar is not None:
            bar.close()


def _draw_noise(shape: tuple[int, ...], generator: torch.Generator, pin: bool) -> Tensor:
    noise = torch.randn(shape, generator=generator)
    return noise.pin_memory() if pin else noise  # pinned: the copy to the GPU does not wait for it


def _progress(progress: bool | Callable[[StepInfo], None], total: int):
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step", leave=False, dynamic_ncols=True)
    return (lambda info: bar.update(1)), bar


@torch.no_grad()
def decode_latents(
    im: InferenceModel, z: Tensor, refs: Sequence[Tensor], settings: SamplerSettings
) -> Tensor:
    """Latents [b, e, T, h, w] -> frames [b, 3, T, H, W] in [-1, 1], fp32 on the CPU. The dual-reference
    decoder sees all T frames at once (clip_length = T) with the keyframes' features; the plain decoder of a
    DynamiCrafter checkpoint takes no features and no second decode."""
    vae = im.vae
    t = z.shape[2]
    with precision(im.device, im.dtype):
        if not vae.config.dual_ref:
            video = vae.decode_video(z, None, clip_length=t, frame_chunk=settings.decode_chunk)
        elif settings.reference_decode and t >= 4:
            video = vae.decode_inbetween(z, refs, clip_length=t, frame_chunk=settings.decode_chunk)
        else:
            video = vae.decode_video(z, refs, clip_length=t, frame_chunk=settings.decode_chunk)
    return video.float().cpu()


# --- whole clips -----------------------------------------------------------------------------------------------


@torch.no_grad()
def interpolate(
    im: InferenceModel,
    first: Tensor,
    last: Tensor,
    prompt: str | Sequence[str],
    settings: SamplerSettings = SamplerSettings(),
    seed: int = 123,
    sketch: SketchGuide | None = None,
    progress: bool | Callable[[StepInfo], None] = True,
) -> Tensor:
    """Two keyframes [b, 3, H, W] (or [3, H, W]) in [-1, 1] + prompt(s) -> [b, 3, T, H, W] in [-1, 1].

    Frames 0 and T-1 are the decoder's reconstructions of the keyframes, not pasted copies (as the reference).
    H and W must be multiples of `im.multiple`."""
    settings.check()
    if first.ndim == 3:
        first, last = first[None], last[None]
    prompts = [prompt] * first.shape[0] if isinstance(prompt, str) else list(prompt)
    h, w = first.shape[-2:]
    if h % im.multiple or w % im.multiple:
        raise ValueError(f"frame {h}x{w}: sides must be multiples of {im.multiple}")
    if settings.frames != im.model.cfg.unet.temporal_length:
        log.warning(
            "%d frames: the model is trained on %d; other lengths change its image context (MODEL.md 7)",
            settings.frames,
            im.model.cfg.unet.temporal_length,
        )
    generator = torch.Generator("cpu").manual_seed(seed)
    context, uncond = encode_context(im, prompts, first)
    c_concat, refs = encode_keyframes(im.vae, first, last, settings.frames, generator, im.device)
    z = sample_latents(im, c_concat, context, uncond, settings, generator, sketch, progress)
    return decode_latents(im, z, refs, settings)


def segment_sketches(
    sketches: Mapping[int, Tensor], segment: int, frames: int, batch: int = 1
) -> SketchGuide | None:
    """The sketches of chained segment `segment`: global frame g lies in segments whose range
    [k (T-1), k (T-1) + T-1] holds it (a keyframe's sketch serves both segments that share the keyframe)."""
    start = segment * (frames - 1)
    local = {g - start: s for g, s in sketches.items() if start <= g < start + frames}
    if not local:
        return None
    h, w = next(iter(local.values())).shape[-2:]
    hint = torch.zeros(batch, 1, frames, h, w)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    for i, s in local.items():
        hint[:, 0, i], mask[:, i] = s, True
    return SketchGuide(hint, mask)


@torch.no_grad()
def interpolate_chain(
    im: InferenceModel,
    keyframes: Sequence[Tensor],
    prompt: str,
    settings: SamplerSettings = SamplerSettings(),
    seed: int = 123,
    sketches: Mapping[int, Tensor] | None = None,
    progress: bool | Callable[[StepInfo], None] = True,
) -> Tensor:
    """Keyframes K_0..K_n ([3, H, W] each) -> one clip [3, n (T-1) + 1, H, W]: segment k interpolates
    K_k -> K_{k+1} with seed + k; the frame two segments share (a keyframe) is kept once, from the earlier
    segment. `sketches` maps global frame indices to hints [H, W] in [0, 1]."""
    if len(keyframes) < 2:
        raise ValueError("need at least two keyframes")
    sketches = sketches or {}
    total = (len(keyframes) - 1) * (settings.frames - 1) + 1
    outside = sorted(g for g in sketches if not 0 <= g < total)
    if outside:
        raise ValueError(f"sketches for frames {outside} lie outside the {total} output frames")
    parts = []
    for k in range(len(keyframes) - 1):
        guide = segment_sketches(sketches, k, settings.frames)
        clip = interpolate(im, keyframes[k], keyframes[k + 1], prompt, settings, seed + k, guide, progress)[0]
        parts.append(clip if k == 0 else clip[:, 1:])
    return torch.cat(parts, dim=1)
