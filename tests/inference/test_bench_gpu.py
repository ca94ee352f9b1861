"""The GPU check's script runs end to end in its CPU smoke mode (the numbers come from a GPU run)."""

from __future__ import annotations

import json

import torch

from inference import bench_gpu


def test_bench_smoke_mode_reports_time_per_sample(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--height", "32", "--width", "64",
            "--repeats", "1", "--compile", "off", "--no-clip", "--json", str(out),
            "--temporal-conv", "conv2d", "--profile", str(tmp_path / "kernels.txt"), "--profile-rows", "5",
            "--cudnn-benchmark"]  # fmt: skip
    assert bench_gpu.main(argv) == 0
    printed = capsys.readouterr().out
    # the warm-up sample's phases are printed as each ends: a run stopped mid-compile still tells where
    assert [
        p for p in ("context", "encode", "sampling", "decode") if f"eager first sample, {p}:" in printed
    ] == [
        "context",
        "encode",
        "sampling",
        "decode",
    ]
    report = json.loads(out.read_text())
    assert report["temporal_conv"] == "conv2d"
    assert "Name" in (tmp_path / "kernels.txt").read_text()  # the profiler's table of one more sample
    run = report["runs"]["eager"]
    assert report["shape"] == {"frames": 16, "height": 32, "width": 64} and report["dtype"] == "float32"
    assert run["seconds_per_sample"] > 0 and set(run["phases_s"]) == {
        "context",
        "encode",
        "sampling",
        "decode",
        "total",
    }
    assert "Resampler" in report["context"]
    # the same mode timed again with cuDNN's autotuning, after one untimed tuning sample; flag restored
    tuned = report["runs"]["eager, cudnn.benchmark"]
    assert tuned["tuning_sample_s"] > 0 and tuned["seconds_per_sample"] > 0 and tuned["repeats"] == 1
    assert set(tuned["phases_s"]) == set(run["phases_s"])
    assert torch.backends.cudnn.benchmark is False
