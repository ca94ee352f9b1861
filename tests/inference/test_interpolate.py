"""`inbetweener interpolate` end to end on the tiny preset, its checks before any GPU work, and the sampler.

The tiny checkpoint is written by the real `save_safetensors` and read back by the real loader. Frames
are 32x64 (the tiny model's size step is 32) and sampling uses 1-2 steps: the properties under test
(counts, sizes, aspect, chaining, seeding, errors) do not depend on the step count.
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from inference import interpolate as cli
from inference.media import frame_size, parse_sketch_args, sketch_index
from inference.sampler import InferenceModel, SamplerSettings, SketchGuide, interpolate, interpolate_chain
from manifests.io import write_manifest
from manifests.schema import to_table
from training.checkpoint import save_safetensors
from training.models.sketch import SKETCH_ENCODER_PRESETS, SketchEncoder
from training.models.tooncrafter import build_tooncrafter

FAST = ["--short-side", "32", "--steps", "1", "--quiet", "--device", "cpu"]


def _keyframe(path: Path, size: tuple[int, int], shift: int) -> Path:
    """A flat-colour cartoon frame of size (width, height): a red square on white, moved by `shift`."""
    w, h = size
    image = np.full((h, w, 3), 255, np.uint8)
    image[h // 4 : 3 * h // 4, shift : shift + h // 2] = (220, 30, 30)
    Image.fromarray(image).save(path)
    return path


def randomised_tiny(seed: int = 0):
    """The tiny model with its zero-initialised layers made random, so that every part shapes the output."""
    torch.manual_seed(seed)
    model = build_tooncrafter("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return randomised_tiny()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("interp")
    ckpt = save_safetensors(tiny_model, root / "tiny.safetensors")
    keys = {
        "a": _keyframe(root / "a.png", (80, 40), 4),  # 2:1 landscape
        "b": _keyframe(root / "b.png", (80, 40), 50),
        "c": _keyframe(root / "c.png", (80, 40), 20),
        "small": _keyframe(root / "small.png", (60, 40), 4),
    }
    return root, ckpt, keys


def _decode_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _gif_size_and_seconds(path: Path) -> tuple[tuple[int, int], float]:
    """(size, playing time): Pillow merges identical consecutive frames into one longer frame."""
    with Image.open(path) as gif:
        total = 0
        for i in range(gif.n_frames):
            gif.seek(i)
            total += gif.info["duration"]
        return gif.size, total / 1000


def test_writes_mp4_gif_and_numbered_pngs_at_the_keyframes_aspect(files, tmp_path):
    root, ckpt, keys = files
    out = tmp_path / "out"
    rc = cli.main(
        [
            str(keys["a"]),
            str(keys["b"]),
            "--prompt",
            "a red box",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--steps",
            "2",
            *FAST,
        ]
    )
    assert rc == 0
    pngs = sorted((out / "frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:04d}.png" for i in range(16)]
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (64, 32)  # width, height: the keyframes' 2:1 aspect, short side 32
    size, seconds = _gif_size_and_seconds(out / "inbetween.gif")
    assert size == (64, 32) and seconds == pytest.approx(16 / 8, abs=16 * 0.01)  # 16 frames at 8 fps
    video = _decode_mp4(out / "inbetween.mp4")
    assert video.shape == (16, 32, 64, 3)
    frames = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(float)
    assert (
        frames.std() > 1 and np.abs(np.diff(frames, axis=0)).mean() > 0
    )  # an image sequence, not a constant
    meta = json.loads((out / "meta.json").read_text())
    assert meta["frames"] == 16 and meta["size"] == {"height": 32, "width": 64}
    assert meta["settings"]["cfg"] == 7.5 and meta["settings"]["fs"] == 10 and meta["seed"] == 123
    assert meta["preset"] == "tiny" and meta["prompt"] == "a red box"
    assert meta["clip_towers"] == "device" and meta["cuda_graph"] is False  # a CPU run: nothing to move


def test_a_checkpoint_that_outputs_nan_writes_no_black_video(files, tmp_path, capsys):
    """NaN cast to uint8 was written as black frames, exit 0; now one line naming the row, nothing written."""
    root, _, keys = files
    model = randomised_tiny()
    with torch.no_grad():
        next(model.model.parameters()).view(-1)[0] = float("nan")  # a damaged file
    ckpt = save_safetensors(model, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    argv = [str(keys["a"]), str(keys["b"]), "--prompt", "p", "--checkpoint", str(ckpt), "--out", str(out)]
    assert cli.main([*argv, "--steps", "2", *FAST]) == 2
    assert "the model's output holds NaN or inf at float32" in capsys.readouterr().err
    assert not (out / "inbetween.mp4").exists() and not list(out.glob("frames/*.png"))


def test_frame_geometry_follows_the_keyframes_aspect():
    assert frame_size(320, 512) == (320, 512)  # the reference's frame, exactly
    assert frame_size(1080, 1920) == (320, 576)  # 16:9
    assert frame_size(1920, 1080) == (576, 320)  # portrait stays portrait
    assert frame_size(480, 640) == (320, 448)  # 4:3: nearest multiple of 64
    assert frame_size(40, 80, short_side=32, multiple=32) == (32, 64)


def test_chained_keyframes_share_their_frames_once_and_take_sketches(files, tmp_path):
    root, ckpt, keys = files
    sketch_ckpt = tmp_path / "sketch_encoder.safetensors"
    save_file(
        {k: v.contiguous() for k, v in SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"]).state_dict().items()},
        str(sketch_ckpt),
    )
    sketches = tmp_path / "sketches"
    sketches.mkdir()
    _keyframe(sketches / "03.png", (80, 40), 30)  # frame 3 = keyframe b, shared by both segments
    _keyframe(sketches / "frame_5.png", (80, 40), 40)
    out = tmp_path / "chain"
    args = [
        "--keyframes",
        str(keys["a"]),
        str(keys["b"]),
        str(keys["c"]),
        "--frames",
        "4",
        "--formats",
        "png",
    ]
    args += ["--sketch", str(sketches), "--sketch-checkpoint", str(sketch_ckpt)]
    assert cli.main([*args, "--checkpoint", str(ckpt), "--out", str(out), *FAST]) == 0
    assert len(list((out / "frames").glob("*.png"))) == 2 * (4 - 1) + 1  # 7, not 8
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta["sketches"]) == ["3", "5"] and meta["sketch_checkpoint"] == str(sketch_ckpt)


def test_batch_writes_one_output_per_row(files, tmp_path):
    root, ckpt, keys = files
    batch = tmp_path / "pairs.csv"
    with batch.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "end", "prompt", "name"])
        writer.writerow([str(keys["a"]), str(keys["b"]), "a box moving right", "right"])
        writer.writerow([str(keys["b"]), str(keys["c"]), "", ""])
    out = tmp_path / "batch"
    assert (
        cli.main(
            [
                "--batch",
                str(batch),
                "--frames",
                "4",
                "--formats",
                "png,gif",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["0001_b_c", "right"]
    assert json.loads((out / "batch.json").read_text())["done"] == 2
    for name in folders:
        assert len(list((out / name / "frames").glob("*.png"))) == 4
        assert (out / name / "inbetween.gif").is_file()
    assert json.loads((out / "right" / "meta.json").read_text())["prompt"] == "a box moving right"


def _write_batch(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["start", "end", "prompt", "seed"], *rows])
    return path


def test_batch_rows_are_read_at_their_turn(files, tmp_path, monkeypatch):
    """Making the jobs reads the files' headers only: a batch of thousands of rows must not hold every
    keyframe in memory before the first is interpolated."""
    from inference import media

    root, ckpt, keys = files
    batch = _write_batch(tmp_path / "pairs.csv", [[str(keys["a"]), str(keys["b"]), "", ""]] * 3)
    args = cli.build_parser().parse_args(["--batch", str(batch), "--out", str(tmp_path / "out")])
    decoded = []
    real = media.read_image
    monkeypatch.setattr(media, "read_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    jobs = cli.build_jobs(args)
    assert len(jobs) == 3 and decoded == []
    images = jobs[1].read_keyframes()
    assert decoded == [keys["a"], keys["b"]] and images[0].shape == (40, 80, 3)


def test_batch_paths_are_relative_to_the_batch_file(files, tmp_path):
    """Keyframes, sketch files and INDEX=FILE sketches alike (the last were taken relative to the working
    directory)."""
    root, ckpt, keys = files
    folder = tmp_path / "job"
    (folder / "sk").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(keys[name[0]].read_bytes())
    _keyframe(folder / "sk" / "line_03.png", (80, 40), 10)
    batch = folder / "rows.jsonl"
    batch.write_text(
        json.dumps({"start": "a.png", "end": "b.png", "sketch": ["sk/line_03.png", "9=sk/line_03.png"]})
    )
    args = cli.build_parser().parse_args(["--batch", str(batch), "--out", str(tmp_path / "out")])
    (job,) = cli.build_jobs(args)
    assert job.labels == [str(folder / "a.png"), str(folder / "b.png")]
    assert job.sketch_files == {3: folder / "sk" / "line_03.png", 9: folder / "sk" / "line_03.png"}


def test_a_batch_with_bad_rows_lists_them_all_and_runs_nothing(files, tmp_path, capsys, no_device_work):
    root, ckpt, keys = files
    rows = [
        [str(keys["a"]), str(keys["b"]), "fine", ""],
        [str(keys["a"]), str(tmp_path / "absent.png"), "missing", ""],
        [str(keys["a"]), str(keys["small"]), "sizes", ""],
        [str(keys["a"]), str(keys["b"]), "seed", "seven"],
    ]
    batch = _write_batch(tmp_path / "pairs.csv", rows)
    out = tmp_path / "out"
    err = _error(capsys, ["--batch", str(batch), "--checkpoint", str(ckpt), "--out", str(out), *FAST])
    assert "3 of 4 rows cannot be used" in err
    assert "row 2: " in err and "absent.png: no such file" in err
    assert "row 3: keyframes differ in size" in err
    assert "row 4: seed 'seven' is not an integer" in err
    assert not out.exists()


def test_a_batch_without_its_header_line_says_so_once(files, tmp_path, capsys, no_device_work):
    """Paths on the first line (no header): one error naming the file and what the header must be."""
    root, ckpt, keys = files
    batch = tmp_path / "pairs.csv"
    batch.write_text(f"{keys['a']},{keys['b']}\n{keys['b']},{keys['a']}\n")
    out = tmp_path / "out"
    err = _error(capsys, ["--batch", str(batch), "--checkpoint", str(ckpt), "--out", str(out), *FAST])
    assert f"{batch}: its first line is the header" in err and "`start,end,prompt`" in err
    assert "row 1" not in err and not out.exists()


def test_batch_files_as_spreadsheets_and_scripts_write_them(files, tmp_path, capsys, no_device_work):
    """Excel's "CSV UTF-8" starts with a byte-order mark (its header was not recognised); its plain CSV is
    Windows-1252, and a JSON line that is no object was a traceback; a JSON error named line 1 of any
    line; an empty `start` cell was said to be a missing column; a row named batch.json took the status file's
    place (a traceback once every row had run)."""
    root, ckpt, keys = files
    run = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--dry-run", *FAST]
    bom = tmp_path / "excel.csv"
    bom.write_bytes(f"\ufeffstart,end,prompt\n{keys['a']},{keys['b']},walk\n".encode())
    assert cli.main(["--batch", str(bom), *run]) == 0
    typed = tmp_path / "typed.csv"  # a header as typed in a spreadsheet: capitals, spaces
    typed.write_text(f"Start, END ,Prompt\n{keys['a']},{keys['b']},walk\n")
    assert cli.main(["--batch", str(typed), *run]) == 0
    cases = {
        "cp1252.csv": (b"start,end,prompt\na.png,b.png,caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 2"),
        "list.jsonl": (
            f'{{"start": "{keys["a"]}", "end": "{keys["b"]}"}}\n[1, 2]\n'.encode(),
            "line 2 is not a JSON object",
        ),
        "broken.jsonl": (b'{"start": "a.png", "end": "b.png"}\n\n{"start": \n', "line 3 is not JSON"),
        "empty.csv": (f"start,end\n{keys['a']},\n".encode(), "row 1: its `end` is empty"),
        "status.csv": (
            f"start,end,name\n{keys['a']},{keys['b']},Batch.json\n".encode(),
            "row 1: the name 'Batch.json' is the batch's own OUT/batch.json",
        ),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        err = _error(capsys, ["--batch", str(tmp_path / name), *run])
        assert f"{tmp_path / name}: " in err and message in err and "Traceback" not in err


def test_dry_run_says_what_a_batch_would_do_and_loads_nothing(
    files, tmp_path, capsys, monkeypatch, no_device_work
):
    import inference.weights

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded the checkpoint")

    monkeypatch.setattr(inference.weights, "load_tooncrafter", refuse)
    root, ckpt, keys = files
    batch = _write_batch(
        tmp_path / "pairs.csv",
        [[str(keys["a"]), str(keys["b"]), "", ""], [str(keys["b"]), str(keys["c"]), "", ""]],
    )
    out = tmp_path / "out"
    (out / "0000_a_b").mkdir(parents=True)
    (out / "0000_a_b" / "meta.json").write_text("{}")  # an earlier run finished this row
    argv = ["--batch", str(batch), "--checkpoint", str(ckpt), "--out", str(out), "--dry-run", *FAST]
    assert cli.main([*argv, "--skip-existing"]) == 0
    said = capsys.readouterr().out
    assert "rows: 2, 1 with complete output skipped (--skip-existing)" in said
    assert "frames per row: 16 (1 row)" in said and "keyframe sizes: 80x40 (1 row)" in said
    assert f"checkpoint: {ckpt}" in said and "sketch encoder: not needed" in said
    assert "dry run: nothing was loaded or written" in said
    assert sorted(p.name for p in out.iterdir()) == ["0000_a_b"] and not (out / "batch.json").exists()


def test_a_row_that_fails_at_its_turn_does_not_stop_the_batch(files, tmp_path, capsys):
    """A file whose header reads but whose pixels do not (a truncated JPEG) is reported at its turn; the
    other rows are written, the exit code is 1, and --skip-existing then tries only that row."""
    root, ckpt, keys = files
    whole = tmp_path / "whole.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)  # mostly pixel data
    Image.fromarray(noise).save(whole, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert Image.open(truncated).size == (80, 40)  # the header reads
    batch = _write_batch(
        tmp_path / "pairs.csv",
        [[str(keys["a"]), str(truncated), "cut", ""], [str(keys["a"]), str(keys["b"]), "fine", ""]],
    )
    out = tmp_path / "out"
    argv = ["--batch", str(batch), "--frames", "4", "--formats", "png", "--checkpoint", str(ckpt),
            "--out", str(out), *FAST]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "0000_a_truncated: not interpolated: " in err and "truncated.jpg" in err
    assert "1 of 2 rows not interpolated" in err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0001_a_b"]
    assert len(list((out / "0001_a_b" / "frames").glob("*.png"))) == 4
    status = json.loads((out / "batch.json").read_text())  # every row's fate, for scripts
    assert (status["done"], status["error"], status["pending"]) == (1, 1, 0)
    assert [(r["name"], r["status"]) for r in status["rows"]] == [
        ("0000_a_truncated", "error"),
        ("0001_a_b", "done"),
    ]
    assert "truncated.jpg" in status["rows"][0]["reason"]
    truncated.write_bytes(whole.read_bytes())  # fixed: only that row runs
    assert cli.main([*argv, "--skip-existing"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0000_a_truncated", "0001_a_b"]
    status = json.loads((out / "batch.json").read_text())
    assert (status["done"], status["error"]) == (2, 0)


def test_a_batch_stopped_by_its_disk_is_one_line_and_a_file_in_a_rows_place_is_found_first(
    files, tmp_path, capsys, monkeypatch
):
    """A full disk mid-batch was a traceback without batch.json; a file where a row writes its folder was
    the same traceback, after that row's sampling."""
    import errno

    from inference import media

    root, ckpt, keys = files
    batch = _write_batch(tmp_path / "pairs.csv", [[str(keys["a"]), str(keys["b"]), "", ""]] * 3)
    out = tmp_path / "out"
    argv = ["--batch", str(batch), "--frames", "4", "--formats", "png", "--checkpoint", str(ckpt),
            "--out", str(out), *FAST]  # fmt: skip
    out.mkdir()
    (out / "0001_a_b").write_text("notes")
    assert cli.main(argv) == 2
    assert f"{out / '0001_a_b'}: a file where a row writes its output folder" in capsys.readouterr().err
    (out / "0001_a_b").unlink()
    real, calls = media.write_outputs, []

    def fills_up(frames, out_dir, *args, **kwargs):
        calls.append(out_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "frames" / "0000.png"))
        return real(frames, out_dir, *args, **kwargs)

    monkeypatch.setattr(media, "write_outputs", fills_up)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        f"0001_a_b: not written: cannot write {out}/0001_a_b/frames/0000.png: No space left on device" in err
    )
    assert "Traceback" not in err and len(calls) == 2  # the run stops: the third row would fail too
    status = json.loads((out / "batch.json").read_text())
    assert [r["status"] for r in status["rows"]] == ["done", "error", "pending"]


