"""Decoding for analysis: YUV-plane Pictures agree with the RGB path, whatever the pixel format."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from pipeline.video import Retime
from pipeline.video_decode import iter_frames, iter_pictures


def _write(path, pix_fmt: str, size=(200, 120), frames: int = 6) -> None:
    """Coloured blocks moving over a gradient: hard edges and smooth ramps, in `pix_fmt`."""
    w, h = size
    codec = "libx264rgb" if pix_fmt == "rgb24" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {"crf": "0", "preset": "ultrafast"}
        ramp = np.linspace(30, 220, w, dtype=np.float32)
        for i in range(frames):
            image = np.zeros((h, w, 3), np.uint8)
            image[..., 0] = ramp.astype(np.uint8)
            image[..., 1] = 90
            image[..., 2] = ramp[::-1].astype(np.uint8)
            image[20:70, 10 + 12 * i : 60 + 12 * i] = (230, 40, 60)
            image[80:110, 120:180] = (20, 200, 120)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p", "rgb24"])
def test_pictures_match_the_rgb_path(tmp_path, pix_fmt):
    path = tmp_path / f"clip_{pix_fmt}.mp4"
    _write(path, pix_fmt)
    rgb = list(iter_frames(str(path), 128, 80))
    pictures = list(iter_pictures(str(path), 128, 80))
    assert len(pictures) == len(rgb) == 6
    for picture, reference in zip(pictures, rgb):
        assert picture.size == (128, 80)
        image = picture.rgb()
        assert image.shape == reference.shape == (80, 128, 3) and image.dtype == np.uint8
        # the two paths resize in different colour spaces and crop on even offsets: close, not equal
        assert np.abs(image.astype(int) - reference.astype(int)).mean() < 6
        grey = picture.gray(64, 40)
        expected = cv2.cvtColor(
            cv2.resize(reference, (64, 40), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY
        )
        assert grey.shape == (40, 64)
        assert np.abs(grey.astype(int) - expected.astype(int)).mean() < 4  # full range, like RGB->grey
        bgr = picture.bgr(32, 20)
        assert bgr.shape == (20, 32, 3)
        small = cv2.resize(reference, (32, 20), interpolation=cv2.INTER_AREA)[..., ::-1]
        # at 32x20 the chroma is 16x10: the edges of the blocks differ, flat areas agree
        error = np.abs(bgr.astype(int) - small.astype(int))
        assert np.median(error) <= 3 and error.mean() < 12


def test_pictures_keep_the_moving_block_where_it_is(tmp_path):
    """Frame order and geometry: the red block's centre moves right by 12 px a frame (scaled)."""
    path = tmp_path / "clip.mp4"
    _write(path, "yuv420p", size=(200, 120))
    centres = []
    for picture in iter_pictures(str(path), 200, 120):
        image = picture.rgb().astype(int)
        red = (image[..., 0] > 190) & (image[..., 1] < 65) & (image[..., 2] < 100)
        centres.append(np.nonzero(red)[1].mean())
    steps = np.diff(centres)
    assert np.allclose(steps, 12, atol=1.0), steps


def test_odd_keyframe_size_is_refused(tmp_path):
    path = tmp_path / "clip.mp4"
    _write(path, "yuv420p")
    with pytest.raises(ValueError, match="even"):
        next(iter_pictures(str(path), 127, 80))


def test_frames_outside_the_wanted_ones_are_skipped_but_keep_their_place(tmp_path):
    """The write stage converts only the frames its clips use: the others come out as None, and the
    wanted ones are exactly those of a full decode, at their own positions."""
    path = tmp_path / "clip.mp4"
    _write(path, "yuv420p")
    every = [p.i420() for p in iter_pictures(str(path), 128, 80)]
    some = list(iter_pictures(str(path), 128, 80, only={1, 4}))
    assert len(some) == len(every) == 6
    assert [i for i, p in enumerate(some) if p is not None] == [1, 4]
    assert all(np.array_equal(some[i].i420(), every[i]) for i in (1, 4))


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "rgb24"])
def test_pictures_encode_to_the_frames_of_the_rgb_path(tmp_path, pix_fmt):
    """The write stage encodes Pictures (YUV planes straight from the decoder, or RGB for other
    formats): the clip must decode to the frames that the RGB path gives, up to the two paths'
    resizing differences and a near-lossless encode."""
    import io

    from pipeline.video_encode import encode_clip

    path = tmp_path / f"clip_{pix_fmt}.mp4"
    _write(path, pix_fmt)
    data = encode_clip(list(iter_pictures(str(path), 128, 80)), 24, crf=0)
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    reference = list(iter_frames(str(path), 128, 80))
    assert len(decoded) == len(reference) == 6
    for got, expected in zip(decoded, reference, strict=True):
        assert got.shape == expected.shape == (80, 128, 3)
        assert np.abs(got - expected).mean() < 6


