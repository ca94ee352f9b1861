"""Where one UNet forward of sampling spends its time, and which temporal-conv kernel is faster (GPU check).

    python -m training.profile_unet --json unet.json      # toon-512, bf16, batch 2 (both guidance branches)
    python -m training.profile_unet --preset tiny --device cpu --height 8 --width 16 --repeats 1   # smoke

The UNet is placed as `inbetweener interpolate` places it (weights in bf16, bf16 autocast) and run eagerly
on one denoising call: 16 frames of 40x64 latents (320x512 pixels), the conditional and unconditional
branches in one batch of 2. It reports:
* `forward_s`: the whole forward with each temporal-conv implementation of training/models/unet.py
  ("conv3d": the Conv3d modules; "conv2d": the same weights as a (3, 1) Conv2d), interleaved, median;
* `parts_s`: one forward timed by part with CUDA events (no sync inside): the ResBlocks' spatial layers,
  their temporal conv blocks, spatial and temporal transformers, the extra temporal attention after the
  input conv, up/downsampling, and inside the transformers the attention kernels by kind; the rest is
  layout changes, embeddings and the output layer;
* `temporal_conv_s`: one (3, 1, 1) conv alone at every width and size the UNet uses, forward and forward +
  backward, for Conv3d (contiguous and channels_last_3d input) and the Conv2d form;
* `kernels`: torch.profiler's table of the forward's most expensive kernels;
* `temporal_conv`: the faster implementation for the whole forward, for the other GPU scripts'
  `--temporal-conv`.
Needs torch only.

    python -m training.profile_unet --flops-by-level     # any machine: nothing runs, shapes only

counts a forward's FLOPs per resolution level of the UNet's blocks on the meta device (what
`train.checkpoint_levels` trades: recomputing level N costs its FLOPs again in backward).

    python -m training.profile_unet --float8-share --batch 1   # any machine: nothing runs, shapes only

counts the forward's FLOPs in the linears that each `train.float8` setting runs as fp8 GEMMs.

    python -m training.profile_unet --roofline --batch 6   # any machine: traced on the meta device

traces training.bench_gpu's rectify step (no checkpointing) and gives each op its roofline time on an
H100 (--peak-tflops, --bandwidth-tbs): the time below which no implementation can run it. Convolutions,
matmuls and attention (flash: the score matrix never leaves the chip) at their roofline give an upper
bound on MFU; the other ops' bytes, unfused, give a second, lower one.

    python -m training.profile_unet --layout-decisions   # any machine: traced on the meta device

says whether torch.compile's inductor would run the convs channels-last on a GPU, by its own heuristic
(`GraphLowering.decide_layout_opt`) applied to the graphs it would be given: the sampling UNet compiled
whole (an inference graph), and each block as training's regional compilation compiles it (forward
graphs with gradients). `TORCHINDUCTOR_FORCE_LAYOUT_OPT=1` overrides the heuristic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from training.bench_gpu import Phases, _sync
from training.bench_model import DTYPES, timed
from training.models import attention as attention_module
from training.models.attention import SpatialTransformer, TemporalTransformer
from training.models.unet import (
    TEMPORAL_CONV_IMPLS,
    UNET_PRESETS,
    Downsample,
    ResBlock,
    TemporalConvBlock,
    UNet3D,
    Upsample,
    resolution_level,
    set_temporal_conv,
    temporal_conv2d,
)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build(preset: str, device: torch.device, dtype: torch.dtype) -> UNet3D:
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet3D(UNET_PRESETS[preset])
    for p in unet.parameters():  # no zero-initialised branch: every layer does its real work
        if p.ndim > 1 and p.abs().sum() == 0:
            nn.init.normal_(p, std=0.02)
    unet = unet.eval().requires_grad_(False).to(dtype)
    for module in unet.modules():  # norms compute in fp32 (autocast does so on a GPU): fp32 parameters
        if isinstance(module, nn.GroupNorm):
            module.float()
    return unet


def inputs(unet: UNet3D, batch: int, frames: int, height: int, width: int, device: torch.device):
    cfg = unet.cfg
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, frames, height, width, generator=g)
    context = torch.randn(
        batch, cfg.text_tokens + frames * cfg.image_tokens_per_frame, cfg.context_dim, generator=g
    )
    timesteps = torch.full((batch,), 500)
    fs = torch.full((batch,), 10)
    return tuple(v.to(device) for v in (x, timesteps, context, fs))


def timed_forwards(unet, args, device, dtype, repeats: int) -> dict[str, float]:
    """Median seconds of a forward per temporal-conv implementation, the implementations interleaved."""
    times: dict[str, list[float]] = {impl: [] for impl in TEMPORAL_CONV_IMPLS}
    with torch.no_grad(), _autocast(device, dtype):
        for impl in TEMPORAL_CONV_IMPLS:  # warm-up: cuDNN picks its algorithms once per shape
            set_temporal_conv(unet, impl)
            unet(*args)
        for _ in range(repeats):
            for impl in TEMPORAL_CONV_IMPLS:
                set_temporal_conv(unet, impl)
                _sync(device)
                start = time.perf_counter()
                unet(*args)
                _sync(device)
                times[impl].append(time.perf_counter() - start)
    set_temporal_conv(unet, "conv3d")
    return {impl: statistics.median(v) for impl, v in times.items()}


PART_NAMES = {
    TemporalConvBlock: "temporal conv blocks",
    ResBlock: "resblocks (with their temporal convs)",
    SpatialTransformer: "spatial transformers",
    Downsample: "down/upsampling",
    Upsample: "down/upsampling",
}


def _attention_kind(inside: list[str], q: torch.Tensor, k: torch.Tensor) -> str:
    if inside and inside[-1] == "temporal":
        return "attention kernels: temporal (over frames)"
    if k.shape[1] == q.shape[1]:
        return "attention kernels: spatial self"
    return "attention kernels: cross (text + image)"


def part_times(unet: UNet3D, args, device, dtype) -> dict[str, float]:
    """Seconds of one forward by part (see the module docstring)."""
    phases = Phases(device)
    for name, module in unet.named_modules():
        if isinstance(module, TemporalTransformer):
            phases.hook(module, "init attention" if name.startswith("init_attn") else "temporal transformers")
        elif type(module) in PART_NAMES:
            phases.hook(module, PART_NAMES[type(module)])
    inside: list[str] = []  # the kind of transformer the running attention belongs to
    handles = []
    for module in unet.modules():
        if isinstance(module, SpatialTransformer | TemporalTransformer):
            kind = "spatial" if isinstance(module, SpatialTransformer) else "temporal"
            handles.append(module.register_forward_pre_hook(lambda m, a, kind=kind: inside.append(kind)))
            handles.append(module.register_forward_hook(lambda m, a, o: inside.pop() and None))
    real = attention_module.attention

    def timed_attention(q, k, v, heads, causal=False):
        with phases.span(_attention_kind(inside, q, k)):
            return real(q, k, v, heads, causal)

    attention_module.attention = timed_attention
    try:
        with torch.no_grad(), _autocast(device, dtype), phases.span("forward"):
            unet(*args)
        _sync(device)
    finally:
        attention_module.attention = real
        phases.remove()
        for handle in handles:
            handle.remove()
    totals = phases.totals()
    total = totals.pop("forward")
    resblocks = totals.pop(PART_NAMES[ResBlock], 0.0)
    temporal = totals.get(PART_NAMES[TemporalConvBlock], 0.0)
    totals["resblocks' spatial layers"] = resblocks - temporal
    nested = ("attention", "resblocks'", PART_NAMES[TemporalConvBlock])  # inside the parts summed here
    layers = resblocks + sum(v for k, v in totals.items() if not k.startswith(nested))
    totals["rest (layouts, embeddings, input/output convs)"] = total - layers
    totals["total"] = total
    return {k: round(v, 5) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def conv_shapes(cfg, batch: int, frames: int, height: int, width: int) -> list[dict]:
    """Every (channels, h, w) a temporal conv block sees in one forward, with how many blocks see it
    (found by a forward on the meta device: no memory, no compute)."""
    seen: dict[tuple[int, int, int], int] = {}

    def record(module, args):
        key = (args[0].shape[1], args[0].shape[3], args[0].shape[4])
        seen[key] = seen.get(key, 0) + 1

    with torch.device("meta"):
        meta = UNet3D(cfg).eval()
    for module in meta.modules():
        if isinstance(module, TemporalConvBlock):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        meta(*inputs(meta, batch, frames, height, width, torch.device("meta")))
    return [{"channels": c, "height": h, "width": w, "blocks": n} for (c, h, w), n in sorted(seen.items())]


def conv_variants(shapes: list[dict], batch: int, frames: int, device, dtype, repeats: int) -> list[dict]:
    """One (3, 1, 1) conv per shape: seconds forward and forward + backward, per variant."""
    rows = []
    for shape in shapes:
        c, h, w = shape["channels"], shape["height"], shape["width"]
        with torch.device(device):
            conv = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)).to(dtype)
            x = torch.randn(batch, c, frames, h, w, dtype=dtype)
        rows.append({**shape, **_variant_times(conv, x, device, repeats)})
    return rows


def _variant_times(conv: nn.Conv3d, x: torch.Tensor, device, repeats: int) -> dict[str, dict[str, float]]:
    variants = {
        "conv3d": (conv, x),
        "conv3d channels_last_3d": (conv, x.to(memory_format=torch.channels_last_3d)),
        "conv2d": (lambda x: temporal_conv2d(x, conv), x),
    }
    out = {}
    for name, (fn, inp) in variants.items():
        out[name] = {
            "forward_s": _median_time(lambda fn=fn, inp=inp: fn(inp), device, repeats),
            "forward_backward_s": _median_time(
                lambda fn=fn, inp=inp: _fwd_bwd(fn, inp, conv), device, repeats
            ),
        }
    return out


def _fwd_bwd(fn, inp: torch.Tensor, conv: nn.Module) -> None:
    x = inp.detach().requires_grad_(True)
    with torch.enable_grad():
        conv.weight.requires_grad_(True)
        fn(x).sum().backward()
    conv.weight.grad = None


def _median_time(fn, device, repeats: int) -> float:
    return round(timed(fn, device, max(3, repeats))[0], 6)


# Kernel names -> what they do, first match wins (cuDNN, cuBLAS/nvjet, CUTLASS, flash attention and ATen's
# own kernels); inductor's Triton kernels are named after the ops they fuse ("..._convolution_0" is a conv's
# epilogue), so they count as fused unless they hold a norm. What a step's profile adds up to per kind.
KERNEL_KINDS = (
    ("layout conversion", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("convolution", ("fprop", "dgrad", "wgrad", "implicit_gemm", "convolve", "convolution", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "scaled_mm")),
    ("norm", ("group_norm", "groupnorm", "layer_norm", "layernorm", "welford")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy / cast", ("copy", "memcpy", "memset", "fill")),
    ("elementwise / reduce (aten)", ("elementwise", "vectorized", "reduce", "softmax", "index")),
)


def kernel_kind(name: str) -> str:
    """The kind (KERNEL_KINDS) of a GPU kernel by its name; "other" when nothing matches."""
    low = name.lower()
    if low.startswith("triton"):
        return "norm" if "norm" in low else "fused (inductor triton)"
    return next((kind for kind, words in KERNEL_KINDS if any(w in low for w in words)), "other")


def kernel_shares(kernels: list[tuple[str, float]]) -> str:
    """(kernel name, ms) pairs -> one line per kind, the largest first: its ms and share of the total."""
    by_kind: dict[str, float] = {}
    for name, ms in kernels:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    total = sum(by_kind.values()) or 1.0
    ranked = sorted(by_kind.items(), key=lambda item: -item[1])
    return "".join(f"  {kind}: {ms:.1f} ms ({100 * ms / total:.1f}%)\n" for kind, ms in ranked)


def kernel_table(fn, device: torch.device, rows: int, label: str = "one call") -> str:
    """torch.profiler's table of the most expensive operators and kernels of one call of fn(), after a
    line saying how busy the device was: the call's wall time against the summed time of its kernels
    and of its copies (copies on a stream of their own may overlap the kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels_ms = copies_ms = 0.0
    kernels: list[tuple[str, float]] = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.self_device_time_total / 1e3
        if event.key.startswith(("Memcpy", "Memset")):
            copies_ms += ms
        else:
            kernels_ms += ms
            kernels.append((event.key, ms))
    head = (
        f"{label}: wall {wall_ms:.1f} ms, kernels {kernels_ms:.1f} ms"
        f" ({100 * kernels_ms / wall_ms:.0f}% of the wall time), copies {copies_ms:.1f} ms\n"
    )
    if kernels:
        head += "kernel time by kind:\n" + kernel_shares(kernels)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return head + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80)