# --- errors, all raised before the model reaches a device ------------------------------------------------------


@pytest.fixture
def no_device_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was placed on a device before the inputs were checked")

    monkeypatch.setattr(InferenceModel, "__init__", refuse)


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "bf16"], "--dtype bf16 runs on a GPU; on the CPU the model runs in fp32"),
        (["--decode-chunk", "-2"], "decode_chunk must be >= 0"),
        (["--cfg", "nan"], "eta and cfg must be finite and >= 0"),
        (["--eta", "inf"], "eta and cfg must be finite and >= 0"),
        (["--sketch-scale", "nan"], "sketch_scale must be a finite number, got nan"),
        (["--fs", "0"], "fs (the frame stride) must be >= 1"),
    ],
    ids=["half-on-cpu", "negative-chunk", "nan-cfg", "inf-eta", "nan-sketch-scale", "zero-fs"],
)
def test_settings_the_cpu_run_cannot_take_are_one_line(flags, message, files, capsys, no_device_work):
    """The first two used to end in torch's traceback mid-run (a dtype clash on the CPU, a negative split
    size); a NaN or infinite cfg or eta (NaN passed `cfg < 0`) sampled every step before its NaN frames were
    refused, and a frame stride of 0 or below, outside anything the model was conditioned on, ran."""
    root, ckpt, keys = files
    err = _error(capsys, [str(keys["a"]), str(keys["b"]), "--checkpoint", str(ckpt), *FAST, *flags])
    assert message in err and "Traceback" not in err


