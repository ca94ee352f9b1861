"""timing: held frames and the animation timing (on ones, twos, threes).

Cartoons repeat each drawing for 1, 2 or 3 frames. A frame whose mean absolute difference from its
predecessor (analysis size, grey, 0..255) is below `held_threshold` repeats it. Later stages
measure motion between distinct drawings only, so holds do not dilute the motion score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.stages.base import Stage


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames. frames [n, h, w] uint8 -> [n-1] float."""
    if len(frames) < 2:
        return np.zeros(0, dtype=np.float64)
    import cv2

    return np.array([cv2.absdiff(b, a).mean() for a, b in zip(frames[:-1], frames[1:])], dtype=np.float64)


def classify_timing(diffs: np.ndarray, held_threshold: float, dominant_share: float) -> dict:
    """Distinct drawings, held ratio, timing label and the indices of the distinct frames."""
    held = diffs < held_threshold
    distinct_idx = [0] + [i + 1 for i, h in enumerate(held) if not h]
    n = len(diffs) + 1
    # hold lengths: how many frames each drawing stays on screen (the last one may be cut by the clip end)
    lengths = np.diff(distinct_idx + [n]).tolist()
    counted = lengths[:-1] if len(lengths) > 1 else lengths
    timing = "none"
    if len(distinct_idx) > 1:
        common = Counter(min(length, 4) for length in counted)
        label, count = common.most_common(1)[0]
        share = count / max(1, len(counted))
        names = {1: "ones", 2: "twos", 3: "threes"}
        timing = names.get(label, "mixed") if share >= dominant_share else "mixed"
    return {
        "distinct_frames": len(distinct_idx),
        "held_ratio": float(held.mean()) if len(held) else 0.0,
        "timing": timing,
        "distinct_idx": np.asarray(distinct_idx, dtype=np.int32),
    }


@dataclass
class TimingStage(Stage):
    held_threshold: float = 0.6
    dominant_share: float = 0.6

    name = "timing"
    batch_size = 8

    def process(self, row: dict) -> dict:
        if row.get("row_kind") != "clip" or row.get("analysis") is None:
            return row
        diffs = frame_differences(row["analysis"])
        return {**row, **classify_timing(diffs, self.held_threshold, self.dominant_share)}
