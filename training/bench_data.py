"""Can the training data keep up with the GPU? Windows per second of the training loader on this machine's
CPUs, against the decoding it cannot do without, measured in the same run on the same clips.

    python -m training.bench_data                      # 24 generated cartoon clips of 512x320, 1 and 2 workers
    python -m training.bench_data --data OUT/shards/train --workers 1,2,4 --json data.json
    python -m training.bench_data --clips 4 --seconds 1 --size 128x80 --windows 8   # smoke (a test runs it)

Without --data it writes --clips cartoon clips (pipeline/samples.py's drawings, --seconds long at 24 fps,
encoded as the curate job encodes clips: libx264 veryfast, crf 18) into 4 shards in a temporary folder.
What it times, on the same shards, in this order:
* `decode floor`: PyAV decoding each window's frames in this process, from the clip's first frame to the
  window's last (H.264 decodes in order, so training's decode_window cannot skip them), nothing else;
* `decode_window`: training/shard_samples.py's whole per-clip work in this process: that decoding, the 16
  picked frames' RGB conversion, the cover-resize and crop to 320x512;
* `loader, W workers`: make_loader's DataLoader (W worker processes, --batch windows per batch, the
  shuffle buffer and the prefetching), windows/s over --windows windows after its first batch (the
  workers' start-up is left out).
Every part draws the same windows (data.sample_rng: the loader's own draws at epoch 0). The rectify step
of one GPU consumes --gpu-rate windows/s (default 4.85: the compiled step at batch 6 on an H100,
BENCHMARKS.md); the table says how many loader workers at the measured rate one GPU needs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training.data import DataConfig, make_loader, sample_rng
from training.shard_samples import _decode_frames, decode_window
from training.shards import iter_tar_samples, list_shards, open_shard, write_shard

GPU_RATE = 4.85  # windows/s of one H100's compiled rectify step at batch 6 (BENCHMARKS.md, fourth run)
SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.bench_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", default="", help="train shards (any form of data.train); default: generated clips"
    )
    p.add_argument("--clips", type=int, default=24, help="clips to generate without --data")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each generated clip")
    p.add_argument("--size", default="512x320", help="WIDTHxHEIGHT of the generated clips")
    p.add_argument("--workers", default="1,2", help="loader worker counts to time")
    p.add_argument("--batch", type=int, default=2, help="windows per loader batch")
    p.add_argument("--windows", type=int, default=48, help="windows timed per loader case")
    p.add_argument(
        "--gpu-rate", type=float, default=GPU_RATE, help="windows/s one GPU's training step consumes"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def generate_shards(folder: Path, clips: int, seconds: float, size: tuple[int, int]) -> list[str]:
    """`clips` cartoon clips (drawings held on ones, twos or threes) as the curate job writes them, in 4
    shards (fewer when there are fewer clips)."""
    from pipeline.samples import PALETTES, Shot, shot_frames
    from pipeline.video_encode import encode_clip

    palettes = [p for p in PALETTES if p != "title"]
    samples = []
    for i in range(clips):
        shot = Shot(
            100 + i, "animated", ("ones", "twos", "threes")[i % 3], seconds, palettes[i % len(palettes)]
        )
        frames = list(shot_frames(shot, SEED, size, 24))
        meta = {"clip_id": f"clip{i:04d}", "fps": 24.0, "num_frames": len(frames), "width": size[0],
                "height": size[1], "caption": "a cartoon character moving"}  # fmt: skip
        samples.append(
            {"key": meta["clip_id"], "mp4": encode_clip(frames, 24), "meta": meta, "caption": meta["caption"]}
        )
    shards = min(4, clips)
    return [str(write_shard(folder / f"{s:06d}.tar", samples[s::shards])) for s in range(shards)]


def read_samples(shards: list[str]) -> list[dict[str, Any]]:
    samples = []
    for shard in shards:
        with open_shard(shard) as stream:
            samples.extend(iter_tar_samples(stream))
    return samples


def time_in_process(samples: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
    """decode_window on every sample, then the decoding alone of the same windows: seconds per window each."""
    windows, t0 = [], time.perf_counter()
    for sample in samples:
        windows.append(decode_window(sample, cfg, sample_rng(SEED, 0, sample["__key__"])))
    whole = (time.perf_counter() - t0) / len(samples)
    t0 = time.perf_counter()
    for sample, window in zip(samples, windows, strict=True):
        _decode_frames(sample["mp4"], window["start"] + window["stride"] * (cfg.frames - 1))
    floor = (time.perf_counter() - t0) / len(samples)
    decoded = statistics.mean(w["start"] + w["stride"] * (cfg.frames - 1) + 1 for w in windows)
    return {"decode_floor_s": floor, "decode_window_s": whole, "frames_decoded_per_window": decoded}


def time_loader(shards: list[str], cfg: DataConfig, batch: int, windows: int) -> float:
    """Windows per second of make_loader's DataLoader after its first batch."""
    loader = iter(make_loader(shards, cfg, batch, SEED))
    next(loader)  # the workers' start-up and first decode
    batches = max(1, math.ceil(windows / batch))
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * batch / (time.perf_counter() - t0)
    del loader
    return rate