def test_clip_encoding_gives_the_same_bytes_after_decoding():
    """The shards' clips are encoded with libx264: the same frames must give the same mp4 whatever the
    process decoded in between (with x264's macroblock-tree rate control they did not)."""
    import io

    from pipeline import samples
    from pipeline.video_encode import encode_clip

    frames = [
        f.copy()
        for shot in samples.EPISODES["episode_01.mp4"][:3]
        for f in samples.shot_frames(shot, 0, (320, 192), 24)
    ]
    first = encode_clip(frames, 24)
    for _ in range(3):
        with av.open(io.BytesIO(first)) as container:  # decoding leaves the heap as the curate job does
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == len(frames)
        assert encode_clip(frames, 24) == first


def test_clip_encoding_keeps_colours_as_pyav_converts_them():
    """encode_clip converts RGB to 4:2:0 with OpenCV (30x faster than PyAV's swscale): a decoder
    must see the colours PyAV's own conversion gives (BT.601, limited range), not swapped channels
    or a shifted range, and lose no more at edges."""
    import io

    from pipeline.video_encode import encode_clip

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (233, 180, 150)]
    frame = np.zeros((64, 96, 3), np.uint8)
    for i, colour in enumerate(colours):
        frame[:, i * 16 : (i + 1) * 16] = colour
    frames = [np.clip(frame.astype(int) + k - 6, 0, 255).astype(np.uint8) for k in range(12)]

    def decoded(data: bytes) -> list[np.ndarray]:
        with av.open(io.BytesIO(data)) as container:
            return [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]

    ours = decoded(encode_clip(frames, 24, crf=0))
    buffer = io.BytesIO()  # the same clip through PyAV's own rgb24 -> yuv420p conversion
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"crf": "0", "preset": "veryfast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    theirs = decoded(buffer.getvalue())
    assert len(ours) == len(theirs) == len(frames)
    for got, ref, source in zip(ours, theirs, frames, strict=True):
        inner = (slice(None), [c for c in range(96) if 2 <= c % 16 < 14])
        assert np.abs(got - source)[inner].max() <= 4  # flat patches, away from chroma edges
        # at the hard chroma edges the two sample chroma at other places: no worse on the whole
        assert np.abs(got - source).mean() <= np.abs(ref - source).mean() + 0.5