def test_keyframes_of_different_sizes(files, capsys, no_device_work):
    root, ckpt, keys = files
    err = _error(capsys, [str(keys["a"]), str(keys["small"]), "--checkpoint", str(ckpt), *FAST])
    assert "differ in size" in err and "80x40" in err and "60x40" in err


def test_keyframes_of_one_aspect_at_two_sizes(files, tmp_path):
    """A start frame exported at twice the end frame's resolution is the same framing: both are scaled to
    the model's frame, which the model then sees as it sees the same-size pair."""
    root, ckpt, keys = files
    big = tmp_path / "b_big.png"
    Image.open(keys["b"]).resize((160, 80), Image.NEAREST).save(big)
    out = tmp_path / "out"
    argv = [str(keys["a"]), str(big), "--frames", "4", "--formats", "png", "--checkpoint", str(ckpt),
            "--out", str(out), *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    assert [np.asarray(Image.open(p)).shape for p in sorted((out / "frames").glob("*.png"))] == [
        (32, 64, 3)
    ] * 4
    prepared = []
    for end in (keys["b"], big):
        job = cli.build_jobs(cli.build_parser().parse_args([str(keys["a"]), str(end)]))[0]
        prepared.append(cli.prepare_frames(job, None, 32, 32))
    (same, _, size_same), (scaled, _, size_scaled) = prepared
    assert size_same == size_scaled == (32, 64)
    assert torch.equal(same[0], scaled[0])  # the start frame is the same file
    assert (same[1] - scaled[1]).abs().mean() < 0.02  # the end frame, up to resampling ([-1, 1] units)


def test_output_settings_that_would_fail_after_sampling_are_refused_first(
    files, tmp_path, capsys, no_device_work
):
    root, ckpt, keys = files
    argv = [str(keys["a"]), str(keys["b"]), "--checkpoint", str(ckpt), *FAST]
    assert "--fps must be in (0, 1000], got 0" in _error(
        capsys, [*argv, "--fps", "0", "--out", str(tmp_path / "o")]
    )
    assert "is a file; give a folder" in _error(capsys, [*argv, "--out", str(keys["a"])])
    assert "--short-side must be positive, got 0" in _error(capsys, [*argv, "--short-side", "0"])


def test_an_output_folder_that_cannot_be_written_stops_before_the_model_loads(
    files, tmp_path, capsys, monkeypatch, no_device_work
):
    """It failed in write_outputs, after the 10.5 GB model had loaded and sampled, with a traceback; the
    dry run said all was well."""
    import inference.weights

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(inference.weights, "load_tooncrafter", refuse)
    root, ckpt, keys = files
    argv = [str(keys["a"]), str(keys["b"]), "--checkpoint", str(ckpt), *FAST]
    (tmp_path / "afile").write_text("x")
    for extra in ([], ["--dry-run"]):
        err = _error(capsys, [*argv, "--out", str(tmp_path / "afile" / "walk"), *extra])
        assert f"--out {tmp_path / 'afile' / 'walk'}: {tmp_path / 'afile'} is a file, not a folder" in err


def test_a_rerun_into_the_folder_of_the_keyframes_removes_only_its_own_earlier_outputs(files, tmp_path):
    """The second run writes 4 frames where the first wrote 8: frames 4..7 go; the user's drawings in the
    same frames/ folder (two of them this run's keyframes) stay."""
    root, ckpt, keys = files
    shot = tmp_path / "shot"
    (shot / "frames").mkdir(parents=True)
    drawings = [_keyframe(shot / "frames" / f"{i:04d}.png", (80, 40), 4 + 10 * i) for i in (20, 21)]
    argv = [str(d) for d in drawings] + ["--checkpoint", str(ckpt), "--out", str(shot), *FAST]
    assert cli.main([*argv, "--frames", "8", "--formats", "png,gif"]) == 0
    assert cli.main([*argv, "--frames", "4", "--formats", "png"]) == 0
    names = sorted(p.name for p in (shot / "frames").glob("*.png"))
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "0020.png", "0021.png"]
    assert not (shot / "inbetween.gif").exists()


