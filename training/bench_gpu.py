"""GPU check of the training issue: step time, throughput, peak memory and MFU of the training steps.

    python -m training.bench_gpu                           # toon-512 on cuda: rectify batch search, decoder batch 1
    python -m training.bench_gpu --preset tiny --device cpu   # smoke mode (a test runs it)
    python -m training.bench_gpu --json bench.json --batches 1,2,3,4,6,8

What it measures, with random weights (no checkpoint, no data: synthetic uint8 clips), fp32 weights with
bf16 autocast on CUDA, fused AdamW, gradient checkpointing on (--no-checkpointing: off), each UNet block
torch.compile'd with --compile inductor (train.compile):
* `rectify`: the full training step of training/stages/rectify.py (VAE encode + CLIP + Resampler + UNet
  forward/backward + AdamW on the 942 M trained parameters), at each batch per GPU of `--batches` in
  increasing order until one runs out of memory; the largest that fits is reported.
* `decoder`: the decoder stage's step (encode, dual-reference decode with grads, L1 + LPIPS-VGG (random
  weights, the architecture is what costs) + patch discriminator G term, AdamW) at batch 1.
Per case: seconds per step (median of --steps after --warmup), samples/s, peak allocated (and reserved)
memory, and model FLOPs utilisation = model FLOPs per step / time / peak. Model FLOPs per clip are what
the stage's step computes, counted by torch's FlopCounterMode on one step at batch 1 on the meta device
(nothing runs, a few seconds of CPU), without checkpointing so that no recompute counts: frozen weights
get no weight gradient, so the rectify step of toon-512 is 44.36 TFLOP, not MODEL.md Appendix E's 49.24
(which trains every UNet weight; reported beside it). The peak is the card's dense bf16 spec (H100/H200
SXM 989.4 TFLOP/s, A100 312) or --peak-tflops; a measured bf16 matmul rate is reported beside it. With
--breakdown, one more step per case is timed by part (CUDA events, no sync inside the step): the frozen
VAE encoder and CLIP towers, the Resampler, the UNet forward, the rest of the forward, the backward, and
clipping + AdamW + EMA: where the time goes before deciding between compiling, caching the frozen
encoders' outputs and larger batches. On a card with more than 80 GB (an H200), the caching allocator is
capped at what an 80 GB card leaves it (--memory-cap-gib), so the largest batch that fits is the
issue's, whichever card the run gets.

Needs torch (and open_clip_torch, for the CLIP towers' classes) only: no Ray, webdataset or PyAV.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from training.compilation import (
    cache_saved,
    check_recompute_budget,
    compile_progress,
    load_compile_cache,
    save_compile_cache,
    wait_for_file,
)
from training.float8 import check_settings as check_float8_settings

# MODEL.md Appendix E, toon-512, per clip and step, no recompute: the whole rectify step with every UNet
# weight trained, and the decoder's own forward + backward. Reported beside the stage's own count.
APPENDIX_E_TFLOP = {"rectify": 49.24, "decoder": 113.56}
SPEC_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.05}
SHAPES = {"toon-512": (16, 320, 512), "tiny": (4, 64, 96)}
# The issue's memory target is one 80 GB card. An H100 80GB HBM3 has 81,559 MiB (79.6 GiB), of which the
# CUDA context keeps ~0.5 GiB: what is left for the caching allocator. On a larger card (an H200's 140
# GiB) the bench caps the allocator there, so that a batch that fits the run fits that card.
CARD_80GB_GIB = 79.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.bench_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="toon-512", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,2,3,4,6,8", help="rectify batches per GPU to try, increasing")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    p.add_argument("--no-decoder", action="store_true", help="skip the decoder step")
    p.add_argument("--no-rectify", action="store_true", help="skip the rectify steps")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)"
    )
    p.add_argument(
        "--compile",
        default="",
        help="torch.compile backend for each UNet block (train.compile), e.g. inductor",
    )
    p.add_argument(
        "--compile-cache",
        type=Path,
        help="torch.compile's compiled artifacts: loaded before the first step when the file exists, written"
        " after each case's first step (carry it to the next GPU machine of the same torch and card)",
    )
    p.add_argument(
        "--no-checkpointing", action="store_true", help="keep activations instead of recomputing them"
    )
    p.add_argument(
        "--float8",
        default="",
        help="fp8 GEMMs for the UNet's transformer linears, a torchao recipe (train.float8: tensorwise);"
        " MFU stays against the bf16 peak",
    )
    p.add_argument(
        "--float8-layers",
        default="large",
        help="with --float8: 'large' (layers where fp8 pays on an H100) or 'all' (train.float8_layers)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="then time the first checkpoint-levels case again with torch.backends.cudnn.benchmark on"
        " (cuDNN picks each conv's algorithm by timing them during the warm-up steps; no recompiling)",
    )
    p.add_argument(
        "--checkpoint-levels",
        default="0",
        help="rectify: recompute only the UNet blocks at the N finest resolutions (train.checkpoint_levels;"
        " 0 = all, none = no block: gradient checkpointing off); a list (0,2,none) measures each on the"
        " same built, compiled step",
    )
    p.add_argument(
        "--recompute-budget",
        type=float,
        default=1.0,
        help="with --compile: the share of each compiled UNet block's activations its backward keeps, the"
        " compiler recomputing the cheapest ops for the rest (train.recompute_budget; 1 = its default)",
    )
    p.add_argument(
        "--temporal-conv",
        choices=("conv3d", "conv2d"),
        default="conv3d",
        help="kernel of the UNet's (3,1,1) temporal convs (same weights and math; see training.profile_unet)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="store the UNet's activations channels-last (train.channels_last; for a compiled step)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="one extra step per case timed by part (VAE, CLIP towers, Resampler, UNet, backward, optimizer)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="write torch.profiler's view of one step of the first case (its kernel time by kind, then its"
        " most expensive kernels) to FILE",
    )
    p.add_argument(
        "--signal-compiled",
        type=Path,
        metavar="FILE",
        help="create FILE once the first case's first warm-up step (the compile) has ended: a benchmark"
        " sharing the GPU (inference.bench_gpu --wait-for) can then time without this one's compile beside it",
    )
    p.add_argument(
        "--wait-for",
        type=Path,
        metavar="FILE",
        help="after that first warm-up step, wait until FILE exists (the other benchmark has left the GPU)"
        " before any further step, at most --wait-max seconds",
    )
    p.add_argument("--wait-max", type=float, default=600.0, help="seconds --wait-for waits at most")
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=CARD_80GB_GIB,
        metavar="GIB",
        help="on a card with more memory, let the caching allocator reserve at most this much (torch's"
        f" per-process memory fraction), so that what fits fits that card (default {CARD_80GB_GIB}: an 80 GB"
        " card less its CUDA context; 0: the whole card)",
    )
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def cap_memory(device: torch.device, cap_gib: float) -> float | None:
    """Keep the caching allocator under cap_gib on a card that has more; returns the cap applied, None
    where the card has no more than that and its CUDA context (an 80 GB card itself), no cap is asked
    for, or the device is not a GPU."""
    if device.type != "cuda" or not cap_gib:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if total <= (cap_gib + 1) * 2**30:
        return None
    # set_per_process_memory_fraction wants an index: a bare "cuda" device names none.
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, index)
    return cap_gib


# Parts of a step's forward timed by --breakdown: module path inside the step's net -> label (a part
# that a stage's net lacks is skipped).
PARTS = {
    "model.first_stage_model.encoder": "VAE encoder (frozen)",
    "model.cond_stage_model": "CLIP text (frozen)",
    "model.embedder": "CLIP image (frozen)",
    "model.image_proj_model": "Resampler",
    "model.model.diffusion_model": "UNet forward",
}


class Phases:
    """Time spent in named parts of one step: CUDA events on a GPU (nothing synchronises inside the
    step, so it runs as it does when timed), the clock on the CPU. Read `totals()` after a sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []
        self._handles: list[Any] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str):
        start = self._now()
        yield
        self.spans.append((name, start, self._now()))

    def hook(self, module: torch.nn.Module, name: str) -> None:
        starts: list[Any] = []
        self._handles.append(module.register_forward_pre_hook(lambda m, a: starts.append(self._now())))
        self._handles.append(
            module.register_forward_hook(lambda m, a, o: self.spans.append((name, starts.pop(), self._now())))
        )

    def hook_parts(self, net: torch.nn.Module) -> None:
        for path, name in PARTS.items():
            try:
                module = net.get_submodule(path)
            except AttributeError:
                continue
            self.hook(module, name)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self.spans:
            out[name] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        return dict(out)