def _boxed_video(path, size, box, frames=48, keyint=12, night=False, pix_fmt="yuv420p"):
    """Moving content inside `box` (x, y, w, h) of a black frame; `night`: a flat near-black band over
    the top third of the content in every frame (a dark sky, not a bar)."""
    from fractions import Fraction

    w, h = size
    x0, y0, bw, bh = box
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {"g": str(keyint)}
        for i in range(frames):
            image = np.zeros((h, w, 3), np.uint8)
            picture = np.zeros((bh, bw, 3), np.uint8)
            picture[:] = (60 + 2 * i, 140, 200 - 2 * i)
            if night:
                picture[: bh // 3] = (3, 3, 8)
            x = (i * 5) % (bw - 40)
            picture[bh // 2 : bh // 2 + 40, x : x + 40] = (250, 220, 30)
            image[y0 : y0 + bh, x0 : x0 + bw] = picture
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_black_bars_are_found_in_pairs_and_nothing_else(tmp_path):
    from pipeline.video import detect_borders

    cases = {
        "pillarbox": ((320, 180), (40, 0, 240, 180), {}, (40, 0, 240, 180)),
        "letterbox": ((320, 240), (0, 30, 320, 180), {}, (0, 30, 320, 180)),
        "no bars": ((320, 180), (0, 0, 320, 180), {}, None),
        "dark sky in every frame": ((320, 180), (0, 0, 320, 180), {"night": True}, None),
        "one GOP: frames read in order": ((320, 180), (40, 0, 240, 180), {"keyint": 250}, (40, 0, 240, 180)),
        "one GOP, dark sky": ((320, 180), (0, 0, 320, 180), {"keyint": 250, "night": True}, None),
    }
    for name, (size, box, extra, expected) in cases.items():
        path = tmp_path / f"{name}.mp4"
        _boxed_video(path, size, box, **extra)
        assert detect_borders(str(path)) == expected, name


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_boxed_decoding_drops_the_bars(tmp_path, pix_fmt):
    """iter_pictures (YUV planes or RGB) and iter_frames cut the clip from the box: no black columns
    are left, and both paths see the same picture."""
    path = tmp_path / "pillar.mp4"
    box = (40, 0, 240, 180)
    _boxed_video(path, (320, 180), box, frames=4, pix_fmt=pix_fmt)
    pictures = [p.rgb() for p in iter_pictures(str(path), 128, 80, box)]
    frames = list(iter_frames(str(path), 128, 80, box=box))
    unboxed = next(iter(iter_frames(str(path), 128, 80)))
    for image in (pictures[0], frames[0]):
        assert image.shape == (80, 128, 3) and image[:, :3].mean() > 40 and image[:, -3:].mean() > 40
    assert unboxed[:, :3].mean() < 10  # without the box the cover crop keeps part of the bars
    assert np.abs(pictures[0].astype(int) - frames[0]).mean() < 3


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_non_square_pixels_are_made_square(tmp_path, pix_fmt):
    """An anamorphic DVD-style source (720x480 stored, pixel aspect 32/27, shown 16:9): a circle of the
    displayed picture is stored as an ellipse; both decode paths give it back round."""
    from fractions import Fraction

    path = tmp_path / "anamorphic.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = 720, 480, pix_fmt
        stream.codec_context.sample_aspect_ratio = Fraction(32, 27)
        ys, xs = np.mgrid[0:480, 0:720]
        image = np.full((480, 720, 3), (50, 100, 150), np.uint8)
        image[((xs - 360) * 32 / 27) ** 2 + (ys - 240) ** 2 < 150**2] = 250
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    for frame in (next(iter_frames(str(path), 512, 320)), next(iter_pictures(str(path), 512, 320)).rgb()):
        rows, cols = np.nonzero(frame.mean(axis=2) > 200)
        width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
        assert abs(width / height - 1) < 0.03, (width, height)  # stored pixels as they are: 0.84


def test_the_main_video_stream_is_read_not_a_still_before_it(tmp_path):
    """A container whose first video stream is a one-frame still (cover art, a thumbnail): the probe
    and the decoder take the main stream, as FFmpeg's own choice does."""
    from fractions import Fraction

    from pipeline.video import probe

    path = tmp_path / "two_streams.mkv"
    with av.open(str(path), "w") as container:
        still = container.add_stream("mjpeg", rate=Fraction(1))
        still.width, still.height, still.pix_fmt = 64, 64, "yuvj420p"
        main = container.add_stream("libx264", rate=Fraction(24))
        main.width, main.height, main.pix_fmt = 320, 192, "yuv420p"
        for packet in still.encode(
            av.VideoFrame.from_ndarray(np.full((64, 64, 3), 200, np.uint8), format="rgb24")
        ):
            container.mux(packet)
        container.mux(still.encode())
        for i in range(24):
            image = np.zeros((192, 320, 3), np.uint8)
            image[:, i * 5 : i * 5 + 40] = 255
            container.mux(main.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(main.encode())
    info = probe(str(path))
    assert (info.codec, info.width, info.height, info.fps) == ("h264", 320, 192, 24.0)
    assert sum(1 for _ in iter_pictures(str(path), 128, 80)) == 24
    assert len(list(iter_frames(str(path), 128, 80))) == 24


def _comb(image: np.ndarray) -> float:
    """Combing: how far each row is from the mean of its neighbours (large when fields disagree)."""
    grey = image.astype(np.float64).mean(axis=2)
    return float(np.abs(grey[1:-1] - (grey[:-2] + grey[2:]) / 2).mean())


def test_interlaced_video_is_deinterlaced_frame_for_frame(tmp_path):
    """Interlaced frames whose two fields show a moving bar at two moments (combed edges) come out of
    both decode paths deinterlaced (bwdif): as many frames, far less combing; progressive video is
    untouched."""
    from fractions import Fraction

    path = tmp_path / "interlaced.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"x264-params": "interlaced=1:tff=1", "crf": "10"}
        for i in range(12):
            image = np.full((240, 320, 3), 30, np.uint8)
            for parity, moment in ((0, 2 * i), (1, 2 * i + 1)):  # top field first, then bottom
                field = np.full((240, 320, 3), 30, np.uint8)
                field[:, 12 * moment % 280 : 12 * moment % 280 + 40] = 230
                image[parity::2] = field[parity::2]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        raw = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames = list(iter_frames(str(path), 320, 240))
    pictures = [p.rgb() for p in iter_pictures(str(path), 320, 240)]
    assert len(frames) == len(pictures) == len(raw) == 12
    combed = np.mean([_comb(f) for f in raw[2:10]])
    assert np.mean([_comb(f) for f in frames[2:10]]) < combed / 3
    assert np.mean([_comb(p) for p in pictures[2:10]]) < combed / 3
    progressive = tmp_path / "progressive.mp4"
    _write(progressive, "yuv420p")
    with av.open(str(progressive)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(next(iter_frames(str(progressive), *first.shape[1::-1])), first)


# Display times of a variable-rate source, in ms: held drawings stored once (125, 83, 250), one
# 17 ms flash, the rest a 24 fps frame rounded to milliseconds (41 or 42); no start falls half way
# between two 24 fps grid times.
VFR_MS = [42, 125, 41, 83, 17, 42, 41, 250, 41, 42, 83, 42]
# Grid frame k (time k/24 s) shows the last drawing starting nearest to it (FFmpeg's fps filter):
# held drawings repeat, the flash shares its grid time with the next drawing and drops (drawing 4)
VFR_GRID = [0, 1, 1, 1, 2, 3, 3, 5, 6, 7, 7, 7, 7, 7, 7, 8, 9, 10, 10, 11]


def _drawing(i: int, size=(160, 96)) -> np.ndarray:
    """A still background; in the middle two grey patches whose levels encode `i` (0..99: ones left,
    tens right; grey, so that it lives in luma, which interlaced video keeps per field, not in the
    4:2:0 chroma shared by two lines); a bar moving along the bottom (motion for idet to see)."""
    w, h = size
    image = np.empty((h, w, 3), np.uint8)
    image[...] = np.linspace(60, 200, w, dtype=np.uint8)[None, :, None]
    image[h // 3 : 2 * h // 3, w // 3 : w // 2] = 20 + 20 * (i % 10)
    image[h // 3 : 2 * h // 3, w // 2 : 2 * w // 3] = 20 + 20 * (i // 10)
    x = 7 * i % (w - 20)
    image[h * 3 // 4 : h - 4, x : x + 16] = 250
    return image


def _drawing_id(image: np.ndarray) -> int:
    h, w = image.shape[:2]
    patch = image[h // 2 - 4 : h // 2 + 4].mean(axis=(0, 2))
    ones, tens = (
        patch[w * 5 // 12 - 4 : w * 5 // 12 + 4].mean(),
        patch[w * 7 // 12 - 4 : w * 7 // 12 + 4].mean(),
    )
    return int(round((tens - 20) / 20)) * 10 + int(round((ones - 20) / 20))


def test_variable_rate_video_decodes_on_a_constant_grid(tmp_path):
    """A drawing held 125 ms comes out as three 24 fps frames (a hold the timing stage can see), in
    both decode paths; without the grid the source's own frames come out, one per drawing."""
    from pipeline import samples

    path = tmp_path / "vfr.mp4"
    samples.write_video(path, (_drawing(i) for i in range(len(VFR_MS))), 24, (160, 96), steps_ms=VFR_MS)
    grid = [_drawing_id(f) for f in iter_frames(str(path), 160, 96, retime=Retime(rate=Fraction(24)))]
    assert grid[: len(VFR_GRID)] == VFR_GRID
    assert len(grid) in (len(VFR_GRID), len(VFR_GRID) + 1)  # the last drawing's 42 ms: one grid step or two
    pictures = [
        _drawing_id(p.rgb()) for p in iter_pictures(str(path), 160, 96, retime=Retime(rate=Fraction(24)))
    ]
    assert pictures == grid
    assert [_drawing_id(f) for f in iter_frames(str(path), 160, 96)] == list(range(len(VFR_MS)))


def _interlaced_video(path, frames: list[np.ndarray], first_pts: int = 0) -> None:
    """Frames whose rows alternate two pictures' fields, encoded interlaced (top field first) at 29.97."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"x264-params": "interlaced=1:tff=1", "crf": "12", "preset": "fast"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = first_pts + i  # a broadcast recording's clock starts anywhere
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _weave(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    frame = top.copy()
    frame[1::2] = bottom[1::2]
    return frame


def _telecined(path, film: list[np.ndarray], still: int = 0, first_pts: int = 0) -> None:
    """3:2 pulldown, as NTSC DVDs of film and most cartoons store it: film frames A B C D become the
    video frames AA BB BC CD DD (top field, bottom field), 24 -> 30 frames a second; after `still`
    frames of the first drawing (an opening card)."""
    frames = [_weave(film[0], film[0])] * still
    for a, b, c, d in zip(film[0::4], film[1::4], film[2::4], film[3::4], strict=True):
        frames += [_weave(a, a), _weave(b, b), _weave(b, c), _weave(c, d), _weave(d, d)]
    _interlaced_video(path, frames, first_pts)


def _combing(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float(np.abs(grey[1:-1] - (grey[:-2] + grey[2:]) / 2).max(axis=1).mean())


def test_telecined_film_is_found_and_decoded_as_its_film_frames(tmp_path):
    """Telecined film is found (FFmpeg's idet sees its repeated fields; native interlaced video has
    none) and decoded back to its own frames, in order, none combed; deinterlacing it frame for frame
    gave 5 frames for every 4 drawings, one of them repeated and two woven from two drawings."""
    from pipeline.video_decode import detect_telecine

    film = [_drawing(i, (320, 240)) for i in range(48)]
    telecined, native = tmp_path / "telecined.mp4", tmp_path / "native.mp4"
    _telecined(telecined, film)
    _interlaced_video(native, [_weave(film[2 * i], film[2 * i + 1]) for i in range(24)])
    progressive = tmp_path / "progressive.mp4"
    _write(progressive, "yuv420p")
    assert (detect_telecine(str(telecined)), detect_telecine(str(native))) == (True, False)
    assert detect_telecine(str(progressive)) is None
    frames = list(iter_frames(str(telecined), 320, 240, retime=Retime(ivtc=True)))
    assert [_drawing_id(f) for f in frames] == list(range(48))
    with av.open(str(telecined)) as container:
        raw = [_combing(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert sum(c > 20 for c in raw) >= 20  # of the 24 frames woven from two drawings (edges ~50-100)
    assert max(_combing(f) for f in frames) < 20  # none left (progressive edges: ~3)
    as_video = [_drawing_id(f) for f in iter_frames(str(telecined), 320, 240)]
    assert len(as_video) == 60 and len(set(as_video)) < 60


@pytest.mark.parametrize("suffix", [".mkv", ".ts"])
def test_telecine_is_found_past_a_still_opening_in_containers_without_a_stream_duration(tmp_path, suffix):
    """idet reads frames from the middle of the source; Matroska and MPEG-TS (DVD rips) give no
    stream duration, and it read their first frames instead: a still opening, no repeated field."""
    from pipeline.video_decode import detect_telecine

    path = tmp_path / f"late{suffix}"
    first_pts = 30_000 if suffix == ".ts" else 0  # a recording whose clock starts at 1001 s
    _telecined(path, [_drawing(i % 100, (320, 240)) for i in range(240)], still=200, first_pts=first_pts)
    assert detect_telecine(str(path)) is True


@pytest.mark.parametrize("kind", ["vfr", "telecined"])
def test_retimed_clips_are_written_from_the_frames_shots_numbered(tmp_path, kind):
    """Shots numbers the retimed frames (a variable-rate source's grid, telecined film's own frames);
    the write stage must encode those same frames, or a clip would start and end at other moments
    than its manifest row says."""
    from pipeline import samples
    from pipeline.stages.discover import ProbeStage
    from pipeline.stages.shots import ShotsStage
    from pipeline.stages.write import EncodeSource
    from pipeline.video import source_retime

    path = tmp_path / f"{kind}.mp4"
    if kind == "vfr":
        drawings = 4 * len(VFR_MS)  # ~3.4 s: long enough for a clip
        samples.write_video(path, (_drawing(i) for i in range(drawings)), 24, (160, 96), steps_ms=VFR_MS)
        expected = {"vfr": True, "ivtc": False, "fps": 24.0}
    else:
        _telecined(path, [_drawing(i, (320, 240)) for i in range(96)])
        expected = {"vfr": False, "ivtc": True, "fps": float(Fraction(24000, 1001))}
    probe = ProbeStage()
    (source,) = probe.process_rows([{"source_uri": str(path)}])
    assert {k: source[k] for k in expected} == expected
    clips = [r for r in ShotsStage(min_len_s=0.5).process_rows([source]) if r["row_kind"] == "clip"]
    assert clips and all({k: c[k] for k in expected} == expected for c in clips)
    retimed = [_drawing_id(f) for f in iter_frames(str(path), 160, 96, retime=source_retime(source))]
    job = {**{k: source[k] for k in ("source_uri", "fps", "vfr", "ivtc", "content_box")}, "clips": clips}
    encoded = EncodeSource(160, 96)(job)
    assert not encoded["errors"]
    for clip in clips:
        with av.open(io.BytesIO(encoded["encoded"][clip["clip_id"]])) as container:
            written = [_drawing_id(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
        assert written == retimed[clip["start_frame"] : clip["end_frame"]]
    assert max(c["end_frame"] for c in clips) > 40  # past the first drawings: retimed all the way


def test_a_clip_the_encoder_fails_on_is_its_row_not_a_worker_crash(tmp_path, monkeypatch):
    """An exception in encoding was left to Ray's retries and recorded for every clip of the source as
    'the worker died on every attempt'; it is the clip's error, named, and the other clips are written."""
    from pipeline import samples
    from pipeline.stages import write

    path = tmp_path / "two.mp4"
    samples.write_video(path, (_drawing(i) for i in range(48)), 24, (160, 96))
    real = write.encode_clip

    def fussy(frames, *args, **kwargs):
        if len(frames) == 10:
            raise ValueError("odd number of rows")
        return real(frames, *args, **kwargs)

    monkeypatch.setattr(write, "encode_clip", fussy)
    clips = [
        {"clip_id": "a", "start_frame": 0, "end_frame": 12},
        {"clip_id": "b", "start_frame": 20, "end_frame": 30},
    ]
    job = {
        "source_uri": str(path),
        "fps": 24.0,
        "vfr": False,
        "ivtc": False,
        "content_box": None,
        "clips": clips,
    }
    result = write.EncodeSource(160, 96)(job)
    assert set(result["encoded"]) == {"a"}
    assert result["errors"] == {"b": "write: encoding failed (ValueError: odd number of rows)"}


def test_a_source_replaced_since_it_was_scored_is_not_encoded_as_its_clips(tmp_path):
    """A file replaced under the same name (a new cut, a re-encode) was encoded at the earlier file's frame
    ranges, as the earlier file's clips (their ids, scores and captions): select wrote other pictures into
    the shards unsaid. It is said as a source that is not there: select stops, curate makes error rows."""
    from manifests.keys import source_id_from_stream
    from pipeline import samples
    from pipeline.stages import write

    path = tmp_path / "ep.mp4"
    samples.write_video(path, (_drawing(i) for i in range(24)), 24, (160, 96))
    with path.open("rb") as handle:
        scored = source_id_from_stream(handle)
    job = {"source_uri": str(path), "source_id": scored, "fps": 24.0, "vfr": False, "ivtc": False,
           "content_box": None, "clips": [{"clip_id": "a", "start_frame": 0, "end_frame": 12}]}  # fmt: skip
    assert set(write.EncodeSource(160, 96)(job)["encoded"]) == {"a"}
    samples.write_video(path, (_drawing(i + 5) for i in range(24)), 24, (160, 96))  # another cut
    result = write.EncodeSource(160, 96)(job)
    assert (
        result["encoded"] == {}
        and f"{path} changed since it was scored (content id {scored}" in result["missing"]
    )
    assert result["errors"]["a"].startswith(f"write: {path} changed since it was scored")


COLOUR_BARS = [(220, 30, 40), (30, 200, 60), (40, 60, 220), (240, 200, 40), (128, 128, 128), (250, 250, 245)]


@pytest.mark.parametrize(
    ("matrix", "colorspace", "full"),
    [("ITU709", 1, False), ("ITU601", 6, False), ("ITU709", 1, True), ("BT2020", 9, False)],
)
def test_colours_survive_analysis_and_writing_in_the_sources_matrix(tmp_path, matrix, colorspace, full):
    """HD video stores colour in the BT.709 matrix (BT.2020 for UHD; full range from screen captures).
    The YUV-plane path read every source as BT.601 limited range and wrote its planes untagged:
    an HD source's reds and greens moved by up to ~25 levels in the frames the model stages scored and
    in the training shards. Now the keyframes and the written clips (decoded as training decodes
    them) keep the source's colours."""
    w, h = 192, 64
    image = np.zeros((h, w, 3), np.uint8)
    for i, colour in enumerate(COLOUR_BARS):
        image[:, i * 32 : (i + 1) * 32] = colour
    path = tmp_path / f"{matrix}_{full}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.colorspace, stream.codec_context.color_range = colorspace, 2 if full else 1
        stream.options = {"crf": "0"}
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame = frame.reformat(
                format="yuv420p", dst_colorspace=matrix, dst_color_range="JPEG" if full else "MPEG"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())

    def bars(rgb: np.ndarray) -> np.ndarray:
        return np.array([rgb[h // 2, i * 32 + 16] for i in range(len(COLOUR_BARS))], np.int32)

    truth = np.array(COLOUR_BARS, np.int32)
    pictures = list(iter_pictures(str(path), w, h))
    assert np.abs(bars(pictures[0].rgb()) - truth).max() <= 3
    assert np.abs(bars(next(iter_frames(str(path), w, h))) - truth).max() <= 3
    from pipeline.video_encode import encode_clip

    with av.open(io.BytesIO(encode_clip(pictures, 24.0, crf=0))) as container:
        written = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(bars(written) - truth).max() <= 3


@pytest.mark.parametrize("colour", [(1, False), (1, True), (6, True)])
def test_scene_detection_frames_have_the_keyframes_colours(colour):
    """Picture.bgr (the small frames PySceneDetect compares) converts as rgb() does: it read every
    picture as BT.601 limited range, stretching full-range captures' contrast."""
    from pipeline.video_decode import Picture

    planes = (
        np.full((64, 96), 230, np.uint8),
        np.full((32, 48), 100, np.uint8),
        np.full((32, 48), 160, np.uint8),
    )
    picture = Picture(*planes, colour=colour)
    small = picture.bgr(48, 32)[..., ::-1].reshape(-1, 3).astype(int)
    assert np.abs(small - picture.rgb()[0, 0].astype(int)).max() <= 1


def test_filters_follow_a_picture_size_change_mid_stream(tmp_path):
    """A broadcast recording switches from SD to HD mid-stream; FFmpeg's filters are built for one
    size: bwdif refused the new frames (an error row for the whole source) and fieldmatch corrupted
    the process's memory (malloc_consolidate abort: the Ray worker dies). The chain is rebuilt."""
    parts = []
    for size, first_pts in (((320, 240), 0), ((480, 272), 1000)):
        part = tmp_path / f"{size[0]}.ts"
        with av.open(str(part), "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=Fraction(30000, 1001))
            stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
            stream.options = {"x264-params": "interlaced=1:tff=1", "preset": "ultrafast"}
            for i in range(60):
                frame = av.VideoFrame.from_ndarray(
                    np.full((size[1], size[0], 3), 4 * i, np.uint8), format="rgb24"
                )
                frame.pts = first_pts + i
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    counts = {
        name: sum(1 for _ in iter_pictures(str(joined), 128, 80, retime=retime))
        for name, retime in (
            ("bwdif", None),
            ("ivtc", Retime(ivtc=True)),
            ("grid", Retime(rate=Fraction(24))),
        )
    }
    assert counts == {"bwdif": 120, "ivtc": 96, "grid": 96}


def _turned_video(path, rotation: int, size=(320, 192), frames: int = 3, sar=None) -> None:
    """A red square at the stored frame's top-left, on blue; `rotation`: the display matrix's angle,
    counterclockwise, as a phone writes it for video held upright (-90: turn clockwise to show)."""
    w, h = size
    image = np.full((h, w, 3), (30, 60, 200), np.uint8)
    image[: h // 4, : h // 4] = (250, 20, 20)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if sar:
            stream.codec_context.sample_aspect_ratio = sar
        stream.set_display_rotation(rotation)
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _red_corner(image: np.ndarray) -> str:
    h, w = image.shape[:2]
    corners = {
        "top-left": (2, 2),
        "top-right": (2, w - 3),
        "bottom-left": (h - 3, 2),
        "bottom-right": (h - 3, w - 3),
    }
    return " ".join(k for k, (y, x) in corners.items() if image[y, x, 0] > 200 and image[y, x, 2] < 80)


@pytest.mark.parametrize(
    "rotation, corner", [(0, "top-left"), (90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")]
)
def test_rotated_video_is_probed_and_decoded_upright(tmp_path, rotation, corner):
    """A video with a display rotation (phones store portrait video as landscape frames) is shown turned
    by players; the probe gives its displayed size and both decode paths give upright frames (they were
    read as stored: a portrait clip written on its side)."""
    from pipeline.video import probe

    path = tmp_path / f"turned{rotation}.mp4"
    _turned_video(path, rotation)
    info = probe(str(path))
    size = (192, 320) if rotation % 180 else (320, 192)
    assert (info.width, info.height) == size
    pictures = [p.rgb() for p in iter_pictures(str(path), *size)]
    frames = list(iter_frames(str(path), *size))
    assert len(pictures) == len(frames) == 3
    for image in (pictures[0], frames[0]):
        assert image.shape == (size[1], size[0], 3) and _red_corner(image) == corner


def test_rotated_video_keeps_its_bars_and_pixel_aspect_upright(tmp_path):
    """The black bars are found in the upright frames the stages decode, and a non-square pixel of a turned
    frame stands on its side: a pillarboxed, anamorphic portrait video comes out round and without bars."""
    from pipeline.video import detect_borders

    path = tmp_path / "turned_boxed.mp4"
    w, h = 240, 320  # stored landscape 320x240, shown portrait 240x320; pixels 4:3 wide when stored
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = h, w, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(3, 4)
        stream.set_display_rotation(-90)
        stream.options = {"g": "12"}
        for i in range(24):
            upright = np.zeros((h, w, 3), np.uint8)  # shown: pillarbox bars 40 px left and right
            upright[:, 40:200] = (60 + 4 * i, 140, 200)
            ys, xs = np.mgrid[0:h, 0:160]
            # a circle of the displayed picture: stored pixels are 3/4 as wide as high once turned upright
            upright[:, 40:200][((xs - 80) * 4 / 3) ** 2 + ((ys - 160) * 1.0) ** 2 < 50**2] = 250
            stored = np.ascontiguousarray(np.rot90(upright, 1))  # turned back: -90 shows it upright
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    box = detect_borders(str(path))
    assert box == (40, 0, 160, 320)
    for image in (
        next(iter_pictures(str(path), 128, 192, box)).rgb(),
        next(iter_frames(str(path), 128, 192, box=box)),
    ):
        assert image[:, :3].mean() > 40 and image[:, -3:].mean() > 40  # no bar left
        rows, cols = np.nonzero(image.mean(axis=2) > 240)
        width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
        assert abs(width / height - 1) < 0.1, (width, height)
