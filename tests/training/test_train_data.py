"""Training data, parameter roles and run configs: the parts of `inbetweener train` that need no training.

Shards are written by tests/training/conftest.py with tarfile + PyAV in the curate job's format (no Ray).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training import data, roles
from training.shard_samples import SampleError, _decode_frames, cover_crop, decode_window
from training.shards import (
    DataError,
    check_shards,
    iter_tar_samples,
    list_shards,
    open_shard,
    split_dirs,
    write_shard,
)


def windows_of(shards: list[str], cfg: data.DataConfig, batch: int, count: int, state=None):
    loader = data.make_loader(shards, cfg, batch, seed=5, state=state)
    it = iter(loader)
    out = []
    for _ in range(count):
        b = next(it)
        loader.dataset.state.consume(b)
        out.append(b)
    return out, loader.dataset.state


def test_window_is_16_frames_at_320x512_with_stride_condition(tmp_path):
    from conftest import clip_sample, write_shard

    write_shard(tmp_path / "000000.tar", [clip_sample("big", 60, (512, 320), 3, caption="a ball")])
    cfg = data.DataConfig(num_workers=0)  # defaults: 16 frames at 320x512, stride 1..6, fs = fps // stride
    with open(tmp_path / "000000.tar", "rb") as f:
        sample = next(iter_tar_samples(f))
    strides = set()
    frames, _ = _decode_frames(sample["mp4"], 59)
    for seed in range(8):
        w = decode_window(sample, cfg, np.random.default_rng(seed))
        assert w["video"].shape == (3, 16, 320, 512) and w["video"].dtype == torch.uint8
        assert 1 <= w["stride"] <= min(6, 59 // 15)
        assert w["start"] >= 0 and w["start"] + 15 * w["stride"] < 60  # where the window lies in the clip
        for i in (0, 15):  # its first and last frames are the clip's frames there
            clip_frame = torch.from_numpy(frames[w["start"] + i * w["stride"]].to_ndarray(format="rgb24"))
            assert torch.equal(w["video"][:, i], clip_frame.permute(2, 0, 1))
        assert w["fs"] == 24 // w["stride"] and w["caption"] == "a ball"
        strides.add(w["stride"])
    assert len(strides) > 1  # the stride is drawn
    batch = data.collate([w, w])
    assert torch.equal(batch["first"], batch["video"][:, :, 0]) and torch.equal(
        batch["last"], batch["video"][:, :, -1]
    )


def test_cover_crop_policy_never_pads():
    """Scale to cover 320x512, then centre crop: a 4:3 frame is cropped top and bottom, never padded."""
    frame = torch.zeros(2, 480, 640, 3, dtype=torch.uint8)
    frame[:, :, :, 0] = 200  # a flat red frame
    frame[:, 240, :, 1] = 255  # one green row in the middle
    out = cover_crop(frame, 320, 512, "center", None)  # [3, t, 320, 512]
    assert out.shape == (3, 2, 320, 512)
    assert (out[0] == 200).all()  # no black border anywhere
    assert out[1, :, 155:165].max() > 100 and out[1, :, :100].max() == 0  # the middle row stays in the middle
    same = cover_crop(torch.full((1, 320, 512, 3), 7, dtype=torch.uint8), 320, 512, "center", None)
    assert (same == 7).all()  # curated clips (already 512x320) pass through unchanged


def test_shard_specs(train_shards: Path, tmp_path: Path):
    train_dir = train_shards / "shards" / "train"
    expected = [str(p) for p in sorted(train_dir.glob("*.tar"))]
    assert split_dirs(str(train_shards)) == (str(train_dir), str(train_shards / "shards" / "eval"))
    out = (
        tmp_path / "OUT"
    )  # a curate output: its manifest (what interpolate and evaluate take) names its shards
    (out / "shards" / "train").mkdir(parents=True)
    (out / "manifest.parquet").write_bytes(b"PAR1")
    # copied to the training machine without its eval split: no eval shards (a traceback before)
    assert split_dirs(str(out / "manifest.parquet")) == (str(out / "shards" / "train"), "")
    (out / "shards" / "eval").mkdir()
    assert (
        split_dirs(str(out / "manifest.parquet"))
        == split_dirs(str(out))
        == (
            str(out / "shards" / "train"),
            str(out / "shards" / "eval"),
        )
    )
    with pytest.raises(ValueError, match="is the held-out eval split of a curate output"):
        split_dirs(str(out / "shards" / "eval"))  # training on it would leak the eval clips
    (out / "shards" / "train").rename(out / "shards" / "train_elsewhere")  # the eval split alone, in its OUT
    with pytest.raises(ValueError, match="is the held-out eval split of a curate output"):
        split_dirs(str(out / "shards" / "eval"))
    (out / "shards" / "train_elsewhere").rename(out / "shards" / "train")
    assert list_shards(str(train_dir)) == expected
    assert list_shards(str(train_dir / "*.tar")) == expected
    assert list_shards(str(train_dir / "{000000..000001}.tar")) == expected
    (tmp_path / "list.txt").write_text("\n".join(expected) + "\n")
    assert list_shards(str(tmp_path / "list.txt")) == expected
    # relative entries are relative to the list file's folder (they were taken from the working directory)
    (train_dir / "rel.txt").write_text("\n".join(Path(e).name for e in expected) + "\n")
    assert list_shards(str(train_dir / "rel.txt")) == expected
    # a file:// URL is its local path, with or without the trailing slash (fsspec lists neither folder)
    assert list_shards(f"file://{train_dir}/") == list_shards(f"file://{train_dir}") == expected
    assert split_dirs(f"file://{train_shards}") == split_dirs(str(train_shards))
    # URLs and pipes stream the same samples as local files
    for url in (f"file://{expected[0]}", f"pipe:cat {expected[0]}"):
        with open_shard(url) as stream:
            keys = [s["__key__"] for s in iter_tar_samples(stream)]
        assert keys == ["clip000", "clip001", "clip002"]


def test_stream_resumes_at_the_same_sample_with_workers(train_shards: Path):
    """Batches after a saved position equal those of an uninterrupted stream (2 workers, odd split point:
    the resumed loader must rotate its workers), across an epoch boundary."""
    shards = list_shards(str(train_shards / "shards" / "train"))
    cfg = data.DataConfig(frames=4, height=32, width=48, num_workers=2, shuffle_buffer=3)
    whole, _ = windows_of(shards, cfg, 1, 9)
    head, state = windows_of(shards, cfg, 1, 5)
    state = data.DataState.from_dict(state.to_dict())  # as stored in a checkpoint
    tail, _ = windows_of(shards, cfg, 1, 4, state=state)
    assert [b["key"] for b in head + tail] == [b["key"] for b in whole]
    for a, b in zip(head + tail, whole):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["fs"], b["fs"])
    assert any(b["state"].epoch == 1 for b in whole)  # 9 batches of 6 clips cross into epoch 1


def test_corrupt_samples_and_shards_are_skipped_and_counted(corrupt_shards: Path):
    shards = list_shards(str(corrupt_shards))
    cfg = data.DataConfig(
        frames=4, height=32, width=48, num_workers=0, shuffle_buffer=2, shuffle_shards=False
    )
    batches, state = windows_of(shards, cfg, 2, 10)  # more than one epoch of the readable clips
    keys = {k for b in batches for k in b["key"]}
    assert "fine" in keys and "broken" not in keys and "short" not in keys
    skipped = state.skipped()
    assert skipped["corrupt"] >= 1 and skipped["too_short"] >= 1
    assert skipped["bad_shards"] == 2  # the garbage and the truncated tar (read again every epoch)


def test_interpolation_conditioning():
    z = torch.randn(2, 4, 16, 5, 8)
    c = data.interp_concat(z)
    assert torch.equal(c[:, :, 0], z[:, :, 0]) and torch.equal(c[:, :, -1], z[:, :, -1])
    assert (c[:, :, 1:-1] == 0).all()
    torch.manual_seed(0)
    text, image = data.conditioning_dropout(200_000, 0.05)
    rates = [(text & ~image).float().mean(), (text & image).float().mean(), (~text & image).float().mean()]
    for rate in rates:  # text only, both, image only: 5 % each (DynamiCrafter's uncond_prob 0.05)
        assert abs(float(rate) - 0.05) < 0.003
    assert abs(float((~text & ~image).float().mean()) - 0.85) < 0.004


def test_roles_of_toon512_match_the_reference_counts():
    """MODEL.md 5.4: temporal 545.32 M frozen; rectify trains 942.3 M (spatial + image K/V + projector)."""
    from training.models.tooncrafter import ToonCrafter, tooncrafter_config

    with torch.device("meta"):
        model = ToonCrafter(tooncrafter_config("toon-512"))
    roles.set_trainable(model, roles.STAGE_ROLES["rectify"])
    table = {r: (n, trained) for r, _, n, trained in roles.role_table(model)}
    assert table["temporal_conv"] == (266_891_520, False)
    assert table["temporal_attention"] == (272_850_880, False)
    assert table["init_attention"] == (5_580_736, False)
    assert table["image_kv"] == (25_559_040, True)
    assert table["spatial"] == (867_972_804, True)
    assert table["image_proj"] == (48_787_456, True)
    assert sum(n for n, t in table.values() if t) == 942_319_300
    assert not any(t for r, (_, t) in table.items() if r.startswith(("vae", "clip")))


def test_roles_from_names_agree_with_module_types():
    from training.models.attention import TemporalTransformer
    from training.models.tooncrafter import build_tooncrafter
    from training.models.unet import TemporalConvBlock

    model = build_tooncrafter("tiny")
    by_type = {}
    for name, module in model.unet.named_modules():
        kind = None
        if isinstance(module, TemporalConvBlock):
            kind = "temporal_conv"
        elif isinstance(module, TemporalTransformer):
            kind = "init_attention" if name.startswith("init_attn") else "temporal_attention"
        if kind:
            for pname, _ in module.named_parameters(prefix=f"model.diffusion_model.{name}"):
                by_type[pname] = kind
    for name, _ in model.named_parameters():
        if name.startswith("model.diffusion_model."):
            expected = by_type.get(name, "image_kv" if "_ip." in name else "spatial")
            assert roles.role(name) == expected, name


def test_run_config_layers_and_errors(tmp_path: Path):
    from training import config_overrides
    from training.run_config import parse_args, resolve_config

    for stage, lr, batch, steps in (
        ("rectify", 1e-6, 32, 50_000),
        ("decoder", 4.5e-6, 16, 60_000),
        ("sketch", 5e-5, 32, 50_000),
    ):
        repo_config = Path(__file__).resolve().parents[2] / "configs" / f"{stage}.yaml"
        for args in (["--out", "x"], ["--out", "x", "--config", str(repo_config)]):
            run = resolve_config(parse_args([stage, *args]))
            assert (run.train.lr, run.train.global_batch, run.train.steps) == (lr, batch, steps)
    run = resolve_config(
        parse_args(
            ["rectify", "--out", "x", "--preset", "tiny", "--set", "train.lr=3e-4", "--set", "data.frames=8"]
        )
    )
    assert (
        run.train.lr == 3e-4 and run.data.frames == 8 and run.train.steps == 20
    )  # preset profile, then --set
    (tmp_path / "bad.yaml").write_text("train:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ValueError, match="unknown key config.train.learning_rate; known keys"):
        resolve_config(parse_args(["rectify", "--out", "x", "--config", str(tmp_path / "bad.yaml")]))
    with pytest.raises(ValueError, match=r"config.train.stepz; did you mean train.steps\? Known keys"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.stepz=3"]))
    with pytest.raises(ValueError, match=r"config.trian; did you mean train\? Known keys"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "trian.steps=3"]))
    for setting, message in [
        ("train.micro_batch=0", "train.micro_batch must be >= 1, got 0"),
        ("train.lr=-1", "train.lr must be > 0 and finite, got -1.0"),
        ("train.ema_decay=2", r"train.ema_decay must be in \[0, 1\)"),
        ("data.frames=0", "data.frames must be >= 2"),
        ("data.stride_min=7", r"data.stride_min must be in 1..data.stride_max \(6\), got 7"),
        ("data.crop=middle", "data.crop must be center or random, got 'middle'"),
        ("train.global_batch=3", "train.global_batch 3 is not a multiple of train.micro_batch 2"),
    ]:  # each used to fail deep in the loader or the optimizer (or, like the EMA decay, not at all)
        extra = ["--set", "train.micro_batch=2"] if setting.startswith("train.global_batch") else []
        with pytest.raises(ValueError, match=message):
            resolve_config(parse_args(["rectify", "--out", "x", "--set", setting, *extra]))
    with pytest.raises(ValueError, match="config.data.frames: expected int"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "data.frames=many"]))
    with pytest.raises(ValueError, match="other stages"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "decoder.lpips_weight=0"]))
    with pytest.raises(ValueError, match="train.checkpoint_levels must be >= 0"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.checkpoint_levels=-1"]))
    run = resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.checkpoint_levels=2"]))
    assert run.train.checkpoint_levels == 2
    with pytest.raises(ValueError, match=r"train.recompute_budget must be in \[0, 1\]"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.recompute_budget=1.5"]))
    with pytest.raises(ValueError, match="recompute_budget needs train.compile"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.recompute_budget=0.5"]))
    budget = ["--set", "train.recompute_budget=0.5", "--set", "train.compile=inductor"]
    assert resolve_config(parse_args(["rectify", "--out", "x", *budget])).train.recompute_budget == 0.5
    assert config_overrides.parse_set(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    # a YAML typo: one line naming the file (or the --set item) and where, not PyYAML's traceback
    (tmp_path / "typo.yaml").write_text("train:\n  lr: [1e-5\n")
    with pytest.raises(ValueError, match=r"typo.yaml: not a valid YAML config \(.* at line 3, column 1\)"):
        resolve_config(parse_args(["rectify", "--out", "x", "--config", str(tmp_path / "typo.yaml")]))
    with pytest.raises(ValueError, match="absent.yaml: cannot read the config file"):
        resolve_config(parse_args(["rectify", "--out", "x", "--config", str(tmp_path / "absent.yaml")]))
    with pytest.raises(ValueError, match=r"--set train.lr=\[1,: the value is not valid YAML"):
        config_overrides.parse_set(["train.lr=[1,"])


def test_help_has_an_example(capsys):
    from training.train import main

    with pytest.raises(SystemExit) as exc:
        main(["rectify", "--help"])
    assert exc.value.code == 0
    assert "inbetweener train rectify --preset tiny --data" in capsys.readouterr().out


def test_data_position_mismatch_is_refused(train_shards: Path):
    shards = list_shards(str(train_shards / "shards" / "train"))
    cfg = data.DataConfig(num_workers=2)
    with pytest.raises(ValueError, match="same"):
        data.ClipStream(shards, cfg, 1, 0, state=data.DataState(world=1, workers=4))


def test_bad_inputs_stop_with_one_line_and_code_2(tmp_path, train_shards, capsys):
    """No traceback for what the user gave: an empty or missing shard folder, a bad setting, a file that
    is not a checkpoint; each is named before any training starts."""
    from training.train import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    import torch

    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:2000])
    cases = {
        "no training shards (*.tar, *.tar.gz) at": ["--data", str(tmp_path / "empty")],
        "no shards at": ["--data", str(tmp_path / "missing")],
        "train.float8 must be one of": ["--data", str(train_shards), "--set", "train.float8=fp4"],
        "notes.ckpt": ["--data", str(train_shards), "--init", str(tmp_path / "notes.ckpt")],
        "checkpoint not found: ": ["--data", str(train_shards), "--init", str(tmp_path / "absent.ckpt")],
        "cut.ckpt (": ["--data", str(train_shards), "--init", str(tmp_path / "cut.ckpt")],  # half a download
        "notes.ckpt is not a shard (.tar, .tar.gz)": ["--data", str(tmp_path / "notes.ckpt")],
        "notes.ckpt is a file; give a folder for the run": [
            "--data",
            str(train_shards),
            "--out",
            str(tmp_path / "notes.ckpt"),
        ],
        "a manifest without OUT/shards/train beside it": [
            "--data",
            str(tmp_path / "lone" / "manifest.parquet"),
        ],
    }
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "manifest.parquet").write_bytes(b"PAR1")
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(["rectify", "--preset", "tiny", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "inbetweener train: error: " in err and message in err, (message, err)
        # refused before the run takes its folder (a missing --init left .lock and train_index.parquet)
        assert not (tmp_path / "out").exists(), message


# --- real-world shards: partly bad, cut short, remote, changed between runs -------------------------------------

SMALL = dict(frames=4, height=32, width=48, shuffle_buffer=2)


@pytest.fixture(scope="module")
def half_bad(tmp_path_factory, train_shards: Path) -> Path:
    """Two good shards, a 0-byte shard (an interrupted upload) and a shard whose clips are all too short."""
    import shutil

    from tests.training.conftest import clip_sample

    out = tmp_path_factory.mktemp("half_bad")
    for p in sorted((train_shards / "shards" / "train").glob("*.tar")):
        shutil.copy(p, out / p.name)
    (out / "000002.tar").write_bytes(b"")
    write_shard(out / "000003.tar", [clip_sample(f"short{i}", 3, (64, 40), i) for i in range(2)])
    return out


def test_an_epoch_that_deals_one_worker_only_bad_shards_does_not_stop_the_run(half_bad: Path):
    """Shards are dealt to workers anew each epoch; where both bad ones went to one worker, that worker's
    epoch held no usable clip and the run stopped ("no usable clip in a whole epoch"), at the same step on
    every --resume. Now that worker reads on into the next epoch; the run stops only when no shard gives data."""
    shards = list_shards(str(half_bad))
    slots = 2
    together = []  # epochs whose deal gives one slot both bad shards
    for epoch in range(8):
        order = [shards[i] for i in np.random.default_rng([5, epoch]).permutation(len(shards))]
        for slot in range(slots):
            dealt = {Path(s).name for s in data.slot_shards(order, slot, slots)[0]}
            if dealt == {"000002.tar", "000003.tar"}:
                together.append(epoch)
    assert together, "the seed deals no such epoch: pick another"
    cfg = data.DataConfig(**SMALL, num_workers=slots)
    batches, state = windows_of(shards, cfg, 1, 30)
    assert max(s.epoch for s in state.slots.values()) > together[0]
    assert {k for b in batches for k in b["key"]} <= {f"clip{i:03d}" for i in range(6)}
    skipped = state.skipped()
    assert skipped["too_short"] >= 2 and skipped["bad_shards"] == 1  # distinct shards, not per epoch
    # more workers than good shards: a worker dealt only the 0-byte shard reads on (it stopped at once)
    write_shard(half_bad / "000003.tar", [])
    windows_of(shards, data.DataConfig(**SMALL, num_workers=4), 1, 6)


def test_no_usable_clip_anywhere_still_stops_with_one_line(tmp_path):
    from tests.training.conftest import clip_sample

    for i in range(3):
        write_shard(tmp_path / f"00000{i}.tar", [clip_sample(f"s{i}", 3, (64, 40), i)])
    shards = list_shards(str(tmp_path))
    with pytest.raises(DataError, match=r"no usable clip in any of the 3 shard\(s\)"):
        windows_of(shards, data.DataConfig(**SMALL, num_workers=0), 1, 1)


def test_a_shard_cut_at_a_member_boundary_is_a_bad_shard(train_shards: Path, tmp_path: Path):
    """tarfile ends quietly where the bytes stop between members: the shard read as whole, its last sample
    without its caption and json, and the rest never counted."""
    import tarfile

    whole = train_shards / "shards" / "train" / "000000.tar"
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    cut = next(m.offset for m in members if m.name == "clip001.json")  # after clip001.mp4, before its json
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut])
    bad: list[str] = []
    samples = list(data._raw_samples([str(tmp_path / "cut.tar")], 0, 1, 0, bad))
    assert [s["__key__"] for s in samples] == ["clip000"]  # clip001 (its mp4 alone) is not yielded
    assert bad == [f"0:{tmp_path / 'cut.tar'}"]
    assert [s["__key__"] for s in data._raw_samples([str(whole)], 0, 1, 0, bad)] == [
        "clip000",
        "clip001",
        "clip002",
    ]


def test_a_pipe_whose_command_fails_is_a_bad_shard(train_shards: Path):
    whole = train_shards / "shards" / "train" / "000000.tar"
    bad: list[str] = []
    samples = list(data._raw_samples([f"pipe:cat {whole}; exit 3"], 0, 1, 0, bad))
    assert len(samples) == 3 and bad == [f"0:pipe:cat {whole}; exit 3"]  # its bytes read; its status counts


def test_a_backends_own_error_type_is_a_bad_shard_and_no_readable_url_stops_first(monkeypatch, train_shards):
    """botocore's NoCredentialsError is no OSError: it crashed the DataLoader worker with a traceback."""

    class NoCredentialsError(Exception):
        pass

    def failing_open(url):
        if url.startswith("s3://"):
            raise NoCredentialsError("Unable to locate credentials")
        return open_shard(url)

    monkeypatch.setattr(data, "open_shard", failing_open)  # the stream's reads
    monkeypatch.setattr("training.shards.open_shard", failing_open)  # check_shards' probe
    good = str(train_shards / "shards" / "train" / "000000.tar")
    bad: list[str] = []
    why: dict[str, str] = {}
    samples = list(data._raw_samples(["s3://b/000000.tar", good], 0, 1, 0, bad, why))
    assert len(samples) == 3 and why == {
        "s3://b/000000.tar": "NoCredentialsError: Unable to locate credentials"
    }
    with pytest.raises(ValueError, match=r"cannot read the shards: s3://b/000000.tar: NoCredentialsError"):
        check_shards([f"s3://b/{i:06d}.tar" for i in range(5)])
    check_shards(["s3://b/000000.tar", f"file://{good}"])  # one bad shard among readable ones: no stop


