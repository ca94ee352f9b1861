"""Each stage on its own, without Ray: `s = Stage(...); s.setup(); s(batch)`."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from pipeline import samples
from pipeline.config import ConfigError, CurateConfig
from pipeline.select import decide_row, rules
from pipeline.stages.base import batch_of, rows_of
from pipeline.stages.discover import ProbeStage, discover
from pipeline.stages.motion import MotionStage
from pipeline.stages.shots import ShotsStage
from pipeline.stages.timing import TimingStage, classify_timing, frame_differences, held_frames


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    out = tmp_path_factory.mktemp("footage")
    truth = samples.generate_footage(out)
    bad = samples.make_bad_inputs(out / "bad")
    return out, truth, bad


def probe(uri: str) -> dict:
    stage = ProbeStage()
    stage.setup()
    return rows_of(stage(batch_of([{"source_uri": uri}])))[0]


def test_discover_expands_folders_globs_and_list_files(footage, tmp_path):
    out, _, _ = footage
    listed = tmp_path / "list.txt"
    listed.write_text(f"# a list file\n{out / 'episode_01.mp4'}\n{out / 'nope.mp4'}\n")
    found = discover([str(out), str(out / "episode_0*.mp4"), str(listed)])
    names = [p.rsplit("/", 1)[-1] for p in found]
    assert "episode_01.mp4" in names and "title_card.mp4" in names and "corrupt.mp4" in names
    assert names.count("episode_01.mp4") == 1  # duplicates once
    assert str(out / "nope.mp4") in found  # a missing path is kept: it becomes an error row


def test_discover_leaves_out_hidden_files_and_folders_unless_named(tmp_path):
    root = tmp_path / "drive"
    for rel in ["a.mp4", "sub/b.mkv", "._a.mp4", ".Trash/old.mp4", "sub/.cache/c.mp4"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert discover([str(root)]) == [str(root / "a.mp4"), str(root / "sub/b.mkv")]
    named = str(root / ".Trash/old.mp4")
    assert discover([named]) == [named]  # asked for by name: curated
    hidden_root = tmp_path / ".footage"  # the folder given may itself be hidden
    (hidden_root / "d.mp4").parent.mkdir()
    (hidden_root / "d.mp4").write_bytes(b"x")
    assert discover([str(hidden_root)]) == [str(hidden_root / "d.mp4")]


def test_a_recursive_glob_does_not_follow_links_to_folders(tmp_path):
    root = tmp_path / "drive"
    for rel in ["a.mp4", "sub/b.mkv", "sub/.cache/c.mp4", ".Trash/old.mp4"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "sub" / "up").symlink_to(root)  # a loop: the standard library's ** searched it forever
    (root / "sub" / "again").symlink_to(root / "sub")
    assert discover([str(root / "**" / "*.m*")]) == [str(root / "a.mp4"), str(root / "sub/b.mkv")]
    assert discover([str(root / ".Trash" / "*.mp4")]) == [str(root / ".Trash/old.mp4")]  # named: found
    assert discover([str(root / "**" / ".cache" / "*")]) == [str(root / "sub/.cache/c.mp4")]


def test_discover_as_users_lay_out_footage(tmp_path, monkeypatch, capsys):
    """Linked season folders were skipped; a quoted `in/*` took the .srt and .jpg beside the videos as
    sources; a list saved with a BOM named a missing file; notes.txt caught by the shell's `*` was read as
    a list of paths; a pattern or folder with no video vanished unsaid; relative paths made a rerun from
    another folder a new job; a Latin-1 file name crashed the job."""
    root = tmp_path / "in"
    for rel in ["ep1.mp4", "ep1.srt", "cover.jpg", "notes.txt", "disc/VTS_01_1.VOB", "bluray/00001.m2ts"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("Episode notes: check the colours\n" if rel == "notes.txt" else "x")
    season = tmp_path / "season2"
    (season / "s2e1.mkv").parent.mkdir()
    (season / "s2e1.mkv").write_bytes(b"x")
    (root / "season2").symlink_to(season)  # followed once
    (season / "back").symlink_to(root)  # and a loop is no hang
    videos = [
        str(root / r) for r in ("bluray/00001.m2ts", "disc/VTS_01_1.VOB", "ep1.mp4", "season2/s2e1.mkv")
    ]
    assert discover([str(root)]) == videos
    assert discover([str(root / "*")]) == videos  # a glob takes videos only, and searches the folders matched
    assert discover([str(root / "notes.txt")]) == [] and "not a list of sources" in capsys.readouterr().err
    listed = tmp_path / "list.txt"
    listed.write_bytes("\ufeffin/ep1.mp4\n".encode())  # saved by Notepad
    assert discover([str(listed)]) == [str(root / "ep1.mp4")]
    unmatched: list[str] = []
    assert discover([str(root / "ep1.mp4"), str(tmp_path / "typo" / "*.mp4")], unmatched) == [
        str(root / "ep1.mp4")
    ]
    assert unmatched == [str(tmp_path / "typo" / "*.mp4")]
    monkeypatch.chdir(tmp_path)
    assert discover(["in/ep1.mp4", "./in/../in/ep1.mp4"]) == [str(root / "ep1.mp4")]  # absolute, once
    (root / "up").symlink_to(tmp_path)  # a link above the input (or to /) is not walked: it would leave it
    (tmp_path / "other" / "secret.mp4").parent.mkdir()
    (tmp_path / "other" / "secret.mp4").write_bytes(b"x")
    assert discover([str(root)]) == videos
    (root / "raw.y4m").write_bytes(b"x")  # a glob that names its extension takes what it matches
    assert discover([str(root / "*.y4m")]) == [str(root / "raw.y4m")]
    mounts = tmp_path / "mounts.txt"  # folders of a disk not mounted yet: kept, each an error row
    mounts.write_text("/mnt/archive/show1\n/mnt/archive/show2\n")
    assert discover([str(mounts)]) == ["/mnt/archive/show1", "/mnt/archive/show2"]
    (root / "caf\udce9.mp4").write_bytes(b"x")  # the byte 0xe9 of a Latin-1 name
    with pytest.raises(ConfigError, match=r"not valid UTF-8 \(.*caf\\xe9\.mp4\)"):
        discover([str(root)])
    latin = tmp_path / "latin.lst"
    latin.write_bytes(b"in/caf\xe9.mp4\n")  # a list saved in Latin-1: the name is said, not "missing"
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        discover([str(latin)])


def test_a_glob_that_matches_folders_searches_them_locally_and_in_a_store(tmp_path):
    """`footage/season*` quoted (or in a list file) gave nothing: the shell hands the folders it matches
    over, and a folder is searched; a glob took only files. In a store the prefixes it matched were sources,
    each an error row. Each folder is searched once, never through a link back to the glob's folder."""
    import fsspec

    for rel in ["season1/e1.mp4", "season1/extras/x.mkv", "season1/e1.srt", "season2/e2.mp4", ".old/e0.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "season2" / "up").symlink_to(tmp_path)
    (tmp_path / "season3").symlink_to(tmp_path / "season1")  # the same folder: searched once
    expected = [str(tmp_path / r) for r in ("season1/e1.mp4", "season1/extras/x.mkv", "season2/e2.mp4")]
    unmatched: list[str] = []
    assert discover([str(tmp_path / "season*")], unmatched) == expected and unmatched == []
    assert discover([str(tmp_path / "seaso?2")]) == [str(tmp_path / "season2/e2.mp4")]
    fs = fsspec.filesystem("memory")
    for rel in ["season1/e1.mp4", "season1/extras/x.mkv", "season1/notes.txt", "season1/.Trash/t.mp4"]:
        fs.pipe(f"/globbed/{rel}", b"x")
    fs.pipe("/globbed/season2/e2.mp4", b"x")
    fs.pipe("/globbed/season2/._e2.mp4", b"macOS resource fork")
    fs.pipe("/globbed/[x] e3.mp4", b"x")  # an object whose key has glob characters is itself
    found = [f"memory:///globbed/{r}" for r in ("season1/e1.mp4", "season1/extras/x.mkv", "season2/e2.mp4")]
    assert discover(["memory://globbed/season*"]) == discover(["memory://globbed/seaso?[12]/"]) == found
    assert discover(["memory://globbed/season2/*"]) == ["memory:///globbed/season2/e2.mp4"]
    # the videos among the objects a glob matches, as a local glob takes them (notes.txt was a source)
    assert discover(["memory://globbed/season1/*"]) == found[:2]
    assert discover(["memory://globbed/season1/*.txt"]) == ["memory:///globbed/season1/notes.txt"]
    assert discover(["memory://globbed/[x] e3.mp4"]) == ["memory://globbed/[x] e3.mp4"]
    assert discover(["memory://globbed/nothing*"], unmatched) == [] and unmatched == [
        "memory://globbed/nothing*"
    ]


def test_discover_reads_object_store_uris():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/raw/a.mp4", b"x")
    fs.pipe("/bucket/raw/sub/b.mkv", b"y")
    fs.pipe("/bucket/raw/notes.txt", b"z")
    fs.pipe("/bucket/raw/._a.mp4", b"macOS resource fork")
    fs.pipe("/bucket/raw/.trash/c.mp4", b"w")
    assert discover(["memory://bucket/raw"]) == [
        "memory:///bucket/raw/a.mp4",
        "memory:///bucket/raw/sub/b.mkv",
    ]


def test_probe_reads_container_facts(footage):
    out, truth, _ = footage
    row = probe(str(out / "episode_01.mp4"))
    info = truth["files"]["episode_01.mp4"]
    assert row["status"] is None
    assert (row["width"], row["height"], row["fps"], row["codec"]) == (
        info["width"],
        info["height"],
        24.0,
        "h264",
    )
    assert len(row["source_id"]) == 16


def test_long_constant_rate_video_with_b_frames_is_not_vfr(tmp_path):
    """Regression: the frame-rate check reads packets in decode order; with B-frames, a window cut
    there misses a few timestamps and looked like a jump (every real source over 10 s failed)."""
    from pipeline.video import probe as probe_container

    shots = [shot for name in sorted(samples.EPISODES) for shot in samples.EPISODES[name]]
    frames = (
        frame
        for seed in range(2)
        for shot in shots
        for frame in samples.shot_frames(shot, seed, (96, 64), 24)
    )
    path = tmp_path / "long.mp4"
    assert samples.write_video(path, frames, 24, (96, 64)) > 300  # past the 240 packets the check reads
    info = probe_container(str(path))
    assert info.vfr_spread < 0.05
    assert probe(str(path))["status"] is None


def _clock(rate: Fraction, tick: Fraction, frames: int) -> list[int]:
    """Frame intervals, in ticks, of a constant `rate` whose timestamps are rounded to `tick`."""
    return np.diff([round(k / rate / tick) for k in range(frames + 1)]).tolist()


def _held(rate: Fraction, tick: Fraction, holds: list[int], frames: int) -> list[int]:
    """Frame intervals, in ticks, of drawings stored once and held `holds` steps (cycled) of a `rate`
    grid, with timestamps rounded to `tick` (as an encoder that drops repeated frames stores them)."""
    steps = np.cumsum([0] + [holds[i % len(holds)] for i in range(frames)])
    return np.diff([round(k / rate / tick) for k in steps]).tolist()


MS, MPEG, GIF = Fraction(1, 1000), Fraction(1, 90000), Fraction(1, 100)


@pytest.mark.parametrize(
    ("tick", "steps", "vfr", "rate"),
    [
        # Matroska/WebM count milliseconds: a constant 60 fps is 17, 17, 16 ms (an error row before),
        # also remuxed into a finer clock;
        # 23.976 and 24 fps are both 41/42 ms, told apart by their mean interval
        (MS, _clock(Fraction(60), MS, 120), False, Fraction(60)),
        (MS, _clock(Fraction(60000, 1001), MS, 120), False, Fraction(60000, 1001)),
        (MS, _clock(Fraction(24), MS, 120), False, Fraction(24)),
        (MS, _clock(Fraction(24000, 1001), MS, 120), False, Fraction(24000, 1001)),
        (MPEG, _clock(Fraction(24000, 1001), MPEG, 120), False, Fraction(24000, 1001)),
        (MS, _clock(Fraction(50), MS, 120), False, Fraction(50)),
        (Fraction(1, 16000), [16 * s for s in _clock(Fraction(60), MS, 120)], False, Fraction(60)),
        # an episode at 23.976 fps with a 29.97 fps opening: the grid is at the rate most frames have
        (MS, _clock(Fraction(24000, 1001), MS, 200) + _clock(Fraction(30000, 1001), MS, 60), True,
         Fraction(24000, 1001)),
        # a screen recording catching up after stalls: on a 29.97 grid its catch-up frames would drop;
        # 59.94 keeps every frame (a frame shown 33 ms is two grid frames)
        (MS, [33, 34, 33, 67, 17, 33, 34, 100] * 10, True, Fraction(60000, 1001)),
        # drawings held 2 and 3 frames at 24 fps and stored once, some on ones: the common interval
        # (12 or 8 fps) would drop every drawing on ones; the grid they are all whole steps of is 24
        (MS, _clock(Fraction(12), MS, 90) * 3 + _clock(Fraction(24), MS, 30), True, Fraction(24)),
        (Fraction(1, 24), [1, 3] * 40, True, Fraction(24)),  # an AVI counting frames: held 1 and 3
        (MS, _held(Fraction(24), MS, [1, 3], 80), True, Fraction(24)),  # ones and threes: not 12 on ones
        # on twos at 23.976 with 2.5% on ones (action): 12 would drop the drawings on ones
        (MS, _held(Fraction(24000, 1001), MS, [2] * 39 + [1], 400), True, Fraction(24000, 1001)),
        (MS, _held(Fraction(24), MS, [2, 2, 3, 2, 1, 2], 300), True, Fraction(24)),
        # a GIF at 12.5 fps with merged held frames
        (GIF, [8, 8, 16, 8, 24, 8] * 10, True, Fraction(25, 2)),
        (MS, [45, 47, 44, 90, 46] * 10, True, Fraction(21739, 1000)),  # no standard rate: to 1/1000 fps
        # two recordings joined (a transport stream's discontinuity): a 25 s break is not a held frame
        (MPEG, [3750] * 50 + [3750 * 600] + [3750] * 50, False, Fraction(24)),
        # soft-telecined film (MPEG-2 on DVD): 23.976 frames shown for 2 and 3 fields in turn
        (MPEG, [3003, 4505, 3003, 4504] * 30, True, Fraction(24000, 1001)),
    ],
)  # fmt: skip
def test_frame_intervals_tell_clock_rounding_from_a_varying_rate(tick, steps, vfr, rate):
    from pipeline.video import frame_intervals

    pts = np.concatenate([[0], np.cumsum(steps)])
    pts[1:-1:2], pts[2::2] = pts[2::2].copy(), pts[1:-1:2].copy()  # decode order: B-frames first
    spread, nominal, breaks = frame_intervals(pts.tolist(), tick)
    assert (spread > ProbeStage.vfr_tolerance) == vfr
    assert nominal == rate


def test_constant_60fps_matroska_is_curated_at_its_own_frames(tmp_path):
    """Regression: every 60 fps Matroska/WebM source (a 60 fps download or capture) was an error row,
    "variable frame rate", because its millisecond timestamps alternate 16 and 17 ms."""
    path = tmp_path / "sixty.mkv"
    samples.write_video(path, (np.full((64, 96, 3), 8 * i, np.uint8) for i in range(30)), 60, (96, 64))
    row = probe(str(path))
    assert (row["status"], row["fps"], row["vfr"]) == (None, 60.0, False)


def test_hdr10_source_is_an_error_row_that_says_how_to_convert_it(tmp_path):
    """PQ-coded frames read as SDR come out dim and washed out; a model trained on them learns those
    colours. An HDR10 source is refused by name (no tone mapping in this FFmpeg build: no zscale)."""
    import av

    path = tmp_path / "hdr10.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        ctx = stream.codec_context
        ctx.color_trc, ctx.color_primaries, ctx.colorspace = 16, 9, 9  # PQ, BT.2020
        for _ in range(2):
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.zeros((96, 64), np.uint8), format="yuv420p"))
            )
        container.mux(stream.encode())
    row = probe(str(path))
    assert (
        row["status"] == "error" and "HDR video (PQ transfer" in row["reason"] and "tonemap" in row["reason"]
    )


