"""Shards made by other tools than curate: other containers, numbered frames, captions in other members,
keys with dots, gzipped shards, members that are no sample. What can be trained on is read; what cannot is
skipped, counted and said once with its shard."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.shard_samples import SampleError, _decode_frames, decode_window
from training.shards import TRAIN_INDEX, _expand_braces, iter_tar_samples, list_shards, write_train_index

SMALL = data.DataConfig(frames=4, height=32, width=48, num_workers=0, shuffle_buffer=1)


def frames_of(n: int, size=(48, 32)) -> np.ndarray:
    """uint8 [n, h, w, 3]: flat colours, a different one per frame (lossy codecs keep them near)."""
    w, h = size
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = (40 + 15 * i, 200 - 12 * i, 90)
    return out


def encode(frames: np.ndarray, fmt: str, codec: str, pix_fmt: str = "yuv420p") -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def image(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def samples_of(path: Path) -> dict[str, dict]:
    with open(path, "rb") as f:
        return {s["__key__"]: s for s in iter_tar_samples(f)}


def test_clips_in_any_container_or_as_numbered_frames_give_their_frames_and_captions(tmp_path):
    clip = frames_of(6)
    shard = write_tar(
        tmp_path / "other.tar",
        [
            ("avi.avi", encode(clip, "avi", "mpeg4")),
            ("avi.txt", b"an avi"),
            ("mkv.mkv", encode(clip, "matroska", "libx264")),  # Matroska states no frame count
            ("mkv.json", json.dumps({"text": "from the json's text"}).encode()),
            ("webm.webm", encode(clip, "webm", "libvpx-vp9")),
            ("webm.caption", b"from .caption"),
            ("gif.gif", encode(clip, "gif", "gif", "rgb8")),
            ("gif.json", json.dumps({"prompt": "from the json's prompt"}).encode()),
            *[(f"seq.{i:04d}.jpg", image(f, "JPEG")) for i, f in enumerate(clip)],
            ("seq.jpg", image(clip[-1], "JPEG")),  # a thumbnail, not a frame
            ("seq.txt", b"numbered frames"),
            ("ten.mp4", encode(clip, "mp4", "libx264", "yuv420p10le")),  # 10-bit (High 10)
            ("dotted.v2.mp4", encode(clip, "mp4", "libx264")),  # webdataset's key: `dotted`
            ("dotted.v2.txt", b"a key with a dot"),
        ],
    )
    samples = samples_of(shard)
    captions = {
        "avi": "an avi",
        "mkv": "from the json's text",
        "webm": "from .caption",
        "gif": "from the json's prompt",
        "seq": "numbered frames",
        "ten": "",
        "dotted": "a key with a dot",
    }
    assert set(samples) == set(captions)
    for key, caption in captions.items():
        w = decode_window(samples[key], SMALL, None)  # stride 1, from frame 0: frames 0..3
        assert w["video"].shape == (3, 4, 32, 48) and w["caption"] == caption, key
        colours = w["video"].float().mean(dim=(2, 3)).T  # [t, 3]
        expected = clip[:4, 0, 0].astype(np.float32)  # the clip's frames, not black, not another frame
        assert np.abs(colours.numpy() - expected).max() < 12, (key, colours, expected)


def test_keys_with_dots_that_run_together_are_said_not_mixed(tmp_path):
    clip = encode(frames_of(4), "mp4", "libx264")
    shard = write_tar(tmp_path / "dots.tar", [("take.1.mp4", clip), ("take.2.mp4", clip)])
    (sample,) = samples_of(shard).values()
    with pytest.raises(SampleError, match="2 videos under one key .*keys with dots"):
        decode_window(sample, SMALL, None)
    # two videos under a key without a dot (a clip and its preview): not blamed on dots
    shard = write_tar(tmp_path / "two.tar", [("take.mp4", clip), ("take.gif", clip)])
    (sample,) = samples_of(shard).values()
    with pytest.raises(SampleError, match="2 videos under one key .*keep one video per sample"):
        decode_window(sample, SMALL, None)


def test_transparent_frames_are_over_white_not_black(tmp_path):
    frames = np.zeros((4, 32, 48, 4), np.uint8)  # transparent black everywhere ...
    frames[:, 8:24, 16:32] = (200, 30, 30, 255)  # ... but an opaque red cel in the middle
    shard = write_tar(
        tmp_path / "cels.tar", [(f"cel.{i:03d}.png", image(f, "PNG")) for i, f in enumerate(frames)]
    )
    w = decode_window(samples_of(shard)["cel"], SMALL, None)
    assert (w["video"][:, :, 0, 0] == 255).all()  # the background: white paper
    assert w["video"][:, 0, 16, 24].tolist() == [200, 30, 30]  # the cel as drawn
    # the same cels as palette PNGs with a transparent entry (what pngquant writes): over white too
    from PIL import Image

    paletted = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).quantize(colors=4).save(buffer, "PNG", transparency=0)
        paletted.append(buffer.getvalue())
    shard = write_tar(tmp_path / "pal.tar", [(f"pal.{i:03d}.png", png) for i, png in enumerate(paletted)])
    w = decode_window(samples_of(shard)["pal"], SMALL, None)
    assert (w["video"][:, :, 0, 0] == 255).all()


def test_a_folder_of_gzipped_shards_is_listed(tmp_path):
    clip = encode(frames_of(4), "mp4", "libx264")
    write_tar(tmp_path / "000000.tar.gz", [("a.mp4", clip)], mode="w:gz")
    write_tar(tmp_path / "000001.tgz", [("b.mp4", clip)], mode="w:gz")
    write_tar(tmp_path / ".000002.tar", [("c.mp4", clip)])  # a shard being written
    (tmp_path / "README.md").write_text("shards from elsewhere")
    shards = list_shards(str(tmp_path))
    assert shards == [str(tmp_path / "000000.tar.gz"), str(tmp_path / "000001.tgz")]
    batch = next(iter(data.make_loader(shards, SMALL, 2, seed=0)))
    assert sorted(batch["key"]) == ["a", "b"]


def test_a_skipped_sample_is_said_once_with_its_shard(tmp_path, caplog):
    clip = encode(frames_of(4), "mp4", "libx264")
    shard = write_tar(tmp_path / "000000.tar", [("README.md", b"# made by another tool"), ("good.mp4", clip)])
    loader = data.make_loader([str(shard)], SMALL, 1, seed=0)
    batches = iter(loader)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        for _ in range(3):  # three epochs of one good clip each
            batch = next(batches)
            assert batch["key"] == ["good"]
    said = [r.getMessage() for r in caplog.records if "README" in r.getMessage()]
    assert len(said) == 1 and str(shard) in said[0] and "no video member" in said[0], said
    assert batch["state"].counts["corrupt"] >= 2  # counted every time it is read


def test_the_same_key_twice_in_a_row_is_two_samples(tmp_path):
    """As webdataset reads it: an extension that comes again starts a new sample (the first clip was lost)."""
    first, second = encode(frames_of(4), "mp4", "libx264"), encode(frames_of(5), "mp4", "libx264")
    shard = write_tar(
        tmp_path / "twice.tar", [("a.mp4", first), ("a.txt", b"one"), ("a.mp4", second), ("a.txt", b"two")]
    )
    with open(shard, "rb") as f:
        samples = list(iter_tar_samples(f))
    assert [(s["mp4"], s["txt"]) for s in samples] == [(first, b"one"), (second, b"two")]


def test_frames_of_different_sizes_are_a_skipped_sample_not_a_crash(tmp_path):
    """The sample videos of a run are drawn before its first step: such a sample stopped the run there."""
    small, big = frames_of(4), frames_of(4, size=(64, 40))
    mixed = [small[0], big[1], small[2], big[3]]
    shard = write_tar(
        tmp_path / "000000.tar",
        [
            *[(f"mixed.{i:02d}.png", image(f, "PNG")) for i, f in enumerate(mixed)],
            ("good.mp4", encode(small, "mp4", "libx264")),
        ],
    )
    with pytest.raises(SampleError, match="frames of different sizes"):
        decode_window(samples_of(shard)["mixed"], SMALL, None)
    assert [w["key"] for w in data.eval_windows([str(shard)], SMALL, 2)] == ["good"]


def test_a_gzipped_shards_index_is_recorded_for_evaluate(tmp_path):
    """evaluate checks its clips against the run's train_index; a gzipped shard's index (000000.parquet) was
    looked for as 000000.tar.parquet, and the run recorded nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "000000.tar.gz", [("a.mp4", encode(frames_of(4), "mp4", "libx264"))], mode="w:gz")
    pq.write_table(
        pa.table({"clip_id": ["a"], "source_id": ["s"], "phash": ["0f"]}), tmp_path / "000000.parquet"
    )
    assert write_train_index([str(tmp_path / "000000.tar.gz")], tmp_path / "run" / TRAIN_INDEX) == 1