def test_a_manifest_batch_with_unreadable_clips_lists_them_before_anything_runs(
    files, tmp_path, capsys, no_device_work
):
    """A curate OUT whose eval shard is gone: every row it held is listed (as a batch file's unusable rows),
    before the model loads; --dry-run says the same."""
    import shutil

    from tests.inference.test_evaluate import CLIPS, _clip_frames, _member, _mp4  # its clip writers

    root, ckpt, keys = files
    out = tmp_path / "OUT"
    (out / "shards" / "eval").mkdir(parents=True)
    rows = []
    with tarfile.open(out / "shards" / "eval" / "000000.tar", "w") as tar:
        for i, (key, n) in enumerate(CLIPS.items()):
            _member(tar, f"{key}.mp4", _mp4(_clip_frames(n, i)))
            rows.append(
                {"clip_id": key, "key": key, "shard": "eval/000000.tar", "split": "eval", "status": "kept"}
            )
    rows.append(
        {"clip_id": "gone", "key": "gone", "shard": "eval/000001.tar", "split": "eval", "status": "kept"}
    )
    write_manifest(to_table(rows), out / "manifest.parquet")
    for extra in ([], ["--dry-run"]):
        err = _error(
            capsys,
            ["--batch", str(out), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), *FAST, *extra],
        )
        assert "1 of 4 clips cannot be read (nothing was run)" in err and "gone: its shard" in err
    shutil.rmtree(out / "shards" / "eval")