def test_variable_rate_source_with_a_jump_back_in_its_timestamps_is_an_error_row(tmp_path):
    """Two variable-rate recordings joined, each with its own clock: one grid over both would drop
    what follows the jump back. A constant-rate source joined the same way decodes its own frames,
    and a long held card in a variable-rate source is a hold (the grid repeats it), not a break."""
    frames = [np.full((64, 96, 3), 2 * i, np.uint8) for i in range(120)]
    parts = []
    for name, steps in (("vfr", list(samples.VFR_STEPS_MS)), ("cfr", [42, 42, 41])):
        for half in (0, 1):
            samples.write_video(
                tmp_path / f"{name}{half}.ts",
                frames[60 * half : 60 * half + 60],
                24,
                (96, 64),
                steps_ms=steps,
            )
        joined = tmp_path / f"{name}.ts"
        joined.write_bytes((tmp_path / f"{name}0.ts").read_bytes() + (tmp_path / f"{name}1.ts").read_bytes())
        parts.append(probe(str(joined)))
    assert parts[0]["status"] == "error" and "1 break(s) in its timestamps" in parts[0]["reason"], parts[0]
    assert (parts[1]["status"], parts[1]["vfr"]) == (None, False)
    steps = list(samples.VFR_STEPS_MS) * 3
    steps[20] = 12_500  # a title card held 12.5 s, stored once
    samples.write_video(tmp_path / "card.mp4", frames, 24, (96, 64), steps_ms=steps)
    row = probe(str(tmp_path / "card.mp4"))
    assert (row["status"], row["vfr"], row["fps"]) == (None, True, 24.0)


