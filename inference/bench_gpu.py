"""GPU check of issue 6: seconds per interpolation and peak memory, with and without torch.compile.

    python -m inference.bench_gpu --json bench.json                   # toon-512, 16x320x512, 50 steps, bf16
    python -m inference.bench_gpu --preset tiny --device cpu --steps 2 --height 32 --width 64   # smoke test

Random weights of the preset (timing does not depend on their values), built directly on the device. The
timed path is the one `inbetweener interpolate` runs (inference/sampler.py): VAE encode of the two
keyframes, 50 DDIM steps x 2 guidance branches of the UNet, the dual-reference decode plus the reference's
second decode. The context is the CLIP towers' when open_clip is importable, else random text tokens and
random CLIP image tokens through the real image projector (open_clip is not on the GPU machine; the towers
cost 0.38 of the sample's 1,343 TFLOP). Anchor: the reference README, ~24 s and ~24 GB on an A100;
targets on an H100: <= 5 s, <= 16 GB. `--compile staged` times the UNet compiled with the decoder eager,
then with the decoder's blocks compiled too, so that a run stopped while the decoder compiles still has
the first mode's numbers.

Measured on an H200 (torch 2.11, bf16, random context, reference double decode, median of 2 after a warm-up):
eager with the reference's two guidance calls 10.62 s; eager with one batch-2 call (the default) 8.77 s;
compiled 5.10 s (the first, compiling sample 104 s). Peak allocated 10.53 GiB in all three (reserved 16.7-17.7).
On an H100 (2026-11-27, BENCHMARKS.md): 5.54 s with the UNet compiled, 5.12 s (median of 3) with the VAE
decoder's blocks compiled too, peak 8.65 GiB allocated (12.0 reserved).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from inference.cuda_graph import GraphedCall
from training.compilation import (
    cache_saved,
    compile_progress,
    load_compile_cache,
    save_compile_cache,
    wait_for_file,
)
from training.models.unet import TEMPORAL_CONV_IMPLS, TemporalConvBlock, set_temporal_conv
from training.profile_unet import kernel_table

# MODEL.md Appendix E (toon-512, b=1, 16 frames at 320x512, 50 steps): the reference's whole sample.
SAMPLE_TFLOP = 1343.2
SAMPLE_TFLOP_SINGLE_DECODE = SAMPLE_TFLOP - 33.15


class NoCLIPToonCrafter(nn.Module):
    """ToonCrafter's networks without the CLIP towers (`cond_stage_model` = `embedder` = None), built from the
    same config and classes, for machines without open_clip."""

    def __init__(self, cfg):
        super().__init__()
        from training.diffusion.schedule import schedule_buffers
        from training.models.resampler import Resampler
        from training.models.tooncrafter import DiffusionWrapper
        from training.models.unet import UNet3D
        from training.models.vae import AutoencoderKL

        self.cfg = cfg
        self.model = DiffusionWrapper(UNet3D(cfg.unet))
        self.first_stage_model = AutoencoderKL(
            replace(cfg.vae, dual_ref=cfg.dual_ref_decoder, scale_factor=cfg.scale_factor)
        )
        self.image_proj_model = Resampler(cfg.resampler)
        self.cond_stage_model = self.embedder = None
        for name, value in schedule_buffers(cfg.schedule).items():
            self.register_buffer(name, value)

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    def schedule(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))


def build(preset: str, device: torch.device, with_clip: bool) -> nn.Module:
    from training.models.tooncrafter import ToonCrafter, tooncrafter_config

    cfg = tooncrafter_config(preset)
    with torch.device(device):  # random init on the device: seconds instead of minutes for 2.6 B numbers
        model = ToonCrafter(cfg) if with_clip else NoCLIPToonCrafter(cfg)
    if with_clip:
        model.init_buffers(device)
    return model


def one_sample(im, first, last, settings, seed: int, with_clip: bool, tell=None) -> dict[str, float]:
    """One interpolation, timed by phase (synchronised), as sampler.interpolate runs it; `tell(phase,
    seconds)` hears of each phase as it ends (the compiling sample's phases, before a time limit)."""
    from inference.sampler import decode_latents, encode_context, encode_keyframes, precision, sample_latents

    def sync() -> float:
        if im.device.type == "cuda":
            torch.cuda.synchronize(im.device)
        return time.perf_counter()

    times = {}
    t0 = sync()
    generator = torch.Generator("cpu").manual_seed(seed)
    if with_clip:
        context, uncond = encode_context(im, ["an anime scene"], first)
    else:
        cfg = im.model.cfg
        text = torch.randn(2, cfg.clip.context_length, cfg.unet.context_dim, generator=generator).to(
            im.device
        )
        clip_tokens = torch.randn(2, 257, cfg.resampler.embedding_dim, generator=generator).to(im.device)
        with torch.no_grad(), precision(im.device, im.dtype):
            image = im.model.image_proj_model(clip_tokens)
        context, uncond = (
            torch.cat([text[:1], image[:1]], 1).float(),
            torch.cat([text[1:], image[1:]], 1).float(),
        )
    tell = tell or (lambda phase, seconds: None)
    t1 = sync()
    tell("context", t1 - t0)
    c_concat, refs = encode_keyframes(im.vae, first, last, settings.frames, generator, im.device)
    t2 = sync()
    tell("encode", t2 - t1)
    z = sample_latents(im, c_concat, context, uncond, settings, generator, progress=False)
    t3 = sync()
    tell("sampling", t3 - t2)
    decode_latents(im, z, refs, settings)
    t4 = sync()
    tell("decode", t4 - t3)
    times.update(context=t1 - t0, encode=t2 - t1, sampling=t3 - t2, decode=t4 - t3, total=t4 - t0)
    return times


def bench(args: argparse.Namespace) -> dict:
    from inference.sampler import InferenceModel, SamplerSettings, default_dtype

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype
    ) or default_dtype(device)
    with_clip = importlib.util.find_spec("open_clip") is not None and not args.no_clip
    settings = SamplerSettings(
        steps=args.steps,
        frames=args.frames,
        reference_decode=not args.single_decode,
        batch_cfg=not args.sequential_cfg,
    )
    t0 = time.perf_counter()
    model = build(args.preset, device, with_clip)
    set_temporal_conv(model.unet, args.temporal_conv)
    build_s = time.perf_counter() - t0
    g = torch.Generator("cpu").manual_seed(0)
    first = torch.rand(1, 3, args.height, args.width, generator=g) * 2 - 1
    last = torch.rand(1, 3, args.height, args.width, generator=g) * 2 - 1
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"frames": args.frames, "height": args.height, "width": args.width},
        "settings": asdict(settings),
        "context": "CLIP towers"
        if with_clip
        else "random text + CLIP-image tokens through the Resampler (no open_clip)",
        "temporal_conv": args.temporal_conv,
        "channels_last": args.channels_last,
        "build_s": round(build_s, 2),
        "runs": {},
    }
    print(f"built {args.preset} in {build_s:.1f} s", flush=True)
    modes = MODES[args.compile]  # (label, compile the UNet, compile the decoder's blocks)
    if args.compile != "off" and args.compile_cache:
        loaded = load_compile_cache(args.compile_cache)
        print(f"compile cache {args.compile_cache}: {'loaded' if loaded else 'absent'}", flush=True)
    for mode, compiled, decoder in modes:
        # the towers visit from host memory first (the default on cards under 24 GiB); --clip-resident then
        # times them kept on the device (the default on larger cards)
        im = InferenceModel(
            model,
            device,
            dtype,
            compile=compiled,
            compile_decoder=decoder,
            offload_clip=True,
            channels_last=args.channels_last,
        )
        report.setdefault("compiled_decoder_blocks", {})[mode] = im.compiled_decoder_blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def tell(phase: str, seconds: float, mode: str = mode) -> None:
            print(f"{mode} first sample, {phase}: {seconds:.1f} s", flush=True)

        with compile_progress(f"{mode} first sample, compiling") if compiled else contextlib.nullcontext():
            first_sample = one_sample(
                im, first, last, settings, 0, with_clip, tell
            )  # warm-up (and compiling)
        # printed at once: a run stopped at its time limit still tells how long compiling took
        print(f"{mode} first sample: {first_sample['total']:.1f} s", flush=True)
        if compiled and args.compile_cache:
            saving = time.perf_counter()
            size = save_compile_cache(args.compile_cache)
            print(
                f"compile cache {args.compile_cache}: {cache_saved(size, time.perf_counter() - saving)}",
                flush=True,
            )
        if args.wait_for and "waited_for_gpu" not in report:  # once, before the first timed sample
            report["waited_for_gpu"] = wait_for_file(
                args.wait_for, args.wait_max, "interpolation bench, before its timed samples"
            )
        timed = functools.partial(timed_run, im, first, last, settings, with_clip, args, device)
        report["runs"][mode] = run = {"first_sample_s": round(first_sample["total"], 3), **timed()}
        print(f"{mode}: {json.dumps(run)}", flush=True)
        # after each mode: a run stopped at a time limit keeps what it measured
        write_report(report, args.json)
        if args.cudnn_benchmark:
            # The same compiled graphs (the flag is read when a conv runs, not traced), with cuDNN timing
            # its algorithms for each conv shape during one untimed sample, then the timed ones.
            torch.backends.cudnn.benchmark = True
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # the tuning sample's workspaces count
            tuning = one_sample(im, first, last, settings, 0, with_clip)
            run = {"tuning_sample_s": round(tuning["total"], 3), **timed()}
            torch.backends.cudnn.benchmark = False
            report["runs"][f"{mode}, cudnn.benchmark"] = run
            print(f"{mode}, cudnn.benchmark: {json.dumps(run)}", flush=True)
            write_report(report, args.json)
        if args.clip_resident:
            # The same graphs again with the CLIP towers kept on the device instead of visiting from pinned
            # host memory for each sample (interpolate's default on cards of >= 24 GiB): the context phase's upload.
            im.keep_clip_on_device()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            report["runs"][f"{mode}, CLIP towers on the device"] = run = timed()
            print(f"{mode}, CLIP towers on the device: {json.dumps(run)}", flush=True)
            write_report(report, args.json)
        if args.cuda_graph and GraphedCall.applies(device):
            # The same UNet call (the same compiled kernels) replayed as one CUDA graph per step
            # (interpolate --cuda-graph), after the rows above: one launch instead of ~1,500 per step.
            a, kw = unet_inputs(im, first, last, settings, with_clip)
            im.unet = graphed = GraphedCall(im.unet)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            from inference.sampler import precision

            recording = time.perf_counter()
            with torch.no_grad(), precision(device, im.dtype):  # as sample_latents calls it
                difference = graphed.max_difference(*a, **kw)  # records the graph first
            print(
                f"{mode}: UNet call recorded as a CUDA graph in {time.perf_counter() - recording:.1f} s",
                flush=True,
            )
            label = f"{mode}, UNet as a CUDA graph" + (
                ", CLIP towers on the device" if args.clip_resident else ""
            )
            report["runs"][label] = run = {"max_abs_difference_to_direct_call": difference, **timed()}
            print(f"{label}: {json.dumps(run)}", flush=True)
            write_report(report, args.json)
        if args.profile and mode == modes[-1][0]:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            short = replace(
                settings, steps=min(settings.steps, args.profile_steps)
            )  # same shapes: no recompiling
            sample = functools.partial(one_sample, im, first, last, short, 99, with_clip)
            args.profile.write_text(kernel_table(sample, device, args.profile_rows))
        del im
    return report


