"""Video I/O with PyAV: opening local or object-store sources, probing, decoding, encoding.

Everything that touches a container lives here so that stages deal in numpy frames and rows.
PyAV decodes with its bundled FFmpeg (no system ffmpeg needed). Analysis reads the decoder's
YUV 4:2:0 planes directly and converts to RGB only the few frames a clip keeps (`Picture`);
writing resizes those planes and hands them to the encoder, with no RGB in between. `iter_frames`
is the plain RGB path. See BENCHMARKS.md for what each path costs.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Container, Iterator, Sequence
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


# idet's verdict on each frame: a field repeated from the previous frame ("top"/"bottom") is how 3:2
# pulldown makes 5 video frames of 4 film frames (2 repeated fields in 5 frames in motion; native
# interlaced video repeats none)
TELECINE_MIN_REPEATED = 0.1  # share of sampled frames with a repeated field


def detect_telecine(uri: str, frames: int = 240) -> bool | None:
    """Whether an interlaced source is telecined film: FFmpeg's idet on `frames` frames from the middle
    of the source (openings are often still), a field repeated in at least TELECINE_MIN_REPEATED of
    them. None: the source is progressive (nothing to decide)."""
    import av

    with open_container(uri) as container:
        stream = video_stream(container)
        if stream is None:
            return None
        stream.codec_context.thread_count = 1
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is None or not _interlaced(stream, first):
            return None
        duration_s = _duration_s(container, stream)
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        if duration_s * rate > 2 * frames:
            # in AV_TIME_BASE units, from the container's start (a broadcast recording's is anywhere)
            container.seek((container.start_time or 0) + int(duration_s / 2 * av.time_base))
            decoded = container.decode(stream)
        verdicts, chain, shape = [], None, None
        for frame in itertools.islice(decoded, frames):
            if _shape(frame) != shape:  # (re)built for the frames' size and format, as in _filtered
                chain, shape = _Chain(stream, frame, [("idet", "")]), _shape(frame)
            verdicts += [f.metadata.get("lavfi.idet.repeated.current_frame") for f in chain(frame)]
        repeated = sum(v in ("top", "bottom") for v in verdicts)
        return bool(verdicts) and repeated >= TELECINE_MIN_REPEATED * len(verdicts)


def cover_size(width: int, height: int, out_w: int, out_h: int) -> tuple[int, int]:
    """The smallest even size >= (out_w, out_h) with the source's aspect (for resize + centre crop)."""
    scale = max(out_w / width, out_h / height)
    sw = max(out_w, int(round(width * scale / 2)) * 2)
    sh = max(out_h, int(round(height * scale / 2)) * 2)
    return sw, sh


