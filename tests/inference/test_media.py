"""Keyframes and sketches as users' files come (orientation tags, high-depth greyscale, colour-keyed
transparency, huge scans, animations), and output folders reused or unwritable."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.media import image_size, read_image, read_sketch


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


def test_colour_keyed_transparency_is_paper_white(tmp_path):
    """PNG optimisers (oxipng, optipng) store an all-or-nothing alpha as a colour key (tRNS) in an RGB or
    greyscale PNG; its clear pixels read black (the key colour) before."""
    drawing = _drawing()
    drawing[30:, :] = 0  # the clear background, keyed by its colour
    Image.fromarray(drawing).save(tmp_path / "rgb_key.png", transparency=(0, 0, 0))
    Image.fromarray(drawing[..., 0]).save(tmp_path / "grey_key.png", transparency=0)
    sixteen = drawing[..., 0].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(tmp_path / "grey16_key.png", transparency=0)
    for name in ("rgb_key.png", "grey_key.png", "grey16_key.png"):
        image = read_image(tmp_path / name)
        assert (image[30:] == 255).all(), name  # the background is paper white
        assert (image[10:20, 5:17] != 255).any() and (image[:5] == 230).all(), name  # the drawing is kept
    Image.fromarray(drawing[..., 0] > 0).save(tmp_path / "bilevel_key.png", transparency=0)  # 1-bit
    assert (read_image(tmp_path / "bilevel_key.png") == 255).all()  # white lines; the clear black is paper


def test_a_huge_scan_is_read_and_a_too_huge_one_named(tmp_path, monkeypatch, caplog):
    """Pillow refuses images over twice its bomb limit with a traceback (a 1200 dpi A3 scan is past it);
    keyframes are the user's own files: read up to MAX_IMAGE_PIXELS, and past it an InputError naming the
    file and its size. (The limits are lowered here to keep the files small.)"""
    import PIL.Image

    from inference import media

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)  # this 64x40 drawing is a "bomb" to Pillow now
    Image.fromarray(_drawing()).save(tmp_path / "scan.png")
    assert read_image(tmp_path / "scan.png").shape == (40, 64, 3)
    assert media.image_size(tmp_path / "scan.png") == (40, 64)
    assert PIL.Image.MAX_IMAGE_PIXELS == 500  # put back
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(media.InputError, match=r"scan\.png is 64x40 .*scale it down first"):
        read_image(tmp_path / "scan.png")


def test_an_animated_keyframe_says_which_frame_is_used(tmp_path, caplog):
    frames = [Image.fromarray(_drawing()), Image.fromarray(255 - _drawing())]
    frames[0].save(tmp_path / "walk.gif", save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level("WARNING", logger="inbetweener.media"):
        image_size(tmp_path / "walk.gif")  # a batch's header check, then the read at its turn
        image = read_image(tmp_path / "walk.gif")
    assert caplog.text.count("walk.gif has 2 frames (animated or multi-page); its first is used") == 1
    assert abs(int(image[0, 0, 0]) - 230) <= 8  # the first frame's paper (GIF palette rounding)


def test_a_rerun_into_the_same_folder_leaves_only_its_own_outputs(tmp_path):
    """An earlier 16-frame run's frames 8..15 stayed beside a new 8-frame run's (an image-sequence import
    took them as one clip), and its mp4/gif of other frames beside a png-only run. Only what the earlier
    run's meta.json lists goes: a user's own drawings in the folder stay, even numbered like frames, and
    so do the run's keyframes."""
    import json

    from inference.media import write_outputs

    clip = np.stack([_drawing()] * 16)
    (tmp_path / "frames").mkdir()
    Image.fromarray(_drawing()).save(tmp_path / "frames" / "0020.png")  # the user's, never listed
    written = write_outputs(clip, tmp_path, fps=8, formats=("png", "gif", "mp4"))
    outputs = {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in written.items()}
    (tmp_path / "meta.json").write_text(json.dumps({"outputs": outputs}))  # as interpolate records them
    (tmp_path / "notes.txt").write_text("mine")
    keyframe = tmp_path / "frames" / "0015.png"  # an earlier output now given as this run's keyframe
    written = write_outputs(clip[:8], tmp_path, fps=8, formats=("png",), keep=[keyframe])
    names = sorted(p.name for p in (tmp_path / "frames").glob("*.png"))
    assert names == [f"{i:04d}.png" for i in range(8)] + ["0015.png", "0020.png"]
    assert written["png"] == [tmp_path / "frames" / f"{i:04d}.png" for i in range(8)]
    assert not (tmp_path / "inbetween.mp4").exists() and not (tmp_path / "inbetween.gif").exists()
    assert (tmp_path / "notes.txt").exists()