def test_brace_patterns_as_the_shell_writes_them(tmp_path, capsys):
    from training.train import main

    assert list_shards(str(tmp_path / "s-{a..c}.tar")) == [str(tmp_path / f"s-{x}.tar") for x in "abc"]
    assert list_shards(str(tmp_path / "{000..004..2}.tar")) == [
        str(tmp_path / f"{i:03d}.tar") for i in (0, 2, 4)
    ]
    # padded as bash pads: to the longer end when either end has a leading zero
    assert _expand_braces("{08..100}")[:2] == ["008", "009"] and _expand_braces("{1..010}")[-1] == "010"
    assert _expand_braces("{8..10}") == ["8", "9", "10"]
    with pytest.raises(SystemExit) as exc:  # a traceback-free line, not "invalid literal for int()"
        main(
            [
                "rectify",
                "--preset",
                "tiny",
                "--out",
                str(tmp_path / "out"),
                "--data",
                str(tmp_path / "{0..x}.tar"),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "{0..x} is not a range: write {000000..000099}" in err, err


def turned_clip(rotation: int = 0, sar=None) -> bytes:
    """48x32 stored frames, blue with a red 8x8 square at the stored top-left; `rotation`: the display
    matrix's angle (a phone's portrait video: stored landscape, -90); `sar`: the pixel aspect."""
    from fractions import Fraction

    import av

    frame = np.full((32, 48, 3), (30, 60, 200), np.uint8)
    frame[:8, :8] = (250, 20, 20)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        if sar:
            stream.codec_context.sample_aspect_ratio = sar
        stream.set_display_rotation(rotation)
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_a_turned_or_anamorphic_clip_is_shown_upright_and_unstretched():
    """Players turn a phone's portrait video and widen anamorphic pixels; training read the stored frames:
    a clip on its side, or squeezed, fed to the model."""
    cfg = data.DataConfig(frames=4, height=48, width=32, num_workers=0)  # the upright clip's size: no crop
    for rotation, corner in ((-90, (0, -1)), (90, (-1, 0))):  # turned clockwise / counterclockwise to show
        w = decode_window({"__key__": "turned", "mp4": turned_clip(rotation)}, cfg, None)
        red = w["video"][0, 0] > 200  # [h, w]: where the red square is
        assert red[corner].item() and red.sum() < 48 * 32 / 4, rotation
    # stored 48x32 with pixels 2:1 wide: shown 96x32, so a 32x96 window takes the whole picture
    cfg = data.DataConfig(frames=4, height=32, width=96, num_workers=0)
    w = decode_window({"__key__": "wide", "mp4": turned_clip(sar=2)}, cfg, None)
    red_columns = (
        (w["video"][0, 0] > 200).any(dim=0).nonzero().flatten()
    )  # the 8 stored columns, twice as wide
    assert red_columns.min() == 0 and 14 <= red_columns.max() <= 17, red_columns


def test_a_window_late_in_a_long_clip_holds_only_its_frames(tmp_path):
    """Shards of other tools may hold whole episodes: every frame decoded before a late window was held
    (tens of GB for minutes of HD video: the run was killed for memory mid-epoch)."""
    clip = frames_of(12)
    for data_ in (encode(clip, "mp4", "libx264"), [image(f, "PNG") for f in clip]):
        frames, _ = _decode_frames(data_, 11, keep={8, 11})
        assert len(frames) == 12 and [i for i, f in enumerate(frames) if f is not None] == [8, 11]
    sample = {"__key__": "long", "mp4": encode(clip, "mp4", "libx264")}
    for seed in range(4):  # the window's frames are still the clip's frames at start + i * stride
        w = decode_window(sample, SMALL, np.random.default_rng(seed))
        colours = w["video"].float().mean(dim=(2, 3)).T.numpy()  # [t, 3]
        expected = clip[w["start"] : w["start"] + 4 * w["stride"] : w["stride"], 0, 0].astype(np.float32)
        assert np.abs(colours - expected).max() < 12, (seed, colours, expected)


def test_a_clip_with_a_still_before_its_video_gives_the_video():
    """Another tool's mkv/mp4 may hold a cover-art still or thumbnail as its first video stream: training
    and evaluate read that one-frame stream instead of the clip (curate's decoder already takes FFmpeg's
    choice of stream)."""
    from fractions import Fraction

    import av

    from training.shard_samples import _clip_facts, clip_ends, decode_clip

    clip = frames_of(12)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        still = container.add_stream("mjpeg", rate=Fraction(1))
        still.width, still.height, still.pix_fmt = 16, 16, "yuvj420p"
        main = container.add_stream("libx264", rate=Fraction(24))
        main.width, main.height, main.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        cover = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200, np.uint8), format="rgb24")
        for packet in [*still.encode(cover), *still.encode()]:
            container.mux(packet)
        for f in clip:
            container.mux(main.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(main.encode())
    data_ = buffer.getvalue()
    frames = decode_clip(data_)
    assert frames.shape == clip.shape  # 12 frames of 48x32, not the 16x16 still
    assert np.abs(frames.astype(int) - clip).mean() < 6
    first, last = clip_ends(data_)
    assert np.abs(first.astype(int) - clip[0]).mean() < 6 and np.abs(last.astype(int) - clip[-1]).mean() < 6
    assert _clip_facts(data_, {})[0] == 12
    w = decode_window({"__key__": "covered", "mkv": data_}, SMALL, None)
    assert w["video"].shape[1] == SMALL.frames
    audio_only = io.BytesIO()
    with av.open(audio_only, "w", format="matroska") as container:
        sound = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*sound.encode(frame), *sound.encode()]:
            container.mux(packet)
    with pytest.raises(ValueError, match=r"no video stream \(streams: audio\)"):
        decode_clip(audio_only.getvalue())