def center_crop(frame: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    h, w = frame.shape[:2]
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return frame[top : top + out_h, left : left + out_w]


def _decoded(uri: str, convert: Callable, retime: Retime | None = None) -> Iterator:
    """`convert(frame, sar)` for every frame of the main video stream, in order, one decoder thread;
    `sar` is the stream's sample (pixel) aspect ratio, width over height of one stored pixel (DVD
    video stores 16:9 pictures as 720x480 with sar 32/27; 1.0 for square pixels). With `retime`, the
    frames retimed as it says: on a variable-frame-rate source's constant grid (FFmpeg's fps filter: a
    frame shown longer repeats, one shown shorter than a grid step may drop), or telecined film back
    to its own frames.

    Decode (and conversion) failures raise SourceError naming the frame they happened at.
    """
    import av

    with open_container(uri) as container:
        stream = video_stream(container)
        if stream is None:
            raise SourceError("no video stream")
        stream.codec_context.thread_count = 1  # one decoder thread per worker: Ray runs one worker per core
        sar = _sample_aspect(stream)
        index = 0
        try:
            decoded = container.decode(stream)
            first = next(decoded, None)
            if first is None:
                return
            turns = quarter_turns(first)
            if turns % 2:  # a stored pixel stands on its side once the frame is turned
                sar = 1 / sar
            for frame in _filtered(stream, itertools.chain([first], decoded), retime, turns):
                yield convert(frame, sar)
                index += 1
        except av.error.FFmpegError as exc:
            raise SourceError(f"decode failed at frame {index} ({_short(exc)})") from exc


def _filtered(stream, frames: Iterator, retime: Retime | None = None, turns: int = 0) -> Iterator:
    """The decoded frames, through FFmpeg filters where the stream needs them.

    Interlaced (the stream says so, or its first frame is: video from DVDs and broadcast often is):
    FFmpeg's bwdif deinterlacer, one frame out per frame in, so frame numbers stay those of the source;
    only frames flagged interlaced change, so a progressive intro passes as it is. `retime.ivtc`:
    fieldmatch, yadif and decimate instead (`Retime`); `retime.rate`: FFmpeg's fps filter puts the
    frames on a constant grid (nearest frame to each grid time); `turns`: the frames turned upright
    (`quarter_turns`), after deinterlacing (fields are rows of the stored frame). A progressive, upright
    stream with nothing to retime does not go through a filter at all.
    """
    import av

    first = next(frames, None)
    if first is None:
        return
    retime = retime or Retime()
    if retime.ivtc:
        filters = [
            ("fieldmatch", "order=auto:combmatch=full"),
            ("yadif", "deint=interlaced"),
            ("decimate", ""),
        ]
    elif _interlaced(stream, first):
        filters = [("bwdif", "mode=send_frame:parity=auto:deint=interlaced")]
    else:
        filters = []
    filters += TURN_FILTERS[turns]
    if retime.rate is not None:
        filters.append(("fps", f"fps={retime.rate.numerator}/{retime.rate.denominator}"))
    if not filters:
        yield first
        yield from frames
        return
    try:
        chain = _Chain(stream, first, filters)
    except (av.error.FFmpegError, ValueError) as exc:
        # frames not retimed would mean other moments in other stages; not turned, a clip on its side
        if retime != Retime() or turns:
            raise SourceError(
                f"cannot retime or turn the frames ({', '.join(f for f, _ in filters)}: {_short(exc)})"
            ) from exc
        yield first  # a pixel format bwdif does not take: frames as they are
        yield from frames
        return
    shape = _shape(first)
    for frame in itertools.chain([first], frames):
        # filters are built for one size and format (fieldmatch corrupts memory when fed another): when
        # the picture changes mid-stream (a broadcast recording's SD/HD switch), the chain is flushed
        # and a new one built
        if _shape(frame) != shape:
            yield from chain(None)
            chain, shape = _Chain(stream, frame, filters), _shape(frame)
        yield from chain(frame)
    yield from chain(None)  # bwdif holds one frame back to look ahead, fps and decimate more: flush them


# FFmpeg's filters that turn a frame counterclockwise by 0..3 quarter turns (as its command line's autorotate)
TURN_FILTERS = {
    0: [],
    1: [("transpose", "cclock")],
    2: [("hflip", ""), ("vflip", "")],
    3: [("transpose", "clock")],
}


def _shape(frame) -> tuple:
    return frame.width, frame.height, frame.format.name


class _Chain:
    """A configured filter graph for frames like `frame`: source -> filters -> sink. It holds the graph:
    PyAV frees the filters with it, and a push into a freed filter crashes the process."""

    def __init__(self, stream, frame, filters: list[tuple[str, str]]):
        import av

        self.graph = av.filter.Graph()
        nodes = [_buffer(self.graph, stream, frame), *(self.graph.add(*f) for f in filters)]
        nodes.append(self.graph.add("buffersink"))
        for left, right in itertools.pairwise(nodes):
            left.link_to(right)
        self.graph.configure()
        self.source, self.sink = nodes[0], nodes[-1]

    def __call__(self, frame) -> Iterator:
        """Push a frame (None: the end, flushing what the filters hold) and yield what comes out."""
        self.source.push(frame)
        return _pulled(self.sink)


def _interlaced(stream, first) -> bool:
    field_order = stream.codec_context.field_order  # 0 unknown, 1 progressive, 2-5 the field orders
    return bool(first.interlaced_frame) or int(field_order or 0) > 1


def _buffer(graph, stream, frame):
    """A filter graph's source for frames like `frame` of the stream, with the stream's frame rate
    (decimate needs it)."""
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    sar = frame.sample_aspect_ratio if hasattr(frame, "sample_aspect_ratio") else None
    sar = sar or stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    args = (
        f"video_size={frame.width}x{frame.height}:pix_fmt={frame.format.name}:time_base={stream.time_base}"
        f":pixel_aspect={sar.numerator if sar else 1}/{sar.denominator if sar else 1}"
        f":frame_rate={rate.numerator}/{rate.denominator}"
    )
    return graph.add("buffer", args)


def _pulled(sink) -> Iterator:
    """The frames a filter graph's sink has ready."""
    import av

    while True:
        try:
            yield sink.pull()
        except (av.BlockingIOError, av.EOFError):
            return


def _sample_aspect(stream) -> float:
    """The stream's pixel aspect ratio; 1.0 when unset or absurd."""
    value = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    sar = float(value) if value else 1.0
    return sar if 0.25 <= sar <= 4.0 else 1.0


def iter_frames(
    uri: str, width: int, height: int, crop: bool = True, box: Box | None = None, retime: Retime | None = None
) -> Iterator[np.ndarray]:
    """Decode every frame in order as uint8 RGB [height, width, 3].

    crop=True: resize to cover then centre-crop (the displayed aspect is kept: non-square pixels
    are made square); crop=False: plain resize.
    box: only this part of the source frame (the picture inside black bars, `detect_borders`).
    retime: how the source's frames are retimed (`source_retime`).
    """
    # RGB at native size is swscale's fast path; scaling there costs ~2.5x more than converting and
    # resizing with OpenCV (measured: see BENCHMARKS.md)
    return _decoded(
        uri,
        lambda frame, sar: _fit_rgb(_boxed(frame.to_ndarray(format="rgb24"), box), width, height, crop, sar),
        retime,
    )


# (x, y, width, height) in source pixels, all even: the picture inside letterbox / pillarbox bars
Box = tuple[int, int, int, int]


def as_box(value) -> Box | None:
    """A manifest's `content_box` (a list, an array out of Ray Data, or null) as a Box or None."""
    if value is None or len(value) != 4:
        return None
    x, y, w, h = (int(v) for v in value)
    return x, y, w, h


def _boxed(image: np.ndarray, box: Box | None) -> np.ndarray:
    if box is None:
        return image
    x, y, w, h = box
    return image[y : y + h, x : x + w]


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


# Limited-range luma (16..235) to the full-range grey that RGB->grey gives (0..255)
_LUMA_TO_GRAY = np.clip(np.round((np.arange(256) - 16) * 255.0 / 219.0), 0, 255).astype(np.uint8)

# How YUV planes encode colour: FFmpeg's matrix code (AVColorSpace: 1 BT.709, 9/10 BT.2020, anything
# else taken as BT.601, as swscale takes it) and full range (AVCOL_RANGE_JPEG) or not
BT601 = (6, False)  # SMPTE 170M, limited range: what OpenCV's I420 conversions and untagged video mean
_KR_KB = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


def _colour_of(frame) -> tuple[int, bool]:
    """A decoded frame's (matrix, full range); BT.601 unless tagged otherwise."""
    matrix = int(frame.colorspace or 0)
    full = int(frame.color_range or 0) == 2 or frame.format.name == "yuvj420p"  # JPEG-range 4:2:0
    return (matrix if matrix in _KR_KB else BT601[0]), full


def _yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, colour: tuple[int, bool]) -> np.ndarray:
    """uint8 RGB from 4:2:0 planes in `colour`'s matrix and range (chroma upsampled bilinearly), as
    one affine map of (Y, Cb, Cr) per pixel (OpenCV's transform: rounds and saturates)."""
    import cv2

    h, w = y.shape
    kr, kb = _KR_KB.get(colour[0], (0.299, 0.114))
    kg = 1 - kr - kb
    s, c, black = (
        (1.0, 1.0, 0.0) if colour[1] else (255 / 219, 255 / 224, 16.0)
    )  # limited: Y 16..235, C 16..240
    cr_r, cb_b = 2 * (1 - kr) * c, 2 * (1 - kb) * c
    cb_g, cr_g = -kb * cb_b / kg, -kr * cr_r / kg
    affine = np.array(
        [
            [s, 0.0, cr_r, -black * s - 128 * cr_r],
            [s, cb_g, cr_g, -black * s - 128 * (cb_g + cr_g)],
            [s, cb_b, 0.0, -black * s - 128 * cb_b],
        ],
        np.float32,
    )
    up = cv2.INTER_LINEAR
    ycc = cv2.merge([y, cv2.resize(u, (w, h), interpolation=up), cv2.resize(v, (w, h), interpolation=up)])
    return cv2.transform(ycc, affine)