def test_an_output_folder_that_cannot_be_written_is_named_first(tmp_path):
    from inference.media import InputError, check_writable_folder

    (tmp_path / "afile").write_text("x")
    for create in (False, True):
        with pytest.raises(InputError, match=r"afile is a file, not a folder"):
            check_writable_folder(tmp_path / "afile" / "sub", create=create)
    check_writable_folder(tmp_path / "new" / "deeper", create=False)
    assert not (tmp_path / "new").exists()  # a dry run writes nothing
    check_writable_folder(tmp_path / "new" / "deeper", create=True)
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())


def _pose(ink: int, paper: int, dense: bool = False) -> np.ndarray:
    """A grey drawing 48x64: a frame of paper, a line across, and (dense) a shaded body covering most of it."""
    a = np.full((48, 64), paper, np.uint8)
    a[20:22, 4:60] = ink
    if dense:
        a[4:44, 6:58] = ink  # more ink than paper: a shaded sketch
        a[24:26, 10:50] = paper
    return a


@pytest.mark.parametrize("dense", [False, True])
def test_sketches_read_lines_light_on_dark_whichever_way_drawn(tmp_path, dense):
    """The encoder wants lines ~1 on 0. A dark-on-light drawing with more ink than paper was taken for an
    inverted one (its mean is dark), so its paper became the lines: the paper decides now."""
    dark_on_light = _pose(0, 255, dense)
    Image.fromarray(dark_on_light).save(tmp_path / "pencil.png")
    Image.fromarray(255 - dark_on_light).save(tmp_path / "chalk.png")
    # (light strokes covering most of a dark page read as a photo of a sheet on a desk: not tried)
    for name in ("pencil.png",) if dense else ("pencil.png", "chalk.png"):
        lines = read_sketch(tmp_path / name)
        assert lines[21, 30] > 200 and lines[0, 0] < 50, name  # a line is bright, the paper dark


@pytest.mark.parametrize("colour", [0, 255])
def test_a_line_layer_on_transparency_is_read_by_its_opacity(tmp_path, colour, caplog):
    """White lines on a transparent layer, composited onto white paper, vanished (a blank hint, used
    unsaid); black ones must keep working."""
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[20:22, 4:60, 3] = 255  # the strokes are the only opaque pixels
    Image.fromarray(rgba, "RGBA").save(tmp_path / "layer.png")
    with caplog.at_level("WARNING", logger="inbetweener.media"):
        lines = read_sketch(tmp_path / "layer.png")
    assert lines[21, 30] == 255 and lines[0, 0] == 0 and "no lines" not in caplog.text


def test_a_blank_sketch_is_warned_about(tmp_path, caplog):
    Image.fromarray(np.full((48, 64), 250, np.uint8)).save(tmp_path / "blank_03.png")
    with caplog.at_level("WARNING", logger="inbetweener.media"):
        read_sketch(tmp_path / "blank_03.png")
    assert "blank_03.png shows no line" in caplog.text


def test_a_photo_of_a_sketch_on_a_desk_is_read_the_right_way_round(tmp_path):
    """Dark margins around the sheet (a desk in a phone photo, a scanner lid) made the edge ring dark, and
    the drawing was taken for light lines on dark paper: the paper became the lines."""
    photo = np.full((100, 160), 235, np.uint8)  # the sheet
    photo[:8], photo[-8:], photo[:, :10], photo[:, -10:] = 60, 60, 60, 60  # the desk around it
    photo[48:51, 20:140] = 20  # a pencil line
    Image.fromarray(photo).save(tmp_path / "photo.png")
    lines = read_sketch(tmp_path / "photo.png")
    assert lines[49, 80] > 200 and lines[50 // 2, 80] < 40  # the line bright, the sheet dark
