"""`inbetweener evaluate` on inputs as users give them: a clip given twice by overlapping sources, a
checkpoint whose CLIP towers score the baselines replaced in place, a checkpoint that outputs NaN, runs
of one method with other settings in one OUT, shards without captions, re-captioned or with captions
not in UTF-8, frame sizes that LPIPS or the flow baseline cannot take, empty or contradictory --method /
--metrics."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from inference import evaluate as cli
from inference.baselines import flow_warp
from inference.eval_data import iter_clips
from inference.eval_scores import markdown_table
from inference.media import InputError
from tests.inference.test_evaluate import (  # noqa: F401 (curated: a fixture)
    TINY,
    _clip_frames,
    _member,
    _mp4,
    curated,
    fake_extractors,
)
from training.checkpoint import save_safetensors
from training.metrics.lpips import LPIPS
from training.models.tooncrafter import build_tooncrafter


def _tiny_checkpoint(path, seed: int, nan: bool = False):
    torch.manual_seed(seed)
    model = build_tooncrafter("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        if nan:  # a damaged file: one non-finite weight in the UNet
            next(model.model.parameters()).view(-1)[0] = float("nan")
    return save_safetensors(model, path)


def test_a_clip_given_by_two_sources_is_evaluated_once(curated, tmp_path, capsys):  # noqa: F811
    """A curate OUT and its shards folder name the same clips: each counted twice, N doubled and FVD/KVD
    weighed towards duplicates."""
    out = tmp_path / "eval"
    argv = [str(curated), str(curated / "shards" / "eval"), "--out", str(out), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    (path,) = (out / "results").glob("*.json")
    result = json.loads(path.read_text())
    assert result["metrics"]["n_clips"] == 2  # clip000a, clip000b (clip000c is too short)
    twice = [s["key"] for s in result["data"]["skipped"] if s["reason"].startswith("given twice")]
    assert twice == ["clip000a", "clip000b"]
    assert "given twice: already evaluated from" in capsys.readouterr().err


def test_baseline_clip_scores_are_redone_when_the_checkpoint_with_the_towers_changes(
    curated,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """Without the OpenCLIP file, CLIP comes from the checkpoint's towers; a baseline's cache was keyed
    without the checkpoint, so a replaced checkpoint's run served the old towers' CLIP scores."""
    monkeypatch.setenv("INBETWEENER_MODELS", str(tmp_path / "models"))  # no CLIP file: the towers serve
    ckpt = _tiny_checkpoint(tmp_path / "ckpt" / "tiny.safetensors", seed=0)
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "--metrics", "clip_img", "--limit", "1"]
    argv += ["--checkpoint", str(ckpt), *TINY]

    def run() -> dict:
        assert cli.main(argv) == 0
        (path,) = (out / "results").glob("*.json")
        return json.loads(path.read_text())

    first = run()
    _tiny_checkpoint(ckpt, seed=1)  # other weights at the same path
    second = run()
    assert first["weights"]["clip"]["sha256"] != second["weights"]["clip"]["sha256"]
    assert second["weights"]["clip"]["sha256"] == second["weights"]["checkpoint"]["sha256"]
    assert second["metrics"]["clip_img"] != first["metrics"]["clip_img"]


def test_a_checkpoint_that_outputs_nan_stops_instead_of_scoring_black_frames(curated, tmp_path, capsys):  # noqa: F811
    """NaN cast to uint8 gave black frames, cached and scored as the model's output (FVD, LPIPS... of them)."""
    ckpt = _tiny_checkpoint(tmp_path / "nan.safetensors", seed=0, nan=True)
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--limit", "1", "--checkpoint", str(ckpt), *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    err = capsys.readouterr().err
    assert "clip000a: the model's output holds NaN or inf at float32" in err
    assert not list(out.glob("generated/*/*.npz")) and not (out / "results").exists()