def test_missing_and_held_out_shards_are_named_before_training(train_shards: Path, tmp_path: Path):
    train_dir = train_shards / "shards" / "train"
    with pytest.raises(ValueError, match=r"1 of 3 shards do not exist: .*000009\.tar"):
        check_shards(list_shards(str(train_dir / "{000000..000001}.tar")) + [str(train_dir / "000009.tar")])
    for spec in (
        str(train_shards / "shards" / "*" / "*.tar"),
        str(train_shards / "shards" / "eval" / "000000.tar"),
    ):
        with pytest.raises(ValueError, match=r"eval/000000\.tar is in the held-out eval split"):
            check_shards(list_shards(spec))
    check_shards(list_shards(str(train_dir)))


def test_resuming_on_other_shards_is_refused_unless_the_data_restarts(train_shards: Path, tmp_path: Path):
    """A saved position replayed on another shard list (a curate rerun added shards) silently read another
    order; 0 and 1 workers are one reading slot; --restart-data reads on in an epoch not read before."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(train_shards / "shards" / "train", folder)
    shards = list_shards(str(folder))
    cfg = data.DataConfig(**SMALL, num_workers=1)
    _, state = windows_of(shards, cfg, 1, 3)
    saved = data.DataState.from_dict(state.to_dict())
    saved.check_resumable(shards, 1, 0)  # one slot either way
    shutil.copy(folder / "000000.tar", folder / "000002.tar")
    grown = list_shards(str(folder))
    with pytest.raises(ValueError, match="the shards differ from those the data position was saved on"):
        windows_of(grown, cfg, 1, 1, state=saved)
    with pytest.raises(ValueError, match="--restart-data"):
        saved.check_resumable(shards, 1, 3)
    fresh = saved.restarted()
    batches, after = windows_of(grown, data.DataConfig(**SMALL, num_workers=2), 1, 2, state=fresh)
    assert min(s.epoch for s in after.slots.values()) == max(s.epoch for s in saved.slots.values()) + 1


def test_samples_no_one_foresaw_are_skipped_not_fatal(train_shards: Path):
    """Valid JSON that is no row, and a clip far too wide to crop (a 4000x2 stream asked for 39 GB)."""
    from tests.training.conftest import clip_sample

    sample = clip_sample("odd", 20, (64, 40), 3, caption="a disc")
    tar_like = {"__key__": "odd", "mp4": sample["mp4"], "json": b"null", "txt": b"a disc"}
    assert decode_window(tar_like, data.DataConfig(**SMALL), None)["caption"] == "a disc"
    wide = clip_sample("wide", 20, (640, 8), 3)
    with pytest.raises(SampleError, match=r"wide: a 640x8 clip is too far from the window's aspect"):
        decode_window({"__key__": "wide", "mp4": wide["mp4"]}, data.DataConfig(**SMALL), None)


def test_sparse_clips_on_more_slots_than_shards_do_not_stop_the_run(tmp_path):
    """Fewer shards than slots: each epoch a slot takes other samples of every shard, so one epoch without a
    usable clip says nothing of the next (it stopped a 4-rank run whose shards did have clips)."""
    from tests.training.conftest import clip_sample

    for i in range(3):  # shards of 5, 4 and 3 samples: which slot takes a sample depends on the order
        samples = [clip_sample(f"s{i}{j}", 3, (64, 40), j) for j in range(4 - i)]  # too short for a window
        samples.insert(i, clip_sample(f"ok{i}", 8, (64, 40), 10 + i))
        write_shard(tmp_path / f"00000{i}.tar", samples)
    shards = list_shards(str(tmp_path))
    cfg = data.DataConfig(**SMALL, num_workers=0)
    for rank in range(4):
        batches, _ = windows_of_rank(shards, cfg, rank=rank, world=4, count=4)
        assert all(k.startswith("ok") for b in batches for k in b["key"])


def windows_of_rank(shards, cfg, rank: int, world: int, count: int):
    loader = data.make_loader(shards, cfg, 1, seed=5, rank=rank, world=world)
    it = iter(loader)
    return [next(it) for _ in range(count)], loader.dataset.state


def test_a_fixed_deal_of_bad_shards_names_a_bad_shard_and_the_way_out(half_bad: Path, tmp_path: Path):
    import shutil

    folder = tmp_path / "fixed"
    folder.mkdir()
    for name, src in (
        ("000000.tar", "000000.tar"),
        ("000001.tar", "000002.tar"),
        ("000002.tar", "000001.tar"),
    ):
        shutil.copy(half_bad / src, folder / name)
    write_shard(folder / "000003.tar", [])
    shards = list_shards(str(folder))  # unshuffled, slot 1 of 2 is dealt 000001 (0 bytes) and 000003
    cfg = data.DataConfig(**SMALL, num_workers=2, shuffle_shards=False)
    with pytest.raises(DataError) as stop:
        windows_of(shards, cfg, 1, 4)
    message = str(stop.value)
    assert "found no usable clip in what it was dealt: 2 of 4 shard(s) (the same every epoch" in message
    assert "e.g. " + str(folder / "000001.tar") in message and "data.shuffle_shards=true" in message


def test_a_pipe_command_that_writes_much_to_stderr_does_not_hang(train_shards: Path):
    whole = train_shards / "shards" / "train" / "000000.tar"
    url = f"pipe:head -c 300000 /dev/zero | tr '\\0' x >&2; cat {whole}"  # wget's progress, say
    bad: list[str] = []
    assert len(list(data._raw_samples([url], 0, 1, 0, bad))) == 3 and bad == []
    check_shards([f"pipe:sleep 30; curl -s https://example.com/{i}.tar" for i in range(3)])  # not run