def test_variable_rate_source_is_curated_on_a_constant_grid(tmp_path):
    row = probe(str(samples.write_vfr_video(tmp_path / "vfr.mp4")))
    assert (row["status"], row["vfr"], row["fps"]) == (None, True, 24.0)
    assert row["num_frames"] == round(row["duration_s"] * 24)
    pinned = ProbeStage(vfr_fps=30)
    pinned.setup()
    assert rows_of(pinned(batch_of([{"source_uri": row["source_uri"]}])))[0]["fps"] == 30.0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("not_video", "not a readable video container"),
        ("zero_bytes", "zero-byte file"),
        ("truncated", None),  # fails at probe or while decoding (shots); both are error rows
        ("no_frames", None),
        ("huge", "exceeds probe.max_width"),
        ("audio_only", "no video stream"),
        ("missing", "no such file"),
    ],
)
def test_bad_inputs_become_error_rows(footage, case, reason):
    _, _, bad = footage
    row = probe(str(bad[case]))
    if row["status"] is None:  # passed probe: the decode in shots must turn it into an error row
        assert reason is None, f"{case} passed probe"
        stage = ShotsStage()
        rows = [r for r in stage.process_rows([row]) if r["row_kind"] != "source_end"]
        errors = [r for r in rows if r["status"] == "error"]
        assert errors, f"{case}: no error row from shots: {rows}"
        assert errors[0]["reason"].startswith("shots:")
        return
    assert row["status"] == "error"
    assert row["reason"].startswith("probe:")
    if reason:
        assert reason in row["reason"]