def unet_inputs(im, first, last, settings, with_clip: bool) -> tuple[tuple, dict]:
    """The arguments of the UNet's first call in a one-step sample of these shapes."""
    seen, unet = [], im.unet

    def spy(*a, **kw):
        seen.append((a, kw))
        return unet(*a, **kw)

    im.unet = spy
    try:
        one_sample(im, first, last, replace(settings, steps=1), 5, with_clip)
    finally:
        im.unet = unet
    return seen[0]


# --compile: the modes timed, in order. "staged" first compiles the UNet alone (its graph is then reused),
# then adds the VAE decoder's blocks: a run stopped while the decoder compiles keeps the UNet's numbers.
MODES = {
    "both": [("eager", False, False), ("compiled", True, True)],
    "on": [("compiled", True, True)],
    "off": [("eager", False, False)],
    "staged": [("compiled, UNet only", True, False), ("compiled", True, True)],
}


def timed_run(im, first, last, settings, with_clip: bool, args, device: torch.device) -> dict:
    """Median seconds (and phases) of `args.repeats` samples after the warm-up, peak memory since the
    caller reset the peak counters (before the warm-up), and TFLOP/s at the full size."""
    timed = [one_sample(im, first, last, settings, 1 + i, with_clip) for i in range(args.repeats)]
    seconds = statistics.median(t["total"] for t in timed)
    run = {
        "seconds_per_sample": round(seconds, 3),
        "phases_s": {k: round(statistics.median(t[k] for t in timed), 3) for k in timed[0]},
        "repeats": args.repeats,
    }
    if device.type == "cuda":
        run["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        run["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    if (args.preset, args.frames, args.height, args.width, args.steps) == ("toon-512", 16, 320, 512, 50):
        flop = SAMPLE_TFLOP if settings.reference_decode else SAMPLE_TFLOP_SINGLE_DECODE
        run["tflop_per_s"] = round(flop / seconds, 1)
    return run


def write_report(report: dict, path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="toon-512", choices=("toon-512", "tiny"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on the CPU"
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="timed samples after one warm-up (median reported)")
    p.add_argument(
        "--compile",
        choices=tuple(MODES),
        default="both",
        help="both: eager, then compiled; staged: the UNet compiled alone, then with the decoder's blocks too",
    )
    p.add_argument("--single-decode", action="store_true", help="skip the reference's second decode")
    p.add_argument(
        "--sequential-cfg",
        action="store_true",
        help="two UNet calls per step, as the reference (default: one of batch 2)",
    )
    p.add_argument(
        "--compile-cache",
        type=Path,
        help="torch.compile's compiled artifacts: loaded before compiling when the file exists, written after"
        " the first compiled sample (carry it to the next GPU machine of the same torch and card)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="after each mode's timing, time it again with torch.backends.cudnn.benchmark on (cuDNN picks each"
        " conv's algorithm by timing them during one untimed sample; no recompiling)",
    )
    p.add_argument(
        "--clip-resident",
        action="store_true",
        help="after each mode's timing (CLIP towers visiting from pinned host memory for each sample, interpolate's"
        " default on cards under 24 GiB), time it again with the towers kept on the device (the default on larger"
        " cards)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="after each mode's timing (and --clip-resident's), time it again with each UNet call replayed as"
        " a CUDA graph (interpolate --cuda-graph), and report its largest difference to the direct call",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="every mode with the UNet's activations channels-last (interpolate --channels-last)",
    )
    p.add_argument("--no-clip", action="store_true", help="random context even when open_clip is present")
    p.add_argument(
        "--temporal-conv",
        choices=TEMPORAL_CONV_IMPLS,
        default=TemporalConvBlock.impl,
        help="kernel of the UNet's (3,1,1) temporal convs (same weights and math; see training.profile_unet)",
    )
    p.add_argument(
        "--profile", type=Path, help="write torch.profiler's table of one more sample (last mode) here"
    )
    p.add_argument("--profile-rows", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=5, help="DDIM steps of the profiled sample")
    p.add_argument(
        "--wait-for",
        type=Path,
        metavar="FILE",
        help="before the first timed sample, wait until FILE exists, at most --wait-max seconds: another"
        " benchmark compiling on the same GPU creates it when its compile is over (training.bench_gpu"
        " --signal-compiled), so that its first step does not run beside the timed samples",
    )
    p.add_argument("--wait-max", type=float, default=240.0, help="seconds --wait-for waits at most")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    report = bench(args)
    write_report(report, args.json)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
