"""Keyframes and sketches as users' files come: orientation tags and high-depth greyscale."""

from __future__ import annotations

import numpy as np
from PIL import Image

from inference.media import read_image


def _drawing(h: int = 40, w: int = 64) -> np.ndarray:
    a = np.full((h, w, 3), 230, np.uint8)
    a[10:20, 5:17] = (200, 40, 40)  # an asymmetric mark: any rotation or flip moves it
    return a


def test_exif_orientation_is_applied(tmp_path):
    """A scan or phone photo stored sideways with an orientation tag reads upright, as viewers show it
    (left unapplied, a landscape keyframe came out portrait and no longer matched its partner's size)."""
    upright = _drawing()
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # sideways on disk
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "sideways.png", exif=exif.tobytes())
    assert np.array_equal(read_image(tmp_path / "sideways.png"), upright)
    assert np.array_equal(
        read_image(tmp_path / "sideways.png", grey=True), np.asarray(Image.fromarray(upright).convert("L"))
    )


def test_16_bit_greyscale_keeps_its_picture(tmp_path):
    """Pillow's own conversion clips 16-bit greyscale at 255, which made a 16-bit line drawing white."""
    lines = np.full((40, 64), 255, np.uint8)
    lines[20, :] = 0  # a black line on white paper
    lines[5:8, 3:9] = 128
    Image.fromarray(lines.astype(np.uint16) * 257).save(tmp_path / "sketch16.png")
    assert Image.open(tmp_path / "sketch16.png").mode.startswith("I")
    assert np.array_equal(read_image(tmp_path / "sketch16.png", grey=True), lines)
    assert np.array_equal(read_image(tmp_path / "sketch16.png"), np.repeat(lines[..., None], 3, axis=2))


def test_float_greyscale_in_unit_range(tmp_path):
    values = np.linspace(0.0, 1.0, 40 * 64, dtype=np.float32).reshape(40, 64)
    Image.fromarray(values, "F").save(tmp_path / "depth.tif")
    out = read_image(tmp_path / "depth.tif", grey=True)
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert np.abs(out.astype(int) - np.rint(values * 255)).max() == 0
