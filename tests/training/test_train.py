"""`inbetweener train` end to end on the CPU with the `tiny` preset, through `main([...])`.

Shards come from tests/training/conftest.py (tarfile + PyAV, the curate job's format; no Ray). Runs use one
torch thread: on a shared 2-core machine a 2-thread OpenMP pool stalls whenever one core is taken. The
torchrun (DDP, FSDP) runs are in test_train_distributed.py, the data/roles/config tests in test_train_data.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from manifests.weights import WeightsError
from training import roles
from training.engine import TrainConfig
from training.train import main

OVERFIT_STEPS, OVERFIT_LR = 30, 3e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(stage: str, out: Path, data: Path, *extra: str) -> Path:
    argv = [
        stage,
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        "data.num_workers=0",
        "--set",
        "train.sample_every=0",
        *extra,
    ]
    assert main(argv) == 0
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def latest(out: Path) -> Path:
    root = out / "checkpoints"
    return root / (root / "latest").read_text().strip()


@pytest.fixture(scope="module")
def dc_checkpoint(tmp_path_factory) -> Path:
    """A tiny DynamiCrafter-like checkpoint (plain decoder) as `inbetweener convert` writes it."""
    from training.checkpoint import save_safetensors
    from training.models.tooncrafter import build_tooncrafter

    torch.manual_seed(42)
    model = build_tooncrafter("tiny", dual_ref_decoder=False)
    with torch.no_grad():  # non-zero output layers, so that every trained tensor gets a gradient
        for p in model.unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return save_safetensors(model, tmp_path_factory.mktemp("dc") / "dc_interp_tiny.safetensors")


@pytest.fixture(scope="module")
def rectify_run(tmp_path_factory, dc_checkpoint: Path, corrupt_shards: Path) -> Path:
    """3 rectify steps from the DynamiCrafter-like checkpoint, reading shards that include a garbage shard,
    a truncated shard and undecodable / too short samples."""
    out = tmp_path_factory.mktemp("rectify")
    return train(
        "rectify",
        out,
        corrupt_shards,
        "--init",
        str(dc_checkpoint),
        "--set",
        "train.steps=3",
        "--set",
        "train.ckpt_every=3",
        "--set",
        "train.ema_decay=0",
    )


def test_rectify_updates_only_spatial_layers_and_projector(rectify_run: Path, dc_checkpoint: Path):
    """Frozen: temporal convs, temporal transformers, init_attn, VAE, CLIP towers (bitwise unchanged);
    trained: the UNet's spatial layers with the image K/V, and the Resampler (every tensor moved)."""
    from training.engine import TrainConfig
    from training.train import initial_model

    model = initial_model(TrainConfig(preset="tiny", init_checkpoint=str(dc_checkpoint)))  # as the run began
    start, params = model.state_dict(), {n for n, _ in model.named_parameters()}
    after = load_file(str(latest(rectify_run) / "model.safetensors"))
    assert set(after) == set(start)  # the full ToonCrafter, dual-reference decoder included
    trained = set(roles.STAGE_ROLES["rectify"])
    moved: dict[str, list[bool]] = {}
    for key in params:
        changed = not torch.equal(after[key], start[key])
        moved.setdefault(roles.role(key), []).append(changed)
    for role, flags in moved.items():
        if role in trained:
            assert all(flags), f"{role}: {flags.count(False)} of {len(flags)} trained tensors did not move"
        else:
            assert not any(flags), f"{role} is frozen but {sum(flags)} tensors changed"
    assert {"temporal_conv", "temporal_attention", "init_attention", "vae_encoder", "clip_text"} <= set(moved)
    state = torch.load(latest(rectify_run) / "state.pt", weights_only=False)
    n_trained = sum(1 for key in params if roles.role(key) in trained)
    assert len(state["trainable"]) == n_trained  # the optimizer holds the trained tensors only
    assert len(state["optimizers"]["model"]["param_groups"][0]["params"]) == n_trained


def test_corrupt_shards_do_not_stop_training(rectify_run: Path):
    rows = metrics(rectify_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["data/bad_shards"] == 2  # the garbage and the truncated tar
    assert rows[-1]["data/corrupt"] >= 1
    assert all(np.isfinite(r["train/loss"]) for r in rows)


def test_rectify_checkpoint_loads_for_inference(rectify_run: Path):
    """The exported file is a ToonCrafter state dict in safetensors with the model config and the run's
    resolved config in its metadata, and `interpolate`'s loader takes it."""
    from safetensors import safe_open

    path = latest(rectify_run) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["inbetweener.run_config"])["stage"] == "rectify"
    assert json.loads(meta["inbetweener.config"])["dual_ref_decoder"] is True
    assert (latest(rectify_run) / "config.yaml").is_file()
    assert any((rectify_run / "tb").glob("events.out.tfevents.*"))
    weights = pytest.importorskip("inference.weights")
    model = weights.load_tooncrafter(path)
    assert model.cfg.unet.model_channels == 32


@pytest.fixture(scope="module")
def lpips_models(tmp_path_factory) -> Path:
    """A models dir holding LPIPS-AlexNet weight files in the real formats (random values)."""
    from training.metrics.lpips import LPIPS

    root = tmp_path_factory.mktemp("models")
    (root / "lpips").mkdir()
    torch.manual_seed(0)
    net = LPIPS("alex")
    torch.save(
        {f"features.{k}": v for k, v in net.features.state_dict().items()},
        root / "lpips" / "alexnet-owt-7be5be79.pth",
    )
    lins = {k: v.abs() for k, v in net.state_dict().items() if k.startswith("lin")}
    torch.save(lins, root / "lpips" / "alex.pth")
    return root


def test_decoder_stage_trains_the_decoder_with_lpips_discriminator_and_eval(
    tmp_path, train_shards, lpips_models
):
    out = train(
        "decoder",
        tmp_path / "dec",
        train_shards,
        "--models-dir",
        str(lpips_models),
        "--set",
        "train.steps=2",
        "--set",
        "decoder.disc_start=1",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.sample_every=2",
        "--set",
        "train.ckpt_every=2",
    )
    rows = metrics(out)
    assert "train/lpips" in rows[0] and "train/d_loss" not in rows[0]  # discriminator after its warm-up
    assert "train/d_loss" in rows[1] and "train/g_adv" in rows[1]
    evals = [r for r in rows if "eval/psnr" in r]
    assert evals and {"eval/ssim", "eval/lpips"} <= set(evals[0]) and np.isfinite(evals[0]["eval/psnr"])
    assert any((out / "samples").glob("samples_reconstruction_*.gif"))
    state = torch.load(latest(out) / "state.pt", weights_only=False)
    model_keys = [k for k in state["trainable"] if not k.startswith("discriminator.")]
    assert model_keys and all(k.startswith("model.first_stage_model.decoder.") for k in model_keys)
    assert "discriminator" in state["optimizers"]