def breakdown(case: Case, batch: dict[str, Any], amp, device: torch.device) -> dict[str, float]:
    """Seconds of one step by part: the forward's modules (PARTS), the rest of the forward, the
    backward (with checkpointing: the UNet's recomputed forward too), and clipping + AdamW + EMA."""
    phases = Phases(device)
    phases.hook_parts(case.net)
    try:
        _step(case, batch, amp, device, phases)
        _sync(device)
    finally:
        phases.remove()
    totals = phases.totals()
    parts = sum(v for k, v in totals.items() if k in PARTS.values())
    totals["forward, rest"] = totals.pop("forward") - parts
    return totals


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(b: int, shape: tuple[int, int, int], device: torch.device) -> dict[str, Any]:
    frames, h, w = shape
    g = torch.Generator().manual_seed(b)
    video = torch.randint(0, 256, (b, 3, frames, h, w), generator=g, dtype=torch.uint8).to(device)
    return {
        "video": video,
        "first": video[:, :, 0].clone(),
        "last": video[:, :, -1].clone(),
        "caption": ["a cartoon character walks across the room"] * b,
        "fs": torch.full((b,), 10, dtype=torch.long, device=device),
    }


@dataclasses.dataclass
class Case:
    """A training step ready to run: the stage's step module, what it trains, AdamW and the EMA."""

    net: torch.nn.Module
    unet: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    ema: Any
    disc: torch.nn.Module | None
    float8_linears: int = 0  # UNet linears running fp8 GEMMs (--float8)