def test_table_rows_of_one_method_with_other_settings_say_their_run():
    """Two model runs in one OUT (another checkpoint, --steps or --seed) were two identical
    "ToonCrafter (ours)" rows with different numbers."""
    m = {"n_clips": 3, "fvd": None, "kvd": None, "lpips": {"all": 0.2, "interior": 0.2}}
    runs = [
        {"kind": "generation", "label": "ToonCrafter (ours)", "run": run, "metrics": m, "data": {}}
        for run in ("model-aaaa", "model-bbbb")
    ]
    runs.append({"kind": "generation", "label": "linear_blend", "run": "linear_blend-cccc", "metrics": m})
    table = markdown_table(runs)
    assert "| **ToonCrafter (ours)** (run model-aaaa) | 3 |" in table
    assert "| **ToonCrafter (ours)** (run model-bbbb) | 3 |" in table
    assert "| **linear_blend** | 3 |" in table  # a label seen once stays as it was


def test_clip_txt_is_over_the_captioned_clips_only(tmp_path, capsys):
    """Shards curated with --skip caption hold no captions: CLIP_txt was the frames' similarity to an
    empty string, pooled and tabled as the metric."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(("clip000a", "clip000b")):
            _member(tar, f"{key}.mp4", _mp4(_clip_frames(16, i)))
            if i == 0:
                _member(tar, f"{key}.txt", b"a square moving right")
    out = tmp_path / "eval"
    argv = [str(shards), "--out", str(out), "--method", "linear", "--metrics", "clip_txt", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    (path,) = (out / "results").glob("*.json")
    m = json.loads(path.read_text())["metrics"]
    assert m["n_clips"] == 2 and m["clip_txt_clips"] == 1
    assert cli.main([*argv, "--limit", "1"], extractors=fake_extractors()) == 0  # the captioned clip alone
    (alone,) = set((out / "results").glob("*.json")) - {path}  # another set of clips: a file of its own
    assert json.loads(alone.read_text())["metrics"]["clip_txt"] == m["clip_txt"]
    assert "CLIP_txt is over the 1 of 2 clips that have a caption" in capsys.readouterr().err
    assert cli.main(argv, extractors=fake_extractors()) == 0
    assert f"| {m['clip_txt']['all']:.4f} (1 of 2 captioned) |" in (out / "results.md").read_text()


def test_the_table_writes_the_papers_frame_size_as_the_runs_are_written():
    """The header gave the paper's size as width x height (512x320) above rows written height x width, so a
    run at --size 512x320 (portrait) read as the paper's size."""
    m = {"n_clips": 3, "fvd": None, "kvd": None}
    run = {"kind": "generation", "label": "x", "run": "x-1", "metrics": m, "data": {"size": [512, 320]}}
    table = markdown_table([run])
    assert "Paper rows: 1,000 clips at 320x512 (height x width" in table and "[16 frames, 512x320]" in table


def test_a_re_captioned_split_is_scored_again(tmp_path):
    """The same clip bytes under a new caption (curate re-run with another captioner): the cache, keyed by
    the clip's bytes, served CLIP_txt against the old caption (and, for the model, clips prompted by it)."""
    out = tmp_path / "eval"

    def run(caption: str) -> dict:
        shards = tmp_path / caption.replace(" ", "_")
        shards.mkdir()
        with tarfile.open(shards / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, key in enumerate(("clip000a", "clip000b")):
                _member(tar, f"{key}.mp4", _mp4(_clip_frames(16, i)))
                _member(tar, f"{key}.txt", caption.encode())
        argv = [str(shards), "--out", str(out), "--method", "linear", "--metrics", "clip_txt", *TINY]
        assert cli.main(argv, extractors=fake_extractors()) == 0
        path = max((out / "results").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)  # the newest
        return json.loads(path.read_text())

    first, second = run("a square"), run("a girl waving")
    assert second["metrics"]["clip_txt"] != first["metrics"]["clip_txt"]
    assert second["data"]["clips_sha256"] != first["data"]["clips_sha256"]  # another set for the table


def test_a_frame_too_small_for_lpips_stops_before_any_clip(curated, tmp_path, capsys):  # noqa: F811
    """AlexNet has no pixel left below 31x31: the real LPIPS network raised torch's RuntimeError after the
    first clip had been generated (with --decoder-size 16, after the model had loaded)."""
    ex = fake_extractors()
    ex.lpips = LPIPS("alex")  # the real network (random weights): its shape limits are what matter
    out = tmp_path / "eval"
    argv = [
        str(curated),
        "--out",
        str(out),
        "--method",
        "linear",
        "--metrics",
        "lpips",
        *TINY,
        "--size",
        "16x32",
    ]
    assert cli.main(argv, extractors=ex) == 2
    assert "LPIPS's AlexNet needs frames of at least 31x31, not 16x32" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*argv[:-1], "32x64"], extractors=ex) == 0


