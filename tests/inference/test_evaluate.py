"""`inbetweener evaluate` on tiny eval shards in the curate job's format, with a tiny model and injected
feature extractors: the JSON and the table, resuming, the baselines, the decoder-only mode, the sources."""

from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from inference import evaluate as cli
from inference.eval_data import clip_window, iter_clips
from inference.eval_scores import Extractors, markdown_table, pool_scores
from inference.weights import file_sha256
from manifests.io import write_manifest
from manifests.schema import to_table
from training.checkpoint import save_safetensors
from training.models.tooncrafter import build_tooncrafter

W, H = 64, 32  # the clips' size (the tiny model's frame: multiples of 32)
CLIPS = {"clip000a": 18, "clip000b": 17, "clip000c": 10}  # key -> frames; the last is too short for 16


def _clip_frames(n: int, seed: int) -> np.ndarray:
    """A square gliding over a flat background, n frames uint8 [n, H, W, 3]."""
    rng = np.random.default_rng(seed)
    background, colour = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    frames = np.empty((n, H, W, 3), np.uint8)
    frames[:] = background
    for i in range(n):
        x = 2 + i * 2
        frames[i, 8:24, x : x + 16] = colour
    return frames


def _mp4(frames: np.ndarray, fps: int = 24) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """OUT/shards/eval/000000.tar (+ OUT/manifest.parquet) as the curate job writes them."""
    out = tmp_path_factory.mktemp("curated")
    shard_dir = out / "shards" / "eval"
    shard_dir.mkdir(parents=True)
    rows = []
    with tarfile.open(shard_dir / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (key, n) in enumerate(CLIPS.items()):
            row = {"clip_id": key, "key": key, "shard": "eval/000000.tar", "split": "eval", "status": "kept",
                   "caption": f"a square moving right, clip {i}", "num_frames": n, "width": W, "height": H}  # fmt: skip
            _member(tar, f"{key}.mp4", _mp4(_clip_frames(n, i)))
            _member(tar, f"{key}.json", json.dumps(row).encode())
            _member(tar, f"{key}.txt", row["caption"].encode())
            rows.append(row)
    write_manifest(
        to_table([*rows, {"clip_id": "rejected", "status": "rejected", "split": "none"}]),
        out / "manifest.parquet",
    )
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_tooncrafter("tiny")
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # no zero-initialised layer: every part shapes the output
                p.normal_(0, 0.05)
    return save_safetensors(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def fake_extractors() -> Extractors:
    """Cheap deterministic stand-ins with the real interfaces (and value ranges checked)."""

    def video(v: torch.Tensor) -> torch.Tensor:  # [N, 3, T, H, W] in 0..255
        assert v.ndim == 5 and v.shape[1] == 3 and v.max() <= 255 and v.min() >= 0
        return torch.cat([v.mean(dim=(2, 3, 4)), v.std(dim=(2, 3, 4))], dim=1).double()  # [N, 6]

    def image(x: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] in [0, 1]
        assert x.ndim == 4 and x.min() >= 0 and x.max() <= 1
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)) + 0.1], dim=1).double()

    def text(texts) -> torch.Tensor:
        return torch.tensor([[len(t) % 7 + 1.0, 1.0, 2.0, 0.5, 0.5, 0.5] for t in texts], dtype=torch.float64)

    def lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [-1, 1]
        assert a.min() >= -1 and a.max() <= 1
        return (a - b).abs().mean(dim=(1, 2, 3))

    return Extractors(
        _Counting(video),
        image,
        text,
        lpips,
        record={"video": "test: mean/std", "clip": "test", "lpips": "test: L1"},
    )


TINY = ["--size", f"{H}x{W}", "--steps", "1", "--device", "cpu", "--quiet"]