def test_a_thumbnail_sized_source_is_an_error_row(tmp_path):
    """A 16x16 video was kept and its clips upscaled 32x to 512x320; frames under probe.min_width x
    probe.min_height are refused as absurd input, as those over the maximum are."""
    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(6)]
    samples.write_video(tmp_path / "icon.mp4", frames, 24, (16, 16))
    row = probe(str(tmp_path / "icon.mp4"))
    assert (
        row["status"] == "error"
        and "16x16 is under probe.min_width x probe.min_height = 64x48" in row["reason"]
    )


def test_corrupt_file_is_an_error_row(footage):
    out, _, _ = footage
    row = probe(str(out / "corrupt.mp4"))
    assert row["status"] == "error" and "corrupt.mp4" in row["reason"] or "not a readable" in row["reason"]


def clips_of(uri: str, **kwargs) -> list[dict]:
    stage = ShotsStage(**kwargs)
    rows = list(stage.process_rows([probe(uri)]))
    assert rows[-1]["row_kind"] == "source_end" and rows[-1]["clips_emitted"] == len(rows) - 1
    return rows[:-1]


@pytest.mark.parametrize("name", ["episode_01.mp4", "episode_02.mp4"])
def test_shots_find_every_cut_within_one_frame_with_margin(footage, name):
    out, truth, _ = footage
    clips = clips_of(str(out / name))
    margin = ShotsStage().margin_frames
    starts = [c["start_frame"] for c in clips]
    ends = [c["end_frame"] for c in clips]
    for cut in truth["files"][name]["cuts"]:
        assert any(abs(s - (cut + margin)) <= 1 for s in starts), (cut, starts)
        assert any(abs(e - (cut - margin)) <= 1 for e in ends), (cut, ends)
    # no clip spans a cut: a frame of the neighbouring shot never leaks in
    for clip in clips:
        assert not any(clip["start_frame"] < cut < clip["end_frame"] for cut in truth["files"][name]["cuts"])
    assert len(clips) == len(truth["files"][name]["shots"])


