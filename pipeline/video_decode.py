"""Decoding a source's frames with PyAV, for analysis and for the clips the job writes.

This module holds the frames-out side of video I/O: every frame of the main stream in order, through
FFmpeg's filters where the stream needs them (deinterlacing, inverse telecine, a variable rate put on
its grid, frames turned upright), resized to cover the asked size and centre-cropped. Analysis reads
the decoder's YUV 4:2:0 planes directly and converts to RGB only the few frames a clip keeps
(`Picture`, from `iter_pictures`); `iter_frames` is the plain RGB path. The telecine check
(`detect_telecine`) is here too, as it runs the same filter graphs. See BENCHMARKS.md for what each path
costs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Container, Iterator
from fractions import Fraction

import numpy as np

from pipeline.video import (
    Box,
    Retime,
    SourceError,
    _duration_s,
    _short,
    open_container,
    quarter_turns,
    video_stream,
)

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


def _boxed(image: np.ndarray, box: Box | None) -> np.ndarray:
    if box is None:
        return image
    x, y, w, h = box
    return image[y : y + h, x : x + w]


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