def _build(
    stage: str,
    preset: str,
    device: torch.device,
    checkpointing: bool,
    compile: str = "",
    temporal_conv: str = "conv3d",
    float8: str = "",
    float8_layers: str = "large",
    channels_last: bool = False,
    recompute_budget: float = 1.0,
) -> Case:
    """The step of `stage` as train.py runs it, with random weights built directly on `device`."""
    from training import float8 as fp8
    from training.compilation import compile_blocks, compile_unet_blocks
    from training.engine import EMA, TrainConfig, adamw
    from training.models.layout import set_channels_last
    from training.models.tooncrafter import build_tooncrafter
    from training.models.unet import set_temporal_conv
    from training.models.vae import resnet_blocks
    from training.stages import decoder, rectify
    from training.stages.common import unet_blocks

    torch.manual_seed(0)
    with torch.device(device):
        model = build_tooncrafter(preset)
    set_temporal_conv(model.unet, temporal_conv)
    set_channels_last(model, channels_last)
    model.unet.set_gradient_checkpointing(checkpointing)  # main() picks the levels per measurement
    train = TrainConfig(preset=preset, gradient_checkpointing=checkpointing, eval_every=0, compile=compile)
    run = argparse.Namespace(train=train, data=None, rectify=rectify.RectifyConfig(), decoder=None)
    disc = None
    if stage == "rectify":
        built = rectify.build(model, run, None)
    else:
        from training.metrics.lpips import LPIPS

        # LPIPS-VGG with random weights (the cost is the architecture's) and the discriminator's G term;
        # the discriminator's own update is not timed.
        run.decoder = decoder.DecoderConfig(lpips_weight=0.0, disc_start=0)
        built = decoder.build(model, run, None)
        built.net.perceptual = LPIPS("vgg")
        built.net.cfg = dataclasses.replace(run.decoder, lpips_weight=1.0)
        disc = built.discriminator.to(device).requires_grad_(False)
    if float8:
        fp8.check_device(device)
    converted = fp8.convert_unet(model.unet, float8, float8_layers)
    compile_unet_blocks(model.unet, unet_blocks(model)[:-1], compile, recompute_budget)
    compile_blocks(resnet_blocks(model.vae.encoder), compile)  # frozen, as train.py does
    net = built.net.to(device).train()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    opt = adamw(params.values(), train, device)
    return Case(net, model.unet, params, opt, EMA(params, train.ema_decay), disc, len(converted))