def test_an_empty_method_or_metrics_word_is_refused(curated, tmp_path, capsys):  # noqa: F811
    """`--method "$M"` with M unset ran nothing and exited 0; `--metrics ""` generated every clip, scored
    nothing and replaced the run's results with an empty row."""
    out = tmp_path / "eval"
    base = [str(curated), "--out", str(out), *TINY]
    assert cli.main([*base, "--method", ""], extractors=fake_extractors()) == 2
    assert "--method: none given not among flow linear model" in capsys.readouterr().err
    assert cli.main([*base, "--method", "linear", "--metrics", ","], extractors=fake_extractors()) == 2
    assert "--metrics: none given not among the metrics of a generation run" in capsys.readouterr().err
    assert not out.exists()


def test_flow_on_frames_under_16_pixels_high_is_refused_not_a_segfault(curated, tmp_path, capsys):  # noqa: F811
    """OpenCV's DIS flow segfaulted on 12x64 frames: `--method flow --size 12x64 --metrics psnr` killed the
    process without a word."""
    with pytest.raises(ValueError, match="at least 16x16"):
        flow_warp(np.zeros((12, 64, 3), np.uint8), np.zeros((12, 64, 3), np.uint8), 4)
    out = tmp_path / "eval"
    argv = [
        str(curated),
        "--out",
        str(out),
        "--method",
        "flow",
        "--metrics",
        "psnr",
        *TINY,
        "--size",
        "12x64",
    ]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert "--method flow: its DIS flow needs frames of at least 16x16, not 12x64" in capsys.readouterr().err
    assert not out.exists()


def test_decoder_only_with_a_method_is_refused(curated, tmp_path, capsys):  # noqa: F811
    """--decoder-only --method linear ran the decoder alone and said nothing of the method."""
    argv = [str(curated), "--out", str(tmp_path / "eval"), "--decoder-only", "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert "--decoder-only scores the checkpoint's VAE: it takes no --method" in capsys.readouterr().err


def test_a_caption_that_is_not_utf8_is_read_with_a_warning_not_a_traceback(tmp_path, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "clip000a.mp4", _mp4(_clip_frames(16, 0)))
        _member(tar, "clip000a.txt", "un garçon qui court".encode("latin-1"))
    (clip,) = iter_clips([shards])
    assert clip.caption == "un gar\ufffdon qui court"
    assert "its caption is not UTF-8" in caplog.text


def test_a_models_dir_whose_path_says_checkpoint_is_not_taken_for_the_towers(curated, tmp_path, monkeypatch):  # noqa: F811
    """The CLIP file's record was told from the towers' by the word "checkpoint" anywhere in it: with the
    models dir under /data/checkpoints/ and no interpolation checkpoint, evaluate hashed None (TypeError)."""
    import inference.eval_scores as scores

    models = tmp_path / "checkpoints" / "models"
    clip_file = models / "clip" / "open_clip_pytorch_model.bin"

    def load(needs, root, device, clip_model=None, hash_file=None):
        assert clip_model is None  # no interpolation checkpoint in this models dir
        ex = fake_extractors()
        ex.record = {"clip": {"file": str(clip_file), "sha256": "c1", "model": "ViT-H-14 laion2b_s32b_b79k"}}
        return ex

    monkeypatch.setattr(scores, "load_extractors", load)
    monkeypatch.setattr(scores, "missing_weights", lambda *a, **k: [])
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "--metrics", "clip_img"]
    assert cli.main([*argv, "--models-dir", str(models), *TINY]) == 0
    (path,) = (out / "results").glob("*.json")
    weights = json.loads(path.read_text())["weights"]
    assert weights == {
        "clip": {"file": str(clip_file), "sha256": "c1", "model": "ViT-H-14 laion2b_s32b_b79k"}
    }


