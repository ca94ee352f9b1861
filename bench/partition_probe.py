"""Where the compile of the rectify step's UNet blocks spends its time before code generation, on any machine.

torch.compile with the backend `aot_eager_decomp_partition` runs what inductor runs before it generates code:
Dynamo's tracing, AOTAutograd's joint graph and its min-cut partitioner (with `train.recompute_budget`'s
activation memory budget, its knapsack solver), but no inductor codegen or Triton compile. The toon-512 UNet
is built with rectify's trainable set (training/roles.py) and each block compiled as train.py compiles them
(training/compilation.py), then one forward and backward runs on 16 frames of 8x8 latents: the graphs
have the full-size structure, the arithmetic is small. Each case runs in a process of its own (the budget is
process-wide), one after the other, and prints one line of its compile times:

    python bench/partition_probe.py                    # budgets 1.0 and 0.3, plain layout, then 0.3 channels-last
    python bench/partition_probe.py --cases 0.3:cl     # one case: budget 0.3, channels-last activations

A GPU run that is still compiling when its time runs out (stop 34: channels-last with budget 0.3, 400 s)
can be told apart from one stuck in the partitioner this way: if the cases here differ by seconds, the
time went to code generation on the GPU machine.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_case(budget: float, channels_last: bool, preset: str) -> None:
    import torch
    from torch._dynamo.utils import compile_times, counters

    from training.compilation import compile_unet_blocks
    from training.models.layout import set_channels_last
    from training.models.unet import UNET_PRESETS, UNet3D
    from training.roles import STAGE_ROLES, UNET, role

    torch.manual_seed(0)
    cfg = UNET_PRESETS[preset]
    unet = UNet3D(cfg)
    for name, p in unet.named_parameters():  # rectify's trainable set, by the roles train.py uses
        p.requires_grad_(role(UNET + name) in STAGE_ROLES["rectify"])
    set_channels_last(unet, channels_last)
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    compile_unet_blocks(unet, blocks, "aot_eager_decomp_partition", budget)
    x = torch.randn(1, cfg.in_channels, 16, 8, 8)  # [b, c, t, h, w]
    context = torch.randn(1, 77 + 16 * 16, cfg.context_dim)  # text tokens, then 16 image tokens per frame
    start = time.perf_counter()
    out = unet(x, torch.tensor([500]), context, torch.tensor([10]))
    forward = time.perf_counter() - start
    out.float().pow(2).mean().backward()
    total = time.perf_counter() - start
    times = {
        line.split(",")[0]: float(line.split(",")[1])
        for line in compile_times(repr="str", aggregate=True).splitlines()
        if line.count(",") == 1 and line.split(",")[1].strip().replace(".", "", 1).isdigit()
    }
    print(
        f"budget {budget} {'channels-last' if channels_last else 'plain'}: first forward {forward:.1f} s,"
        f" forward + backward {total:.1f} s, {counters['stats']['unique_graphs']} graphs;"
        f" Dynamo compile {times.get('_compile.compile_inner', float('nan')):.1f} s, of which AOTAutograd"
        f" {times.get('create_aot_dispatcher_function', float('nan')):.1f} s (joint graph"
        f" {times.get('aot_trace_joint_graph', float('nan')):.1f} s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default="toon-512", choices=["toon-512", "tiny"], help="tiny: a smoke run"
    )
    parser.add_argument("--cases", default="1.0,0.3,0.3:cl", help="budget[:cl] items, comma-separated")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case, in its own process
    args = parser.parse_args()
    if args.one:
        budget, _, layout = args.one.partition(":")
        one_case(float(budget), layout == "cl", args.preset)
        return
    cases = args.cases.split(",")
    for case in cases:
        budget, _, layout = case.partition(":")
        if layout not in ("", "cl") or not budget.replace(".", "", 1).isdigit():
            parser.error(f"--cases: {case!r} is not a budget, or a budget then :cl for channels-last")
    for case in cases:
        subprocess.run([sys.executable, __file__, "--one", case, "--preset", args.preset], check=True)


if __name__ == "__main__":
    main()
