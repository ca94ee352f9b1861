"""One shard sample -> its clip, its caption, and one training window.

A sample is `{"__key__": key, ext: bytes, ...}` (`training.shards.iter_tar_samples`). The curate job's
samples hold `KEY.mp4`, `KEY.json` and `KEY.txt`. Shards of other tools are read too: the clip in another
container (`.mkv`, `.webm`, `.avi`, `.gif`, ...) or as numbered frames (`KEY.0000.jpg`, ...), the caption in
`KEY.caption` or the json's caption/text/prompt, keys with dots in them. Frames are decoded with PyAV,
transparent pixels over white; a window keeps only its own frames while the clip is decoded up to its
last one (a whole episode in one sample does not fill memory).

Window policy (stated, as the issue asks):
* frames: `frames` frames at a stride drawn uniformly from [stride_min, stride_max], limited so the
  window fits in the clip; the start is uniform over the positions that fit (DynamiCrafter's WebVid
  loader: random stride 1..6, random start).
* size: scaled to cover height x width (the smallest scale at which both sides fit; antialiased
  bilinear), then cropped to height x width (centre crop by default, `crop: random` draws one offset per
  clip). For clips wider than 1.6:1 this equals the reference's resize-short-side + centre crop; for
  narrower clips it never pads. The curate job already writes 512x320 clips, for which it is a no-op.
  The clip is taken as players show it: turned by its display rotation, its pixels made square.
* frame-stride condition `fs`: with `fs_mode: fps` (the reference's `fps_condition_type: fps`, MODEL.md
  2.4) the clip's frame rate divided by the stride, floored (DynamiCrafter: `fps_ori // frame_stride`);
  with `fs_mode: stride` the stride itself.

A sample that cannot give a window raises SampleError with the counter it goes to (`corrupt`,
`too_short`); the stream in `training.data` skips and counts it. `decode_clip` and `clip_ends` give
evaluation (`inference.eval_data`) a clip's frames as training sees them.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from training.data import DataConfig


class SampleError(Exception):
    """A sample that cannot give a window; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# Where shards from other tools keep a clip: a video member in any container PyAV reads, or numbered frames
# (KEY.0000.jpg, KEY.0001.jpg, ...). A member is known by its last extension, so that a key with a dot in it
# (KEY = `a` of `a.v2.mp4`: webdataset cuts the key at the first dot) still finds its video and caption.
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "gif", "mpg", "mpeg", "ts", "flv", "ogv")
_FRAME_MEMBER = re.compile(r"(?:.*\.)?(\d+)\.(?:jpe?g|png|webp|bmp)")
# the caption's fields in a sample's json, in this order (img2dataset writes caption, others text or prompt)
CAPTION_FIELDS = ("caption", "text", "prompt")


def members(sample: dict[str, Any], extensions: tuple[str, ...]) -> list[str]:
    """A sample's members of these extensions, each known by its last one (`a.v2.json` is a json)."""
    return [ext for ext in sample if not ext.startswith("__") and ext.rsplit(".", 1)[-1] in extensions]


def clip_data(sample: dict[str, Any]) -> bytes | list[bytes]:
    """The clip of a sample: its video's bytes, or its numbered frames' bytes in order (SampleError if none)."""
    key = sample["__key__"]
    videos = members(sample, VIDEO_EXTENSIONS)
    if len(videos) > 1:
        dotted = any("." in ext for ext in videos)
        why = (
            "webdataset takes the key up to the first dot of a member's name, so keys with dots run together;"
            " write keys without dots"
            if dotted
            else "which is the clip is not known; keep one video per sample"
        )
        raise SampleError(
            "corrupt", f"{key}: {len(videos)} videos under one key ({', '.join(sorted(videos)[:3])}): {why}"
        )
    if videos:
        return sample[videos[0]]
    numbered = sorted((int(m.group(1)), ext) for ext in sample if (m := _FRAME_MEMBER.fullmatch(ext)))
    if numbered:
        return [sample[ext] for _, ext in numbered]
    present = ", ".join(sorted(ext for ext in sample if not ext.startswith("__"))) or "none"
    raise SampleError(
        "corrupt", f"{key}: no video member ({'/'.join(VIDEO_EXTENSIONS[:6])}/...; it has {present})"
    )


def sample_caption(sample: dict[str, Any], meta: dict[str, Any]) -> str:
    for ext in members(sample, ("txt", "caption")):
        text = sample[ext].decode("utf-8", errors="replace").strip()
        if text:
            return text
    return next((str(meta[f]).strip() for f in CAPTION_FIELDS if meta.get(f)), "")