def test_long_shots_are_cut_into_windows_and_short_ones_rejected(footage):
    out, _, _ = footage
    clips = clips_of(str(out / "episode_01.mp4"), max_len_s=1.0, min_len_s=0.5)
    assert max(c["num_frames"] for c in clips) == 24
    assert sum(c["window_index"] > 0 for c in clips) >= 3
    short = clips_of(str(out / "episode_01.mp4"), min_len_s=2.1, max_len_s=4.0)
    rejected = [c for c in short if c["status"] == "rejected"]
    assert rejected and all(c["reason"].startswith("shots: length") for c in rejected)


def test_timing_labels_ones_twos_threes_and_static():
    rng = np.random.default_rng(0)
    drawings = rng.integers(0, 255, size=(12, 16, 16), dtype=np.uint8)
    for hold, label in ((1, "ones"), (2, "twos"), (3, "threes")):
        frames = np.repeat(drawings, hold, axis=0)
        result = classify_timing(held_frames(frames), dominant_share=0.6)
        assert result["timing"] == label
        assert result["distinct_frames"] == 12
        assert result["distinct_idx"].tolist() == list(range(0, 12 * hold, hold))
    static = classify_timing(held_frames(np.repeat(drawings[:1], 30, axis=0)), 0.6)
    assert (static["timing"], static["distinct_frames"], static["held_ratio"]) == ("none", 1, 1.0)


