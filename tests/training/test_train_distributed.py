"""`inbetweener train` under torchrun: 2 CPU processes on gloo, with DDP and with FSDP2 (tiny preset).

Separate from test_train.py because each run starts two Python processes (~25-35 s on 2 shared cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def latest(out: Path) -> Path:
    root = out / "checkpoints"
    return root / (root / "latest").read_text().strip()


def torchrun(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training.train",
           "rectify", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", "train.steps=2",
           "--set", "train.sample_every=0", "--set", "data.num_workers=0", *extra]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s) on cpu" in result.stdout and "-> global batch 2" in result.stdout
    return result


@pytest.mark.slow
def test_torchrun_two_ranks_ddp(tmp_path, train_shards):
    """torchrun with 2 CPU processes (gloo): DDP, one micro-batch per rank, a checkpoint at the end."""
    out = tmp_path / "ddp"
    torchrun(out, train_shards, "--set", "train.steps=3")
    assert {p.name for p in latest(out).iterdir()} >= {
        "model.safetensors",
        "state.pt",
        "rank_0.pt",
        "rank_1.pt",
    }
    # the logged throughput is the global batch's (2 samples a step), not that times the ranks
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    logged = {e.step: e for e in events.Scalars("train/samples_per_s")}
    for step in (2, 3):
        timed = 2 / (logged[step].wall_time - logged[step - 1].wall_time)
        assert 0.5 < logged[step].value / timed < 1.5, (step, logged[step].value, timed)


@pytest.mark.slow
def test_torchrun_two_ranks_fsdp(tmp_path, train_shards):
    """The same with the UNet and the projector sharded by FSDP2: per-rank shards of the training state, a
    whole (gathered) model file that inference loads."""
    out = tmp_path / "fsdp"
    torchrun(out, train_shards, "--set", "train.fsdp=true")
    assert {p.name for p in latest(out).iterdir()} >= {"model.safetensors", "shard_0.pt", "shard_1.pt"}
    weights = pytest.importorskip("inference.weights")
    assert weights.load_tooncrafter(latest(out) / "model.safetensors").cfg.unet.model_channels == 32
