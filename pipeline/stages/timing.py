"""timing: held frames and the animation timing (on ones, twos, threes).

Cartoons repeat each drawing for 1, 2 or 3 frames. A frame repeats its predecessor (analysis size,
grey, 0..255) when both the mean absolute difference is below `held_threshold` and at most
`changed_max` of the pixels moved by more than `changed_delta` grey levels. The mean alone misses a
small character moving over a still background (a 16x16 figure of the 256x160 analysis frame moving
3 pixels changes the mean by ~0.3, half the threshold); the count of strongly changed pixels catches
it, while the codec's noise on a held drawing stays far below (on the sample footage: at most 0.02%
of the pixels by more than 32 levels on held frames, at least 1.5% on new drawings). Later stages
measure motion between distinct drawings only, so holds do not dilute the motion score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.stages.base import Stage


def frame_differences(frames: np.ndarray, changed_delta: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Between consecutive frames: the mean absolute difference and the fraction of pixels whose
    difference exceeds `changed_delta`. frames [n, h, w] uint8 -> two [n-1] float arrays."""
    if len(frames) < 2:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.float64)
    import cv2

    means, changed = [], []
    for a, b in zip(frames[:-1], frames[1:]):
        diff = cv2.absdiff(b, a)
        means.append(diff.mean())
        changed.append(np.count_nonzero(diff > changed_delta) / diff.size)
    return np.array(means, dtype=np.float64), np.array(changed, dtype=np.float64)


def held_frames(
    frames: np.ndarray, held_threshold: float = 0.6, changed_delta: int = 32, changed_max: float = 0.001
) -> np.ndarray:
    """[n-1] bool: whether each frame after the first repeats its predecessor (see the module doc)."""
    means, changed = frame_differences(frames, changed_delta)
    return (means < held_threshold) & (changed <= changed_max)


def classify_timing(held: np.ndarray, dominant_share: float) -> dict:
    """Distinct drawings, held ratio, timing label and the indices of the distinct frames, from
    `held_frames`."""
    distinct_idx = [0] + [i + 1 for i, h in enumerate(held) if not h]
    n = len(held) + 1
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
    changed_delta: int = 32
    changed_max: float = 0.001
    dominant_share: float = 0.6

    name = "timing"
    reads = ("analysis",)
    batch_size = 8

    def process(self, row: dict) -> dict:
        if row.get("row_kind") != "clip" or row.get("analysis") is None:
            return row
        held = held_frames(row["analysis"], self.held_threshold, self.changed_delta, self.changed_max)
        return {**row, **classify_timing(held, self.dominant_share)}