def test_batch_names_keep_their_letters_and_a_shared_folder_names_its_rows(files, tmp_path, capsys):
    """Names in Japanese all became `clip` (then refused as "used twice: ['clip']"), and `Scène 1` became
    `Sc_ne_1`; rows whose names map to one folder are named as the user wrote them."""
    root, ckpt, keys = files
    a, b = str(keys["a"]), str(keys["b"])
    batch = tmp_path / "rows.jsonl"
    names = ("歩く", "走る", "Scène 1", "../up", "कुत्ता दौड़ता", "ไก่", "Sce\u0300ne 2", "歩く" * 45)
    rows = [{"name": n, "start": a, "end": b} for n in names]
    batch.write_text("\n".join(json.dumps(r) for r in rows))
    args = cli.build_parser().parse_args(["--batch", str(batch), "--out", str(tmp_path / "out")])
    folders = [j.name for j in cli.build_jobs(args)]
    assert folders[:7] == ["歩く", "走る", "Scène_1", "up", "कुत्ता_दौड़ता", "ไก่", "Scène_2"]  # marks kept, NFC
    assert len(folders[7].encode()) <= 120 and folders[7].startswith(
        "歩く歩く"
    )  # a folder name the disk takes
    names = ("walk 1", "walk/1", "x", "Run", "run")  # Run and run: one folder on macOS and Windows
    batch.write_text("\n".join(json.dumps({"name": n, "start": a, "end": b}) for n in names))
    err = _error(capsys, ["--batch", str(batch), "--checkpoint", str(ckpt), *FAST])
    assert "rows share an output folder: 'walk 1', 'walk/1' -> walk_1/; 'Run', 'run' -> Run/" in err


