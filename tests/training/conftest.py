"""Fixtures of the training tests: the reference parity fixtures (shared/reference/parity/<name>.*)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.shards import write_shard  # noqa: F401  (the tests' shards: KEY.mp4, KEY.json, KEY.txt)


def load_fixture(shared_reference: Path, name: str) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """-> (json spec, state_dict, inputs, outputs); fails clearly when the fixture is missing."""
    folder = shared_reference / "parity"
    spec_path, tensors_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (spec_path, tensors_path):
        if not path.is_file():
            pytest.fail(f"parity fixture missing: {path}")
    spec = json.loads(spec_path.read_text())
    tensors = load_file(str(tensors_path))
    groups: dict[str, dict[str, torch.Tensor]] = {"state_dict": {}, "input": {}, "output": {}}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        groups[group][rest] = value
    return spec, groups["state_dict"], groups["input"], groups["output"]


@pytest.fixture(scope="session")
def parity(shared_reference: Path):
    """`parity("unet")` -> (json spec, state_dict, inputs, outputs) of that fixture."""
    cache: dict[str, tuple] = {}

    def load(name: str) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
        if name not in cache:
            cache[name] = load_fixture(shared_reference, name)
        return cache[name]

    return load


# --- training data: tiny WebDataset shards written directly (tarfile + PyAV, no Ray) --------------------------


def cartoon_clip(num_frames: int, size: tuple[int, int], seed: int):
    """uint8 [t, h, w, 3]: a flat background and a flat disc moving across it, held on twos (cartoon-like)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    bg, fg = rng.integers(40, 215, 3), rng.integers(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    x0, y0 = rng.uniform(0.2, 0.4) * w, rng.uniform(0.3, 0.7) * h
    vx, vy = rng.uniform(1.0, 3.0), rng.uniform(-1.0, 1.0)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for i in range(num_frames):
        k = i - i % 2  # on twos
        inside = (xx - x0 - vx * k) ** 2 + (yy - y0 - vy * k) ** 2 < (0.18 * h) ** 2
        frames[i] = np.where(inside[..., None], fg, bg)
    return frames


def encode_mp4(frames, fps: int = 24) -> bytes:
    """An mp4 as the curate job writes clips (libx264, yuv420p; the fastest preset for tests)."""
    from pipeline.video_encode import encode_clip

    return encode_clip(list(frames), fps, preset="ultrafast")


def clip_sample(key: str, num_frames: int, size: tuple[int, int], seed: int, caption: str = "") -> dict:
    frames = cartoon_clip(num_frames, size, seed)
    meta = {"clip_id": key, "fps": 24.0, "num_frames": num_frames, "width": size[0], "height": size[1],
            "caption": caption}  # fmt: skip
    return {"key": key, "mp4": encode_mp4(frames), "meta": meta, "caption": caption}


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """A curate-style OUT folder: shards/train (2 shards, 6 clips of 128x80, 20-40 frames at 24 fps) and
    shards/eval (1 shard, 2 clips). Written once per session with tarfile + PyAV (no Ray: ~1 s)."""
    out = tmp_path_factory.mktemp("curate_out")
    size = (128, 80)
    clips = [
        clip_sample(f"clip{i:03d}", 20 + 4 * i, size, i, caption=f"a disc moving, clip {i}") for i in range(6)
    ]
    write_shard(out / "shards" / "train" / "000000.tar", clips[:3])
    write_shard(out / "shards" / "train" / "000001.tar", clips[3:])
    evals = [clip_sample(f"eval{i:03d}", 24, size, 100 + i, caption="") for i in range(2)]
    write_shard(out / "shards" / "eval" / "000000.tar", evals)
    return out


@pytest.fixture(scope="session")
def one_clip_shard(tmp_path_factory) -> Path:
    """A folder with one shard holding one 4-frame clip: exactly one window of the tiny preset (overfitting)."""
    out = tmp_path_factory.mktemp("one_clip")
    write_shard(out / "000000.tar", [clip_sample("only", 4, (128, 80), 7, caption="a disc")])
    return out


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory, train_shards: Path) -> Path:
    """Good shards plus: a shard of garbage bytes, a truncated shard, and a shard with a sample whose mp4
    is garbage and one whose clip is too short for a window."""
    import shutil

    out = tmp_path_factory.mktemp("corrupt")
    for p in sorted((train_shards / "shards" / "train").glob("*.tar")):
        shutil.copy(p, out / p.name)
    (out / "000002.tar").write_bytes(b"this is not a tar file at all" * 100)
    whole = (out / "000000.tar").read_bytes()
    (out / "000003.tar").write_bytes(whole[: len(whole) // 2 + 100])
    bad = {"key": "broken", "mp4": b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50, "meta": {}, "caption": "x"}
    short = clip_sample("short", 3, (128, 80), 9)  # shorter than a 4-frame window
    write_shard(out / "000004.tar", [bad, short, clip_sample("fine", 24, (128, 80), 11)])
    return out