def test_one_clip_says_fvd_and_kvd_are_left_blank(curated, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "--limit", "1", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    assert "FVD and KVD compare sets of clips; of 1 clip they are left blank" in capsys.readouterr().err
    (path,) = (out / "results").glob("*.json")
    m = json.loads(path.read_text())["metrics"]
    assert m["fvd"] is None and m["kvd"] is None and m["fvd_note"] == "needs at least 2 clips"
    row = next(line for line in (out / "results.md").read_text().splitlines() if "**linear_blend**" in line)
    assert "| 1 | - | - |" in row


def test_a_window_too_short_for_i3d_stops_before_any_clip(curated, tmp_path, capsys):  # noqa: F811
    """StyleGAN-V's I3D raises on windows of 8 frames or fewer (time 1 at its 2-frame average pool), after
    the first clip had been generated; the injected extractors here take any length, the real one does not."""
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", *TINY, "--frames", "8"]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert "FVD and KVD's I3D needs windows of at least 9 frames, not 8" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*argv, "--metrics", "lpips,cpbd"], extractors=fake_extractors()) == 0


def test_runs_on_other_clips_or_metrics_keep_what_earlier_runs_measured(curated, tmp_path, monkeypatch):  # noqa: F811
    """The results file was named by the method and its settings only: a --limit 1 try after a full run
    replaced the full run's row, and `--metrics psnr` after it blanked every other metric."""
    from inference import evaluate

    out = tmp_path / "eval"
    base = [str(curated), "--out", str(out), "--method", "linear", *TINY]

    def results() -> dict[str, dict]:
        return {p.name: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}

    assert cli.main(base, extractors=fake_extractors()) == 0
    (full,) = results().values()
    assert full["metrics"]["n_clips"] == 2 and full["metrics"]["lpips"] and full["metrics"]["fvd"] is not None
    assert cli.main([*base, "--limit", "1"], extractors=fake_extractors()) == 0
    assert sorted(r["metrics"]["n_clips"] for r in results().values()) == [1, 2]  # each set its own row
    # psnr alone on the same clips: the full run's other metrics stay in its row, said to be carried
    assert cli.main([*base, "--metrics", "psnr"], extractors=fake_extractors()) == 0
    (merged,) = [r for r in results().values() if r["metrics"]["n_clips"] == 2]
    assert (
        merged["metrics"]["lpips"] == full["metrics"]["lpips"]
        and merged["metrics"]["fvd"] == full["metrics"]["fvd"]
    )
    assert (
        "fvd" in merged["metrics_carried"]["metrics"] and "psnr" not in merged["metrics_carried"]["metrics"]
    )
    assert merged["metrics"].get("fvd_note") == full["metrics"].get("fvd_note")  # not "not computed"
    # the code that scores a clip changed (a fixed SSIM): the cached per-clip scores are not served
    score_dirs = set((out / "scores").iterdir())
    assert cli.main([*base, "--metrics", "psnr"], extractors=fake_extractors()) == 0
    assert set((out / "scores").iterdir()) == score_dirs  # unchanged code: served from the cache
    monkeypatch.setattr(evaluate, "_scoring_code", lambda: "edited")
    assert cli.main([*base, "--metrics", "psnr"], extractors=fake_extractors()) == 0
    (new,) = set((out / "scores").iterdir()) - score_dirs
    assert len(list(new.glob("*.npz"))) == 2  # both clips scored again
    # and the earlier run's metrics, scored by the old code, are not carried into the new row
    (row,) = [r for r in results().values() if r["metrics"]["n_clips"] == 2]
    assert row["metrics"]["lpips"] is None and "metrics_carried" not in row
    # results.md names each row's own file (the name carries the set of clips now)
    table = (out / "results.md").read_text()
    assert all(f"results/{name}" in table for name in results())


def test_eval_shards_of_other_tools_are_read_as_training_reads_them(tmp_path):
    """Shards made by other tools (a video in another container, numbered frames, the caption in the json's
    `text`) gave no clip at all: only KEY.mp4 and KEY.txt were looked for."""
    import io

    from PIL import Image

    frames = _clip_frames(16, 0)
    png = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        png.append(buffer.getvalue())
    shards = tmp_path / "theirs"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "a.mov", _mp4(frames))  # an mp4 under another container's name: PyAV reads it
        _member(tar, "a.caption", b"a square gliding")
        for i, data in enumerate(png):
            _member(tar, f"b.{i:04d}.png", data)
        _member(tar, "b.json", json.dumps({"text": "a square, frame by frame"}).encode())
        _member(tar, "c.json", b"{}")  # no clip in it: not a sample
    clips = list(iter_clips([shards], "eval"))
    assert [(c.key, c.caption) for c in clips] == [
        ("a", "a square gliding"),
        ("b", "a square, frame by frame"),
    ]
    assert np.array_equal(clips[1].frames(), frames)  # PNG frames are lossless
    assert clips[0].frames().shape == frames.shape and clips[0].content != clips[1].content
    # a window's frames only (a whole episode of another tool in one sample would fill memory)
    assert clips[0].frames(4).shape == (4, *frames.shape[1:]) and len(clips[1].frames(5)) == 5
    # an in-between's keyframes (interpolate --batch from a manifest): the ends, without the frames between
    for clip in clips:
        whole = clip.frames()
        first, last = clip.ends()
        assert np.array_equal(first, whole[0]) and np.array_equal(last, whole[-1])


