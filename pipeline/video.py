"""Video sources and what they hold, with PyAV: opening local or object-store sources, probing.

This module holds what stages learn about a source before decoding it for analysis: opening it (a
local path or any fsspec URI; what cannot be used raises `SourceError`, what is not there
`SourceMissing`), choosing its main video stream, probing that stream (size as displayed, frame rate,
how much its frame intervals vary and the grid a variable rate is decoded on), the retiming a manifest
row asks for (`Retime`, `source_retime`), and the picture area inside black bars (`detect_borders`).
Decoding frames is `pipeline.video_decode`, writing clips `pipeline.video_encode`. PyAV decodes with its
bundled FFmpeg (no system ffmpeg needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from manifests.remote import local_path

VIDEO_EXTENSIONS = (
    ".mp4",
    ".mkv",
    ".mov",
    ".avi",
    ".webm",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".ts",
    ".flv",
    ".wmv",
    ".gif",
    ".m2ts",  # Blu-ray
    ".mts",  # AVCHD
    ".vob",  # DVD
    ".mxf",  # broadcast and studio masters
    ".ogv",
    ".3gp",
    ".dv",
    ".divx",
    ".asf",
    ".f4v",
    ".rmvb",
)


class SourceError(Exception):
    """A source that cannot be used; its message becomes the row's reason."""


class SourceMissing(SourceError):
    """A source that is not there (moved, deleted, a store out of reach): not a fault of its content."""


def says_missing(reason: str | None) -> bool:
    """Whether an error row's reason (`stage: why`) is a `SourceMissing`: the source was not there then (a
    disk not mounted, a file moved away mid-job, a store out of reach), so a rerun looks for it again."""
    why = (reason or "").split(": ", 1)[-1]
    if why.startswith("cannot open as video"):  # open_container: the file was there, its content is bad
        return False
    return why.startswith(("no such file: ", "no such object: ", "broken link: ", "cannot open "))


def source_exists(uri: str) -> bool:
    """Whether a source is there now (a local path, or an object an fsspec store can see); a store that
    cannot be asked (offline, no credentials) says no."""
    if is_local(uri):
        return os.path.isfile(local_path(uri))
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return bool(fs.isfile(path))
    except Exception:  # noqa: BLE001 - unreachable: not there for this run
        return False


def is_local(uri: str) -> bool:
    return "://" not in uri or uri[:7].lower() == "file://"


@contextmanager
def open_binary(uri: str):
    """A readable binary file for a local path or any fsspec URI (s3://, gs://, memory://...)."""
    if is_local(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            if os.path.islink(path):
                raise SourceMissing(f"broken link: {path} -> {os.readlink(path)}")
            raise SourceMissing(f"no such file: {path}")
        if os.path.isdir(path):
            raise SourceError(f"is a directory, not a video: {path}")
        with open(path, "rb") as handle:
            yield handle
        return
    import fsspec

    try:
        handle = fsspec.open(uri, "rb").open()
    except FileNotFoundError as exc:
        raise SourceMissing(f"no such object: {uri}") from exc
    except Exception as exc:  # an unreachable store is a per-source error, not a crash
        raise SourceMissing(f"cannot open {uri}: {exc}") from exc
    try:
        yield handle
    finally:
        handle.close()


@contextmanager
def open_container(uri: str):
    """An `av` input container, with open failures turned into SourceError."""
    import av

    with open_binary(uri) as handle:
        try:
            container = av.open(local_path(uri) if is_local(uri) else handle, mode="r")
        except av.error.FFmpegError as exc:
            raise SourceError(f"not a readable video container ({_short(exc)})") from exc
        except Exception as exc:
            raise SourceError(f"cannot open as video ({_short(exc)})") from exc
        try:
            yield container
        finally:
            container.close()


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


@dataclass
class ProbeInfo:
    codec: str
    width: int
    height: int
    fps: float
    num_frames: int  # from the container; may be an estimate for formats that do not store it
    duration_s: float
    vfr_spread: float  # relative spread of frame intervals beyond the clock's rounding (0: constant rate)
    nominal_rate: Fraction | None  # the grid a variable rate is decoded on; None when no interval was seen
    breaks: int = 0  # breaks in the timestamps (frame_intervals)
    turns: int = 0  # quarter turns counterclockwise that show the frames upright (`quarter_turns`)
    transfer: int = 0  # FFmpeg's transfer characteristic (AVColorTransferCharacteristic); 16: PQ (HDR10)


DISCONTINUITY_S = (
    10.0  # a longer gap between two frames is no rate (a held card, or a break in a constant rate)
)
_REORDER_DEPTH = 32  # more than any codec's decode-to-presentation reordering (H.264: 16)

# Frame rates a source is likely made at: a variable-rate source is decoded on a grid at the one its
# common interval matches (within the rounding of its timestamps), else at that interval's own rate
STANDARD_RATES = tuple(
    Fraction(n) for n in (8, 10, 12, 15, 24, 25, 30, 48, 50, 60, 72, 90, 100, 120)
) + tuple(Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120))