def test_dry_run_checks_the_frame_size_and_warns_of_shapes_and_prompts_far_from_training(
    files, tmp_path, capsys, caplog, no_device_work
):
    """A --size the model cannot take passed the dry run (refused only after loading); a 20:1 pan
    background ran as a huge frame unlike anything the model saw; a prompt past 75 tokens was cut unsaid;
    a keyframe far smaller than the frame was scaled up unsaid."""
    root, ckpt, keys = files
    argv = [str(keys["a"]), str(keys["b"]), "--checkpoint", str(ckpt), "--dry-run", *FAST]
    assert "frame size 30x60 must be positive multiples of 32" in _error(capsys, [*argv, "--size", "30x60"])
    assert cli.main(argv) == 0
    assert "frame sizes (sides multiples of 32): 64x32 (1 row)" in capsys.readouterr().out
    pan = _keyframe(tmp_path / "pan.png", (400, 40), 4)
    with caplog.at_level("WARNING", logger="inbetweener.interpolate"):
        long_prompt = " ".join(["a cartoon cat walking"] * 30)
        assert cli.main([str(pan), str(pan), "--prompt", long_prompt, *argv[2:]]) == 0
    assert "frame 320x32 is 10.0:1; the model was trained on 1.6:1 frames" in caplog.text
    assert "prompts longer than 75 tokens are cut there: the prompt (120 tokens)" in caplog.text
    assert "scaled up" not in caplog.text  # 40 pixels high to 32
    dot = tmp_path / "dot.png"  # a 1x1 picture became a 32x32 (at the default, 320x320) frame unsaid
    Image.new("RGB", (1, 1), "white").save(dot)
    caplog.clear()
    with caplog.at_level("WARNING", logger="inbetweener.interpolate"):
        assert cli.main([str(dot), str(dot), *argv[2:]]) == 0
    assert "keyframe 1x1 is scaled up 32x to the 32x32 frame" in caplog.text


def test_a_file_that_is_not_an_image(files, tmp_path, capsys, no_device_work):
    root, ckpt, keys = files
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    err = _error(capsys, [str(keys["a"]), str(notes), "--checkpoint", str(ckpt), *FAST])
    assert "notes.png is not an image file" in err
    err = _error(capsys, [str(keys["a"]), str(tmp_path / "absent.png"), "--checkpoint", str(ckpt), *FAST])
    assert "absent.png: no such file" in err


def test_a_missing_checkpoint_says_what_to_download_and_where(
    files, tmp_path, capsys, monkeypatch, no_device_work
):
    root, ckpt, keys = files
    models = tmp_path / "models"
    monkeypatch.setenv("INBETWEENER_MODELS", str(models))
    err = _error(capsys, [str(keys["a"]), str(keys["b"]), *FAST])
    assert "Doubiiu/ToonCrafter" in err and "model.ckpt" in err
    assert str(models / "tooncrafter" / "model.ckpt") in err and "--checkpoint" in err
    err = _error(capsys, [str(keys["a"]), str(keys["b"]), "--checkpoint", str(tmp_path / "nope.ckpt"), *FAST])
    assert f"--checkpoint {tmp_path / 'nope.ckpt'}: no such file" in err and "Doubiiu/ToonCrafter" in err
    # a mistyped name in a training run's checkpoint folder: the weight files there are listed
    run = tmp_path / "step_0000004"
    run.mkdir()
    for name in ("sketch_encoder.safetensors", "state.pt", "meta.json"):
        (run / name).write_bytes(b"x")
    sketch = ["--sketch", f"1={keys['a']}", "--sketch-checkpoint", str(run / "model.safetensors")]
    err = _error(capsys, [str(keys["a"]), str(keys["b"]), "--checkpoint", str(ckpt), *sketch, *FAST])
    assert f"--sketch-checkpoint {run / 'model.safetensors'}: no such file; {run} holds:" in err
    assert "sketch_encoder.safetensors, state.pt" in err and "meta.json" not in err


def test_the_models_dir_copy_is_found(files, tmp_path, monkeypatch):
    root, ckpt, keys = files
    models = tmp_path / "models"
    (models / "tooncrafter").mkdir(parents=True)
    (models / "tooncrafter" / "model.safetensors").symlink_to(ckpt)
    monkeypatch.setenv("INBETWEENER_MODELS", str(models))
    out = tmp_path / "o"
    assert (
        cli.main(
            [str(keys["a"]), str(keys["b"]), "--frames", "2", "--formats", "png", "--out", str(out), *FAST]
        )
        == 0
    )
    assert len(list((out / "frames").glob("*.png"))) == 2


