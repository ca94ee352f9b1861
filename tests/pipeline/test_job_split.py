"""The curate job's split step: what it says when eval cannot have the size asked for."""

from __future__ import annotations

import random

import pyarrow as pa

from manifests.schema import CLIP_SCHEMA
from pipeline.config import CurateConfig
from pipeline.job import CurateJob


def kept_rows(sizes: list[int]) -> pa.Table:
    rng = random.Random(0)
    rows = [
        {
            "clip_id": f"s{s}c{k}",
            "source_id": f"s{s}",
            "source_uri": f"/f/s{s}.mp4",
            "status": "kept",
            "split": "none",
            "phash": [rng.getrandbits(64) for _ in range(3)],
        }  # fmt: skip
        for s, size in enumerate(sizes)
        for k in range(size)
    ]
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


def split_with(tmp_path, sizes: list[int], eval_size: int, fraction: float = 0.25) -> list[dict]:
    config = CurateConfig()
    config.split.eval_size, config.split.max_eval_fraction = eval_size, fraction
    return CurateJob(["x"], tmp_path, config)._split(kept_rows(sizes)).to_pylist()


def test_eval_short_of_the_size_asked_says_why(tmp_path, capsys):
    rows = split_with(tmp_path, [6, 6, 6, 6, 5, 5], eval_size=10, fraction=0.5)
    assert sum(r["split"] == "eval" for r in rows) == 10 and capsys.readouterr().err == ""
    rows = split_with(tmp_path, [6, 6, 6, 6, 5, 5], eval_size=13, fraction=0.5)
    assert sum(r["split"] == "eval" for r in rows) == 12
    err = capsys.readouterr().err
    assert "eval split: 12 clips (asked 13; no set of whole sources adds up to exactly 13)" in err
    split_with(tmp_path, [6, 6, 6, 6, 5, 5], eval_size=1000)
    err = capsys.readouterr().err
    assert "eval split: 6 clips (asked 1000; a small job gives eval at most 25% of its 34 kept clips" in err