def video_stream(container):
    """The container's main video stream, as FFmpeg chooses it (`av_find_best_stream`: cover art and
    other stills stored as extra video streams are passed over), or None."""
    if not container.streams.video:
        return None
    return container.streams.best("video") or container.streams.video[0]


def probe(uri: str, max_pixels: int | None = None) -> ProbeInfo:
    """Container facts of the main video stream, and how much its frame intervals vary, from the
    timestamps of all its packets (demuxed, not decoded: a frame rate that changes late in an episode,
    as a 29.97 fps opening in a 23.976 fps show, counts). Width and height are those displayed: a phone
    video stored 1920x1080 with a 90 degree display rotation is 1080x1920 (its first frame says; a frame
    of more than `max_pixels`, which the job refuses anyway, is not decoded to learn it)."""
    with open_container(uri) as container:
        stream = video_stream(container)
        if stream is None:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise SourceError(f"no video stream (streams: {', '.join(kinds)})")
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        duration_s = _duration_s(container, stream)
        pts, turns = [], None
        if max_pixels is not None and (ctx.width or 0) * (ctx.height or 0) > max_pixels:
            turns = 0
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size > 0:
                    pts.append(packet.pts)
                if turns is None:
                    turns = _first_turns(ctx, packet)
            if turns is None:  # a stream so short that the decoder held all its frames back: flushed
                turns = _first_turns(ctx, None)
        except Exception as exc:
            raise SourceError(f"cannot read packets ({_short(exc)})") from exc
        spread, nominal, breaks = frame_intervals(pts, stream.time_base or Fraction(1, 1000))
        if pts and not breaks and fps > 0 and stream.time_base:
            # a header may claim far more than the file holds (a Matroska header saying 100 h of 4 s, a
            # download cut short): the packets' span is the duration then
            span_s = float((max(pts) - min(pts)) * stream.time_base) + 1 / fps
            if duration_s > 1.01 * span_s + 1.0:
                duration_s = span_s
        num_frames = int(stream.frames or round(duration_s * fps))
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if (turns or 0) % 2:
            width, height = height, width
        return ProbeInfo(
            codec=ctx.name or "unknown",
            width=width,
            height=height,
            fps=fps,
            num_frames=num_frames,
            duration_s=duration_s,
            vfr_spread=spread,
            nominal_rate=nominal,
            breaks=breaks,
            transfer=int(ctx.color_trc or 0),
            turns=turns or 0,
        )


def _first_turns(ctx, packet) -> int | None:
    """`quarter_turns` of the first frame a packet decodes to (None: the decoder flushed); None while
    none has come out (0 when the packet does not decode: the shots stage, which decodes every frame,
    reports what is wrong)."""
    import av

    try:
        frames = ctx.decode(packet)
    except av.error.FFmpegError:
        return 0
    return quarter_turns(frames[0]) if frames else None