def test_eval_shards_group_samples_as_training_does(tmp_path):
    """Evaluate grouped members by its own rule: a dotted key lost its json and caption, the same key twice
    in a row was one clip (the first overwritten), and gzipped shards were refused."""
    clip = _mp4(_clip_frames(16, 1))
    shards = tmp_path / "theirs"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar.gz", "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "take.v2.mp4", clip)
        _member(tar, "take.v2.txt", b"the second take")
        _member(tar, "again.mp4", clip)
        _member(tar, "again.txt", b"first")
        _member(tar, "again.mp4", _mp4(_clip_frames(16, 2)))  # a tar appended to: the same key again
        _member(tar, "again.txt", b"second")
    clips = list(iter_clips([shards], "eval"))
    assert [(c.key, c.caption) for c in clips] == [
        ("take", "the second take"),
        ("again", "first"),
        ("again", "second"),
    ]
    assert clips[1].content != clips[2].content
    assert [c.key for c in iter_clips([shards / "000000.tar.gz"], "eval")] == ["take", "again", "again"]


def test_a_truncated_checkpoint_stops_before_any_clip_is_decoded(curated, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The checkpoint was read only when the first clip was generated: after every clip of the eval split
    had been decoded (and the baselines scored) a truncated download stopped the run."""
    whole = _tiny_checkpoint(tmp_path / "whole.safetensors", 0)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    def no_clips(*args, **kwargs):
        raise AssertionError("the clips were decoded before the checkpoint was checked")

    monkeypatch.setattr(cli, "_windows", no_clips)
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "model", "--checkpoint", str(cut), *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint: cannot read {cut}" in err and "truncated: the header announces" in err


def test_a_cut_metric_weight_file_stops_before_any_clip_is_decoded(curated, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The pre-check looked for the metric weights only: an empty or cut I3D file was loaded, and refused,
    after every clip of the eval split had been decoded."""
    models = tmp_path / "models"
    (models / "i3d").mkdir(parents=True)
    (models / "i3d" / "i3d_torchscript.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a zip, cut

    def no_clips(*args, **kwargs):
        raise AssertionError("the clips were decoded before the metric weights were checked")

    monkeypatch.setattr(cli, "_windows", no_clips)
    argv = [str(curated), "--out", str(tmp_path / "eval"), "--method", "linear", "--metrics", "fvd", "psnr"]
    assert cli.main([*argv, "--models-dir", str(models), *TINY]) == 2
    err = capsys.readouterr().err
    assert "1 weight file(s) missing or damaged" in err and "i3d_torchscript.pt: truncated" in err


def test_shards_named_by_a_glob_or_a_brace_pattern_are_read(curated, tmp_path, capsys):  # noqa: F811
    """train's --data takes `shards/eval/*.tar` and `{000000..000009}.tar` (quoted, or past the shell's argument
    limit): evaluate said "no such file or folder" of both."""
    import shutil

    shards = tmp_path / "eval"
    shards.mkdir()
    for i in range(2):  # two shards of other keys
        with tarfile.open(shards / f"{i:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            _member(tar, f"k{i}.mp4", _mp4(_clip_frames(16, i)))
    shutil.copy(curated / "shards" / "eval" / "000000.tar", shards / "000002.tar")
    keys = ["k0", "k1", "clip000a", "clip000b", "clip000c"]
    assert [c.key for c in iter_clips([f"{shards}/*.tar"])] == keys
    assert [c.key for c in iter_clips([f"{shards}/{{000001..000002}}.tar"])] == keys[1:]
    out = tmp_path / "out"
    argv = [f"{shards}/00000[01].tar", "--out", str(out), "--method", "linear", "--metrics", "psnr", *TINY]
    assert cli.main(argv) == 0
    (path,) = (out / "results").glob("*.json")
    assert json.loads(path.read_text())["metrics"]["n_clips"] == 2
    assert cli.main([f"{tmp_path}/nothing/*.tar", *argv[1:]]) == 2
    assert f"{tmp_path}/nothing/*.tar: no file or folder matches it" in capsys.readouterr().err
    # a list file of shards (train's --data takes it; evaluate said "expected a shard"), entries relative
    # to the list's folder
    (tmp_path / "eval.txt").write_text("# the eval shards\neval/000002.tar\n\neval/000000.tar\n")
    assert [c.key for c in iter_clips([str(tmp_path / "eval.txt")])] == [*keys[2:], "k0"]
    # its lines as train reads them: a file:// URL is the local file, an object-store URL is named as such
    (tmp_path / "eval.txt").write_text(f"file://{shards}/000000.tar\ns3://bucket/eval/000000.tar\n")
    with pytest.raises(InputError, match="^s3://bucket/eval/000000.tar: evaluate reads local files"):
        list(iter_clips([str(tmp_path / "eval.txt")]))
    (tmp_path / "eval.txt").write_text(f"file://{shards}/000000.tar\n")
    assert [c.key for c in iter_clips([str(tmp_path / "eval.txt")])] == ["k0"]


def test_a_damaged_or_foreign_json_in_the_results_folder_is_left_out_of_the_table(curated, tmp_path, capsys):  # noqa: F811
    """A cut-off JSON, a list, or a file of another tool in OUT/results stopped the run with a traceback after
    every clip was scored, and results.md was not written."""
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "--metrics", "psnr", "--limit", "1", *TINY]
    assert cli.main(argv) == 0
    (out / "results" / "cut.json").write_text('{"kind": "generation", "metrics": {')
    (out / "results" / "list.json").write_text("[1, 2]")
    (out / "results" / "notes.json").write_text('{"note": "mine"}')
    (out / "results.md").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    for name in ("cut.json", "list.json", "notes.json"):
        assert f"{name}: not a result of evaluate" in err
    assert "different sets of clips" not in err  # a foreign file is not a set of clips
    assert "| **linear_blend** [16 frames, 32x64] | 1 |" in (out / "results.md").read_text()


def test_an_out_folder_under_a_file_is_refused_before_any_clip(curated, tmp_path, capsys):  # noqa: F811
    """`--out notes.txt/eval` decoded the clips, generated the first and stopped with NotADirectoryError."""
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "--metrics", "psnr", *TINY]
    assert cli.main(argv) == 2
    assert f"--out {out}: {tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    # `--out eval/results.md`, the file the user wants to read: a folder of that name was made for it
    named = tmp_path / "eval" / "results.md"
    assert cli.main([str(curated), "--out", str(named), *argv[3:]]) == 2
    assert f"--out {named} names a file: --out is the folder" in capsys.readouterr().err
    assert not named.exists()