def run(args: argparse.Namespace, shards: list[str]) -> dict[str, Any]:
    samples = read_samples(shards)
    if not samples:
        raise SystemExit(f"no samples in {shards[:3]}")
    workers = [int(w) for w in args.workers.split(",")]
    cfg = DataConfig(shuffle_buffer=8)
    report: dict[str, Any] = {
        "clips": len(samples),
        "shards": len(shards),
        "window": [cfg.frames, cfg.height, cfg.width],
    }
    report.update(time_in_process(samples, cfg))
    report["loader"] = []
    for w in workers:
        rate = time_loader(shards, DataConfig(shuffle_buffer=8, num_workers=w), args.batch, args.windows)
        report["loader"].append({"workers": w, "windows_per_s": rate, "per_worker": rate / max(1, w)})
    report["gpu_rate"] = args.gpu_rate
    best = max(report["loader"], key=lambda r: r["per_worker"])
    report["workers_per_gpu"] = math.ceil(args.gpu_rate / best["per_worker"])
    return report


def table(report: dict[str, Any]) -> str:
    floor, whole = report["decode_floor_s"], report["decode_window_s"]
    lines = [
        f"{report['clips']} clips in {report['shards']} shards; windows of {report['window'][0]} frames at"
        f" {report['window'][2]}x{report['window'][1]}, {report['frames_decoded_per_window']:.0f} frames decoded per"
        " window on average",
        "| case | windows/s | per worker | vs decode floor |",
        "|---|---|---|---|",
        f"| decode floor (in process) | {1 / floor:.1f} | | 1.00 |",
        f"| decode_window (in process) | {1 / whole:.1f} | | {floor / whole:.2f} |",
    ]
    for r in report["loader"]:
        lines.append(
            f"| loader, {r['workers']} worker(s) | {r['windows_per_s']:.1f} | {r['per_worker']:.1f} |"
            f" {r['per_worker'] * floor:.2f} |"
        )
    lines.append(
        f"one GPU's rectify step consumes {report['gpu_rate']} windows/s: {report['workers_per_gpu']} loader"
        " worker(s) per GPU at this machine's per-worker rate"
    )
    return "\n".join(lines)


def _ints(text: str, sep: str, flag: str, count: int | None = None, minimum: int = 1) -> list[int]:
    parts = text.lower().split(sep)
    if not all(p.strip().isdigit() and int(p) >= minimum for p in parts) or (count and len(parts) != count):
        raise SystemExit(f"{flag}: expected integers >= {minimum} separated by {sep!r}, got {text!r}")
    return [int(p) for p in parts]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = _ints(args.size, "x", "--size", 2)
    args.workers = ",".join(str(w) for w in _ints(args.workers, ",", "--workers", minimum=0))
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if args.data:
            try:
                shards = list_shards(args.data)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"--data: {e}") from None
        else:
            t0 = time.perf_counter()
            shards = generate_shards(Path(tmp), args.clips, args.seconds, (width, height))
            print(f"generated {args.clips} clips in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        report = run(args, shards)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