def test_evaluate_limit_2_writes_the_json_and_the_table_and_resumes(curated, checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--limit", "2", "--checkpoint", str(checkpoint), *TINY]
    ex = fake_extractors()
    assert cli.main(argv, extractors=ex) == 0
    (result_path,) = sorted((out / "results").glob("model-*.json"))
    result = json.loads(result_path.read_text())
    m = result["metrics"]
    assert m["n_clips"] == 2 and result["timing"]["generated"] == 2
    for name in ("fvd", "kvd", "kvd_mmd2"):
        assert np.isfinite(m[name])
    for name in ("lpips", "clip_img", "clip_txt", "cpbd"):
        assert set(m[name]) == {"all", "interior"} and np.isfinite(m[name]["all"])
    assert m["real_vs_real_floor"] == {"note": "needs at least 4 clips"}
    assert result["protocol"]["kvd"]["kernel"].startswith("(x.y/d + 1)^3")
    assert result["weights"]["checkpoint"]["sha256"] == file_sha256(checkpoint)
    assert result["weights"]["video"] == "test: mean/std"
    assert result["generation"]["settings"]["cfg"] == 7.5 and result["generation"]["settings"]["steps"] == 1
    assert result["data"]["frames"] == 16 and result["data"]["size"] == [H, W]
    generated = sorted((out / "generated" / result["run"]).glob("*.npz"))
    assert [p.name.split(".")[0] for p in generated] == ["clip000a", "clip000b"]  # KEY.CONTENT.npz
    with np.load(generated[0]) as f:
        assert f["frames"].shape == (16, H, W, 3) and f["frames"].dtype == np.uint8
    table = (out / "results.md").read_text()
    assert (
        "| ToonCrafter (paper) | 1000 | 43.92 |" in table
        and "**ToonCrafter (ours)** [16 frames, 32x64] | 2 |" in table
    )
    assert f"| {m['fvd']:.2f} † |" in table and "† fewer than 100 clips" in table  # 2 clips: marked

    # a second run redoes nothing: every clip comes from the cache
    calls = ex.video.calls
    assert cli.main(argv, extractors=ex) == 0
    again = json.loads(result_path.read_text())
    assert again["timing"] == {**again["timing"], "generated": 0, "cached": 2}
    assert again["metrics"] == result["metrics"] and ex.video.calls == calls


def test_the_baselines_run_through_the_same_code(curated, tmp_path):
    out = tmp_path / "eval"
    argv = [
        str(curated / "shards" / "eval"),
        "--out",
        str(out),
        "--method",
        "linear",
        "flow",
        "--limit",
        "2",
        *TINY,
    ]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    results = {
        json.loads(p.read_text())["method"]: json.loads(p.read_text())
        for p in (out / "results").glob("*.json")
    }
    assert set(results) == {"linear_blend", "flow_warp"}
    for r in results.values():
        assert r["metrics"]["n_clips"] == 2 and "checkpoint" not in r["weights"]
        assert r["metrics"]["lpips"]["all"] > 0  # the interior frames differ from the ground truth
    table = (out / "results.md").read_text()
    win = "[16 frames, 32x64]"  # not the paper's 320x512: said on the row
    assert (
        f"**linear_blend** {win} | 2 |" in table
        and f"**flow_warp** {win} | 2 |" in table
        and "EISAI (paper)" in table
    )


def test_decoder_only_scores_the_reconstruction(curated, checkpoint, tmp_path):
    out = tmp_path / "eval"
    argv = [str(curated / "manifest.parquet"), "--out", str(out), "--decoder-only", "--decoder-size", "32",
            "--limit", "2", "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv, extractors=fake_extractors()) == 0
    (path,) = (out / "results").glob("decoder-*.json")
    result = json.loads(path.read_text())
    m = result["metrics"]
    assert result["kind"] == "decoder" and m["n_clips"] == 2 and result["data"]["size"] == [32, 32]
    # the device is part of what made the reconstructions: a CPU run's were reused by a GPU run of the
    # same OUT, whose JSON then said cuda
    assert result["generation"]["device"] == result["device"] == "cpu"
    assert 0 < m["psnr"]["all"] < 100 and -1 <= m["ssim"]["all"] <= 1 and m["lpips"]["all"] >= 0
    assert "full dual-reference decoder (paper)" in (out / "results.md").read_text()
    # the decoder is named: a plain (DynamiCrafter) decoder's row and a dual-reference one's were both
    # "VAE decoder (ours)", in the table that compares them
    assert result["decoder"] == "dual-reference" and result["label"] == "VAE decoder, dual-reference (ours)"
    torch.manual_seed(1)
    plain = tmp_path / "dynamicrafter.ckpt"  # pickled, no config: told by its key names
    torch.save({"state_dict": build_tooncrafter("tiny", dual_ref_decoder=False).state_dict()}, plain)
    assert cli.main([*argv[:-5], "--checkpoint", str(plain), "--device", "cpu", "--quiet"],
                    extractors=fake_extractors()) == 0  # fmt: skip
    labels = {json.loads(p.read_text())["label"] for p in (out / "results").glob("decoder-*.json")}
    assert labels == {"VAE decoder, dual-reference (ours)", "VAE decoder, plain (ours)"}
    table = (out / "results.md").read_text()
    assert "VAE decoder, plain (ours)" in table and "VAE decoder, dual-reference (ours)" in table
    path.unlink()
    assert cli.main(argv, extractors=fake_extractors()) == 0  # its scores cached: the model is not loaded
    assert json.loads(path.read_text())["decoder"] == "dual-reference"


def test_a_checkpoint_evaluated_on_clips_it_trained_on_is_flagged(curated, checkpoint, tmp_path, capsys):
    """A run of `inbetweener train` records its clips (train_index.parquet); evaluating its checkpoint on
    any of them (another eval split after select, another folder) is said, and recorded in the results.
    A checkpoint without a record (the released model) is recorded as unchecked."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    shutil.copy(checkpoint, step / "model.safetensors")
    first = next(iter(CLIPS))
    trained = [
        {"clip_id": first, "source_id": "s1", "phash": [1, 2, 3]},
        {"clip_id": "x", "source_id": "s2", "phash": [7]},
    ]
    pq.write_table(pa.Table.from_pylist(trained), run / "train_index.parquet")

    def evaluate(ckpt, out):
        argv = [str(curated / "manifest.parquet"), "--out", str(out), "--decoder-only", "--decoder-size", "32",
                "--limit", "2", "--checkpoint", str(ckpt), "--device", "cpu", "--quiet"]  # fmt: skip
        assert cli.main(argv, extractors=fake_extractors()) == 0
        (path,) = (out / "results").glob("decoder-*.json")
        return json.loads(path.read_text())["training_overlap"]

    overlap = evaluate(step / "model.safetensors", tmp_path / "eval")
    assert overlap["checked"] and overlap["same_clips"] == overlap["near_duplicates"] == 1
    assert overlap["examples"] == [first] and overlap["train_clips"] == 2
    assert (
        "warning: 1 of 2 eval clips are the same as or near-duplicates of clips this checkpoint trained on"
        in (capsys.readouterr().err)
    )
    assert evaluate(checkpoint, tmp_path / "eval2")["checked"] is False  # no record beside it
    (run / "train_index.parquet").write_bytes(b"PAR1 damaged")
    unreadable = evaluate(step / "model.safetensors", tmp_path / "eval3")
    assert unreadable["checked"] is False and "train_index.parquet: unreadable" in unreadable["why"]


def test_missing_metric_weights_are_named(curated, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INBETWEENER_MODELS", str(tmp_path / "models"))
    argv = [str(curated), "--out", str(tmp_path / "e"), "--method", "linear", "--limit", "1", *TINY]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "i3d/i3d_torchscript.pt" in err and "INBETWEENER_MODELS" in err


def test_metrics_subset_needs_only_its_weights(curated, tmp_path, monkeypatch, capsys):
    """--metrics cpbd runs the baselines with an empty models dir (CPBD needs no network); the other
    metrics are absent from the JSON and blank in the table, and their scores are not computed; a metric
    of the other mode, or one whose weights are missing, is a clear error before any work."""
    monkeypatch.setenv("INBETWEENER_MODELS", str(tmp_path / "models"))
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", "--limit", "2", "--metrics", "cpbd", *TINY]
    assert cli.main(argv) == 0
    (path,) = (out / "results").glob("*.json")
    result = json.loads(path.read_text())
    m = result["metrics"]
    assert result["metrics_computed"] == ["cpbd"] and result["weights"] == {}
    assert 0 <= m["cpbd"]["all"] <= 1 and 0 <= m["cpbd_real"]["all"] <= 1  # 32x64 frames: few edge blocks
    assert m["fvd"] is None and m["lpips"] is None and m["clip_img"] is None and m["clip_txt"] is None
    row = next(line for line in (out / "results.md").read_text().splitlines() if "**linear_blend**" in line)
    assert row == f"| **linear_blend** [16 frames, 32x64] | 2 | - | - | - | - | - | {m['cpbd']['all']:.4f} |"
    assert "CPBD" in capsys.readouterr().out

    ex = fake_extractors()  # with every extractor at hand, only the asked scores are computed
    argv_lpips = [*argv[: -len(TINY) - 1], "lpips", "cpbd", *TINY]
    assert cli.main(argv_lpips, extractors=ex) == 0 and ex.video.calls == 0
    (path,) = [p for p in (out / "results").glob("*.json")]
    assert json.loads(path.read_text())["metrics"]["lpips"]["all"] > 0

    capsys.readouterr()  # PSNR and SSIM of the baselines need no weights either (README said so; refused)
    assert cli.main([*argv[: -len(TINY) - 1], "psnr", "ssim", *TINY]) == 0
    (path,) = [
        p for p in (out / "results").glob("*.json") if "psnr" in json.loads(p.read_text())["metrics_computed"]
    ]
    m = json.loads(path.read_text())["metrics"]
    # the keyframes are exact (infinite PSNR): left out of the means and counted, not an infinite mean
    assert m["psnr_exact_frames"] == {"all": 4, "interior": 0}
    assert 10 < m["psnr"]["interior"] == pytest.approx(m["psnr"]["all"])
    assert 0 < m["ssim"]["interior"] <= 1 and "PSNR interior" in capsys.readouterr().out
    # --decoder-only takes no --method
    no_method = [a for a in argv[: -len(TINY) - 1] if a not in ("--method", "linear")]
    assert cli.main([*no_method, "cpbd", "--decoder-only", *TINY]) == 2
    assert "--metrics: ['cpbd'] not among the metrics of --decoder-only" in capsys.readouterr().err
    assert cli.main([*argv[: -len(TINY) - 1], "clip_txt", *TINY]) == 2
    assert "tooncrafter/model.ckpt" in capsys.readouterr().err  # CLIP: its file or the checkpoint's towers


def test_sources_shards_folder_and_manifest_agree(curated):
    by_folder = [(c.key, c.caption) for c in iter_clips([curated])]
    by_shards = [(c.key, c.caption) for c in iter_clips([curated / "shards" / "eval" / "000000.tar"])]
    by_manifest = [(c.key, c.caption) for c in iter_clips([curated / "manifest.parquet"])]
    by_url = [(c.key, c.caption) for c in iter_clips([f"file://{curated}"])]  # a file:// URL: its local path
    assert (
        by_folder
        == by_shards
        == by_manifest
        == by_url
        == [(k, f"a square moving right, clip {i}") for i, k in enumerate(CLIPS)]
    )
    assert [c.key for c in iter_clips([curated], limit=2)] == ["clip000a", "clip000b"]
    clip = next(iter_clips([curated]))
    frames = clip.frames()
    assert frames.shape == (18, H, W, 3)
    assert clip_window(frames, 16).shape[0] == 16 and clip_window(frames, 16, stride=2) is None
    assert clip.meta["num_frames"] == 18


def test_too_short_clips_are_skipped_and_reported(curated, tmp_path):
    out = tmp_path / "eval"
    argv = [str(curated), "--out", str(out), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    (path,) = (out / "results").glob("*.json")
    result = json.loads(path.read_text())
    assert result["metrics"]["n_clips"] == 2
    assert result["data"]["skipped"] == [{"key": "clip000c", "reason": "shorter than 16 frames at stride 1"}]


def test_pooling_and_table_on_hand_made_records():
    rng = np.random.default_rng(0)
    records = [
        {
            "i3d_gen": rng.normal(size=4),
            "i3d_real": rng.normal(size=4),
            "lpips": np.full(4, 0.2),
            "clip_img": np.array([1.0, 0.5, 0.5, 1.0]),
            "clip_txt": np.full(4, 0.3),
            "cpbd": np.full(4, 0.6),
            "cpbd_real": np.full(4, 0.7),
        }  # fmt: skip
        for _ in range(4)
    ]
    m = pool_scores(records)
    assert m["clip_img"] == {"all": 0.75, "interior": 0.5} and m["real_vs_real_floor"]["n_half"] == 2
    table = markdown_table([{"kind": "generation", "label": "x", "run": "x-1", "metrics": m}])
    assert "| **x** | 4 |" in table and "0.7500" in table
    # runs on different clips (an eval split changed by select, another --limit) are marked as such
    runs = [
        {"kind": "generation", "label": label, "run": label, "metrics": m, "data": {"keys_sha256": keys}}
        for label, keys in (("linear", "k1"), ("flow", "k1"), ("ours", "k2"))
    ]
    table = markdown_table(runs)
    assert "measured on 2 different sets of clips (A, B" in table and "compare only rows of one set" in table
    assert "| **linear** (clips A) | 4 |" in table and "| **ours** (clips B) | 4 |" in table
    assert "different sets" not in markdown_table(runs[:2]) and "| **flow** | 4 |" in markdown_table(runs[:2])


def test_clip_from_the_checkpoint_towers_equals_open_clip():
    """TowerCLIP (CLIP metrics from the ToonCrafter checkpoint's towers) computes open_clip's own
    encode_image / encode_text when open_clip's CLIP holds the same weights."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from inference.eval_scores import TowerCLIP

    torch.manual_seed(0)
    model = build_tooncrafter("tiny").eval()
    c = model.cfg.clip
    reference = open_clip.CLIP(
        c.embed_dim,
        CLIPVisionCfg(
            image_size=c.image_size,
            patch_size=c.patch_size,
            width=c.vision_width,
            layers=c.vision_layers,
            head_width=c.vision_head_width,
        ),
        CLIPTextCfg(
            context_length=c.context_length,
            vocab_size=c.vocab_size,
            width=c.text_width,
            heads=c.text_heads,
            layers=c.text_layers,
        ),
    ).eval()
    state = {k: v for k, v in model.cond_stage_model.model.state_dict().items() if k != "logit_scale"}
    state |= {f"visual.{k}": v for k, v in model.embedder.model.visual.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"logit_scale"}
    towers = TowerCLIP(model.cond_stage_model, model.embedder)
    images = torch.randn(2, 3, c.image_size, c.image_size)
    tokens = open_clip.tokenize(["a square moving right", "an anime scene"])
    with torch.no_grad():
        torch.testing.assert_close(towers.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(towers.encode_text(tokens), reference.encode_text(tokens))


def test_interpolate_batch_from_a_clip_manifest(curated, checkpoint, tmp_path):
    """`interpolate --batch manifest.parquet`: a row per kept eval clip, its first and last frames as
    keyframes, its caption as the prompt, its key as the name; frames decoded at the row's turn."""
    from inference import interpolate as cli

    argv = ["--batch", str(curated / "manifest.parquet"), "--out", str(tmp_path / "out"), "--frames", "4",
            "--formats", "png", "--checkpoint", str(checkpoint), *TINY]  # fmt: skip
    jobs = cli.build_jobs(cli.build_parser().parse_args(argv))
    assert [j.name for j in jobs] == list(CLIPS)
    assert [j.prompt for j in jobs] == [f"a square moving right, clip {i}" for i in range(len(CLIPS))]
    first, last = jobs[1].read_keyframes()
    frames = _clip_frames(CLIPS["clip000b"], 1)
    assert (
        np.abs(first.astype(int) - frames[0]).mean() < 4 and np.abs(last.astype(int) - frames[-1]).mean() < 4
    )
    assert cli.main(argv) == 0
    for key in CLIPS:
        meta = json.loads((tmp_path / "out" / key / "meta.json").read_text())
        tar = curated / "shards" / "eval" / "000000.tar"
        assert meta["keyframes"] == [f"{tar}:{key}[0]", f"{tar}:{key}[-1]"]
        assert len(list((tmp_path / "out" / key / "frames").glob("*.png"))) == 4


def test_a_corrupt_clip_is_skipped_and_reported_not_a_crash(tmp_path, capsys):
    """A shard sample whose mp4 does not decode is listed under `skipped` with its reason, and the rest is
    evaluated; one whose json member is unreadable is still evaluated (its caption is in the txt)."""
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    good = _mp4(_clip_frames(18, 0))
    with tarfile.open(shard_dir / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, mp4, meta in [
            ("fine", good, b"{}"),
            ("cut", good[: len(good) // 3], b"{}"),
            ("badjson", good, b"{not json"),
        ]:
            _member(tar, f"{key}.mp4", mp4)
            _member(tar, f"{key}.json", meta)
            _member(tar, f"{key}.txt", f"caption of {key}".encode())
    out = tmp_path / "eval"
    argv = [str(shard_dir / "000000.tar"), "--out", str(out), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    (path,) = (out / "results").glob("*.json")
    result = json.loads(path.read_text())
    assert result["metrics"]["n_clips"] == 2
    (skipped,) = result["data"]["skipped"]
    assert skipped["key"] == "cut" and "does not decode" in skipped["reason"]
    assert "skipped cut: " in capsys.readouterr().err
    with tarfile.open(shard_dir / "empty.tar", "w"):
        pass
    argv = [str(shard_dir / "empty.tar"), "--out", str(out), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert f"no clips in ['{shard_dir / 'empty.tar'}']" in capsys.readouterr().err


def test_methods_and_metrics_take_commas_or_spaces(curated, tmp_path, capsys):
    """`--method linear,flow --metrics cpbd` (commas, as --formats takes) equals the space-separated form;
    an unknown name is an error that lists the known ones."""
    runs = []
    for method, metrics in ((["linear,flow"], ["cpbd"]), (["linear", "flow"], ["cpbd"])):
        out = tmp_path / f"eval{len(runs)}"
        argv = [str(curated), "--out", str(out), "--method", *method, "--metrics", *metrics, *TINY]
        assert cli.main(argv, extractors=fake_extractors()) == 0
        runs.append(sorted(p.name.split("-")[0] for p in (out / "results").glob("*.json")))
    assert runs[0] == runs[1] == ["flow_warp", "linear_blend"]
    argv = [str(curated), "--out", str(tmp_path / "bad"), "--method", "linear,bogus", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert "--method: ['bogus'] not among flow linear model" in capsys.readouterr().err
    argv = [
        str(curated),
        "--out",
        str(tmp_path / "bad"),
        "--method",
        "decoder",
        *TINY,
    ]  # that is --decoder-only
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert "--method: ['decoder'] not among" in capsys.readouterr().err


def test_ground_truth_is_decoded_at_each_clips_turn_not_held(curated, tmp_path, monkeypatch):
    """The split is not held decoded (1,000 windows of 320x512 would be 7.9 GB): each clip is decoded once
    to check it, then again only when it is scored; a resumed run whose scores exist decodes each once."""
    from inference.eval_data import EvalClip

    calls = []
    real = EvalClip.frames
    monkeypatch.setattr(
        EvalClip, "frames", lambda self, limit=None: calls.append(self.key) or real(self, limit)
    )
    argv = [str(curated), "--out", str(tmp_path / "eval"), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    assert sorted(calls) == sorted([*CLIPS, "clip000a", "clip000b"])  # check all, score the two long ones
    calls.clear()
    assert cli.main(argv, extractors=fake_extractors()) == 0  # every score cached
    assert sorted(calls) == sorted(CLIPS)


def test_a_damaged_manifest_is_one_error_line(tmp_path, capsys):
    """A manifest.parquet cut short (a copy interrupted): exit code 2 and a line naming the file."""
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"PAR1")
    argv = [str(manifest), "--out", str(tmp_path / "eval"), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert f"{manifest}: not a readable Parquet manifest" in capsys.readouterr().err


def test_a_curate_output_with_an_empty_eval_split_says_how_to_resplit(tmp_path, capsys):
    """A small curate job whose eval split came out empty: the error names the folder and the select
    command that re-splits it, not only the folders it looked in."""
    out = tmp_path / "curated"
    (out / "shards" / "eval").mkdir(parents=True)
    (out / "shards" / "train").mkdir()
    write_manifest(to_table([{"clip_id": "a", "status": "kept", "split": "train"}]), out / "manifest.parquet")
    argv = [str(out), "--out", str(tmp_path / "eval"), "--method", "linear", *TINY]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    err = capsys.readouterr().err
    assert f"{out / 'manifest.parquet'}: the manifest has no kept rows in the 'eval' split" in err
    assert f"inbetweener select {out} --set split.by_source=false" in err
    # an object-store URL is named as such, not folded by Path() into a missing local file
    assert cli.main(["s3://bucket/run1", *argv[1:]], extractors=fake_extractors()) == 2
    assert "s3://bucket/run1: evaluate reads local files" in capsys.readouterr().err


def test_evaluate_holds_its_curate_out_against_select(tmp_path, capsys):
    """A model evaluation reads the eval shards for hours; select must not swap them meanwhile (nor may
    evaluate start while select writes). evaluate holds the OUT's lock shared, and select stops."""
    from inference.interpolate import main as interpolate_main
    from manifests.files import folder_lock
    from pipeline.cli import select_main

    out = tmp_path / "curated"
    (out / "shards" / "eval").mkdir(parents=True)
    write_manifest(to_table([{"clip_id": "a", "status": "kept", "split": "train"}]), out / "manifest.parquet")
    argv = [str(out / "shards" / "eval"), "--out", str(tmp_path / "eval"), "--method", "linear", *TINY]
    with folder_lock(out, "inbetweener select"):
        assert cli.main(argv, extractors=fake_extractors()) == 2
        assert f"{out} is being written by inbetweener select (pid " in capsys.readouterr().err
        batch = ["--batch", str(out / "manifest.parquet"), "--out", str(tmp_path / "batch")]
        assert interpolate_main(batch) == 2  # interpolate --batch reads the eval shards row by row too
        assert f"{out} is being written by inbetweener select (pid " in capsys.readouterr().err
    with folder_lock(out, "inbetweener evaluate", shared=True):
        assert select_main([str(out), "--quiet"]) == 2
    assert f"{out} is being read by inbetweener evaluate (pid " in capsys.readouterr().err


# --- evaluating real splits: re-curated, incomplete, other windows ---------------------------------------------


def _copy_curated(curated: Path, to: Path, seed_shift: int = 0) -> Path:
    """A copy of the curated fixture; seed_shift > 0 re-encodes every clip with other pixels, same keys."""
    import shutil

    shutil.copytree(curated, to)
    if seed_shift:
        with tarfile.open(to / "shards" / "eval" / "000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (key, n) in enumerate(CLIPS.items()):
                _member(tar, f"{key}.mp4", _mp4(_clip_frames(n, i + seed_shift)))
                _member(tar, f"{key}.txt", f"a square moving right, clip {i}".encode())
    return to


def _result(out: Path, method: str = "linear_blend") -> dict:
    # the newest: a run on another set of clips writes a file of its own
    path = max((out / "results").glob(f"{method}-*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the results JSON"))


def test_a_re_curated_split_with_the_same_keys_is_scored_again(curated, tmp_path):
    """Clip ids hash the source and the frame range, so a re-curated split (another crop or size) keeps
    them: its scores were read from the first split's cache, and the table could not tell the sets apart."""
    first, second = _copy_curated(curated, tmp_path / "A"), _copy_curated(curated, tmp_path / "B", 100)
    out = tmp_path / "eval"
    base = ["--out", str(out), "--method", "linear", "--metrics", "psnr", "--limit", "2", *TINY]
    assert cli.main([str(first), *base], extractors=fake_extractors()) == 0
    a = _result(out)
    assert cli.main([str(second), *base], extractors=fake_extractors()) == 0
    b = _result(out)
    assert b["timing"]["generated"] == 2 and b["metrics"]["psnr"] != a["metrics"]["psnr"]
    assert a["data"]["keys_sha256"] == b["data"]["keys_sha256"]
    assert a["data"]["clips_sha256"] != b["data"]["clips_sha256"]


def test_clips_the_split_names_but_that_cannot_be_read_are_listed_not_dropped(curated, tmp_path, capsys):
    """A manifest row whose shard lacks it, a row without a shard, a deleted shard (given the OUT folder,
    not only its manifest) and a shard cut short: each missing clip is in `skipped` with its reason;
    the readable ones are evaluated; --limit counts evaluated clips, not skipped ones."""
    from manifests.io import read_manifest

    out = _copy_curated(curated, tmp_path / "OUT")
    rows = read_manifest(out / "manifest.parquet").to_pylist()
    extra = [
        {**rows[0], "clip_id": "ghost", "key": "ghost"},  # its shard does not hold it
        {**rows[0], "clip_id": "noshard", "key": "noshard", "shard": None},
        {**rows[0], "clip_id": "gone", "key": "gone", "shard": "eval/000001.tar"},  # a deleted shard
    ]
    write_manifest(to_table([*extra, *rows]), out / "manifest.parquet")
    argv = [
        str(out),
        "--out",
        str(tmp_path / "e"),
        "--method",
        "linear",
        "--metrics",
        "cpbd",
        "--limit",
        "2",
        *TINY,
    ]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    result = _result(tmp_path / "e")
    assert result["metrics"]["n_clips"] == 2  # clip000a and clip000b, after 3 unreadable rows
    reasons = {s["key"]: s["reason"] for s in result["data"]["skipped"]}
    assert "does not hold it" in reasons["ghost"] and "names no shard" in reasons["noshard"]
    assert "000001.tar, named by" in reasons["gone"] and "is missing" in reasons["gone"]
    assert "skipped ghost:" in capsys.readouterr().err

    shard = out / "shards" / "eval" / "000000.tar"  # cut exactly between clip000b's and clip000c's members:
    with tarfile.open(shard) as tar:  # clip000b may lack members that followed, so it is not used either
        cut = next(m.offset for m in tar.getmembers() if m.name == "clip000c.mp4")
    shard.write_bytes(shard.read_bytes()[:cut])
    for source, lost in ((out, "clip000b"), (shard, "000000.tar:rest")):
        e = tmp_path / f"e_{lost}"
        argv = [str(source), "--out", str(e), "--method", "linear", "--metrics", "cpbd", *TINY]
        assert cli.main(argv, extractors=fake_extractors()) == 0  # it stopped the whole evaluation
        result = _result(e)
        reasons = {s["key"]: s["reason"] for s in result["data"]["skipped"]}
        assert result["metrics"]["n_clips"] == 1 and "unreadable after 1 clip(s)" in reasons[lost]


def test_another_window_is_recorded_and_marked_and_the_json_has_no_nan(curated, tmp_path):
    """--frames/--stride/--size were in no row and no protocol line (four runs looked alike); two frames
    have no interior frames, whose NaN made the JSON unreadable to strict parsers."""
    out = tmp_path / "eval"
    argv = [
        str(curated),
        "--out",
        str(out),
        "--method",
        "linear",
        "--metrics",
        "cpbd",
        "psnr",
        "--frames",
        "2",
    ]
    assert cli.main([*argv, *TINY], extractors=fake_extractors()) == 0
    result = _result(out)  # fails on NaN or Infinity
    assert result["metrics"]["cpbd"]["interior"] is None and result["protocol"]["paper_window"] is False
    assert result["protocol"]["frames"].startswith(f"2 frames per clip (every 1. frame) at {H}x{W}")
    assert "**linear_blend** [2 frames, 32x64]" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "0x0"], "must have positive sides"),
        (
            ["--method", "model", "--size", "40x72"],
            "--size: the frame 40x72 must have sides that are multiples of 32",
        ),
        (["--decoder-only", "--decoder-size", "8"], "SSIM's 11-tap window needs frames of at least 11x11"),
        (
            ["--decoder-only", "--decoder-size", "36"],  # under 31, LPIPS's limit would speak first
            "--decoder-size: the frame 36x36 must have sides that are multiples of 8",
        ),
    ],
    ids=["zero", "model-step", "ssim-window", "vae-step"],
)
def test_a_frame_size_the_run_cannot_take_stops_before_any_clip(
    flags, message, curated, checkpoint, tmp_path, monkeypatch, capsys
):
    import inference.evaluate

    monkeypatch.setattr(inference.evaluate, "_windows", lambda *a: pytest.fail("clips were decoded first"))
    argv = [
        str(curated),
        "--out",
        str(tmp_path / "e"),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        *flags,
    ]
    assert cli.main(argv, extractors=fake_extractors()) == 2
    assert message in capsys.readouterr().err


def test_every_missing_metric_weight_is_named_before_the_clips_are_decoded(
    curated, tmp_path, monkeypatch, capsys
):
    import inference.evaluate

    monkeypatch.setenv("INBETWEENER_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(inference.evaluate, "_windows", lambda *a: pytest.fail("clips were decoded first"))
    argv = [str(curated), "--out", str(tmp_path / "e"), "--method", "linear", *TINY]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "4 weight file(s) missing" in err  # I3D, LPIPS's two files and CLIP: one run tells all
    for name in ("i3d/i3d_torchscript.pt", "lpips/alex.pth", "lpips/alexnet-owt-7be5be79.pth", "clip/"):
        assert name in err
    assert "tooncrafter/model.ckpt" in err  # the CLIP towers of the checkpoint serve instead


def test_a_missing_model_is_named_with_the_missing_metric_weights(curated, tmp_path, monkeypatch, capsys):
    """README: missing weight files are all named at once. A run of the model with an empty models dir
    named the checkpoint alone; the metric weights came one run later."""
    import inference.evaluate

    monkeypatch.setenv("INBETWEENER_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(inference.evaluate, "_windows", lambda *a: pytest.fail("clips were decoded first"))
    assert cli.main([str(curated), "--out", str(tmp_path / "e"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "tooncrafter/model.ckpt" in err and "3 metric weight file(s) missing" in err
    for name in ("i3d/i3d_torchscript.pt", "lpips/alex.pth", "lpips/alexnet-owt-7be5be79.pth"):
        assert name in err
    assert "clip/" not in err  # the checkpoint's CLIP towers serve once it is there


def test_a_pickled_tiny_checkpoint_needs_no_preset_and_a_limit_reads_only_its_shards(
    curated, checkpoint, tmp_path, monkeypatch
):
    """The early size check took toon-512's step for a .ckpt without --preset (load_tooncrafter reads the
    preset from the weights): a valid tiny run was refused. Reading an OUT through its manifest must stream
    shard by shard: --limit 1 read every shard of the split first."""
    from safetensors.torch import load_file

    import inference.eval_data as eval_data

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(checkpoint))}, ckpt)
    out = _copy_curated(curated, tmp_path / "OUT")
    (out / "shards" / "eval" / "000001.tar").write_bytes(
        (out / "shards" / "eval" / "000000.tar").read_bytes()
    )
    from manifests.io import read_manifest

    rows = read_manifest(out / "manifest.parquet").to_pylist()
    more = [
        {**r, "clip_id": r["key"] + "x", "key": r["key"], "shard": "eval/000001.tar"}
        for r in rows
        if r["key"]
    ]
    write_manifest(to_table([*rows, *more]), out / "manifest.parquet")
    opened = []
    real = eval_data._samples
    monkeypatch.setattr(
        eval_data, "_samples", lambda tar, problems: opened.append(tar.name) or real(tar, problems)
    )
    argv = [
        str(out),
        "--out",
        str(tmp_path / "e"),
        "--checkpoint",
        str(ckpt),
        "--limit",
        "1",
        "--metrics",
        "cpbd",
        *TINY,
    ]
    assert cli.main(argv, extractors=fake_extractors()) == 0
    assert _result(tmp_path / "e", "model")["metrics"]["n_clips"] == 1 and opened == ["000000.tar"]


def test_json_safe_takes_numpy_values_too():
    value = {
        "a": np.float32("nan"),
        "b": np.array([1.0, np.inf]),
        "c": [float("nan"), 2],
        "d": np.float64(3.5),
    }
    assert cli.json_safe(value) == {"a": None, "b": [1.0, None], "c": [None, 2], "d": 3.5}