def test_decoder_without_lpips_weights_stops_with_the_file_and_the_way_out(tmp_path, train_shards, capsys):
    """Said before the run takes its folder (it left .lock and train_index.parquet, exit 1), like the other
    input errors; so are Anime2Sketch asked for without its weights and a global batch the ranks can't split."""
    for stage, extra, message in [
        ("decoder", (), r"lpips/alex\.pth[\s\S]*--no-lpips"),
        ("sketch", ("--set", "sketch.extractor=anime2sketch"), r"Anime2Sketch weights not found"),
        ("rectify", ("--set", "train.global_batch=3", "--set", "train.micro_batch=2"), r"not a multiple"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train(stage, tmp_path / stage, train_shards, "--models-dir", str(tmp_path / "empty"), *extra)
        assert stop.value.code == 2
        assert re.search(message, capsys.readouterr().err), stage
        assert not (tmp_path / stage).exists(), stage


def test_damaged_lpips_or_anime2sketch_weights_stop_before_the_run_takes_its_folder(
    tmp_path, train_shards, capsys
):
    """Present but empty or cut short, they passed the pre-check (it looked for the files only): the run took
    its folder, indexed the data and loaded the model, then stopped (the loss's LPIPS with exit 1)."""
    models = tmp_path / "models"
    (models / "lpips").mkdir(parents=True)
    (models / "lpips" / "alex.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a torch.save zip, cut
    (models / "lpips" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    (models / "tooncrafter").mkdir()
    (models / "tooncrafter" / "sketch_extractor.pth").write_bytes(b"")
    for stage, extra, message in [
        (
            "decoder",
            ("--set", "decoder.lpips_net=alex"),
            r"alex\.pth: truncated[\s\S]*empty file[\s\S]*--no-lpips",
        ),
        ("decoder", ("--no-lpips",), r"the eval LPIPS \(alex\) weights .*alex\.pth: truncated"),
        ("sketch", (), r"Anime2Sketch weights .*sketch_extractor\.pth: an empty file"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train(stage, tmp_path / stage, train_shards, "--models-dir", str(models), *extra)
        assert stop.value.code == 2
        assert re.search(message, capsys.readouterr().err), stage
        assert not (tmp_path / stage).exists(), stage
    # the eval's LPIPS only matters to a run that evaluates: without eval the damaged file is not read
    one_step = ("--set", "train.steps=1", "--set", "train.global_batch=1")
    train("decoder", tmp_path / "no_eval", train_shards, "--models-dir", str(models), "--no-lpips",
          "--set", "train.eval_every=0", *one_step)  # fmt: skip
    assert (tmp_path / "no_eval" / "checkpoints" / "latest").is_file()


def test_a_run_holds_its_curate_out_against_select(tmp_path, train_shards, capsys):
    """select swaps a curate OUT's shard folders: under a running training the shards would change
    mid-epoch (another version of the dataset, an inexact resume). train holds the OUT's lock shared."""
    import shutil

    from manifests.files import folder_lock

    data = tmp_path / "curated"
    shutil.copytree(train_shards, data)
    (data / "manifest.parquet").write_bytes(b"")  # what makes it a curate OUT
    with folder_lock(data, "inbetweener select"), pytest.raises(SystemExit) as stopped:
        train("rectify", tmp_path / "run", data, "--set", "train.steps=1")
    assert stopped.value.code == 2
    assert f"{data} is being written by inbetweener select (pid " in capsys.readouterr().err
    train("rectify", tmp_path / "run", data / "shards" / "train", "--set", "train.steps=1")
    assert (data / ".lock").read_text() == f"inbetweener train rectify (pid {os.getpid()}) reads it\n"


def test_a_run_into_the_curate_out_it_reads_is_refused_by_name(tmp_path, train_shards, capsys):
    """--out = the curate OUT given as --data: "is being written by inbetweener train rectify (pid <its
    own>); wait for it to end", the run waiting for itself. A folder inside it is a folder of its own."""
    import shutil

    data = tmp_path / "curated"
    shutil.copytree(train_shards, data)
    (data / "manifest.parquet").write_bytes(b"")
    for given in (data, data / "shards" / "train"):
        with pytest.raises(SystemExit) as stop:
            train("rectify", data, given, "--set", "train.steps=1")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"--out {data} is the curate output the run reads (--data)" in err, (
            err
        )
    assert not (data / ".lock").exists() and not (data / "checkpoints").exists()
    train("rectify", data / "runs" / "rectify", data, "--set", "train.steps=1")


def test_clips_all_shorter_than_the_window_name_the_setting_to_lower(tmp_path, train_shards, capsys):
    """data.frames above every clip's length said only "6 too short in all", not what to change."""
    with pytest.raises(SystemExit) as stop:
        train("rectify", tmp_path / "run", train_shards, "--set", "data.frames=64")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "6 too short in all" in err
    assert "every clip is shorter than a window; lower data.frames (or data.stride_min)" in err


def test_an_eval_split_of_clips_shorter_than_the_window_is_said_once(tmp_path, train_shards, caplog):
    """The decoder's eval logged an empty row ({"step": N}) every eval_every steps and the sample videos
    were left out, with only a warning per sample; now one line each, and the samples come from the
    training shards."""
    import shutil

    from tests.training.conftest import clip_sample, write_shard

    data = tmp_path / "curated"
    shutil.copytree(train_shards / "shards" / "train", data / "shards" / "train")
    write_shard(data / "shards" / "eval" / "000000.tar", [clip_sample("s0", 3, (128, 80), 5)])
    sets = ["train.steps=2", "train.eval_every=1", "train.sample_every=1", "train.sample_steps=1"]
    argv = ["decoder", "--preset", "tiny", "--no-lpips", "--data", str(data), "--out", str(tmp_path / "run"),
            "--set", "data.num_workers=0", *[a for item in sets for a in ("--set", item)]]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("decoder eval: no clip of the eval split" in m and m.endswith("skipped") for m in said), said
    assert any("sample videos from the training shards" in m for m in said), said
    assert all("train/loss" in row for row in metrics(tmp_path / "run"))


def test_a_run_records_the_clips_it_trains_on(tmp_path, train_shards):
    """From the index curate writes beside each shard: evaluate checks its eval clips against it. Shards
    without an index (from elsewhere) leave no record rather than a wrong one."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "shards"
    shutil.copytree(train_shards / "shards" / "train", data)
    train("rectify", tmp_path / "bare", data, "--set", "train.steps=1")
    assert not (tmp_path / "bare" / "train_index.parquet").exists()
    for tar in data.glob("*.tar"):  # parquet files beside the shards that are not curate's index
        pq.write_table(pa.table({"other": [1]}), tar.with_suffix(".parquet"))
    train("rectify", tmp_path / "foreign", data, "--set", "train.steps=1")
    assert not (tmp_path / "foreign" / "train_index.parquet").exists()
    for n, tar in enumerate(sorted(data.glob("*.tar"))):
        rows = [{"clip_id": f"c{n}{k}", "source_id": f"s{n}", "phash": [n, k]} for k in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), tar.with_suffix(".parquet"))
    train("rectify", tmp_path / "run", data, "--set", "train.steps=1")
    index = pq.read_table(tmp_path / "run" / "train_index.parquet").to_pylist()
    assert sorted(r["clip_id"] for r in index) == ["c00", "c01", "c02", "c10", "c11", "c12"]


def test_a_second_run_on_the_same_folder_stops_before_training(tmp_path, train_shards, capsys):
    from manifests.files import folder_lock

    out = tmp_path / "run"
    with folder_lock(out, "inbetweener train rectify"), pytest.raises(SystemExit) as stopped:
        train("rectify", out, train_shards, "--set", "train.steps=1")
    assert stopped.value.code == 2
    assert f"{out} is being written by inbetweener train rectify (pid " in capsys.readouterr().err
    assert not any(out.rglob("*.safetensors"))  # nothing written
    train("rectify", out, train_shards, "--set", "train.steps=1", "--set", "train.ckpt_every=1")  # free again
    assert any(out.rglob("*.safetensors"))


def test_sketch_stage_trains_the_encoder_only(tmp_path, train_shards):
    out = train(
        "sketch", tmp_path / "sk", train_shards, "--set", "train.steps=2", "--set", "train.ckpt_every=2"
    )
    folder = latest(out)
    state = torch.load(folder / "state.pt", weights_only=False)
    assert state["trainable"] and all(k.startswith("encoder.") for k in state["trainable"])
    assert not (folder / "model.safetensors").exists()  # the ToonCrafter is frozen: nothing new to export
    weights = pytest.importorskip("inference.weights")
    encoder = weights.load_sketch_encoder(folder / "sketch_encoder.safetensors", "tiny")
    assert sum(p.numel() for p in encoder.parameters()) > 0
    assert 0 < metrics(out)[-1]["train/sketch_rate"] <= 1


def test_anime2sketch_loads_when_present_and_xdog_otherwise(tmp_path):
    from training.stages.sketch import Anime2Sketch, SketchConfig, XDoG, load_extractor

    cfg = SketchConfig(anime2sketch_size=256)
    assert isinstance(load_extractor(cfg, tmp_path)[1], XDoG)
    with pytest.raises(SystemExit, match="sketch_extractor.pth"):
        load_extractor(SketchConfig(extractor="anime2sketch"), tmp_path)
    net = Anime2Sketch()
    assert sum(p.numel() for p in net.parameters()) == 54_405_505  # the 218 MB netG / sketch_extractor.pth
    (tmp_path / "tooncrafter").mkdir()
    torch.save(
        {f"module.{k}": v for k, v in net.state_dict().items()},
        tmp_path / "tooncrafter" / "sketch_extractor.pth",
    )
    name, loaded = load_extractor(cfg, tmp_path)
    assert name.startswith("anime2sketch")
    other = tmp_path / "other"  # another network's file under the extractor's name: named, not a traceback
    (other / "tooncrafter").mkdir(parents=True)
    torch.save(
        {"module.conv.weight": torch.zeros(4, 3, 3, 3)}, other / "tooncrafter" / "sketch_extractor.pth"
    )
    with pytest.raises(
        WeightsError,
        match=r"sketch_extractor.pth: not the expected weights: \d+ missing keys .*1 unexpected keys",
    ):
        load_extractor(cfg, other)
    with torch.no_grad():
        sketch = loaded(torch.rand(1, 3, 40, 64) * 2 - 1)
    assert sketch.shape == (1, 1, 40, 64) and sketch.min() >= 0 and sketch.max() <= 1


def test_overfit_one_clip(tmp_path, one_clip_shard):
    """A few dozen rectify steps on one clip lower its loss clearly: the loss at fixed timesteps, noise and
    posterior samples (the per-step training loss is too noisy to compare: t is drawn every step)."""
    from training import data
    from training.checkpoint import load_model
    from training.engine import TrainConfig
    from training.shard_samples import decode_window
    from training.shards import iter_tar_samples
    from training.stages.common import diffusion_step
    from training.train import initial_model

    out = train(
        "rectify",
        tmp_path / "fit",
        one_clip_shard,
        "--set",
        f"train.steps={OVERFIT_STEPS}",
        "--set",
        "train.global_batch=1",
        "--set",
        f"train.lr={OVERFIT_LR}",
        "--set",
        "train.ema_decay=0",
        "--set",
        f"train.ckpt_every={OVERFIT_STEPS}",
    )
    with open(one_clip_shard / "000000.tar", "rb") as f:
        sample = next(iter_tar_samples(f))
    window = decode_window(sample, data.DataConfig(frames=4, height=64, width=96), None)
    batch = data.collate([window] * 8)

    def fixed_loss(model) -> float:
        model.eval()
        torch.manual_seed(0)  # the same timesteps, noise and posterior samples for both models
        with torch.no_grad():
            return float(diffusion_step(model, batch, uncond_prob=0.0)["loss"])

    before = fixed_loss(initial_model(TrainConfig(preset="tiny")))
    after = fixed_loss(load_model(latest(out) / "model.safetensors"))
    print(
        f"overfit: {OVERFIT_STEPS} steps, fixed-noise loss {before:.4f} -> {after:.4f} ({after / before:.2f}x)"
    )
    assert after < 0.6 * before  # measured 0.295 -> 0.148; the rest is the random VAE's posterior noise


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, train_shards):
    """2 steps in one go vs 1 + --resume 1: bitwise equal trained weights, optimizer moments, EMA, exported
    weights and losses. 2 DataLoader workers and 3 micro-batches per step, so the resumed loader must rotate
    its workers; sample videos in between must not touch the training RNG."""
    common = ["--set", "data.num_workers=2", "--set", "train.global_batch=3", "--set", "train.ckpt_every=1",
              "--set", "train.sample_every=1"]  # fmt: skip
    whole = train("rectify", tmp_path / "whole", train_shards, *common, "--set", "train.steps=2")
    split = train("rectify", tmp_path / "split", train_shards, *common, "--set", "train.steps=1")
    train("rectify", split, train_shards, *common, "--set", "train.steps=2", "--resume")
    a = torch.load(latest(whole) / "state.pt", weights_only=False)
    b = torch.load(latest(split) / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 2
    for key in a["trainable"]:
        assert torch.equal(a["trainable"][key], b["trainable"][key]), key
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    for k, moments in a["optimizers"]["model"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], b["optimizers"]["model"]["state"][k]["exp_avg_sq"])
    assert [r["train/loss"] for r in metrics(whole)] == [r["train/loss"] for r in metrics(split)]
    exported_a = load_file(str(latest(whole) / "model.safetensors"))
    exported_b = load_file(str(latest(split) / "model.safetensors"))
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)


def test_a_diverging_run_skips_its_nan_updates_and_stops_keeping_its_good_checkpoints(
    tmp_path, train_shards, capsys
):
    """A run whose loss turned NaN trained on, exit 0: every later checkpoint was NaN and pushed the good
    ones out (3 kept), and metrics.jsonl held the bare token NaN, which JSON parsers refuse."""
    out = tmp_path / "nan"
    argv = ["rectify", "--preset", "tiny", "--data", str(train_shards), "--out", str(out), "--set",
            "data.num_workers=0", "--set", "train.sample_every=0", "--set", "train.steps=12", "--set",
            "train.ckpt_every=1", "--set", "train.log_every=1", "--set", "train.lr=1e30", "--set",
            "train.warmup_steps=0", "--set", "train.max_nonfinite_steps=2", "--set", "train.keep_checkpoints=2"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1
    assert "the gradient has not been finite for 2 steps in a row" in capsys.readouterr().err
    records = metrics(out)  # strict JSON: json.loads refuses NaN only with a parse_constant hook
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert any(r["train/grad_norm"] is None for r in records)
    for folder in (out / "checkpoints").glob("step_*"):  # whatever was kept holds finite weights
        state = torch.load(folder / "state.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["trainable"].values()), folder


def test_a_resume_logs_each_step_once(tmp_path, train_shards):
    """A run killed after logging past its last checkpoint, resumed: its steps were logged twice, the step
    going backwards in metrics.jsonl and TensorBoard."""
    common = ["--set", "train.ckpt_every=1", "--set", "train.log_every=1"]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=2")
    root = out / "checkpoints"
    (root / "latest").write_text("step_0000001\n")  # as if killed after step 2 was logged, before its save
    import shutil

    shutil.rmtree(root / "step_0000002")
    train("rectify", out, train_shards, *common, "--set", "train.steps=2", "--resume")
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_a_replicated_checkpoint_continues_on_other_ranks_with_restart_data(tmp_path, train_shards, capsys):
    """A lost node (2 ranks -> 1) could never continue, not even with --restart-data, and learnt so only
    after the model was built. A DDP checkpoint's state is one file for all ranks: --restart-data goes on.
    (The 2-rank checkpoint is made from a 1-rank one: the same files, its meta saying 2 ranks.)"""
    import shutil

    common = ["--set", "train.ckpt_every=1"]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=1")
    folder = latest(out)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "world": 2}))
    shutil.copy(folder / "rank_0.pt", folder / "rank_1.pt")
    argv = ["rectify", "--preset", "tiny", "--data", str(train_shards), "--out", str(out), "--set",
            "data.num_workers=0", "--set", "train.sample_every=0", *common, "--set", "train.steps=2", "--resume"]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    assert "pass --restart-data to go on with the weights" in capsys.readouterr().err
    assert main([*argv, "--restart-data"]) == 0
    assert json.loads((latest(out) / "meta.json").read_text())["step"] == 2


def test_a_damaged_checkpoint_says_how_to_resume_from_the_one_before(tmp_path, train_shards, capsys):
    """The newest checkpoint's state cut short (a full disk, a copy interrupted): --resume stops with one
    line naming the file and what to do, and after moving that checkpoint aside resumes from the one before."""
    common = ["--set", "train.global_batch=1", "--set", "train.ckpt_every=1"]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=2")
    newest = latest(out)
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(SystemExit) as stop:
        train("rectify", out, train_shards, *common, "--set", "train.steps=3", "--resume")
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert f"cannot read {state}" in message and f"move {newest} aside" in message
    newest.rename(tmp_path / "aside")
    train("rectify", out, train_shards, *common, "--set", "train.steps=3", "--resume")
    assert f"resumed from {out / 'checkpoints' / 'step_0000001'} at step 1" in capsys.readouterr().out
    assert torch.load(latest(out) / "state.pt", weights_only=False)["step"] == 3


def test_a_damaged_meta_or_config_of_the_newest_checkpoint_is_one_line_naming_it(
    tmp_path, train_shards, monkeypatch, capsys
):
    """An empty meta.json was "error: Expecting value: line 1 column 1 (char 0)", naming no file; a config.yaml
    cut short was a yaml ReaderError traceback (exit 1). Both now name the file and the way on, exit 2,
    before the model is built; so does a state.pt cut short."""
    import training.train as train_module

    common = ["--set", "train.global_batch=1", "--set", "train.ckpt_every=1"]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=1")
    newest = latest(out)
    monkeypatch.setattr(train_module, "initial_model", lambda *a: pytest.fail("the model was built first"))
    config = newest / "config.yaml"
    whole = config.read_bytes()
    state = newest / "state.pt"  # cut short: it was found once the model was built (minutes at full size)
    damages = [(newest / "meta.json", b""), (config, whole[:300]), (config, whole + b"\0" * 8)]
    for path, damage in [*damages, (state, state.read_bytes()[:1000])]:
        kept = path.read_bytes()
        path.write_bytes(damage)
        with pytest.raises(SystemExit) as stop:
            train("rectify", out, train_shards, *common, "--set", "train.steps=2", "--resume")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err, err
        assert f"cannot read {path} (" in err and f"move {newest} aside" in err, err
        path.write_bytes(kept)


def test_a_resume_of_another_stages_run_or_of_other_trained_parameters_is_one_line(
    tmp_path, train_shards, monkeypatch, capsys
):
    """`train decoder --resume` on a rectify run said "state.pt lacks trained parameters [discriminator...]:
    another stage or model?" once the model was built; a resume with another rectify.train_roles was torch's
    "loaded state dict contains a parameter group that doesn't match", another decoder.disc_channels a size
    mismatch traceback. Now the stage and the setting are named before the model is built."""
    import yaml

    import training.train as train_module

    common = ["--set", "train.global_batch=1", "--set", "train.ckpt_every=1"]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=1")
    real = train_module.initial_model
    monkeypatch.setattr(train_module, "initial_model", lambda *a: pytest.fail("the model was built first"))
    roles = ("--set", "rectify.train_roles=[spatial]")
    for stage, extra, message in [
        ("sketch", (), f"the run in {out} is a 'rectify' run, not 'sketch'"),
        ("rectify", roles, "began with rectify.train_roles=['spatial', 'image_kv', 'image_proj'], this one"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train(stage, out, train_shards, *common, *extra, "--set", "train.steps=2", "--resume")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, err
    monkeypatch.setattr(train_module, "initial_model", real)
    config = latest(out) / "config.yaml"  # a config without the setting: said once the state is read
    saved = yaml.safe_load(config.read_text())
    del saved["rectify"]
    config.write_text(yaml.safe_dump(saved))
    with pytest.raises(SystemExit) as stop:
        train("rectify", out, train_shards, *common, *roles, "--set", "train.steps=2", "--resume")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "trained other parameters than this run" in err and "Traceback" not in err


def test_resuming_on_changed_shards_stops_first_and_restart_data_continues(
    tmp_path, train_shards, monkeypatch, capsys
):
    """A curate rerun added a shard: --resume replayed the saved position on another shard order, silently.
    It now stops (one line, before the model is built); --restart-data continues the weights and the step
    and reads the data in a new order."""
    import shutil

    import training.train as train_module

    data = tmp_path / "data"
    shutil.copytree(train_shards / "shards" / "train", data)
    common = ["--set", "train.global_batch=1", "--set", "train.ckpt_every=1"]
    out = train("rectify", tmp_path / "run", data, *common, "--set", "train.steps=1")
    shutil.copy(data / "000000.tar", data / "000002.tar")
    real = train_module.initial_model
    monkeypatch.setattr(train_module, "initial_model", lambda *a: pytest.fail("the model was built first"))
    with pytest.raises(SystemExit) as stop:
        train("rectify", out, data, *common, "--set", "train.steps=2", "--resume")
    assert stop.value.code == 2 and "the shards differ from those" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "initial_model", real)
    train("rectify", out, data, *common, "--set", "train.steps=2", "--resume", "--restart-data")
    rank = torch.load(latest(out) / "rank_0.pt", weights_only=False)
    assert torch.load(latest(out) / "state.pt", weights_only=False)["step"] == 2
    assert rank["data"]["first_epoch"] == 1 and rank["data"]["slots"]["0"]["epoch"] == 1


def test_resume_without_a_checkpoint_stops_before_the_initial_weights_load(
    tmp_path, train_shards, monkeypatch, capsys
):
    """--resume on a fresh --out: one line and exit code 2, before a (10 GB) --init checkpoint is read."""
    import training.train as train_module

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before --resume was checked")

    monkeypatch.setattr(train_module, "initial_model", must_not_build)
    with pytest.raises(SystemExit) as stop:
        train("rectify", tmp_path / "fresh", train_shards, "--resume")
    assert stop.value.code == 2
    assert f"--resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}" in capsys.readouterr().err


def test_resume_given_a_checkpoint_folder_as_out_names_the_run_folder(
    tmp_path, train_shards, monkeypatch, capsys
):
    """--out RUN/checkpoints or RUN/checkpoints/step_N with --resume said only "no checkpoint in
    RUN/checkpoints/checkpoints"; so did `--out checkpoints` typed inside the run folder."""
    step = tmp_path / "run" / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")  # what makes it a complete checkpoint to latest_checkpoint
    monkeypatch.chdir(tmp_path / "run")
    for given in (step.parent, step, Path("checkpoints")):
        with pytest.raises(SystemExit) as stop:
            train("rectify", given, train_shards, "--resume")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"inside the run folder {tmp_path / 'run'}; resume with --out" in err


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_that_all_fail_to_read_stop_the_run_with_one_line(workers, tmp_path, capsys):
    """Every shard unreadable (not tars at all): the run stops with one line naming a shard and why, exit
    code 2, also when the error comes from a DataLoader worker process."""
    bad = tmp_path / "shards"
    bad.mkdir()
    for i in range(2):
        (bad / f"00000{i}.tar").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SystemExit) as stop:
        train(
            "rectify", tmp_path / "run", bad, "--set", f"data.num_workers={workers}", "--set", "train.steps=1"
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2
    assert err.startswith("inbetweener train: error: no shard could be read (")
    assert f"{bad}/00000" in err and "ReadError" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
     ("cuda", "train.device=cuda: no CUDA device is available here")],
)  # fmt: skip
def test_a_device_this_machine_lacks_is_one_line_before_any_work(
    device, message, tmp_path, train_shards, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever run
    with pytest.raises(SystemExit) as stop:
        train("rectify", tmp_path / "run", train_shards, "--set", f"train.device={device}")
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_full_size_preset_without_init_is_refused_unless_from_scratch(
    tmp_path, train_shards, monkeypatch, capsys
):
    """toon-512 from random weights is never what a GPU run wants: stopped before anything is built, unless
    --from-scratch says so."""
    import training.train as train_module

    class Built(Exception):
        pass

    def build(cfg):
        raise Built(cfg.preset)

    monkeypatch.setattr(train_module, "initial_model", build)
    argv = ["sketch", "--preset", "toon-512", "--data", str(train_shards), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "train sketch: preset toon-512 starts from a checkpoint: pass --init" in err
    assert "the rectify stage's exported model.safetensors" in err and "--from-scratch" in err
    with pytest.raises(Built, match="toon-512"):  # past the check, to the model
        main([*argv, "--from-scratch"])


def test_bench_gpu_counts_the_step_as_it_trains():
    """MFU's numerator: the meta-device count equals the count of the same step run on the CPU, and the
    rectify stage's frozen temporal layers cost no weight gradient (training them would count more)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from training import bench_gpu

    def run(case) -> int:
        # attention as the meta device runs it: torch's counter has no formula for the CPU's flash kernel
        # nor for nn.MultiheadAttention's inference fast path (the frozen CLIP image tower's), so the
        # CPU's default paths would leave those FLOPs out; the meta device's count has them
        counter = FlopCounterMode(display=False)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with counter, sdpa_kernel(SDPBackend.MATH):
                batch = bench_gpu._batch(1, bench_gpu.SHAPES["tiny"], torch.device("cpu"))
                case.net(batch)["loss"].backward()
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return counter.get_total_flops()

    case = bench_gpu._build("rectify", "tiny", torch.device("cpu"), checkpointing=False)
    as_trained = run(case)
    assert bench_gpu.count_flops("rectify", "tiny") == as_trained
    frozen = [p for p in case.unet.parameters() if not p.requires_grad]
    assert frozen  # the temporal layers
    for p in frozen:
        p.requires_grad_(True)
    assert run(case) > as_trained


def test_bench_gpu_keeps_timing_when_the_flop_count_fails(monkeypatch, capsys):
    """The count traces the step on the meta device; a GPU machine's older torch failing to must not cost
    the session its timed steps: toon-512 falls back to MODEL.md Appendix E, saying so, any other preset
    to no MFU, and the table prints either."""
    from training import bench_gpu

    def fails(stage: str, preset: str) -> float:
        raise NotImplementedError("aten::some_op has no meta kernel")

    monkeypatch.setattr(bench_gpu, "count_flops", fails)
    full = bench_gpu.model_flops("rectify", "toon-512")
    assert full["value"] == 49.24 and "Appendix E" in full["source"] and "no meta kernel" in full["source"]
    tiny = bench_gpu.model_flops("rectify", "tiny")
    assert tiny["value"] is None and "no MFU" in tiny["source"]
    assert "rectify: model FLOPs from MODEL.md Appendix E" in capsys.readouterr().out
    report = {"device": "cpu", "preset": "tiny", "autocast": "None", "gradient_checkpointing": True,
              "compile": None, "peak_bf16_tflops": None, "matmul_bf16_tflops": None, "rows": [],
              "rectify_tflop_per_clip": tiny,
              "decoder_tflop_per_clip": bench_gpu.model_flops("decoder", "toon-512")}  # fmt: skip
    table = bench_gpu._table(report)
    assert "model FLOPs per rectify clip: unknown, from none: no MFU" in table
    assert "model FLOPs per decoder clip: 113.6 TFLOP, from MODEL.md Appendix E" in table


def test_bench_gpu_caps_a_larger_card_at_an_80gb_cards_memory(monkeypatch):
    """The issue's target is a batch that fits one 80 GB card; a run lent an H200 (140 GiB) must not report
    a batch that fits only there: the allocator is capped at an 80 GB card's share of the larger card,
    and an 80 GB card itself, a cap of 0 or the CPU is left as it is."""
    from types import SimpleNamespace

    from training import bench_gpu

    fractions = []

    def set_fraction(fraction, device=None):
        # torch refuses a device without an index here (the first H200 run of the cap ended so)
        assert isinstance(device, int), device
        fractions.append(fraction)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = torch.device("cuda")  # as the bench's --device cuda gives it

    def card(gib: float) -> None:
        props = SimpleNamespace(total_memory=int(gib * 2**30))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)

    card(139.8)  # an H200
    assert bench_gpu.cap_memory(gpu, bench_gpu.CARD_80GB_GIB) == bench_gpu.CARD_80GB_GIB
    assert fractions == [pytest.approx(bench_gpu.CARD_80GB_GIB / 139.8)]
    assert bench_gpu.cap_memory(gpu, 0) is None
    card(79.6)  # an H100 80GB: nothing to cap
    assert bench_gpu.cap_memory(gpu, bench_gpu.CARD_80GB_GIB) is None
    assert bench_gpu.cap_memory(torch.device("cpu"), bench_gpu.CARD_80GB_GIB) is None
    assert len(fractions) == 1
    assert bench_gpu.parse_args([]).memory_cap_gib == bench_gpu.CARD_80GB_GIB
    with pytest.raises(SystemExit, match="--memory-cap-gib: GiB >= 0"):
        bench_gpu.main(["--memory-cap-gib", "-1", "--device", "cpu", "--preset", "tiny"])
    report = {"device": "NVIDIA H200", "preset": "toon-512", "autocast": "torch.bfloat16",
              "gradient_checkpointing": True, "compile": None, "peak_bf16_tflops": 989.4,
              "matmul_bf16_tflops": None, "memory_cap_gib": bench_gpu.CARD_80GB_GIB,
              "rows": [{"stage": "rectify", "batch": 6, "checkpoint_levels": 0, "s_per_step": 1.0,
                        "samples_per_s": 6.0, "peak_mem_gib": 40.0, "peak_reserved_gib": 44.5}]}  # fmt: skip
    table = bench_gpu._table(report)
    assert "the allocator capped at 79.1 GiB" in table and "| 40.0 (44.5) |" in table


def test_bench_gpu_smoke_mode(tmp_path):
    """The GPU benchmark's CPU smoke mode: the same code path at the tiny preset."""
    from training import bench_gpu

    path = tmp_path / "bench.json"
    assert (
        bench_gpu.main(
            [
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--batches",
                "1,2",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--breakdown",
                "--checkpoint-levels",
                "0,1,none",
                "--cudnn-benchmark",
                "--profile",
                str(tmp_path / "kernels.txt"),
                "--json",
                str(path),
            ]
        )
        == 0
    )
    report = json.loads(path.read_text())
    # each checkpointing choice, then the first again with cuDNN's autotuning (per stage)
    assert [
        (r["stage"], r["batch"], r["checkpoint_levels"], r["cudnn_benchmark"]) for r in report["rows"]
    ] == [
        ("rectify", 1, 0, False),
        ("rectify", 2, 0, False),
        ("rectify", 1, 1, False),
        ("rectify", 2, 1, False),
        ("rectify", 1, None, False),  # none: gradient checkpointing off
        ("rectify", 2, None, False),
        ("rectify", 1, 0, True),
        ("rectify", 2, 0, True),
        ("decoder", 1, 0, False),
        ("decoder", 1, 0, True),
    ]
    assert torch.backends.cudnn.benchmark is False
    profile = (tmp_path / "kernels.txt").read_text()  # one step of the first case under the profiler
    assert profile.startswith("one rectify step at batch 1: wall ") and "aten::convolution" in profile
    table = bench_gpu._table(report)
    assert "| rectify | 1 | none |" in table and "| rectify | 1 | 1 finest |" in table
    rows = {
        (r["stage"], r["batch"]): r
        for r in report["rows"]
        if r["checkpoint_levels"] == 0 and not r["cudnn_benchmark"]
    }
    assert report["rectify_largest_batch"] == 2
    assert all(r["s_per_step"] > 0 and r["tflop_per_step"] > 0 for r in rows.values())
    assert report["rectify_tflop_per_clip"]["value"] == bench_gpu.count_flops("rectify", "tiny") / 1e12
    assert report["rectify_tflop_per_clip"]["appendix_e"] is None  # the table is toon-512's
    # --breakdown: one more step timed by part; every part of the rectify step ran and took time
    parts = rows[("rectify", 1)]["breakdown_s"]
    for part in (
        "VAE encoder (frozen)",
        "CLIP text (frozen)",
        "CLIP image (frozen)",
        "Resampler",
        "UNet forward",
        "backward",
        "clip + AdamW + EMA",
    ):
        assert parts[part] > 0, part
    assert parts["forward, rest"] > -1e-3  # the hooked parts lie inside the forward
    # (no comparison of the by-part step with the timed steps: two walls on a shared machine, CI saw
    # one stalled step take six times the other)
    assert rows[("decoder", 1)]["breakdown_s"]["backward"] > 0


def test_compiled_blocks_train_like_eager_ones():
    """train.compile traces every UNet block with torch.compile; the step computes what eager does.
    ("aot_eager" runs Dynamo and AOTAutograd, the parts that can break, without generating kernels.)"""
    from training import bench_gpu

    device = torch.device("cpu")
    batch = bench_gpu._batch(1, bench_gpu.SHAPES["tiny"], device)
    grads, graphs = [], []
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    for backend in ("", "aot_eager"):
        before = counters["stats"]["unique_graphs"]
        case = bench_gpu._build("rectify", "tiny", device, checkpointing=True, compile=backend)
        torch.manual_seed(1)  # the same noise and timesteps for both
        out = case.net(batch)
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in case.params.items()})
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] == 0 and graphs[1] >= 4  # eager traced nothing; compiled: a graph per block shape
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_every_block_is_compiled_past_dynamos_default_limit():
    """Blocks of one class but different shapes each get their own graph: with Dynamo's default of 8
    graphs per function, the UNet's blocks past the 8th ran eager on a GPU."""
    from torch import nn

    from training.compilation import compile_blocks

    class Block(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.proj = nn.Linear(width, width + 1)

        def forward(self, x):
            return self.proj(x).relu()

    blocks = [Block(w) for w in range(2, 14)]  # 12 shapes
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    assert compile_blocks(blocks, "eager") == len(blocks)
    for w, block in zip(range(2, 14), blocks, strict=True):
        block(torch.randn(3, w))
    assert counters["stats"]["unique_graphs"] - before == len(blocks)


def test_compiled_blocks_keep_static_shapes_across_block_widths_and_decodes():
    """Blocks share their class's forward, so Dynamo's default turns the second width it meets into a
    symbolic-shape recompile (on the H100 most UNet blocks compiled that way). compile_blocks keeps every
    graph static: the tiny dual-reference decoder through a full and a reference (14-frame) decode."""
    from inference.sampler import encode_keyframes
    from training.compilation import compile_blocks
    from training.models.tooncrafter import build_tooncrafter
    from training.models.vae import resnet_blocks

    symbolic: list[bool] = []

    def shapes_of(gm, inputs):
        dims = [d for t in inputs if isinstance(t, torch.Tensor) for d in t.shape]
        symbolic.append(any(isinstance(v, torch.SymInt) for v in [*dims, *inputs]))
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.register_backend(shapes_of, "static_shapes_probe")
    vae = build_tooncrafter("tiny").vae.eval()
    assert compile_blocks(resnet_blocks(vae.decoder), "static_shapes_probe") > 2
    keys = torch.rand(2, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        _, refs = encode_keyframes(
            vae, keys[:1], keys[1:], 16, torch.Generator().manual_seed(0), torch.device("cpu")
        )
        vae.decode_inbetween(
            torch.randn(1, vae.config.embed_dim, 16, 4, 8), refs, clip_length=16, frame_chunk=4
        )
    torch._dynamo.reset()
    assert len(symbolic) > 2 and not any(symbolic)


def test_compile_cache_round_trip_and_bad_files(tmp_path):
    """What torch.compile built is written to one file for the next GPU machine; loading it back works,
    a missing file is no error, a damaged one is named."""
    from training.compilation import load_compile_cache, save_compile_cache

    fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, backend="inductor")
    x = torch.randn(8, 8)
    assert torch.allclose(fn(x), torch.nn.functional.gelu(x) * 2 + 1)
    cache = tmp_path / "gpu" / "compile_cache.xz"
    assert save_compile_cache(cache) == cache.stat().st_size > 0
    assert load_compile_cache(cache) is True
    assert load_compile_cache(tmp_path / "absent.xz") is False
    damaged = tmp_path / "damaged.xz"
    damaged.write_bytes(cache.read_bytes()[:20])
    with pytest.raises(ValueError, match="damaged.xz"):
        load_compile_cache(damaged)

    # A cache larger than what the device tool brings back in one file is split, and joined on loading.
    whole = torch.compiler.save_cache_artifacts()[0]
    size = save_compile_cache(cache, part_bytes=1000)
    parts = [cache, *sorted(cache.parent.glob("compile_cache.xz.*"), key=lambda p: int(p.suffix[1:]))]
    assert len(parts) == -(-size // 1000) > 1 and all(p.stat().st_size <= 1000 for p in parts)
    seen = []
    real_load = torch.compiler.load_cache_artifacts
    torch.compiler.load_cache_artifacts = lambda data: seen.append(data)
    try:
        assert load_compile_cache(cache) is True
    finally:
        torch.compiler.load_cache_artifacts = real_load
    assert seen == [whole]
    parts[-1].unlink()  # a part left behind is a damaged cache, named as such
    with pytest.raises(ValueError, match="compile_cache.xz"):
        load_compile_cache(cache)
    assert save_compile_cache(cache) == cache.stat().st_size  # one file again: the old parts are gone
    assert not list(cache.parent.glob("compile_cache.xz.*"))


def test_unknown_compile_backend_is_named():
    from torch import nn

    from training.compilation import compile_blocks
    from training.engine import adamw

    with pytest.raises(ValueError, match="train.compile"):
        compile_blocks([nn.Linear(2, 2)], "no-such-backend")
    opt = adamw(nn.Linear(2, 2).parameters(), TrainConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] is False and opt.defaults["lr"] == TrainConfig().lr


def test_compile_progress_reports_while_the_block_runs(capsys):
    """A GPU check stopped mid-compile still says how far compiling got: a line every `interval` seconds
    while the block runs, none after it."""
    import time

    from training.compilation import compile_progress

    with compile_progress("rectify batch 6: compiling", interval=0.05):
        time.sleep(0.4)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(line.startswith("rectify batch 6: compiling: ") for line in lines)
    assert all(line.endswith(" graphs so far") for line in lines)
    time.sleep(0.15)
    assert capsys.readouterr().out == ""  # the reporter stopped with the block


def test_wait_for_file_returns_when_the_file_comes_and_gives_up_after_its_limit(tmp_path):
    """How the GPU checks' two benches keep out of each other's timed runs."""
    import threading

    from training.compilation import wait_for_file

    signal = tmp_path / "compiled"
    threading.Timer(0.3, signal.touch).start()
    came = wait_for_file(signal, 30, "test", poll_s=0.05)
    assert came["found"] and 0.2 <= came["waited_s"] < 10
    gone = wait_for_file(tmp_path / "never", 0.3, "test", poll_s=0.05)
    assert not gone["found"] and gone["waited_s"] >= 0.3


def test_a_run_over_an_earlier_one_and_a_resume_that_changes_its_start_are_refused(
    tmp_path, train_shards, dc_checkpoint, capsys, monkeypatch
):
    """A new run into an --out with checkpoints pruned its own (lower steps) at once and exited 0; a resume
    without the --init the run began with trained on random frozen weights; a checkpoint renamed aside
    (step_N.bad) was resumed from again. All said now, before the model is built."""
    import training.train as train_module

    common = ["--set", "train.global_batch=1", "--set", "train.ckpt_every=1", "--init", str(dc_checkpoint)]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=2")
    real = train_module.initial_model
    monkeypatch.setattr(train_module, "initial_model", lambda *a: pytest.fail("the model was built first"))
    for argv, message in [
        (
            (*common, "--set", "train.steps=1"),
            "holds the checkpoints of an earlier run (latest step_0000002)",
        ),
        (("--set", "train.steps=3", "--resume"), f"began with train.init_checkpoint='{dc_checkpoint}'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train("rectify", out, train_shards, *argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # without --preset tiny: not "pass --init (DynamiCrafter)"
        main(["rectify", "--data", str(train_shards), "--out", str(out), "--resume"])
    assert stop.value.code == 2 and "resume with --preset tiny" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "initial_model", real)
    newest = latest(out)
    (out / "checkpoints" / "latest").unlink()
    newest.rename(newest.with_name(newest.name + ".bad"))  # damaged, moved aside by its name
    sets = ["--set", "train.steps=3", "--set", "train.weight_decay=0.5", "--set", "train.beta1=0.5"]
    train("rectify", out, train_shards, *common, *sets, "--resume")
    assert "resumed from " + str(out / "checkpoints" / "step_0000001") in capsys.readouterr().out
    groups = torch.load(latest(out) / "state.pt", weights_only=False)["optimizers"]["model"]["param_groups"]
    assert all(g["weight_decay"] == 0.5 and tuple(g["betas"]) == (0.5, 0.999) for g in groups)  # applied
    assert (out / "checkpoints" / "step_0000002.bad").is_dir()  # neither resumed from nor pruned


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train=5"], "config section 'train' must be a mapping of settings, got 5"),
        (["train.precision=fp16"], "train.precision must be auto, bf16 or fp32, got 'fp16'"),
        (["rectify.uncond_prob=0.5"], "rectify.uncond_prob must be in [0, 1/3], got 0.5"),
        (["rectify.train_roles=[]"], "rectify.train_roles must be at least one role"),
        (["train.lr=.inf"], "train.lr must be > 0 and finite"),
        # was said once the model was built (minutes at full size), the run's folder taken
        (["train.compile=inductr"], "train.compile: unknown torch.compile backend 'inductr'"),
        # 64x52 crashed in the UNet (a skip of another size); 70 rows lost 6 in the VAE, unsaid
        (["data.width=52"], "data.width must be a multiple of 32 (the tiny model's VAE and UNet"),
        (["data.height=70"], "data.height must be a multiple of 32"),
        (["train.preset=huge"], "train.preset must be one of tiny, toon-512, got 'huge'"),
        (["train.seed=-5"], "train.seed must be >= 0, got -5"),  # numpy's traceback in the loader
        (["train.sample_steps=2000"], "train.sample_steps must be in 1..1000 (the schedule's timesteps)"),
    ],
    ids=[
        "section-value",
        "precision",
        "uncond",
        "no-roles",
        "inf-lr",
        "compile-backend",
        "width",
        "height",
        "preset",
        "seed",
        "sample-steps",
    ],
)
def test_settings_that_crashed_or_trained_wrongly_are_one_line(sets, message, tmp_path, train_shards, capsys):
    with pytest.raises(SystemExit) as stop:
        train("rectify", tmp_path / "run", train_shards, *[a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # said before the run takes its folder


def test_an_eval_size_is_not_checked_for_a_run_that_does_not_evaluate():
    from training.run_config import parse_args, resolve_config

    args = ["decoder", "--out", "x", "--set", "decoder.eval_size=20", "--set", "train.eval_every=0"]
    assert resolve_config(parse_args(args)).decoder.eval_size == 20


@pytest.mark.parametrize(
    ("stage", "setting", "message"),
    [
        ("decoder", "decoder.lpips_net=resnet", "decoder.lpips_net must be one of alex, vgg, got 'resnet'"),
        ("decoder", "decoder.eval_lpips_net=squeeze", "decoder.eval_lpips_net must be one of alex, vgg"),
        (
            "sketch",
            "sketch.extractor=canny",
            "sketch.extractor must be auto, anime2sketch or xdog, got 'canny'",
        ),
        ("decoder", "decoder.disc_channels=0", "decoder.disc_channels must be >= 1, got 0"),  # conv traceback
        # at the first eval, after training: 0, or sizes SSIM's window or LPIPS' strides do not take
        (
            "decoder",
            "decoder.eval_size=0",
            "decoder.eval_size must be >= 31 (the smallest frame LPIPS (alex)",
        ),
        ("decoder", "decoder.eval_size=30", "decoder.eval_size must be >= 31"),
        ("decoder", "decoder.l1_weight=-1", "decoder.l1_weight must be >= 0, got -1.0"),  # trained silently
        ("rectify", "rectify.train_roles=[spatail]", "rectify.train_roles must be roles of ["),  # model built
    ],
    ids=[
        "lpips-net",
        "eval-lpips-net",
        "extractor",
        "disc-channels",
        "eval-size",
        "eval-size-30",
        "l1-weight",
        "roles",
    ],
)
def test_stage_settings_are_checked_before_any_work(stage, setting, message, tmp_path, train_shards, capsys):
    """The LPIPS nets, no discriminator channels, a zero eval size were tracebacks; the sketch extractor and an
    unknown role were said once the model was built, the run's folder taken; a negative loss weight trained."""
    with pytest.raises(SystemExit) as stop:
        train(stage, tmp_path / "run", train_shards, "--set", setting)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_config_error_names_the_file_or_set_it_comes_from(tmp_path):
    """An unknown key, a wrong type, an empty section or another stage's section in one of several config
    files named no file ("unknown key config.foo"); `--set stpes=3` (no section) said "config section
    'stpes' must be a mapping of settings"."""
    from training.run_config import parse_args, resolve_config

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("train:\n  steps: 3\n")
    for text, message in [
        ("foo:\n  x: 1\n", "unknown key config.foo"),
        ("train:\n  steps: abc\n", "config.train.steps: expected int, got 'abc'"),
        ("train:\n", "config section 'train' must be a mapping of settings, got None"),
        ("decoder:\n  lpips_weight: 0\n", "sections ['decoder'] belong to other stages than 'rectify'"),
        # PyYAML kept the later of two `lr`s silently: which one the run used depended on the order
        ("train:\n  lr: 1.0e-5\n  steps: 3\n  lr: 1.0e-4\n", "found duplicate key 'lr' at line 4, column 3"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError) as error:
            resolve_config(parse_args(["rectify", "--out", "x", "--config", str(good), "--config", str(bad)]))
        assert str(error.value).startswith(f"{bad}: ") and message in str(error.value)
    for item, message in [
        ("stpes=3", "--set: 'stpes' is not a setting: settings are section.key"),
        ("uncond_prob=0.1", "did you mean rectify.uncond_prob?"),
        ("train.stpes=3", "--set: unknown key config.train.stpes; did you mean train.steps?"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            resolve_config(parse_args(["rectify", "--out", "x", "--config", str(good), "--set", item]))


def test_a_run_without_data_says_to_pass_data(tmp_path, capsys):
    """Without --data it said "no training shards (*.tar, *.tar.gz) at : pass --data" (an empty path)."""
    with pytest.raises(SystemExit) as stop:
        main(["rectify", "--preset", "tiny", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "no training data given: pass --data" in err and " at :" not in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoints_config_is_a_config_file_and_a_sketch_encoder_is_named(tmp_path, train_shards, capsys):
    from training.models.sketch import SKETCH_ENCODER_PRESETS, SketchEncoder
    from training.stages.sketch import save_encoder

    out = train(
        "rectify", tmp_path / "run", train_shards, "--set", "train.steps=1", "--set", "train.ckpt_every=1"
    )
    saved = latest(out) / "config.yaml"
    # it names its stage, which was refused as an unknown key
    train("rectify", tmp_path / "again", train_shards, "--config", str(saved))
    with pytest.raises(SystemExit):
        train("decoder", tmp_path / "other", train_shards, "--config", str(saved))
    assert "is the config of a 'rectify' run, not of 'decoder'" in capsys.readouterr().err
    sketch = tmp_path / "sketch_encoder.safetensors"
    save_encoder(SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"]), sketch, {})  # as `train sketch` exports it
    # said by its header before the run takes its folder (it was a 20-line key mismatch after); a
    # checkpoint's training state by its name (it was "no state dict found")
    for given, message in [
        (sketch, f"--init {sketch} is a sketch encoder (what `train sketch` exports)"),
        (latest(out) / "state.pt", "is the training state of a checkpoint, not its model: --init"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train("rectify", tmp_path / "wrong", train_shards, "--init", str(given))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "wrong").exists()


def test_an_init_of_another_model_is_refused_before_the_run_takes_its_folder(
    tmp_path, train_shards, dc_checkpoint, capsys
):
    """An --init whose keys are another network's, or a pickled checkpoint of another preset, was refused
    only when the model was built: after the run had taken its folder (lock, shard index, config printed).
    Its key names and shapes are checked first now; a good --init still trains."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(dc_checkpoint))
    vae_only = tmp_path / "vae_only.safetensors"  # e.g. a VAE or an SD checkpoint given by mistake
    save_file({k: v for k, v in tensors.items() if k.startswith("first_stage_model.")}, str(vae_only))
    pickled = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tensors}, pickled)
    for given, extra, message in [
        (vae_only, [], "missing"),
        (pickled, ["--preset", "toon-512"], "key layout of preset 'tiny', not 'toon-512'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train("rectify", tmp_path / "wrong", train_shards, "--init", str(given), *extra)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and str(given) in err, err
        assert not (tmp_path / "wrong").exists()
    out = train("rectify", tmp_path / "good", train_shards, "--init", str(dc_checkpoint))
    assert (out / "checkpoints" / "latest").is_file()


def test_an_init_without_its_config_names_its_preset_and_a_checkpoint_folder_is_taken(
    tmp_path, dc_checkpoint
):
    """A pickled tiny checkpoint (no embedded config) under the default preset was a wall of shape
    mismatches; `--init runs/x/checkpoints/step_N` (the folder the done: line prints) was "not found"."""
    from safetensors.torch import load_file

    from training.checkpoint import CheckpointError, load_model
    from training.run_config import parse_args, resolve_config

    pickled = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(dc_checkpoint))}, pickled)
    with pytest.raises(
        CheckpointError, match=r"key layout of preset 'tiny', not 'toon-512': give preset tiny"
    ):
        load_model(pickled, preset="toon-512")
    folder = tmp_path / "step_0000002"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(dc_checkpoint.read_bytes())
    args = parse_args(["rectify", "--out", str(tmp_path / "o"), "--init", str(folder)])
    assert resolve_config(args).train.init_checkpoint == str(folder / "model.safetensors")
    # `latest` is resolved to its step now: recorded as a pointer, a resume would start from a later step
    (tmp_path / "latest").write_text("step_0000002\n")
    args = parse_args(["rectify", "--out", str(tmp_path / "o"), "--init", str(tmp_path / "latest")])
    assert resolve_config(args).train.init_checkpoint == str(folder / "model.safetensors")


def test_an_init_given_by_set_or_a_config_file_is_recorded_as_the_file_it_names(
    tmp_path, dc_checkpoint, monkeypatch
):
    """--init's `latest` pointer, checkpoint folder and relative path were resolved, train.init_checkpoint
    given by --set or a config file was recorded as given: the pointer would name another step at the
    resume, and a resume with the equivalent --init was refused ("began with ...latest")."""
    from training.run_config import parse_args, resolve_config

    folder = tmp_path / "step_0000002"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(dc_checkpoint.read_bytes())
    (tmp_path / "latest").write_text("step_0000002\n")
    config = tmp_path / "init.yaml"
    config.write_text("train:\n  init_checkpoint: latest\n")
    monkeypatch.chdir(tmp_path)
    for extra in (["--set", "train.init_checkpoint=latest"], ["--set", "train.init_checkpoint=step_0000002"],
                  ["--config", str(config)], ["--init", "latest"]):  # fmt: skip
        run = resolve_config(parse_args(["rectify", "--out", "o", *extra]))
        assert run.train.init_checkpoint == str(folder / "model.safetensors"), extra


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, train_shards, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as stop:
        train("rectify", tmp_path / "afile" / "run", train_shards)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--out {tmp_path / 'afile' / 'run'}: cannot write there" in err


def test_a_resume_names_its_init_by_any_path_and_a_refused_run_leaves_no_folder(
    tmp_path, train_shards, dc_checkpoint, monkeypatch, capsys
):
    """The run began with --init models/dc.safetensors: a resume with the absolute path, or from another
    folder, named the same file and was refused."""
    import shutil

    (tmp_path / "models").mkdir()
    shutil.copy(dc_checkpoint, tmp_path / "models" / "dc.safetensors")
    monkeypatch.chdir(tmp_path)
    common = ["--set", "train.global_batch=1", "--set", "train.ckpt_every=1"]
    out = train(
        "rectify",
        tmp_path / "run",
        train_shards,
        *common,
        "--set",
        "train.steps=1",
        "--init",
        "models/dc.safetensors",
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = ["--init", str(tmp_path / "models" / "dc.safetensors"), "--set", "train.steps=2", "--resume"]
    train("rectify", out, train_shards, *common, *again)
    assert torch.load(latest(out) / "state.pt", weights_only=False)["step"] == 2
    # a run begun by older code recorded the checkpoint folder it was given, not the file in it: the resume
    # with that folder was refused ("began with .../step_0000002, this one has .../model.safetensors")
    folder = tmp_path / "models" / "step_0000002"
    folder.mkdir()
    (tmp_path / "models" / "dc.safetensors").rename(folder / "model.safetensors")
    saved = latest(out) / "config.yaml"
    saved.write_text(saved.read_text().replace(str(tmp_path / "models" / "dc.safetensors"), str(folder)))
    assert f"init_checkpoint: {folder}\n" in saved.read_text()
    train("rectify", out, train_shards, *common, "--init", str(folder), "--set", "train.steps=3", "--resume")
    assert torch.load(latest(out) / "state.pt", weights_only=False)["step"] == 3
    # or the `latest` pointer of the run it started from: which step it named then is unknown (following
    # it now took a later step's weights, said nowhere); a step of that run is taken, said, another refused
    (tmp_path / "models" / "latest").write_text("step_0000002\n")
    saved = latest(out) / "config.yaml"
    recorded = f"init_checkpoint: {folder / 'model.safetensors'}\n"
    assert recorded in saved.read_text()
    saved.write_text(
        saved.read_text().replace(recorded, f"init_checkpoint: {tmp_path / 'models' / 'latest'}\n")
    )
    elsewhere = tmp_path / "elsewhere" / "dc.safetensors"
    elsewhere.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(SystemExit):
        train(
            "rectify",
            out,
            train_shards,
            *common,
            "--init",
            str(elsewhere),
            "--set",
            "train.steps=4",
            "--resume",
        )
    assert "resume with --init the step folder of" in capsys.readouterr().err
    train("rectify", out, train_shards, *common, "--init", str(folder), "--set", "train.steps=4", "--resume")
    said = capsys.readouterr().out
    assert f"the run began from {tmp_path / 'models' / 'latest'}, a pointer to the newest checkpoint" in said
    with pytest.raises(SystemExit):
        train("rectify", tmp_path / "fresh", train_shards, "--set", "train.lr=-1")
    assert "train.lr must be" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_ctrl_c_says_how_to_go_on_from_where_the_run_is(tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first checkpoint recommended a --resume that then failed ('no checkpoint')."""
    from training import train as train_module

    def interrupted(argv, held):
        train_module._RUN_OUT.append(tmp_path / "run")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_main", interrupted)
    assert main(["rectify", "--out", str(tmp_path / "run")]) == 130
    assert (
        "no checkpoint was written yet: run the same command again (without --resume)"
        in capsys.readouterr().err
    )
    step = tmp_path / "run" / "checkpoints" / "step_0000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    assert main(["rectify", "--out", str(tmp_path / "run")]) == 130
    assert f"run it again with --resume to go on from {step}" in capsys.readouterr().err


def test_ctrl_c_mid_run_ends_with_its_line_not_the_progress_bar(tmp_path, train_shards, monkeypatch, capsys):
    """Ctrl-C in the loop: the progress bar was closed (redrawn) after the line saying how to go on."""
    from training import train as train_module

    real, calls = train_module._next_batch, []

    def interrupted(batches, bar):
        calls.append(1)
        if len(calls) > 4:  # in step 3 (2 micro-batches a step), after the checkpoint of step 2
            raise KeyboardInterrupt
        return real(batches, bar)

    monkeypatch.setattr(train_module, "_next_batch", interrupted)
    argv = ["rectify", "--preset", "tiny", "--data", str(train_shards), "--out", str(tmp_path / "run"),
            "--set", "data.num_workers=0", "--set", "train.sample_every=0", "--set", "train.ckpt_every=2"]  # fmt: skip
    assert main(argv) == 130
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last.startswith("inbetweener train: interrupted; run it again with --resume"), last


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_nothing_half_written(
    tmp_path, train_shards, capsys, monkeypatch
):
    """A full disk: torch.save's 'unexpected pos' traceback, a half-written .step_N.tmp of gigabytes left,
    and the --resume after it died in the lock's own write. One line now naming the disk and the intact
    checkpoint; the half-written folder removed (and a killed run's, at the next start)."""
    import collections

    from training import run_checkpoints

    common = ["--set", "train.ckpt_every=1"]
    out = train("rectify", tmp_path / "run", train_shards, *common, "--set", "train.steps=1")
    stale = out / "checkpoints" / ".step_0000009.tmp"
    stale.mkdir()  # a run killed while writing
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if Path(path).name == "state.pt":
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 1474816 vs 1474768"
            )
        return real_save(obj, path, *args, **kwargs)

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(run_checkpoints.torch, "save", full_disk)
    monkeypatch.setattr(run_checkpoints.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    argv = ["rectify", "--preset", "tiny", "--data", str(train_shards), "--out", str(out), "--set",
            "data.num_workers=0", "--set", "train.sample_every=0", *common, "--set", "train.steps=2", "--resume"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint step_0000002" in err and "no space left on its disk (1 MiB free)" in err
    assert "step_0000001, is intact: free space, then --resume" in err
    assert not list((out / "checkpoints").glob(".step_*"))