def _forward(unet: UNet3D, args, device, dtype) -> None:
    with torch.no_grad(), _autocast(device, dtype):
        unet(*args)


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = build(args.preset, device, dtype)
    call = inputs(unet, args.batch, args.frames, args.height, args.width, device)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "latents": {"batch": args.batch, "frames": args.frames, "height": args.height, "width": args.width},
    }
    forward = timed_forwards(unet, call, device, dtype, args.repeats)
    report["forward_s"] = {k: round(v, 5) for k, v in forward.items()}
    report["temporal_conv"] = min(forward, key=forward.get)
    print(f"forward: {json.dumps(report['forward_s'])} -> {report['temporal_conv']}", flush=True)
    report["parts_s"] = part_times(unet, call, device, dtype)
    print(f"parts: {json.dumps(report['parts_s'])}", flush=True)
    shapes = conv_shapes(unet.cfg, args.batch, args.frames, args.height, args.width)
    report["temporal_conv_s"] = conv_variants(shapes, args.batch, args.frames, device, dtype, args.repeats)
    for row in report["temporal_conv_s"]:
        print(f"temporal conv: {json.dumps(row)}", flush=True)
    report["kernels"] = kernel_table(lambda: _forward(unet, call, device, dtype), device, args.kernels)
    return report


def flops_by_level(preset: str, batch: int, frames: int, height: int, width: int) -> dict[str, float]:
    """FLOPs of one forward by the resolution level of each block's input ("level 0" = the latent's),
    the rest (embeddings, input/output layers) and the total, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet3D(UNET_PRESETS[preset]).eval()
    x, timesteps, context, fs = inputs(unet, batch, frames, height, width, torch.device("meta"))
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    if unet.cfg.init_attention:
        blocks.append(unet.init_attn)
    counted: dict[str, float] = {}
    started: dict[int, tuple[str, float]] = {}
    with FlopCounterMode(display=False) as counter:

        def before(module: nn.Module, args: tuple) -> None:
            level = f"level {resolution_level(width, args[0].shape[-1])}"
            started[id(module)] = (level, counter.get_total_flops())

        def after(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            level, start = started.pop(id(module))
            counted[level] = counted.get(level, 0.0) + counter.get_total_flops() - start

        handles = [
            h for b in blocks for h in (b.register_forward_pre_hook(before), b.register_forward_hook(after))
        ]
        try:
            with torch.no_grad():
                unet(x, timesteps, context, fs=fs)
        finally:
            for handle in handles:
                handle.remove()
        total = float(counter.get_total_flops())
    report = dict(sorted(counted.items()))
    report["rest"] = total - sum(counted.values())
    report["total"] = total
    return report


def float8_share(preset: str, batch: int, frames: int, height: int, width: int) -> dict[str, float]:
    """FLOPs of one forward: in total, in all linears, and in the linears each `train.float8` setting
    runs in fp8 (training/float8.py), counted on the meta device. A linear's backward costs twice its
    forward, as a conv's does, so the shares hold for a training step's UNet part too."""
    from torch.utils.flop_counter import FlopCounterMode

    from training import float8

    with torch.device("meta"):
        unet = UNet3D(UNET_PRESETS[preset]).eval()
    x, timesteps, context, fs = inputs(unet, batch, frames, height, width, torch.device("meta"))
    per_linear: dict[int, float] = {}

    def count(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:  # 2 * tokens * K * N
        per_linear[id(module)] = per_linear.get(id(module), 0.0) + 2.0 * args[0].numel() * module.out_features

    handles = [m.register_forward_hook(count) for m in unet.modules() if isinstance(m, nn.Linear)]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, timesteps, context, fs=fs)
    finally:
        for handle in handles:
            handle.remove()
    report = {"total": float(counter.get_total_flops()), "linears": sum(per_linear.values())}
    for recipe in float8.RECIPES:
        for layers in float8.LAYERS:
            chosen = float8.candidates(unet, layers)
            report[f"{recipe}, {layers}"] = sum(per_linear.get(id(m), 0.0) for _, m in chosen)
    return report


# Ops that move no data (views, allocations), for the roofline.
VIEW_OPS = {
    "aten.view", "aten._unsafe_view", "aten.t", "aten.permute", "aten.expand", "aten.slice", "aten.select",
    "aten.unsqueeze", "aten.squeeze", "aten.transpose", "aten.detach", "aten.alias", "aten.split",
    "aten.split_with_sizes", "aten.unbind", "aten.as_strided", "aten.empty_like", "aten.empty",
    "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
}  # fmt: skip
MATMUL_KINDS = ("convolution", "matmul", "attention")


def _bytes(*tensors: torch.Tensor | None) -> float:
    """Bytes of the tensors' elements as bf16; a broadcast dimension (stride 0, e.g. a linear's weight
    expanded over a batched matmul) holds its data once."""
    return float(
        sum(
            2 * math.prod(n for n, st in zip(t.shape, t.stride(), strict=True) if st)
            for t in tensors
            if t is not None
        )
    )


class RooflineMode(TorchDispatchMode):
    """Every aten op of what runs under it, by kind, with its FLOPs (torch's FLOP formulas), the bytes it
    reads and writes (every tensor as bf16, 2 bytes an element) and its roofline time at `peak` FLOP/s and
    `bandwidth` bytes/s: max(FLOPs / peak, bytes / bandwidth). Views and allocations move nothing; norms, pointwise ops
    and copies count their bytes as if nothing were fused. Attention (`F.scaled_dot_product_attention`,
    which the UNet and open_clip's towers call) counts as flash attention runs it, one op forward and one
    backward that read q, k, v (and the output and its gradient) and write the output (the gradients),
    never the score matrix: its own ops (the math path, on the meta device) are not counted."""

    def __init__(self, peak: float, bandwidth: float):
        super().__init__()
        self.peak, self.bandwidth = peak, bandwidth
        self.kinds: dict[str, list[float]] = {}  # kind -> [ops, flops, bytes, roofline s, memory-bound flops]
        self.other_ops: dict[str, list[float]] = {}  # op -> [ops, bytes], the unfused kind's ops
        self.quiet = False  # inside an attention op
        self.attention = _FlashAttentionCalls(self)

    def __enter__(self):
        self.attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.attention.__exit__(*exc)

    def add(self, kind: str, flops: float, moved: float, recomputed: float = 0.0) -> None:
        """One op: `flops` model FLOPs (the column and MFU's numerator), `recomputed` more that the kernel
        runs all the same (flash attention's backward recomputes the scores), `moved` bytes."""
        seconds = max((flops + recomputed) / self.peak, moved / self.bandwidth)
        memory_bound = flops if flops and flops / moved < self.peak / self.bandwidth else 0.0
        row = self.kinds.setdefault(kind, [0, 0.0, 0.0, 0.0, 0.0])
        for i, value in enumerate((1, flops, moved, seconds, memory_bound)):
            row[i] += value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func._overloadpacket)
        if self.quiet or name in VIEW_OPS:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if func._overloadpacket in flop_registry:
            flops = float(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
            self.add("convolution" if "conv" in name else "matmul", flops, _bytes(*tensors))
        else:
            moved = _bytes(*tensors)
            self.add("other (unfused)", 0.0, moved)
            row = self.other_ops.setdefault(name, [0, 0.0])
            row[0], row[1] = row[0] + 1, row[1] + moved
        return out


class _FlashAttentionCalls(torch.overrides.TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` through `_FlashAttention` for a RooflineMode."""

    def __init__(self, roof: RooflineMode):
        super().__init__()
        self.roof = roof

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v, *rest = args
            names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            options = {**dict(zip(names, rest, strict=False)), **kwargs}
            return _FlashAttention.apply(self.roof, q, k, v, options)
        return func(*args, **kwargs)


def _as_4d(t: torch.Tensor) -> tuple[int, ...]:
    """[..., L, d] as torch's attention FLOP formulas take it: [batch, heads, L, d]."""
    return (*(1,) * (4 - t.dim()), *t.shape) if t.dim() <= 4 else (math.prod(t.shape[:-3]), *t.shape[-3:])


class _FlashAttention(torch.autograd.Function):
    """Attention as one op each way for RooflineMode; the values come from the math path (meta tensors)."""

    @staticmethod
    def forward(ctx, roof: RooflineMode, q, k, v, options: dict):
        from torch.utils.flop_counter import sdpa_flop_count

        roof.quiet = True
        try:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)
        finally:
            roof.quiet = False
        flops = sdpa_flop_count(*map(_as_4d, (q, k, v)))
        roof.add("attention", float(flops), _bytes(q, k, v, out, options.get("attn_mask")))
        ctx.roof = roof
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from torch.utils.flop_counter import sdpa_backward_flop_count

        q, k, v, out = ctx.saved_tensors
        shapes = list(map(_as_4d, (grad_out, q, k, v)))
        flops = sdpa_backward_flop_count(*shapes)  # counts the recomputed scores too: one more matmul
        b, heads, lq, d = shapes[1]
        scores = 2.0 * b * heads * lq * shapes[2][2] * d
        moved = _bytes(q, k, v, out, grad_out) + _bytes(q, k, v)
        ctx.roof.add("attention", float(flops) - scores, moved, recomputed=scores)
        return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def rectify_roofline(preset: str, batch: int, peak: float, bandwidth: float) -> dict:
    """The rectify training step (training.bench_gpu's, no checkpointing: no recompute) traced on the meta
    device under RooflineMode: {"total_flops", "kinds": {kind: {...}}, "other_ops": {op: {...}}, "floor_s"
    (the matmul kinds at their roofline), "unfused_s" (+ the other ops' bytes)}. Nothing runs."""
    from training.bench_gpu import SHAPES, _batch, _build

    meta = torch.device("meta")
    case = _build("rectify", preset, meta, checkpointing=False)
    inputs = _batch(batch, SHAPES[preset], meta)
    with RooflineMode(peak, bandwidth) as mode:
        case.net(inputs)["loss"].backward()
    keys = ("ops", "flops", "bytes", "roofline_s", "memory_bound_flops")
    kinds = {k: dict(zip(keys, v, strict=True)) for k, v in mode.kinds.items()}
    floor = sum(kinds[k]["roofline_s"] for k in MATMUL_KINDS if k in kinds)
    other = sum(v["roofline_s"] for k, v in kinds.items() if k not in MATMUL_KINDS)
    return {
        "preset": preset,
        "batch": batch,
        "peak_flops": peak,
        "bandwidth": bandwidth,
        "total_flops": sum(v["flops"] for v in kinds.values()),
        "kinds": kinds,
        "other_ops": {k: {"ops": v[0], "bytes": v[1]} for k, v in mode.other_ops.items()},
        "floor_s": floor,
        "unfused_s": floor + other,
    }


def roofline_table(r: dict, top: int = 10) -> str:
    total = r["total_flops"]
    lines = [
        f"rectify step, {r['preset']}, batch {r['batch']}: {total / 1e12:.1f} TFLOP; roofline at"
        f" {r['peak_flops'] / 1e12:g} TFLOP/s and {r['bandwidth'] / 1e12:g} TB/s",
        "| kind | ops | TFLOP | GB moved | roofline ms | FLOPs in memory-bound ops |",
        "|---|---|---|---|---|---|",
    ]
    for kind, v in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["roofline_s"]):
        bound = f"{100 * v['memory_bound_flops'] / v['flops']:.0f}%" if v["flops"] else "-"
        lines.append(
            f"| {kind} | {v['ops']:.0f} | {v['flops'] / 1e12:.1f} | {v['bytes'] / 1e9:.0f} |"
            f" {1e3 * v['roofline_s']:.0f} | {bound} |"
        )
    lines.append(
        f"convolutions, matmuls and attention at their roofline: {1e3 * r['floor_s']:.0f} ms, MFU at most"
        f" {100 * total / r['floor_s'] / r['peak_flops']:.1f}%; with every other op's bytes unfused:"
        f" {1e3 * r['unfused_s']:.0f} ms, {100 * total / r['unfused_s'] / r['peak_flops']:.1f}%"
    )
    ops = sorted(r["other_ops"].items(), key=lambda kv: -kv[1]["bytes"])[:top]
    lines.append(
        "unfused ops moving the most: " + ", ".join(f"{k} {v['bytes'] / 1e9:.0f} GB" for k, v in ops)
    )
    return "\n".join(lines)


def layout_decisions(preset: str, batch: int, frames: int, height: int, width: int) -> dict:
    """{"sampling": [decision per graph of the whole UNet], "training": {block: [decision per graph]}},
    True = channels-last, from inductor's heuristic on graphs traced with meta tensors (on a CPU tensor
    the heuristic always says yes, for oneDNN; a meta tensor takes the GPU's branch). Nothing is compiled."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.graph import GraphLowering

    decisions: list[bool] = []

    def backend(is_inference: bool):
        def forward_graph(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            decisions.append(bool(GraphLowering.decide_layout_opt(gm, is_inference=is_inference)))
            return gm.forward  # meta tensors: "runs" without computing anything

        return aot_autograd(fw_compiler=forward_graph)

    with torch.device("meta"):
        unet = UNet3D(UNET_PRESETS[preset])
    x, timesteps, context, fs = inputs(unet, batch, frames, height, width, torch.device("meta"))
    report: dict = {}
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(unet.eval(), backend=backend(True), dynamic=False)(x, timesteps, context, fs=fs)
    report["sampling"], decisions[:] = list(decisions), []

    unet.train()
    names = [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
    names += [f"output_blocks.{i}" for i in range(len(unet.output_blocks))]
    blocks = dict(zip(names, [*unet.input_blocks, unet.middle_block, *unet.output_blocks], strict=True))
    calls: dict[str, tuple] = {}
    handles = [
        b.register_forward_pre_hook(lambda m, a, k, n=n: calls.setdefault(n, (a, k)), with_kwargs=True)
        for n, b in blocks.items()
    ]
    try:
        unet(x, timesteps, context, fs=fs)  # eager on meta: each block's inputs
    finally:
        for handle in handles:
            handle.remove()
    report["training"] = {}
    for name, block in blocks.items():
        torch._dynamo.reset()  # one block at a time: no graph shared with an earlier block
        a, k = calls[name]
        torch.compile(block, backend=backend(False), dynamic=False)(*a, **k)
        report["training"][name], decisions[:] = list(decisions), []
    torch._dynamo.reset()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.profile_unet", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="toon-512", choices=sorted(UNET_PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2, help="2: both guidance branches in one call")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=40, help="latent height (pixels / 8)")
    p.add_argument("--width", type=int, default=64, help="latent width (pixels / 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per implementation (median)")
    p.add_argument("--kernels", type=int, default=25, help="rows of the profiler's kernel table")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument(
        "--flops-by-level", action="store_true", help="only count FLOPs per resolution level (meta device)"
    )
    p.add_argument(
        "--float8-share",
        action="store_true",
        help="only count the FLOPs in the linears each train.float8 setting converts (meta device)",
    )
    p.add_argument(
        "--roofline",
        action="store_true",
        help="only the rectify step's roofline at --batch (meta device; training.bench_gpu's step)",
    )
    p.add_argument("--peak-tflops", type=float, default=989.4, help="--roofline: dense bf16 peak (H100 SXM)")
    p.add_argument(
        "--bandwidth-tbs", type=float, default=3.35, help="--roofline: memory bandwidth (H100 SXM)"
    )
    p.add_argument(
        "--layout-decisions",
        action="store_true",
        help="only say which graphs inductor would run channels-last on a GPU (meta device)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for wanted, count in ((args.flops_by_level, flops_by_level), (args.float8_share, float8_share)):
        if not wanted:
            continue
        counts = count(args.preset, args.batch, args.frames, args.height, args.width)
        width = max(map(len, counts))
        for part, flops in counts.items():
            print(f"{part:{width}s} {flops / 1e12:8.3f} TFLOP  {100 * flops / counts['total']:5.1f}%")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"preset": args.preset, "flops": counts}, indent=1) + "\n")
        return 0
    if args.roofline:
        for flag, value in (("--batch", args.batch), ("--peak-tflops", args.peak_tflops),
                            ("--bandwidth-tbs", args.bandwidth_tbs)):  # fmt: skip
            if not value > 0:
                raise SystemExit(f"profile_unet --roofline: {flag} must be > 0, got {value}")
        found = rectify_roofline(args.preset, args.batch, args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12)
        print(roofline_table(found))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(found, indent=1) + "\n")
        return 0
    if args.layout_decisions:
        found = layout_decisions(args.preset, args.batch, args.frames, args.height, args.width)
        word = {True: "channels-last", False: "NCHW"}
        print(f"sampling, whole UNet: {', '.join(word[d] for d in found['sampling'])}")
        for name, graphs in found["training"].items():
            print(f"training, {name}: {', '.join(word[d] for d in graphs)}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"preset": args.preset, **found}, indent=1) + "\n")
        return 0
    report = run(args)
    print(report["kernels"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("device", "forward_s", "temporal_conv", "parts_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
