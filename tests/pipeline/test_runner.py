"""The runner on a local Ray: what a stage declares is what its workers get."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.runner import init_ray, run_stages
from pipeline.stages.base import Stage


def test_task_stages_keep_opencv_to_the_cpus_they_declare():
    """A task holds one CPU slot; OpenCV's own pool would otherwise spread its resizes and optical
    flow over every core of the node (Ray's OMP_NUM_THREADS does not reach it)."""

    @dataclass
    class OpenCVThreads(Stage):
        name = "opencv_threads"

        def process(self, row: dict) -> dict:
            import cv2

            return {**row, "opencv_threads": cv2.getNumThreads()}

    init_ray(num_cpus=2)
    rows = list(run_stages([{"source_uri": f"s{i}"} for i in range(3)], [OpenCVThreads()], workers=2))
    assert sorted(r["source_uri"] for r in rows) == ["s0", "s1", "s2"]
    assert {r["opencv_threads"] for r in rows} == {1}
