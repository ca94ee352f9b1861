"""One UNet call (toon-512, both guidance branches: the input once, two contexts; 16x40x64 latents, bf16) timed
with the branches' inputs stacked (a batch of 2, the baseline), with them shared (the layers before the first
cross-attention run once, UNet3D.forward), and replayed as a CUDA graph (inference/cuda_graph.GraphedCall),
with the largest differences. A stack dump after 150 s shows where a stuck run waits.

    python bench/cuda_graph_check.py [toon-512|tiny] [cuda|cpu] [compile|eager] [seconds before the stack dump]
"""

import argparse
import faulthandler
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference.bench_gpu import build  # noqa: E402
from inference.cuda_graph import GraphedCall  # noqa: E402
from inference.sampler import InferenceModel, precision  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("preset", nargs="?", default="toon-512", choices=["toon-512", "tiny"])
parser.add_argument("device", nargs="?", default="cuda")
parser.add_argument("mode", nargs="?", default="eager", choices=["compile", "eager"])
parser.add_argument("stack_dump_s", nargs="?", type=int, default=150, help="seconds before the stack dump")
args = parser.parse_args()
faulthandler.dump_traceback_later(args.stack_dump_s, exit=True)
preset = args.preset
dev = torch.device(args.device)
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
model = build(preset, dev, with_clip=False)
compiled = args.mode == "compile"
im = InferenceModel(model, dev, dtype, compile=compiled, compile_decoder=False)
cfg = model.cfg
g = torch.Generator().manual_seed(0)
h, w = (40, 64) if preset == "toon-512" else (4, 8)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


with torch.no_grad(), precision(dev, dtype):
    text = torch.randn(2, cfg.clip.context_length, cfg.unet.context_dim, generator=g).to(dev)
    image = model.image_proj_model(torch.randn(2, 257, cfg.resampler.embedding_dim, generator=g).to(dev))
    ctx = torch.cat([text, image], 1).float()
    x = torch.randn(1, 8, 16, h, w, generator=g).to(dev)  # shared by the branches, as the sampler calls it
    t = torch.tensor([500], device=dev)
    fs = torch.full((1,), 10, dtype=torch.long, device=dev)

    def per_call(fn, n=10):
        fn(x, t, ctx, fs=fs, control=None)
        t0 = sync()
        for _ in range(n):
            fn(x, t, ctx, fs=fs, control=None)
        return (sync() - t0) / n

    mode = "compiled" if compiled else "eager"
    stacked = (x.repeat(2, 1, 1, 1, 1), t.repeat(2), ctx, fs.repeat(2))  # the branches' inputs stacked

    def stacked_call(*_, **__):
        return im.unet(stacked[0], stacked[1], stacked[2], fs=stacked[3], control=None)

    baseline = per_call(stacked_call)
    direct = per_call(im.unet)
    print(
        f"{preset} UNet call ({mode}), inputs stacked for both branches: {baseline * 1e3:.1f} ms", flush=True
    )
    print(
        f"{preset} UNet call ({mode}), inputs shared: {direct * 1e3:.1f} ms ({baseline / direct:.3f}x)",
        flush=True,
    )
    shared_vs_stacked = (im.unet(x, t, ctx, fs=fs).float() - stacked_call().float()).abs().max().item()
    print(f"largest difference, shared vs stacked: {shared_vs_stacked:.3g}", flush=True)
    if GraphedCall.applies(dev):
        graphed = GraphedCall(im.unet)
        t0 = sync()
        difference = graphed.max_difference(x, t, ctx, fs=fs, control=None)
        print(
            f"recorded in {sync() - t0:.1f} s; largest difference to the direct call {difference:.3g}",
            flush=True,
        )
        replay = per_call(graphed)
        print(
            f"{preset} UNet call ({mode}), CUDA graph: {replay * 1e3:.1f} ms ({direct / replay:.2f}x)",
            flush=True,
        )
        print(f"peak allocated {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB", flush=True)
faulthandler.cancel_dump_traceback_later()
