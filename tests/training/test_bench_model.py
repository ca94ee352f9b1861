"""training.bench_model (the model issue's GPU check) runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json

from training import bench_model


def test_bench_model_smoke_mode_times_train_steps_and_sampling(tmp_path):
    out = tmp_path / "model.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--dtype", "bf16", "--frames", "4", "--steps", "2",
            "--repeats", "1", "--temporal-conv", "conv2d", "--json", str(out)]  # fmt: skip
    assert bench_model.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["temporal_conv"] == "conv2d" and report["dtype"] == "torch.bfloat16"
    for key in ("train_step", "train_step_checkpointing", "sample_sequential_cfg", "sample_batched_cfg"):
        assert report[key]["seconds"] > 0, key
    assert report["sample_batched_cfg"]["steps"] == 2
