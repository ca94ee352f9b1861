"""motion: OpenCV DIS optical flow between consecutive distinct drawings.

Flow is measured at a fixed analysis size and expressed in percent of that frame's diagonal, so a
threshold means the same at any input resolution. `motion_residual` is the motion left after
removing the dominant (camera) translation: a pure pan has a high mean and a low residual.
Static shots (one drawing, or no flow) score 0 and are rejected by `motion.min`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.stages.base import Stage

_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}


def pair_indices(distinct_idx: np.ndarray, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive distinct-drawing pairs, evenly subsampled to at most max_pairs."""
    pairs = list(zip(distinct_idx[:-1].tolist(), distinct_idx[1:].tolist()))
    if len(pairs) > max_pairs:
        keep = np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)
        pairs = [pairs[i] for i in keep]
    return pairs


def flow_statistics(flows: list[np.ndarray]) -> dict:
    """Per-pair mean magnitude and residual after the median translation, in % of the diagonal."""
    if not flows:
        return {"motion_mean": 0.0, "motion_p90": 0.0, "motion_residual": 0.0}
    h, w = flows[0].shape[:2]
    diagonal = float(np.hypot(w, h))
    means, residuals = [], []
    for flow in flows:
        # float64 adds, multiplies and square roots (correctly rounded everywhere), not cv2.magnitude: its
        # float32 result changed in the last bit between runs, so a resumed job's scores differed from an
        # uninterrupted run's; np.hypot was 3x slower and goes through libm
        x, y = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
        means.append(float(np.sqrt(x * x + y * y).mean()) / diagonal * 100.0)
        x, y = x[::2, ::2], y[::2, ::2]  # the residual is a shape measure: half resolution serves
        dx, dy = np.median(x[::2, ::2]), np.median(y[::2, ::2])  # the camera's translation
        x, y = x - dx, y - dy
        residuals.append(float(np.sqrt(x * x + y * y).mean()) / diagonal * 100.0)
    return {
        "motion_mean": float(np.mean(means)),
        "motion_p90": float(np.percentile(means, 90)),
        "motion_residual": float(np.mean(residuals)),
    }


@dataclass
class MotionStage(Stage):
    flow_width: int = 256
    flow_height: int = 160
    max_pairs: int = 48
    preset: str = "ultrafast"

    name = "motion"
    reads = ("analysis", "distinct_idx")
    batch_size = 8

    # No setup(): the DIS object is cheap and made lazily, so this stage runs in the same Ray task as
    # shots and timing (pipeline.runner), and the analysis frames never leave the worker that decoded them.
    def _flow(self):
        if not hasattr(self, "_dis"):
            import cv2

            self._cv2 = cv2
            self._dis = cv2.DISOpticalFlow_create(_PRESETS[self.preset])
        return self._dis

    def process(self, row: dict) -> dict:
        if row.get("row_kind") != "clip" or row.get("analysis") is None:
            return row
        dis = self._flow()
        frames = row["analysis"]
        distinct = row.get("distinct_idx")
        if distinct is None:
            distinct = np.arange(len(frames))
        flows = []
        for a, b in pair_indices(np.asarray(distinct), self.max_pairs):
            flows.append(dis.calc(self._resize(frames[a]), self._resize(frames[b]), None))
        return {**row, **flow_statistics(flows)}

    def _resize(self, gray: np.ndarray) -> np.ndarray:
        if gray.shape[:2] == (self.flow_height, self.flow_width):
            return gray
        return self._cv2.resize(gray, (self.flow_width, self.flow_height), interpolation=self._cv2.INTER_AREA)