def _rgb(frame: Any) -> np.ndarray:
    """uint8 [h, w, 3] of a PyAV frame; one with an alpha channel (a cel with a transparent background:
    PNG, GIF) over white, the paper it was drawn on, not over whatever colour its transparent pixels hold."""
    # gray+alpha, RGBA / YUVA, or a palette with a transparent entry (pngquant's PNGs, GIFs)
    if not (frame.format.name == "pal8" or len(frame.format.components) in (2, 4)):
        return frame.to_ndarray(format="rgb24")
    rgba = frame.to_ndarray(format="rgba").astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)


def _decode_frames(
    data: bytes | list[bytes], needed_last: int, keep: set[int] | None = None
) -> tuple[list[Any], float]:
    """PyAV frames 0..needed_last (fewer if the clip is shorter) and the stream's frame rate (0 for frames
    given as images). With `keep`, the frames at other indices are None: a window late in a long clip (a
    whole episode in a shard of another tool) holds its 16 frames, not the thousands decoded before them."""
    import av

    if isinstance(data, list):  # numbered images: one frame each
        frames = []
        for index, image in enumerate(data[: needed_last + 1]):
            if keep is not None and index not in keep:
                frames.append(None)
                continue
            with av.open(io.BytesIO(image)) as container:
                frames.append(next(container.decode(video=0)))
        return frames, 0.0
    frames = []
    with av.open(io.BytesIO(data)) as container:
        stream = _main_stream(container)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(stream):
            frames.append(frame if keep is None or len(frames) in keep else None)
            if len(frames) > needed_last:
                break
    return frames, rate