def test_small_figure_on_a_still_background_is_not_a_hold():
    """A 16x16 figure moving 3 px per frame over a flat 256x160 background changes the mean difference
    by ~0.3, under the 0.6 threshold; the strongly changed pixels (96, 0.23%) make each frame new. Codec
    noise of a held drawing (5% of the pixels off by up to 3 levels, 8 by 40) stays a hold."""
    frames = np.full((12, 160, 256), 90, np.uint8)
    for i in range(12):
        frames[i, 70:86, 20 + 3 * i : 36 + 3 * i] = 250
    means, changed = frame_differences(frames)
    assert means.max() < 0.6 and changed.min() > 0.002
    assert classify_timing(held_frames(frames), 0.6)["timing"] == "ones"
    rng = np.random.default_rng(1)
    noisy = np.repeat(frames[:1], 12, axis=0).astype(np.int16)
    noisy += rng.integers(-3, 4, noisy.shape) * (rng.random(noisy.shape) < 0.05)  # 5% of pixels, +-3
    for frame in noisy:  # and in each frame 8 pixels of its own off by 40
        frame[rng.integers(0, 160, 8), rng.integers(0, 256, 8)] += 40
    result = classify_timing(held_frames(np.clip(noisy, 0, 255).astype(np.uint8)), 0.6)
    assert (result["timing"], result["distinct_frames"]) == ("none", 1)


def test_timing_stage_on_sample_shots(footage):
    out, truth, _ = footage
    stage = TimingStage()
    stage.setup()
    rows = rows_of(stage(batch_of(clips_of(str(out / "episode_01.mp4")))))
    expected = [s["timing"] for s in truth["files"]["episode_01.mp4"]["shots"]]
    assert [r["timing"] for r in rows] == expected


