"""GPU check of the model issue: toon-512 UNet with random weights.

(a) one training step (forward + backward of the v-prediction loss) at batch 1, 16x320x512,
    with gradient checkpointing off and on: seconds, peak memory, model FLOPs utilisation
    (numerator: MODEL.md Appendix E's 37.73 TFLOP, never the recompute-inflated count);
(b) 50 DDIM steps with classifier-free guidance at 16x320x512: the reference's two sequential
    branches, and both branches batched in one call: seconds, peak memory.
Needs torch only. `--preset tiny --device cpu` is the smoke mode the tests run.

  python -m training.bench_model --device cuda --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

TRAIN_STEP_TFLOP = 37.73  # MODEL.md Appendix E: UNet forward + backward, one 16-frame clip
SAMPLE_TFLOP = 1260.3  # 50 steps x 2 guidance branches
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `repeats` calls after one warm-up, and the peak memory over them."""
    fn()
    _sync(device)
    _peak_reset(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_gb(device)


def run(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    frames: int,
    steps: int,
    repeats: int,
    sample: bool = True,
    temporal_conv: str = "conv3d",
) -> dict:
    from training.diffusion.ddim import sample_ddim, uniform_trailing_timesteps
    from training.diffusion.guidance import batched_cfg_denoiser, cfg_denoiser, hybrid_model_fn
    from training.diffusion.schedule import SCHEDULE_PRESETS, schedule_buffers
    from training.models.unet import UNET_PRESETS, UNet3D, set_temporal_conv

    torch.manual_seed(0)
    cfg = UNET_PRESETS[preset]
    with torch.device(device):
        unet = UNet3D(cfg)
    unet = unet.to(dtype)
    set_temporal_conv(unet, temporal_conv)
    for module in unet.modules():  # fp32 norm parameters: what autocast computes norms in anyway
        if isinstance(module, torch.nn.GroupNorm):
            module.float()

    def amp() -> contextlib.AbstractContextManager:
        """bf16/fp16 weights run under autocast, as in training and sampling: the norms then compute in
        fp32 (the reference's GroupNorm32), which CUDA's group_norm cannot do on bf16 parameters."""
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)

    sched = {k: v.to(device) for k, v in schedule_buffers(SCHEDULE_PRESETS[preset]).items()}
    latent_hw = (40, 64) if preset == "toon-512" else (8, 8)
    ctx_dim = cfg.context_dim
    x0 = torch.randn(1, 4, frames, *latent_hw, device=device, dtype=dtype)
    concat = torch.zeros_like(x0)
    context = torch.randn(1, 77 + 16 * frames, ctx_dim, device=device, dtype=dtype)
    fs = torch.tensor([10], device=device)
    results: dict = {"preset": preset, "device": str(device), "dtype": str(dtype), "frames": frames,
                     "temporal_conv": temporal_conv}  # fmt: skip
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    # (a) training step
    unet.train()
    for checkpointing in (False, True):
        unet.set_gradient_checkpointing(checkpointing)

        def step():
            t = torch.randint(0, 1000, (1,), device=device)
            with amp():
                v = unet(torch.cat([x0, concat], 1), t, context, fs=fs)
            loss = torch.nn.functional.mse_loss(v.float(), torch.randn_like(v, dtype=torch.float32))
            loss.backward()
            unet.zero_grad(set_to_none=True)

        seconds, peak = timed(step, device, repeats)
        key = "train_step_checkpointing" if checkpointing else "train_step"
        results[key] = {"seconds": seconds, "peak_gb": peak}
        if preset == "toon-512" and frames == 16:  # the FLOP counts are for this shape only
            results[key]["tflops"] = TRAIN_STEP_TFLOP / seconds
    unet.set_gradient_checkpointing(False)
    unet.eval()
    if not sample:
        return results

    # (b) DDIM with guidance
    timesteps = uniform_trailing_timesteps(steps).to(device)
    cond = {"c_concat": concat, "c_crossattn": context, "fs": fs}
    uncond = {"c_concat": concat, "c_crossattn": torch.zeros_like(context), "fs": fs}
    model_fn = hybrid_model_fn(unet)

    # both rows with the sampler's guidance (scale 7.5, rescale 0.7): two calls per step, then one call that
    # gets x once and both contexts (the UNet runs its layers before the first cross-attention once)
    for name, den in (("sample_sequential_cfg", cfg_denoiser(model_fn, cond, uncond, 7.5, 0.7)),
                      ("sample_batched_cfg", batched_cfg_denoiser(model_fn, cond, uncond, 7.5, 0.7))):  # fmt: skip

        @torch.no_grad()
        def sample(den=den):
            x_t = torch.randn_like(x0)
            with amp():
                return sample_ddim(den, x_t, timesteps, sched, eta=1.0)

        seconds, peak = timed(sample, device, max(1, repeats // 2))
        results[name] = {"seconds": seconds, "peak_gb": peak, "steps": steps}
        if preset == "toon-512" and frames == 16:
            results[name]["tflops"] = SAMPLE_TFLOP * steps / 50 / seconds
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--preset", default="toon-512", choices=["tiny", "toon-512"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-sample", action="store_true", help="only the training steps")
    p.add_argument("--temporal-conv", choices=("conv3d", "conv2d"), default="conv3d",
                   help="kernel of the UNet's (3,1,1) temporal convs (same weights and math)")  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    results = run(
        args.preset, torch.device(args.device), DTYPES[args.dtype], args.frames, args.steps, args.repeats,
        not args.no_sample, args.temporal_conv,
    )  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