def _main_stream(container: Any) -> Any:
    """The clip's video stream as FFmpeg picks it (`av_find_best_stream`, as curate's decoder does): a
    cover-art still or thumbnail stored as a first video stream is passed over."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise ValueError(f"no video stream (streams: {', '.join(kinds)})")
    return container.streams.best("video") or container.streams.video[0]


def _quarter_turns(frame: Any) -> int:
    """Quarter turns counterclockwise (0..3) that show a decoded frame upright, from its display matrix (as
    curate's `pipeline.video.quarter_turns`; phones store portrait video as landscape frames and a rotation)."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def decode_clip(data: bytes | list[bytes], limit: int | None = None) -> np.ndarray:
    """The frames of a clip (`clip_data`: a video's bytes or numbered frames), the first `limit` of them or
    all, uint8 [T, H, W, 3], upright (a display rotation applied, as `decode_window` does) and over white
    where it is transparent. A limit keeps a whole episode in one sample (other tools' shards) from
    filling memory for a window of its first frames."""
    frames, _ = _decode_frames(data, (limit - 1) if limit else 1 << 62)
    if not frames:
        raise ValueError("the clip holds no frames")
    turns = _quarter_turns(frames[0])
    pictures = [np.rot90(_rgb(frame), turns) for frame in frames]
    sizes = sorted({f"{p.shape[1]}x{p.shape[0]}" for p in pictures})
    if len(sizes) > 1:
        raise ValueError(f"frames of different sizes ({', '.join(sizes[:3])})")
    return np.ascontiguousarray(np.stack(pictures))


def clip_ends(data: bytes | list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The first and last frames of a clip (as `decode_clip` gives them), decoded through without holding
    the frames between: the keyframes of an in-between, from a clip of any length."""
    import av

    if isinstance(data, list):
        ends = [_decode_frames([data[0]], 0)[0][0], _decode_frames([data[-1]], 0)[0][0]] if data else []
    else:
        ends = []
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(_main_stream(container)):
                ends = [ends[0] if ends else frame, frame]
    if not ends:
        raise ValueError("the clip holds no frames")
    turns = _quarter_turns(ends[0])
    first, last = (np.ascontiguousarray(np.rot90(_rgb(frame), turns)) for frame in ends)
    return first, last


def _clip_facts(data: bytes | list[bytes], meta: dict[str, Any]) -> tuple[int, float]:
    """(frames, pixel aspect: width over height of a stored pixel, as DVD's 720x480 for 16:9 has 32/27; 1.0
    when unset or absurd) of a clip, from its container."""
    import av

    if isinstance(data, list):
        return len(data), 1.0
    with av.open(io.BytesIO(data)) as container:
        stream = _main_stream(container)
        sar = float(stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1)
        n = int(stream.frames or 0)
        if not n:  # Matroska/WebM (and others) state no frame count: count the packets (nothing is decoded)
            n = sum(1 for packet in container.demux(stream) if packet.size)
    return n or int(meta.get("num_frames") or 0), sar if 0.25 <= sar <= 4.0 else 1.0


def cover_crop(
    video: torch.Tensor,
    height: int,
    width: int,
    crop: str,
    rng: np.random.Generator | None,
    pixel_aspect: float = 1.0,
):
    """uint8 [t, H0, W0, 3] -> uint8 [3, t, height, width]: scale to cover, then crop (module docstring).
    A stored pixel `pixel_aspect` times as wide as high is scaled to a square one (not a stretched clip)."""
    t, h0, w0, _ = video.shape
    x = video.permute(0, 3, 1, 2)  # [t, 3, H0, W0]
    scale = max(height / h0, width / (w0 * pixel_aspect))
    size = (max(height, round(h0 * scale)), max(width, round(w0 * pixel_aspect * scale)))
    if size != (h0, w0):
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    dy, dx = size[0] - height, size[1] - width
    if crop == "random" and rng is not None:
        top, left = int(rng.integers(dy + 1)), int(rng.integers(dx + 1))
    else:
        top, left = dy // 2, dx // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.permute(1, 0, 2, 3).contiguous()  # [3, t, height, width]


# A clip whose aspect is this many times wider or narrower than the window's is not a picture to crop (a
# 4000x2 stream would be scaled to 640000 pixels wide to cover 320x512): counted as corrupt.
MAX_ASPECT_MISMATCH = 8.0


def decode_window(sample: dict[str, Any], cfg: DataConfig, rng: np.random.Generator | None) -> dict[str, Any]:
    """One training window from one sample; `rng=None` gives the eval window (stride_min, start 0, centre).

    -> {"video": uint8 [3, frames, height, width], "caption", "fs", "stride", "start" (its first frame's
    index in the clip), "fps", "key"}.
    Raises SampleError("corrupt" | "too_short", ...) for samples that cannot give one.
    """
    import json

    key = sample["__key__"]
    data = clip_data(sample)
    if not data:
        raise SampleError("corrupt", f"{key}: an empty video member")
    try:
        meta = next((json.loads(sample[ext]) for ext in members(sample, ("json",)) if sample[ext]), {})
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):  # valid JSON, not a row
        meta = {}
    try:
        n, sar = _clip_facts(data, meta)
    except Exception as exc:  # PyAV raises many types for broken files
        raise SampleError("corrupt", f"{key}: {exc}") from exc
    for attempt in range(2):  # a container that over-states its length is decoded once more with the true one
        longest = (n - 1) // (cfg.frames - 1) if n >= cfg.frames else 0
        if longest < cfg.stride_min:
            needs = (cfg.frames - 1) * cfg.stride_min + 1
            raise SampleError(
                "too_short",
                f"{key}: {n} frames, a window of {cfg.frames} at stride {cfg.stride_min} needs {needs}",
            )
        hi = min(cfg.stride_max, longest)
        stride = cfg.stride_min if rng is None else int(rng.integers(cfg.stride_min, hi + 1))
        span = stride * (cfg.frames - 1)
        start = 0 if rng is None else int(rng.integers(n - span))
        try:
            frames, rate = _decode_frames(
                data, start + span, keep=set(range(start, start + span + 1, stride))
            )
        except Exception as exc:
            raise SampleError("corrupt", f"{key}: {exc}") from exc
        if len(frames) > start + span:
            break
        if attempt or not frames:
            raise SampleError("corrupt", f"{key}: decodes {len(frames)} frames, {n} stated")
        n = len(frames)
    # a display rotation (phones store portrait video as landscape frames and a rotation; players turn it):
    # quarter turns counterclockwise that show the frames upright, as the curate job decodes them
    first = frames[start]
    turns = _quarter_turns(first)
    if turns % 2:  # a stored pixel stands on its side once the frame is turned
        sar = 1 / sar
    h0, w0 = (first.width, first.height) if turns % 2 else (first.height, first.width)
    shown = w0 * sar  # the displayed width
    if (
        max(h0 * cfg.width / (shown * cfg.height), shown * cfg.height / (h0 * cfg.width))
        > MAX_ASPECT_MISMATCH
    ):
        raise SampleError("corrupt", f"{key}: a {w0}x{h0} clip is too far from the window's aspect to crop")
    picked = [np.rot90(_rgb(frames[start + i * stride]), turns) for i in range(cfg.frames)]
    sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in picked})
    if len(sizes) > 1:  # numbered frames of other sizes, a stream that changes size: no one crop fits all
        raise SampleError("corrupt", f"{key}: frames of different sizes ({', '.join(sizes[:3])})")
    picked = np.stack(picked)  # [t, h, w, 3], upright
    video = cover_crop(torch.from_numpy(picked), cfg.height, cfg.width, cfg.crop, rng, sar)
    fps = rate or float(meta.get("fps") or 0) or 24.0
    fs = max(1, int(fps // stride)) if cfg.fs_mode == "fps" else stride
    return {
        "video": video,
        "caption": sample_caption(sample, meta),
        "fs": fs,
        "stride": stride,
        "start": start,
        "fps": fps,
        "key": key,
    }