def moving_square(dx: int, dy: int, n: int = 6, background_shift: bool = False) -> np.ndarray:
    frames = []
    for i in range(n):
        frame = np.zeros((160, 256), np.uint8)
        frame[::16, :] = 60 if not background_shift else 0
        if background_shift:  # a textured background that moves as a whole (a pan)
            ys, xs = np.mgrid[0:160, 0:256]
            frame = (((xs + i * dx) // 16 + (ys + i * dy) // 16) % 2 * 120 + 60).astype(np.uint8)
        else:
            frame[60 + i * dy : 100 + i * dy, 40 + i * dx : 80 + i * dx] = 220
        frames.append(frame)
    return np.stack(frames)


def test_motion_is_resolution_independent_and_separates_pans():
    stage = MotionStage()
    stage.setup()
    still = stage.process({"row_kind": "clip", "analysis": moving_square(0, 0)})
    moving = stage.process({"row_kind": "clip", "analysis": moving_square(4, 0)})
    assert still["motion_mean"] == pytest.approx(0.0, abs=1e-3)
    assert moving["motion_mean"] > 0.05
    # the same motion at twice the resolution gives (about) the same score
    big = np.stack([np.kron(f, np.ones((2, 2), np.uint8)) for f in moving_square(4, 0)])
    moving_big = MotionStage().process({"row_kind": "clip", "analysis": big})
    assert moving_big["motion_mean"] == pytest.approx(moving["motion_mean"], rel=0.35)
    pan = stage.process({"row_kind": "clip", "analysis": moving_square(3, 0, background_shift=True)})
    assert pan["motion_mean"] > 0.5
    assert pan["motion_residual"] < 0.25 * pan["motion_mean"]


def test_motion_scores_are_exact_and_do_not_depend_on_where_the_flow_lies_in_memory():
    """OpenCV's float32 magnitude is off in the last bit for about a third of the pixels, and which ones
    depended on the arrays' addresses: a resumed job's motion scores (and the shards' JSON) differed
    from an uninterrupted run's. Scores are now the flow's magnitudes to float64 precision."""
    from pipeline.stages.motion import flow_statistics

    rng = np.random.default_rng(0)
    flows = [(rng.standard_normal((40, 64, 2)) * 0.7).astype(np.float32) for _ in range(3)]
    results, held = set(), []
    for size in range(1, 4000, 400):  # arrays of other sizes in between: the next ones lie elsewhere
        held.append(np.empty(size, np.uint8))
        results.add(tuple(sorted(flow_statistics([f.copy() for f in flows]).items())))
    assert len(results) == 1
    diagonal = np.hypot(64, 40)
    means = [np.sqrt((f.astype(np.float64) ** 2).sum(axis=-1)).mean() / diagonal * 100 for f in flows]
    assert flow_statistics(flows)["motion_mean"] == pytest.approx(np.mean(means), rel=1e-12, abs=0)


def test_decide_keeps_errors_and_structural_rejections():
    active = rules(CurateConfig())
    assert decide_row({"status": "error", "reason": "probe: x"}, active) == ("error", "probe: x")
    assert decide_row({"status": "rejected", "reason": "shots: length 0.5 s"}, active)[0] == "rejected"
    status, reason = decide_row({"status": None, "motion_mean": 0.0}, active)
    assert status == "rejected" and reason.startswith("motion:")
    assert decide_row({"status": "rejected", "reason": "motion: old", "motion_mean": 5.0}, active) == (
        "kept",
        None,
    )
    # a write error says nothing of the clip: its scores decide again (and the write is tried again)
    assert decide_row(
        {"status": "error", "reason": "write: no such file: x", "motion_mean": 5.0}, active
    ) == (
        "kept",
        None,
    )
    assert decide_row({"status": "error", "reason": "write: no such file: x", "motion_mean": 0.0}, active)[
        0
    ] == ("rejected")


def test_a_score_that_is_not_a_number_does_not_pass_its_threshold():
    """NaN compares false both ways: a NaN text score let a title card into the shards with text.max said
    to apply. (A column dropped from the file is refused when the manifest is read: test_manifests.)"""
    active = rules(CurateConfig())
    for value in (float("nan"), float("inf")):
        status, reason = decide_row({"status": "kept", "motion_mean": 1.0, "text_area": value}, active)
        assert status == "rejected" and reason.startswith("text: text_area"), value
    assert decide_row({"status": "kept", "motion_mean": 1.0, "text_area": None}, active) == ("kept", None)


def test_cpu_stages_never_import_torch(footage):
    out, _, _ = footage
    code = f"""
import sys, json
from pipeline.stages.discover import ProbeStage
from pipeline.stages.shots import ShotsStage
from pipeline.stages.timing import TimingStage
from pipeline.stages.motion import MotionStage
row = ProbeStage().process({{"source_uri": {json.dumps(str(out / "episode_02.mp4"))}}})
rows = [r for r in ShotsStage().process_rows([row]) if r["row_kind"] == "clip"]
rows = [MotionStage().process(TimingStage().process(r)) for r in rows]
assert all(r["motion_mean"] is not None for r in rows)
assert "torch" not in sys.modules, "torch imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_existing_path_with_brackets_is_itself_not_a_glob(tmp_path):
    """Release names carry brackets (`[Group] Show - 01 [1080p].mkv`): named as an input, such a file or
    folder was read as a glob that matched nothing, and the job said the input held no video."""
    folder = tmp_path / "[Group] Show [1080p]"
    folder.mkdir()
    episode = folder / "[Group] Show - 01 [1080p].mkv"
    episode.write_bytes(b"x")
    assert discover([str(episode)]) == [str(episode)]
    assert discover([str(folder)]) == [str(episode)]
    assert discover([str(tmp_path / "*" / "*.mkv")]) == [str(episode)]  # a pattern is still a pattern
    assert discover([str(folder / "*.mkv")]) == [str(episode)]  # in a folder named with brackets too
    assert discover([str(folder / "*[1080p].mkv")]) == []  # the file's own name: still a pattern's class


def test_broken_links_to_videos_are_error_rows_not_left_out(tmp_path):
    """A folder of links whose targets are gone (a disk not mounted, git-annex content not fetched): a
    walk or a glob dropped them unsaid, so footage went missing from the job without a row. Each is now a
    source whose error row names the link and its target."""
    from pipeline.stages.discover import ProbeStage

    root = tmp_path / "in"
    root.mkdir()
    (root / "ep1.mp4").write_bytes(b"x")
    (root / "ep2.mp4").symlink_to(tmp_path / "unmounted" / "ep2.mp4")
    (root / "loop.mkv").symlink_to(root / "loop.mkv")  # a link to itself: no file either
    (root / "notes").symlink_to(tmp_path / "gone")  # not a video name: still left out
    expected = [str(root / n) for n in ("ep1.mp4", "ep2.mp4", "loop.mkv")]
    assert discover([str(root)]) == discover([str(root / "*")]) == expected
    row = ProbeStage().process({"source_uri": str(root / "ep2.mp4")})
    assert row["status"] == "error"
    assert row["reason"] == f"probe: broken link: {root / 'ep2.mp4'} -> {tmp_path / 'unmounted' / 'ep2.mp4'}"


def test_a_header_claiming_far_more_than_the_file_holds_is_measured_from_its_packets(tmp_path):
    """A 4 s Matroska file whose header says 100 hours was an error row (`duration exceeds
    probe.max_duration_s`), and one saying 5 hours claimed 432,000 frames: the packets' span is taken."""
    import struct

    import av

    path = tmp_path / "few_frames.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(96):
            frame = np.full((64, 64, 3), 2 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Segment Info's Duration: an 8-byte float, in milliseconds
    for hours in (100, 5):
        data[at + 3 : at + 11] = struct.pack(">d", hours * 3600 * 1000.0)
        path.write_bytes(bytes(data))
        row = ProbeStage(crop_borders=False).process({"source_uri": str(path)})
        assert row["status"] is None, row["reason"]
        assert row["num_frames"] == 96 and row["duration_s"] == pytest.approx(4.0, abs=0.01)


def test_a_list_that_names_itself_is_read_once(tmp_path, capsys):
    """`ls > videos.txt` writes a list that names videos.txt itself (the shell makes the file first), and
    two lists may name each other: reading them recursed until Python's limit, and the job crashed."""
    (tmp_path / "ep1.mp4").write_bytes(b"x")
    (tmp_path / "videos.txt").write_text("ep1.mp4\nvideos.txt\n")
    (tmp_path / "a.lst").write_text("b.lst\n")
    (tmp_path / "b.lst").write_text("a.lst\nep1.mp4\n")
    assert discover([str(tmp_path / "videos.txt")]) == [str(tmp_path / "ep1.mp4")]
    assert discover([str(tmp_path / "a.lst")]) == [str(tmp_path / "ep1.mp4")]
    assert "videos.txt: a list that names itself" in capsys.readouterr().err


def test_a_frame_too_large_for_the_job_is_refused_without_decoding_it(tmp_path, monkeypatch):
    """The probe decodes a first frame to learn a display rotation; not one larger than probe.max_width x
    probe.max_height (an 8K frame decoded only to be refused)."""
    import av

    from pipeline import video

    path = tmp_path / "large.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = 256, 128, "yuv420p"
        for _ in range(2):
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.zeros((128, 256, 3), np.uint8), "rgb24"))
            )
        container.mux(stream.encode())
    decoded = []
    real = video._first_turns
    monkeypatch.setattr(video, "_first_turns", lambda *a: decoded.append(1) or real(*a))
    row = ProbeStage(max_width=128, max_height=128).process({"source_uri": str(path)})
    assert row["reason"].startswith("probe: frame size 256x128 exceeds") and not decoded
    assert ProbeStage().process({"source_uri": str(path)})["status"] is None and decoded


def test_a_list_entry_under_the_home_folder_is_found(tmp_path, monkeypatch):
    """`~/footage/ep1.mp4` in a list file was looked for as a folder named `~` beside the list."""
    home = tmp_path / "home"
    (home / "footage").mkdir(parents=True)
    (home / "footage" / "ep1.mp4").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    listed = tmp_path / "lists" / "videos.txt"
    listed.parent.mkdir()
    listed.write_text("~/footage/ep1.mp4\n~/footage\n")
    assert discover([str(listed)]) == [str(home / "footage" / "ep1.mp4")]
