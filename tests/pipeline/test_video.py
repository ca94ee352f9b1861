"""Decoding for analysis: YUV-plane Pictures agree with the RGB path, whatever the pixel format."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from pipeline.video import iter_frames, iter_pictures


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


def test_clip_encoding_gives_the_same_bytes_after_decoding():
    """The shards' clips are encoded with libx264: the same frames must give the same mp4 whatever the
    process decoded in between (with x264's macroblock-tree rate control they did not)."""
    import io

    from pipeline import samples
    from pipeline.video import encode_clip

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