def _step(
    case: Case,
    batch: dict[str, Any],
    amp: torch.dtype | None,
    device: torch.device,
    phases: Phases | None = None,
) -> None:
    """forward under autocast, backward, clip, AdamW, EMA: one micro-batch of train.py's loop."""
    from training.engine import autocast

    span = phases.span if phases is not None else lambda name: contextlib.nullcontext()
    with span("forward"), autocast(device, amp):
        out = case.net(batch, case.disc) if case.disc is not None else case.net(batch)
    with span("backward"):
        out["loss"].backward()
    with span("clip + AdamW + EMA"):
        torch.nn.utils.clip_grad_norm_(list(case.params.values()), 0.5)
        case.opt.step()
        case.opt.zero_grad(set_to_none=True)
        case.ema.update(case.params)


_graphs_saved = 0


def _compiled_since_saved() -> bool:
    """Whether Dynamo compiled a graph since the last call that said so: the next cases of one step
    reuse its graphs, and their cache would be the same file again."""
    import torch._dynamo.utils

    global _graphs_saved
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    new, _graphs_saved = graphs > _graphs_saved, graphs
    return new


_signalled = False
_waited: dict[str, Any] | None = None  # what --wait-for waited, once it has


def _signal_compiled(args: argparse.Namespace) -> None:
    """Once, after the first warm-up step: say that this bench's compile is over (--signal-compiled)."""
    global _signalled
    if args.signal_compiled and not _signalled:
        args.signal_compiled.parent.mkdir(parents=True, exist_ok=True)
        args.signal_compiled.touch()
    _signalled = True


def _wait_for_gpu(args: argparse.Namespace) -> None:
    """Once, before any step after the first: wait until the GPU is left to this bench (--wait-for),
    holding only live tensors meanwhile (the allocator's cached blocks go back to the card for the
    other bench: after a step at batch 6, tens of GiB)."""
    global _waited
    if args.wait_for and _waited is None:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        _waited = wait_for_file(args.wait_for, args.wait_max, "training bench, before its timed steps")