def test_a_checkpoint_of_another_model(files, tmp_path, capsys, no_device_work):
    root, ckpt, keys = files
    wrong = tmp_path / "sketch_encoder.safetensors"
    save_file(
        {k: v.contiguous() for k, v in SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"]).state_dict().items()},
        str(wrong),
    )
    err = _error(capsys, [str(keys["a"]), str(keys["b"]), "--checkpoint", str(wrong), *FAST])
    assert "is not a checkpoint of the ToonCrafter model" in err and "missing" in err
    assert "--sketch-checkpoint" in err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 64)
    err = _error(capsys, [str(keys["a"]), str(keys["b"]), "--checkpoint", str(garbage), *FAST])
    assert (
        "--checkpoint: cannot read" in err and "garbage.ckpt (64 bytes): its first bytes are neither" in err
    )


def test_sketch_errors(files, tmp_path, capsys, monkeypatch, no_device_work):
    root, ckpt, keys = files
    monkeypatch.setenv("INBETWEENER_MODELS", str(tmp_path / "models"))
    sketch = _keyframe(tmp_path / "sketch_09.png", (80, 40), 10)
    argv = [str(keys["a"]), str(keys["b"]), "--checkpoint", str(ckpt), *FAST]
    err = _error(capsys, [*argv, "--sketch", str(sketch)])
    assert "sketch_encoder.ckpt" in err and "--sketch-checkpoint" in err
    err = _error(capsys, [*argv, "--sketch", f"20={sketch}"])
    assert "frames [20]" in err and "0..15" in err
    noise = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=95)
    cut = tmp_path / "cut_05.jpg"  # its header reads, its pixels do not: still refused before any work
    cut.write_bytes((tmp_path / "whole.jpg").read_bytes()[:1500])
    err = _error(capsys, [*argv, "--sketch", str(cut)])
    assert "cut_05.jpg is not an image file that Pillow can read" in err
    narrow = _keyframe(tmp_path / "narrow_04.png", (60, 40), 10)  # keyframes are 80x40: lines would move
    err = _error(capsys, [*argv, "--sketch", str(narrow)])
    assert "narrow_04.png is 60x40, the keyframes 80x40" in err
    _keyframe(tmp_path / "double_04.png", (160, 80), 20)  # the same aspect at twice the size is fine
    assert cli.build_jobs(cli.build_parser().parse_args([*argv, "--sketch", str(tmp_path / "double_04.png")]))


def test_help_explains_weights_geometry_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "Doubiiu/ToonCrafter",
        "model.ckpt",
        "INBETWEENER_MODELS",
        "--checkpoint",
        "centre-crop",
        "320x512",
        "--steps 50",
    ):
        assert needle in text


def test_sketch_arguments():
    assert sketch_index("frame_07.png") == 7 and sketch_index("sketch.png") is None
    assert parse_sketch_args(["3=a.png", "b_12.png"]) == {3: Path("a.png"), 12: Path("b_12.png")}


def test_a_sketch_folders_unnumbered_images_are_named_as_unused(tmp_path, caplog):
    """Unnumbered pictures and pictures of formats not read (a .psd) are named as not used; macOS's hidden
    ._NAME twins (a USB disk) and the keyframes, when the sketches sit beside them, are not sketches."""
    for name in (
        "07.png",
        "frame_09.png",
        "notes.png",
        "readme.txt",
        "._07.png",
        "key_00.png",
        "pose_05.psd",
    ):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING", logger="inbetweener.media"):
        found = parse_sketch_args([str(tmp_path)], keyframes=[tmp_path / "key_00.png"])
    assert found == {7: tmp_path / "07.png", 9: tmp_path / "frame_09.png"}
    assert f"sketch folder {tmp_path}: notes.png not used" in caplog.text and "readme" not in caplog.text
    assert "pose_05.psd not used" in caplog.text
    assert parse_sketch_args(["2= sk.png"]) == {2: Path("sk.png")}  # a space after = is not part of the name


def test_sketches_with_a_batch_are_refused_and_row_indices_checked_with_the_rest(files, tmp_path, capsys):
    """--sketch with --batch was dropped silently (each row ran unguided); a row's sketch past its last
    frame was named only after every other row had been fixed, under another name."""
    root, ckpt, keys = files
    sketch = _keyframe(tmp_path / "s.png", (80, 40), 10)
    argv = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *FAST]
    batch = _write_batch(tmp_path / "pairs.csv", [[str(keys["a"]), str(keys["b"]), "", ""]])
    err = _error(capsys, ["--batch", str(batch), "--sketch", f"2={sketch}", *argv])
    assert "--sketch is for one job, not --batch" in err and "`sketch` column" in err
    batch = tmp_path / "sketched.csv"
    with batch.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["start", "end", "sketch"],
                [str(keys["a"]), str(keys["b"]), f"99={sketch}"],
                [str(keys["a"]), str(keys["b"]), f"2={tmp_path / 'absent.png'}"],
            ]
        )
    err = _error(capsys, ["--batch", str(batch), *argv])
    assert "2 of 2 rows cannot be used" in err
    assert "row 1: sketches for frames [99]: the output has frames 0..15" in err and "row 2: " in err
    err = _error(capsys, [str(keys["a"]), "--sketch", str(sketch), str(keys["b"]), *argv])
    assert "put the keyframes before --sketch" in err


