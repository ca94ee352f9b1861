"""shots: PySceneDetect on frames decoded once, boundaries exact to the frame with a safety margin.

The source is decoded once, straight to the keyframe size (resize to cover + centre crop) in the
decoder's YUV planes, and each frame is reduced to the analysis size for the detector, timing and
motion; only a clip's first, middle and last frames are converted to RGB. Only the current shot's
frames are held, and long shots are emitted window by window, so memory stays bounded whatever the
length of the source.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from manifests.keys import clip_id
from manifests.schema import SOURCE_COLUMNS
from pipeline.stages.base import Stage
from pipeline.stages.discover import error_fields
from pipeline.video import SourceError, as_box, source_retime
from pipeline.video_decode import iter_pictures
from pipeline.video_encode import encode_jpeg


@dataclass
class ShotsStage(Stage):
    """Split a probed source into candidate clips: one row per shot window, plus a source_end row."""

    detector: str = "adaptive"
    threshold: float = 3.0
    min_content_val: float = 15.0
    analysis_width: int = 256
    analysis_height: int = 160
    detect_width: int = 128
    detect_height: int = 80
    margin_frames: int = 2
    min_len_s: float = 1.0
    max_len_s: float = 10.0
    window_stride_s: float = 0.0
    keyframe_width: int = 512
    keyframe_height: int = 320

    name = "shots"
    emits_many = True

    def process_rows(self, rows: list[dict]) -> Iterator[dict]:
        for row in rows:
            if row.get("status") == "error":
                yield {**row, "row_kind": "error"}
                yield {"row_kind": "source_end", "source_uri": row["source_uri"], "clips_emitted": 1}
                continue
            emitted = 0
            for out in self.split(row):
                emitted += 1
                yield out
            yield {"row_kind": "source_end", "source_uri": row["source_uri"], "clips_emitted": emitted}

    def _make_detector(self, fps: float):
        from scenedetect.detectors import AdaptiveDetector, ContentDetector

        min_scene = max(2, int(round(self.min_len_s * fps / 2)))
        if self.detector == "content":
            return ContentDetector(threshold=self.threshold, min_scene_len=min_scene)
        return AdaptiveDetector(
            adaptive_threshold=self.threshold, min_scene_len=min_scene, min_content_val=self.min_content_val
        )

    def split(self, source: dict) -> Iterator[dict]:
        from scenedetect.common import FrameTimecode

        fps = float(source["fps"])
        detector = self._make_detector(fps)
        lag = 8  # frames a cut may be reported late: progressive windows stay this far behind the newest

        shot = _Shot(start=0, index=0, head=0)
        next_frame = 0
        try:
            box = as_box(source.get("content_box"))
            for picture in iter_pictures(
                source["source_uri"],
                self.keyframe_width,
                self.keyframe_height,
                box,
                retime=source_retime(source),
            ):
                gray = picture.gray(self.analysis_width, self.analysis_height)
                # PySceneDetect expects BGR; frame numbers are ours, so boundaries are exact to the frame
                bgr = picture.bgr(self.detect_width, self.detect_height)
                for cut in detector.process_frame(FrameTimecode(next_frame, fps=fps), bgr):
                    shot = yield from self._cut(source, shot, cut.frame_num)
                shot.frames.append((picture, gray))
                next_frame += 1
                if len(shot.frames) > self._max_len(fps) + lag + self.margin_frames:
                    yield from self._windows(source, shot, shot.start + len(shot.frames) - lag, final=False)
        except SourceError as exc:
            yield {**source, **error_fields(source, f"shots: {exc}"), "row_kind": "error"}
            return
        if next_frame == 0:
            yield {
                **source,
                **error_fields(source, "shots: video stream has no decodable frames"),
                "row_kind": "error",
            }
            return
        for cut in detector.post_process(FrameTimecode(next_frame, fps=fps)) or []:
            if shot.start < cut.frame_num < next_frame:
                shot = yield from self._cut(source, shot, cut.frame_num)
        yield from self._windows(source, shot, shot.start + len(shot.frames), final=True)

    def _max_len(self, fps: float) -> int:
        return max(self._min_len(fps), int(round(self.max_len_s * fps)))

    def _min_len(self, fps: float) -> int:
        return max(2, int(math.ceil(self.min_len_s * fps)))

    def _cut(self, source: dict, shot: _Shot, cut: int):
        """A cut at frame `cut` (first frame of the new shot): close the shot, keep margins off the cut."""
        tail = shot.frames[cut - shot.start :]
        shot.frames = shot.frames[: cut - shot.start]
        yield from self._windows(source, shot, cut - self.margin_frames, final=True)
        new = _Shot(start=cut, index=shot.index + 1, head=self.margin_frames)
        new.frames = tail
        return new

    def _windows(self, source: dict, shot: _Shot, end: int, final: bool) -> Iterator[dict]:
        """Emit the shot's windows that end by `end`; on `final`, also the remainder (or a too-short row)."""
        fps = float(source["fps"])
        max_len, min_len = self._max_len(fps), self._min_len(fps)
        stride = max_len if self.window_stride_s <= 0 else max(1, int(round(self.window_stride_s * fps)))
        start = shot.start + shot.head
        while end - start >= max_len:
            yield self._row(source, shot, start, start + max_len)
            shot.window += 1
            start += stride
        if final:
            length = end - start
            if length >= min_len:
                yield self._row(source, shot, start, end)
            elif length > 0 and shot.window == 0:
                reason = f"shots: length {length / fps:.2f} s < min_len_s {self.min_len_s:g}"
                yield self._row(source, shot, start, end, rejected=reason)
            # a short tail after full windows is not a candidate clip
            return
        shot.frames = shot.frames[start - shot.start :]
        shot.start, shot.head = start, 0

    def _row(self, source: dict, shot: _Shot, start: int, end: int, rejected: str | None = None) -> dict:
        fps = float(source["fps"])
        chunk = shot.frames[start - shot.start : end - shot.start]
        mid = len(chunk) // 2
        row = {
            **{k: source.get(k) for k in SOURCE_COLUMNS},
            "clip_id": clip_id(source["source_id"], start, end),
            "start_frame": start,
            "end_frame": end,
            "start_s": start / fps,
            "end_s": end / fps,
            "num_frames": end - start,
            "shot_index": shot.index,
            "window_index": shot.window,
            "row_kind": "clip",
            "status": None,
            "reason": None,
        }
        middle = chunk[mid][0].rgb() if chunk else None
        if chunk:
            row["thumb"] = encode_jpeg(middle)
        if rejected:
            row.update(status="rejected", reason=rejected, split="none")
            return row
        row["analysis"] = np.stack([gray for _, gray in chunk])  # [n, ah, aw] uint8
        row["keyframes"] = [chunk[0][0].rgb(), middle, chunk[-1][0].rgb()]  # first, mid, last
        return row


@dataclass
class _Shot:
    """The frames of the shot being read: [start, start + len(frames)) as (Picture, analysis gray)."""

    start: int
    index: int
    head: int  # frames skipped at the start (the safety margin after a cut)
    window: int = 0
    frames: list = field(default_factory=list)