def measure(
    case: Case,
    stage: str,
    b: int,
    args: argparse.Namespace,
    device: torch.device,
    amp,
    flops_per_clip: float | None,
) -> dict[str, Any] | None:
    """One batch size on the built step -> dict of numbers, or None when it runs out of memory."""
    shape = SHAPES[args.preset]
    try:
        batch = _batch(b, shape, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            t0 = time.perf_counter()
            watch = compile_progress(f"{stage} batch {b}: compiling") if i == 0 and args.compile else None
            with watch or contextlib.nullcontext():
                _step(case, batch, amp, device)
                _sync(device)
            # printed at once: a run stopped at its time limit still tells how long compiling took
            print(f"{stage} batch {b}: warm-up step {i + 1} {time.perf_counter() - t0:.1f} s", flush=True)
            if i == 0:
                _signal_compiled(args)
            if i == 0 and args.compile and args.compile_cache and _compiled_since_saved():
                saving = time.perf_counter()
                size = save_compile_cache(args.compile_cache)
                print(
                    f"compile cache {args.compile_cache}: {cache_saved(size, time.perf_counter() - saving)}",
                    flush=True,
                )
            if i == 0:
                _wait_for_gpu(args)
        _signal_compiled(args)  # without warm-up steps: before the first timed one
        _wait_for_gpu(args)
        times = []
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            _step(case, batch, amp, device)
            _sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        case.opt.zero_grad(set_to_none=True)
        return None
    sec = statistics.median(times)
    _profile_once(case, batch, amp, device, args, f"one {stage} step at batch {b}")
    phases = breakdown(case, batch, amp, device) if args.breakdown else None
    row = {
        "stage": stage,
        "batch": b,
        "frames": shape[0],
        "height": shape[1],
        "width": shape[2],
        "s_per_step": sec,
        "samples_per_s": b / sec,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        # what the allocator held at most: the cap applies to this, fragmentation included
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30
        if device.type == "cuda"
        else None,
        "tflop_per_step": flops_per_clip * b / 1e12 if flops_per_clip else None,
    }
    if phases is not None:
        row["breakdown_s"] = {k: round(v, 4) for k, v in phases.items()}
    if flops_per_clip:
        row["achieved_tflops"] = flops_per_clip * b / sec / 1e12
    return row


def _profile_once(case: Case, batch, amp, device: torch.device, args: argparse.Namespace, label: str) -> None:
    """--profile: after the first case's timed steps, one more step under torch.profiler; its kernel time
    by kind and its most expensive kernels are written to the file (once per run)."""
    if args.profile and not getattr(args, "profiled", False):
        from training.profile_unet import kernel_table

        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(kernel_table(lambda: _step(case, batch, amp, device), device, 40, label))
        args.profiled = True
        print(f"profile of {label}: {args.profile}", flush=True)


def count_flops(stage: str, preset: str) -> float:
    """Model FLOPs of one clip's step of `stage` as it trains (forward + backward; checkpointing off so
    nothing counts twice; frozen weights get no weight gradient), on the meta device: no memory, no run."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    case = _build(stage, preset, meta, checkpointing=False)
    batch = _batch(1, SHAPES[preset], meta)
    counter = FlopCounterMode(display=False)
    with counter:
        out = case.net(batch, case.disc) if case.disc is not None else case.net(batch)
        out["loss"].backward()
    return float(counter.get_total_flops())


COUNTED = "FlopCounterMode, meta device, the stage's trained set"


def model_flops(stage: str, preset: str) -> dict[str, Any]:
    """count_flops as the report keeps it (TFLOP per clip). The count traces the step on the meta device,
    which a GPU machine's torch version might not support for every op: that must not cost the session
    its timed steps, so a failed count falls back to MODEL.md Appendix E for toon-512 (which overstates
    the rectify step by 11%: its frozen layers get no weight gradient) and to no MFU otherwise, and
    says why. The timed seconds per step are kept either way, so MFU can be recounted later."""
    appendix_e = APPENDIX_E_TFLOP[stage] if preset == "toon-512" else None
    try:
        value = count_flops(stage, preset) / 1e12
        return {"value": value, "counted": True, "source": COUNTED, "appendix_e": appendix_e}
    except Exception as e:  # noqa: BLE001 - any failure of the count; the steps still get timed
        fallback = "MODEL.md Appendix E" if appendix_e else "none: no MFU"
        source = f"{fallback} (the meta-device count failed: {type(e).__name__}: {e})"
        print(f"{stage}: model FLOPs from {source}", flush=True)
        return {"value": appendix_e, "counted": False, "source": source, "appendix_e": appendix_e}


def matmul_tflops(device: torch.device, amp) -> float | None:
    """A measured dense bf16 matmul rate (8192^3), the practical ceiling beside the spec peak."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    _sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels_list = _levels(args.checkpoint_levels)
    try:
        check_float8_settings(args.float8, args.float8_layers)
    except ValueError as e:
        raise SystemExit(f"--float8: {e}") from None
    try:
        check_recompute_budget(args.recompute_budget, args.compile)
    except ValueError as e:
        raise SystemExit(f"--recompute-budget: {e}") from None
    if args.memory_cap_gib < 0:
        raise SystemExit(f"--memory-cap-gib: GiB >= 0 (0: the whole card), got {args.memory_cap_gib}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (use --preset tiny there)", file=sys.stderr)
        return 2
    amp = torch.bfloat16 if device.type == "cuda" else None  # the training default (train.precision auto)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    report: dict[str, Any] = {
        "device": name,
        "preset": args.preset,
        "torch": torch.__version__,
        "autocast": str(amp),
        "gradient_checkpointing": not args.no_checkpointing,
        "checkpoint_levels": levels_list,
        "compile": args.compile or None,
        # TORCHINDUCTOR_FORCE_LAYOUT_OPT=1: channels-last in every compiled block; by default inductor's
        # heuristic leaves the blocks with a conv of >= 2x more input than output channels in NCHW
        "inductor_force_layout_opt": bool(args.compile) and _forced_layout(),
        "temporal_conv": args.temporal_conv,
        "channels_last": args.channels_last,
        "recompute_budget": args.recompute_budget if args.compile else None,
        "float8": args.float8 or None,
        "float8_layers": args.float8_layers if args.float8 else None,
        "peak_bf16_tflops": peak,
        "memory_cap_gib": cap_memory(device, args.memory_cap_gib),
        "matmul_bf16_tflops": matmul_tflops(device, amp),
        "rows": [],
    }
    stages = [s for s, skip in (("rectify", args.no_rectify), ("decoder", args.no_decoder)) if not skip]
    if args.compile and args.compile_cache:
        loaded = load_compile_cache(args.compile_cache)
        print(f"compile cache {args.compile_cache}: {'loaded' if loaded else 'absent'}", flush=True)
    for stage in stages:
        count = report[f"{stage}_tflop_per_clip"] = model_flops(stage, args.preset)
        flops = count["value"] * 1e12 if count["value"] else None
        batches = [int(x) for x in args.batches.split(",")] if stage == "rectify" else [1]
        case = _build(
            stage,
            args.preset,
            device,
            not args.no_checkpointing,
            args.compile,
            args.temporal_conv,
            args.float8,
            args.float8_layers,
            args.channels_last,
            args.recompute_budget,
        )
        if args.float8:
            report[f"{stage}_float8_linears"] = case.float8_linears
            print(f"{stage}: {case.float8_linears} UNet linears in fp8 ({args.float8})", flush=True)
        # the same step (and its compiled blocks) under each checkpointing choice (the decoder's own
        # checkpointing has no levels), then the first choice again with cuDNN's autotuning: the flag is
        # read when a conv runs, so nothing recompiles, and the case's warm-up steps do the tuning
        settings = [(levels, False) for levels in (levels_list if stage == "rectify" else [0])]
        settings += [(settings[0][0], True)] if args.cudnn_benchmark else []
        for levels, tuned in settings:
            case.unet.set_gradient_checkpointing(
                not args.no_checkpointing and levels is not None, levels or 0
            )
            torch.backends.cudnn.benchmark = tuned
            for b in batches:
                row = measure(case, stage, b, args, device, amp, flops)
                if row is None:
                    print(f"{stage} batch {b}, checkpoint levels {levels}: out of memory", flush=True)
                    report["rows"].append(
                        {"stage": stage, "batch": b, "checkpoint_levels": levels, "oom": True}
                    )
                    break
                row["checkpoint_levels"] = levels
                row["cudnn_benchmark"] = tuned
                if peak and row.get("achieved_tflops"):
                    row["mfu"] = row["achieved_tflops"] / peak
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
        torch.backends.cudnn.benchmark = False
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if _waited is not None:
        report["waited_for_gpu"] = _waited
    fitting = [r for r in report["rows"] if r["stage"] == "rectify" and not r.get("oom")]
    report["rectify_largest_batch"] = max((r["batch"] for r in fitting), default=None)
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _forced_layout() -> bool:
    import torch._inductor.config

    return bool(torch._inductor.config.force_layout_optimization)