# --- the sampler -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sketchy(tiny_model):
    """The tiny model placed on the CPU with a sketch encoder whose output convs are not zero."""
    torch.manual_seed(1)
    encoder = SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"])
    with torch.no_grad():
        for conv in encoder.output_convs():
            conv.weight.normal_(0, 0.5)
    return InferenceModel(tiny_model, "cpu", torch.float32, sketch_encoder=encoder)


def _guide() -> SketchGuide:
    hint = torch.zeros(1, 1, 4, 64, 64)
    hint[0, 0, 1, 16:48, 16:48] = 1.0
    return SketchGuide(hint, torch.tensor([[False, True, False, False]]))


def test_seeded_sampling_is_reproducible_and_sketches_steer_it(sketchy):
    im = sketchy
    settings = SamplerSettings(steps=1, frames=4)
    first, last = torch.rand(3, 64, 64) * 2 - 1, torch.rand(3, 64, 64) * 2 - 1
    a = interpolate(im, first, last, "x", settings, seed=5, progress=False)
    b = interpolate(im, first, last, "x", settings, seed=5, progress=False)
    c = interpolate(im, first, last, "x", settings, seed=6, progress=False)
    assert a.shape == (1, 3, 4, 64, 64) and a.min() >= -1.5 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    s = interpolate(im, first, last, "x", settings, seed=5, sketch=_guide(), progress=False)
    assert not torch.allclose(s, a)


def test_batched_guidance_equals_the_reference_two_calls(sketchy):
    first, last = torch.rand(3, 64, 64) * 2 - 1, torch.rand(3, 64, 64) * 2 - 1
    runs = [
        interpolate(
            sketchy,
            first,
            last,
            "x",
            SamplerSettings(steps=2, frames=4, batch_cfg=batched),
            3,
            _guide(),
            False,
        )
        for batched in (True, False)
    ]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)


def test_chain_keeps_each_segment_and_drops_only_the_shared_frame(tiny_model):
    im = InferenceModel(tiny_model, "cpu", torch.float32)
    settings = SamplerSettings(steps=1, frames=3)
    keys = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(3)]
    chain = interpolate_chain(im, keys, "x", settings, seed=9, progress=False)
    first = interpolate(im, keys[0], keys[1], "x", settings, seed=9, progress=False)[0]
    second = interpolate(im, keys[1], keys[2], "x", settings, seed=10, progress=False)[0]
    assert chain.shape[1] == 5
    assert torch.equal(chain[:, :3], first) and torch.equal(chain[:, 3:], second[:, 1:])


def test_a_training_step_folder_is_a_checkpoint_and_the_model_is_no_sketch_encoder(
    files, tmp_path, capsys, no_device_work
):
    """`--checkpoint runs/x/checkpoints/step_N` (what `train` prints) was 'no such file' with advice to
    download from Hugging Face; the interpolation model given as the sketch encoder got a decoder hint."""
    root, ckpt, keys = files
    step = tmp_path / "step_0000001"
    step.mkdir()
    (step / "model.safetensors").write_bytes(ckpt.read_bytes())
    argv = [str(keys["a"]), str(keys["b"]), "--out", str(tmp_path / "out"), *FAST]
    assert cli.main([*argv, "--checkpoint", str(step), "--dry-run"]) == 0
    assert f"checkpoint: {step / 'model.safetensors'}" in capsys.readouterr().out
    sketch = _keyframe(tmp_path / "pose_05.png", (80, 40), 10)
    err = _error(
        capsys, [*argv, "--checkpoint", str(ckpt), "--sketch", str(sketch), "--sketch-checkpoint", str(ckpt)]
    )
    assert "is the interpolation model, not a sketch encoder: it goes to --checkpoint" in err


def test_the_models_dirs_checkpoint_as_a_folder_a_dead_link_or_a_file_dir_is_named_not_not_found(tmp_path):
    """`tooncrafter/model.ckpt` as a folder (Lightning-DeepSpeed saves one) or a link to nothing, and a models
    dir that is a file, were each '... not found; looked for ...', about a path that is there."""
    from inference.media import InputError
    from inference.weights import TOONCRAFTER_FILE, find_weights

    ckpt = tmp_path / "models" / "tooncrafter" / "model.ckpt"
    ckpt.mkdir(parents=True)
    with pytest.raises(
        InputError, match=r"model.ckpt is a folder without a checkpoint file .*holds: nothing"
    ):
        find_weights(None, TOONCRAFTER_FILE, tmp_path / "models")
    save_file({"w": torch.zeros(1)}, str(ckpt / "model.safetensors"))
    assert find_weights(None, TOONCRAFTER_FILE, tmp_path / "models") == ckpt / "model.safetensors"
    (ckpt / "model.safetensors").unlink()
    ckpt.rmdir()
    ckpt.symlink_to(tmp_path / "gone.ckpt")
    with pytest.raises(InputError, match=r"model.ckpt is a link to .*gone.ckpt, which does not exist"):
        find_weights(None, TOONCRAFTER_FILE, tmp_path / "models")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="the models dir .*file is a file, not a folder"):
        find_weights(None, TOONCRAFTER_FILE, tmp_path / "file")