def quarter_turns(frame) -> int:
    """Quarter turns counterclockwise (0..3) that show a decoded frame upright, from its display matrix
    (phones store portrait video as landscape frames and a rotation; players, and FFmpeg's command line,
    turn it). A mirroring matrix counts for its rotation only."""
    return round((frame.rotation or 0) / 90) % 4


def _duration_s(container, stream) -> float:
    """The stream's duration in seconds, else the container's (Matroska and MPEG-TS give no stream
    duration), else 0."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return (container.duration or 0) / 1_000_000  # AV_TIME_BASE


def frame_intervals(pts: Sequence[int], time_base: Fraction) -> tuple[float, Fraction | None, int]:
    """(spread, nominal rate, breaks) of a stream's presentation timestamps (in `time_base` ticks, in
    decode order: B-frames come before the frames they sit between).

    Timestamps are rounded to a clock: the container's, or milliseconds (Matroska and WebM count
    them, and a remux into MP4 keeps their rounding), so a constant 60 fps stream can have intervals
    of 16 and 17 ms. Intervals within that rounding of each other are one rate:
    spread = (longest - shortest interval - rounding) / the median interval, 0 when negative.
    breaks: jumps back (files joined, a broadcast recording's discontinuity), each side measured on its
    own. Gaps longer than DISCONTINUITY_S count for neither spread nor rate.

    nominal: the grid a variable-rate source is decoded on, in this order:
    - a regular cadence: the mean rate over the stream when it is a standard rate (within 0.5%) that
      gives every frame its own grid time and no interval is longer than 1.25 grid steps
      (soft-telecined film on DVD: 23.976 fps frames shown for 2 and 3 fields in turn, 33 and 50 ms);
    - the lowest rate, from that of the common interval (the mean of the intervals within rounding of
      the median one) up to 4 times it, at which at most 0.1% of the intervals are shorter than a step
      (each such frame would drop) and at least 95% are whole numbers of steps (within rounding; of two
      standard rates 0.1% apart, as 23.976 and 24, the one the frames' times drift least from):
      drawings held for 2 and 3 frames and stored once, with some on ones, come out on their 24 fps
      grid, not on the 12 fps of their common interval (which would drop every drawing on ones);
    - else the common interval's rate (a jittery capture: the odd catch-up frame drops).
    Rates are snapped to the nearest standard rate within 0.5%, else rounded to 1/1000 fps.
    """
    raw = np.asarray(pts, dtype=np.int64)
    # a jump back (files joined, a broadcast recording's discontinuity): packets stay below the latest
    # timestamp for longer than B-frames reorder them; each side is measured on its own
    behind = np.concatenate([[False], raw[1:] < np.maximum.accumulate(raw)[:-1], [False]])
    edges = np.flatnonzero(np.diff(behind.astype(np.int8)))
    starts = [int(s) + 1 for s, e in zip(edges[0::2], edges[1::2], strict=True) if e - s > _REORDER_DEPTH]
    segments = np.split(raw, starts)
    steps = np.concatenate([np.diff(np.unique(segment)) for segment in segments])
    breaks = len(starts)
    # a gap longer than DISCONTINUITY_S is not a rate: a held card in a variable-rate source (the grid
    # holds it), or a break in a constant-rate one (decoded as its own frames)
    steps = steps[steps * float(time_base) <= DISCONTINUITY_S]
    if steps.size == 0:
        return 0.0, None, breaks
    tick = float(time_base)
    rounding = max(1, round(0.001 / tick))  # ticks
    median = np.sort(steps)[steps.size // 2]  # an interval that occurs (a mean of two may not)
    spread = max(0.0, float(steps.max() - steps.min() - rounding)) / float(median)
    seconds = np.concatenate([[0.0], np.cumsum(steps) * tick])  # gaps closed up
    step_s = steps * tick

    regular = _standard_rate(float(step_s.mean()))
    drops = seconds.size - np.unique(np.rint(seconds * float(regular))).size  # frames sharing a grid time
    if regular in STANDARD_RATES and drops <= seconds.size // 1000 and step_s.max() * regular <= 1.25:
        return spread, regular, breaks
    base = _standard_rate(float(step_s[np.abs(steps - median) <= rounding].mean()))
    fits = []
    for rate in [base, *(r for r in STANDARD_RATES if base < r <= 4 * base)]:
        multiples = step_s * float(rate)
        residual = np.abs(multiples - np.rint(multiples)) / float(rate)  # seconds off the grid
        # within the clock's rounding, but never a quarter step (a clock of 1/24 s is exact for 24 fps)
        tolerance = min(rounding * tick, 0.25 / float(rate))
        short = multiples * (1 + 1e-9) < 1 - tolerance * float(rate)  # shown less than a step: dropped
        whole = (np.rint(multiples) >= 1) & (residual <= tolerance)
        if short.mean() <= 0.001 and whole.mean() >= 0.95:
            fits.append(rate)
    if not fits:
        return spread, base, breaks
    # of two rates 0.1% apart (23.976 and 24: a millisecond clock cannot tell them apart interval by
    # interval), the one whose grid the frames' times drift least from
    lowest = min(fits)
    near = [r for r in fits if r <= lowest * Fraction(1002, 1000)]

    def drift(rate: Fraction) -> float:
        return float(np.abs(seconds * float(rate) - np.rint(seconds * float(rate))).mean())

    return spread, min(near, key=drift), breaks


def _standard_rate(step_s: float) -> Fraction:
    """The standard rate nearest 1/step_s within 0.5%, else 1/step_s to 1/1000 fps."""
    near = [(abs(float(r) * step_s - 1), r) for r in STANDARD_RATES if abs(float(r) * step_s - 1) <= 0.005]
    return min(near)[1] if near else Fraction(max(1, round(1000 / step_s)), 1000)


def grid_rate(fps: float) -> Fraction:
    """The exact rate behind a manifest's `fps` (standard rates such as 24000/1001, or 1/1000 fps)."""
    return Fraction(fps).limit_denominator(1001)


@dataclass(frozen=True)
class Retime:
    """How a source's frames are retimed before any stage counts them; every stage that decodes the
    source applies the same, so frame numbers mean the same moments everywhere.

    rate: a variable-frame-rate source's constant grid (FFmpeg's fps filter).
    ivtc: telecined film (3:2 pulldown) back to its own frames: FFmpeg's fieldmatch pairs the fields of
    each film frame, yadif deinterlaces what no field pairs, decimate drops the one repeated frame in 5
    (29.97 -> 23.976 fps).
    """

    rate: Fraction | None = None
    ivtc: bool = False


def source_retime(row: dict) -> Retime | None:
    """The manifest's word on how a source is decoded: on the grid at its `fps` when its rate varies
    (`vfr`), inverse-telecined (`ivtc`), else None (its own frames; rows written before the two
    columns existed too)."""
    if row.get("ivtc"):
        return Retime(ivtc=True)
    if row.get("vfr"):
        return Retime(rate=grid_rate(float(row["fps"])))
    return None


# (x, y, width, height) in source pixels, all even: the picture inside letterbox / pillarbox bars
Box = tuple[int, int, int, int]


def as_box(value) -> Box | None:
    """A manifest's `content_box` (a list, an array out of Ray Data, or null) as a Box or None."""
    if value is None or len(value) != 4:
        return None
    x, y, w, h = (int(v) for v in value)
    return x, y, w, h


def detect_borders(uri: str, samples: int = 8, dark: int = 12, short_frames: int = 1200) -> Box | None:
    """The picture area inside black bars (letterbox: top and bottom; pillarbox: left and right), or
    None when there are none.

    Up to `samples` frames spread over the video are read: a seek, then its first decodable frame, so
    keyframes only, which is cheap. A video of fewer distinct keyframes and at most `short_frames`
    frames is then read in order, taking frames spread over it. A row or column of a frame is black
    when its mean grey level is at most `dark` and none of its pixels exceeds 3 x `dark` (full-range
    grey, 0..255); it is a bar when it is black in every sampled frame. Bars are cropped in opposite
    pairs only, each at least 1% of the frame and the two within a quarter of each other (4 pixels for
    thin ones), so that a dark sky at the top of every sample is never cut off. At least 3 distinct
    non-black samples are needed, and the picture left must keep half of each dimension. Most videos
    have no dark edges at all: the first sample already rules bars out.
    """
    import av

    bars = _Bars(dark)
    with open_container(uri) as container:
        stream = video_stream(container)
        if stream is None:
            return None
        duration = stream.duration
        if duration is None and container.duration is not None and stream.time_base:
            duration = int(container.duration / 1_000_000 / stream.time_base)
        start = stream.start_time or 0
        for k in range(samples if duration else 1):
            try:
                if duration:
                    container.seek(start + int(duration * (k + 0.5) / samples), stream=stream)
                frame = next(container.decode(stream), None)
            except av.error.FFmpegError:
                continue
            if frame is not None and not bars.add(frame):
                return None
        rate = stream.average_rate or stream.guessed_rate
        frames = int(stream.frames or (float(duration * stream.time_base * rate) if duration and rate else 0))
    if bars.lit < 3 and 0 < frames <= short_frames:
        stride = max(1, frames // samples)
        with open_container(uri) as container:
            try:
                for index, frame in enumerate(container.decode(video_stream(container))):
                    if index % stride == stride // 2 and not bars.add(frame):
                        return None
            except av.error.FFmpegError:
                pass
    return bars.box()


class _Bars:
    """The rows and columns that are black in every lit frame added so far (see `detect_borders`)."""

    def __init__(self, dark: int):
        self.dark, self.lit = dark, 0
        self.rows = self.cols = None
        self.seen: set[int] = set()

    def add(self, frame) -> bool:
        """Take a decoded frame into account; False when bars are no longer possible."""
        import cv2

        if frame.pts in self.seen:
            return True
        self.seen.add(frame.pts)
        gray = cv2.cvtColor(frame.to_ndarray(format="rgb24"), cv2.COLOR_RGB2GRAY)
        gray = np.rot90(gray, quarter_turns(frame))  # the box is in the upright frames that stages decode
        dark = self.dark
        if gray.max() <= 3 * dark:
            return True  # a black frame (a fade) says nothing about bars
        rows = (gray.mean(1) <= dark) & (gray.max(1) <= 3 * dark)
        cols = (gray.mean(0) <= dark) & (gray.max(0) <= 3 * dark)
        if self.rows is not None and (self.rows.shape != rows.shape or self.cols.shape != cols.shape):
            return False  # the frame size changes
        self.rows = rows if self.rows is None else self.rows & rows
        self.cols = cols if self.cols is None else self.cols & cols
        self.lit += 1
        return _bar_pair(self.rows) != (0, 0) or _bar_pair(self.cols) != (0, 0)

    def box(self) -> Box | None:
        if self.lit < 3:
            return None
        height, width = len(self.rows), len(self.cols)
        top, bottom = _bar_pair(self.rows)
        left, right = _bar_pair(self.cols)
        y0, y1 = _even_up(top), height - _even_up(bottom)
        x0, x1 = _even_up(left), width - _even_up(right)
        if (y0, y1, x0, x1) == (0, height, 0, width) or y1 - y0 < height / 2 or x1 - x0 < width / 2:
            return None
        return x0, y0, x1 - x0, y1 - y0


def _bar_pair(black: np.ndarray) -> tuple[int, int]:
    """Lengths of the black runs at both ends of a row/column profile, if they make a pair of bars."""
    n = len(black)
    lead = int(np.argmin(black)) if not black.all() else n
    trail = int(np.argmin(black[::-1])) if not black.all() else n
    if min(lead, trail) < max(2, 0.01 * n) or abs(lead - trail) > max(4, 0.25 * max(lead, trail)):
        return 0, 0
    return lead, trail


def _even_up(n: int) -> int:
    return n + (n % 2)