def _levels(text: str) -> list[int | None]:
    """--checkpoint-levels: "0,2,none" -> [0, 2, None] (None: no block recomputed by checkpointing)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() or part == "none" for part in parts):
        raise SystemExit(
            f"--checkpoint-levels: a comma-separated list of integers >= 0 or none, got {text!r}"
        )
    return [None if part == "none" else int(part) for part in parts]


def _recomputed(report: dict[str, Any], row: dict[str, Any]) -> str:
    tuned = ", cudnn.benchmark" if row.get("cudnn_benchmark") else ""
    if not report["gradient_checkpointing"] or row.get("checkpoint_levels", 0) is None:
        return "none" + tuned
    if row["stage"] != "rectify" or not row.get("checkpoint_levels"):
        return "all" + tuned
    return f"{row['checkpoint_levels']} finest{tuned}"


def _budget(report: dict[str, Any]) -> str:
    budget = report.get("recompute_budget")
    return "" if budget in (None, 1.0) else f", compiled blocks keep {budget:g} of their activations"


def _cap(report: dict[str, Any]) -> str:
    cap = report.get("memory_cap_gib")
    return f", the allocator capped at {cap:g} GiB" if cap else ""


def _count_line(stage: str, count: dict[str, Any]) -> str:
    if not count["counted"]:  # model_flops fell back
        value = f"{count['value']:.4g} TFLOP" if count["value"] else "unknown"
        return f"model FLOPs per {stage} clip: {value}, from {count['source']}"
    appendix = f" (MODEL.md Appendix E: {count['appendix_e']})" if count.get("appendix_e") else ""
    return f"model FLOPs per {stage} clip: {count['value']:.4g} TFLOP as it trains{appendix}"


def _table(report: dict[str, Any]) -> str:
    fp8 = f", fp8 linears ({report['float8']}, {report['float8_layers']})" if report.get("float8") else ""
    lines = [
        f"{report['device']}, {report['preset']}, autocast {report['autocast']}, gradient checkpointing"
        f" {'on' if report['gradient_checkpointing'] else 'off'}, compile {report['compile']}"
        f"{' (layout optimisation forced)' if report.get('inductor_force_layout_opt') else ''}"
        f"{', activations channels-last' if report.get('channels_last') else ''}{fp8}"
        f"{_budget(report)}{_cap(report)}; "
        f"peak {report['peak_bf16_tflops']} TFLOP/s (spec), matmul measured {report['matmul_bf16_tflops']}",
        "| stage | batch | recomputed UNet levels | s/step | samples/s | peak GiB (reserved) | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    counts = [(stage, report.get(f"{stage}_tflop_per_clip")) for stage in ("rectify", "decoder")]
    lines[1:1] = [_count_line(stage, c) for stage, c in counts if c]
    for r in report["rows"]:
        if r.get("oom"):
            lines.append(f"| {r['stage']} | {r['batch']} | {_recomputed(report, r)} | OOM | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mem += f" ({r['peak_reserved_gib']:.1f})" if r.get("peak_reserved_gib") is not None else ""
        tf = f"{r['achieved_tflops']:.1f}" if r.get("achieved_tflops") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(
            f"| {r['stage']} | {r['batch']} | {_recomputed(report, r)} | {r['s_per_step']:.3f} |"
            f" {r['samples_per_s']:.2f} | {mem} | {tf} | {mfu} |"
        )
    for r in report["rows"]:
        if r.get("breakdown_s"):
            total = sum(r["breakdown_s"].values())
            parts = ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in r["breakdown_s"].items())
            lines.append(f"{r['stage']} batch {r['batch']}, levels {_recomputed(report, r)}: {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