class Picture:
    """One decoded frame at the keyframe size, held as YUV 4:2:0 planes or, failing that, as RGB.

    Most video is 8-bit yuv420p; keeping its planes skips the full-size RGB conversion, the
    costliest step of analysis, and halves the memory a held frame takes. `rgb()` converts on
    demand, for the few frames a clip keeps, in the planes' own matrix and range (`colour`: HD
    video is BT.709; read as BT.601, its reds and greens moved by up to ~25 levels).
    """

    __slots__ = ("_y", "_u", "_v", "_rgb", "_small_y", "colour")

    def __init__(self, y=None, u=None, v=None, rgb=None, colour: tuple[int, bool] = BT601):
        self._y, self._u, self._v, self._rgb = y, u, v, rgb
        self._small_y = None  # the luma that gray() reduced; bgr() goes on from it
        # (matrix, full range) of what i420() gives: the planes', or BT.601 for an RGB picture
        self.colour = BT601 if rgb is not None else colour

    @property
    def size(self) -> tuple[int, int]:
        h, w = (self._y if self._rgb is None else self._rgb).shape[:2]
        return w, h

    def rgb(self) -> np.ndarray:
        """uint8 RGB [h, w, 3]."""
        if self._rgb is not None:
            return self._rgb
        if self.colour != BT601:
            return _yuv_to_rgb(self._y, self._u, self._v, self.colour)
        import cv2

        return cv2.cvtColor(_i420(self._y, self._u, self._v), cv2.COLOR_YUV2RGB_I420)

    def i420(self) -> np.ndarray:
        """The [h * 3 / 2, w] yuv420p buffer an encoder takes, in `colour`: the planes as they are,
        or the RGB converted (BT.601 limited range)."""
        if self._rgb is None:
            return _i420(self._y, self._u, self._v)
        import cv2

        return cv2.cvtColor(self._rgb, cv2.COLOR_RGB2YUV_I420)

    def gray(self, width: int, height: int) -> np.ndarray:
        """Full-range uint8 grey [height, width] (as RGB->grey would give), area-averaged."""
        import cv2

        if self._rgb is not None:
            return cv2.cvtColor(shrink(self._rgb, width, height), cv2.COLOR_RGB2GRAY)
        self._small_y = shrink(self._y, width, height)
        return self._small_y if self.colour[1] else cv2.LUT(self._small_y, _LUMA_TO_GRAY)

    def bgr(self, width: int, height: int) -> np.ndarray:
        """uint8 BGR [height, width, 3], small (for scene detection); width and height even."""
        import cv2

        if self._rgb is not None:
            return cv2.cvtColor(shrink(self._rgb, width, height), cv2.COLOR_RGB2BGR)
        small = self._small_y
        # when both steps are halvings, going on from gray()'s luma gives the same pixels, once less
        reuse = (
            small is not None
            and _halves(self._y.shape, small.shape)
            and _halves(small.shape, (height, width))
        )
        y = shrink(small if reuse else self._y, width, height)
        u = shrink(self._u, width // 2, height // 2)
        v = shrink(self._v, width // 2, height // 2)
        if self.colour != BT601:
            return np.ascontiguousarray(_yuv_to_rgb(y, u, v, self.colour)[..., ::-1])
        return cv2.cvtColor(_i420(y, u, v), cv2.COLOR_YUV2BGR_I420)


def _halves(big: tuple[int, ...], small: tuple[int, ...]) -> bool:
    """Whether `big` reduces to `small` by exact halvings (at least one)."""
    h, w = big[:2]
    while h > small[0] and w > small[1] and h % 2 == 0 and w % 2 == 0:
        h, w = h // 2, w // 2
    return (h, w) == tuple(small[:2]) and big[0] > small[0]


def shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average an image down to (width, height), halving first while it is twice the size.

    OpenCV's area resize is several times faster for an exact 2x than for larger factors, and two
    2x steps average the same pixels as one 4x step.
    """
    import cv2

    while image.shape[1] >= 2 * width and image.shape[0] >= 2 * height:
        h, w = image.shape[:2]
        if w % 2 or h % 2:
            break
        image = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _i420(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The contiguous [h * 3 / 2, w] buffer OpenCV's I420 conversions read."""
    h, w = y.shape
    return np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(h * 3 // 2, w)


def _plane(frame, index: int, width: int, height: int) -> np.ndarray:
    """A zero-copy view of one plane of a decoded frame (rows padded to line_size are trimmed)."""
    plane = frame.planes[index]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:height, :width]


def _even_crop(size: tuple[int, int], out_w: int, out_h: int) -> tuple[int, int]:
    """Top-left offsets of a centre crop, even so that the 4:2:0 chroma stays aligned."""
    return ((size[1] - out_h) // 4) * 2, ((size[0] - out_w) // 4) * 2


def iter_pictures(
    uri: str,
    width: int,
    height: int,
    box: Box | None = None,
    only: Container[int] | None = None,
    retime: Retime | None = None,
) -> Iterator[Picture | None]:
    """Decode every frame in order, resized to cover (width, height) and centre-cropped, as Pictures;
    with `box`, only that part of the source frame (the picture inside black bars); with `only`, the
    frames at other indices are decoded but yield None; with `retime`, the source's frames retimed
    (`source_retime`), which the indices count.

    8-bit yuv420p (and yuvj420p) frames stay in YUV planes (each resized on its own), with their
    colour matrix and range (`Picture.colour`); any other pixel format goes through RGB.
    """
    if width % 2 or height % 2:
        raise ValueError(f"keyframe size must be even, got {width}x{height}")
    numbers = itertools.count()

    def convert(frame, sar):
        if only is not None and next(numbers) not in only:
            return None
        return _picture(frame, width, height, box, sar)

    return _decoded(uri, convert, retime)


def _picture(frame, width: int, height: int, box: Box | None = None, sar: float = 1.0) -> Picture:
    import cv2

    fw, fh = frame.width, frame.height
    x, y, bw, bh = box or (0, 0, fw, fh)
    if x + bw > fw or y + bh > fh:  # the frame size changed mid-stream: the box no longer applies
        x, y, bw, bh = 0, 0, fw, fh
    if frame.format.name not in ("yuv420p", "yuvj420p") or any(v % 2 for v in (fw, fh, x, y, bw, bh)):
        image = _boxed(frame.to_ndarray(format="rgb24"), (x, y, bw, bh))
        return Picture(rgb=_fit_rgb(image, width, height, True, sar))
    sw, sh = cover_size(_displayed(bw, sar), bh, width, height)
    interp = cv2.INTER_AREA if min(sw / bw, sh / bh) < 0.5 else cv2.INTER_LINEAR
    top, left = _even_crop((sw, sh), width, height)
    planes = []
    for i in range(3):
        s = 1 if i == 0 else 2  # 4:2:0 chroma planes are half size
        data = _plane(frame, i, fw // s, fh // s)[y // s : (y + bh) // s, x // s : (x + bw) // s]
        ow, oh = sw // s, sh // s
        # resizing makes a new array; a frame already at size is copied (the decoder reuses its buffers)
        data = cv2.resize(data, (ow, oh), interpolation=interp) if data.shape != (oh, ow) else data.copy()
        planes.append(data[top // s : (top + height) // s, left // s : (left + width) // s])
    return Picture(*planes, colour=_colour_of(frame))


def _displayed(width: int, sar: float) -> int:
    """The width in square pixels of `width` stored pixels of aspect `sar`."""
    return max(2, int(round(width * sar)))


def _fit_rgb(image: np.ndarray, width: int, height: int, crop: bool, sar: float = 1.0) -> np.ndarray:
    """Resize an RGB frame to cover (width, height) and centre-crop it, or plainly resize it; `sar`:
    the stored pixels' aspect (cover keeps the displayed aspect)."""
    import cv2

    h, w = image.shape[:2]
    size = cover_size(_displayed(w, sar), h, width, height) if crop else (width, height)
    if size != (w, h):
        interp = cv2.INTER_AREA if min(size[0] / w, size[1] / h) < 0.5 else cv2.INTER_LINEAR
        image = cv2.resize(image, size, interpolation=interp)
    if crop and size != (width, height):
        image = center_crop(image, width, height)  # a view: OpenCV and numpy take strided rows
    return image


def encode_clip(
    frames: Sequence[np.ndarray | Picture],
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
    preset: str = "veryfast",
) -> bytes:
    """Encode RGB frames [H, W, 3] (or Pictures, whose YUV planes go in as they are) as an mp4 in
    memory (yuv420p, constant frame rate), tagged with the matrix and range its planes are in (the
    source's, when every frame kept its planes; BT.601 limited range otherwise), so that decoders
    that honour the tags (PyAV's, which training uses) give back the source's colours."""
    import av

    if not frames:
        raise ValueError("no frames to encode")
    colours = {f.colour if isinstance(f, Picture) else BT601 for f in frames}
    if len(colours) > 1:  # planes in different matrices (a stream that changed): all through RGB
        frames = [Picture(rgb=f.rgb()) if isinstance(f, Picture) else f for f in frames]
    matrix, full = colours.pop() if len(colours) == 1 else BT601
    first = frames[0]
    width, height = first.size if isinstance(first, Picture) else first.shape[1::-1]
    buffer = io.BytesIO()
    rate = grid_rate(fps)
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.colorspace, stream.codec_context.color_range = matrix, 2 if full else 1
        if codec == "libx264":
            # mbtree=0: with x264's macroblock-tree rate control the bytes depend on what the process
            # decoded before (x264 as PyAV 16-18 ship it; measured): off, the same frames give the same mp4
            stream.options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
        for image in frames:
            for packet in stream.encode(_yuv420_frame(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _yuv420_frame(image: np.ndarray | Picture):
    """RGB uint8 [H, W, 3] (or a Picture) -> a yuv420p frame for the encoder: BT.601, limited range,
    as PyAV's own conversion (swscale) gives and players assume, but through OpenCV. swscale took
    2.4 ms for a 512x320 frame on the bench machine, more than x264 needed to encode it; OpenCV
    takes 0.08 ms, with the same round-trip error (decoded back: mean 1.37 levels either way; the
    two differ only in where chroma is sampled at edges). Odd sizes, which 4:2:0 cannot halve, take
    PyAV's path."""
    import av

    if not isinstance(image, Picture):
        height, width = image.shape[:2]
        if height % 2 or width % 2 or image.dtype != np.uint8:
            return av.VideoFrame.from_ndarray(image, format="rgb24")
        image = Picture(rgb=np.ascontiguousarray(image))
    return av.VideoFrame.from_ndarray(image.i420(), format="yuv420p")


def encode_jpeg(image: np.ndarray, width: int = 192, quality: int = 80) -> bytes:
    """A small JPEG thumbnail of an RGB frame."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(image, (width, max(2, int(round(h * width / w)))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError("jpeg encoding failed")
    return data.tobytes()
