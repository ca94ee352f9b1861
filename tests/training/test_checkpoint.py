"""Checkpoints: exact round trips in every supported format, readable errors, plain -> dual-reference decoder."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors import safe_open

from training.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    dual_ref_only_keys,
    load_model,
    load_state_dict,
    save_safetensors,
)
from training.checkpoint_files import read_checkpoint
from training.models.tooncrafter import ToonCrafter, ToonCrafterConfig, build_tooncrafter


def _randomised(model: ToonCrafter, seed: int = 0) -> ToonCrafter:
    """Every parameter random (no zero-initialised layer), so that equality checks mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny() -> ToonCrafter:
    return _randomised(build_tooncrafter("tiny"))


def _assert_equal_state(a: ToonCrafter, b: ToonCrafter) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_safetensors_round_trip_is_exact_and_carries_config_and_version(tiny, tmp_path):
    path = save_safetensors(tiny, tmp_path / "tiny.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert ToonCrafterConfig.from_dict(json.loads(meta["inbetweener.config"])) == tiny.cfg
    assert meta["inbetweener.code_version"].startswith("0.1.0")
    loaded = load_model(path)  # config from the file, no preset
    assert loaded.cfg == tiny.cfg
    _assert_equal_state(loaded, tiny)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_lightning_ckpt_round_trip_is_exact(tiny, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1200, "state_dict": tiny.state_dict()}, path)
    _assert_equal_state(load_model(path, preset="tiny"), tiny)


def test_lightning_ckpt_with_pickled_objects_falls_back_with_a_warning(tiny, tmp_path, caplog):
    path = tmp_path / "lightning.ckpt"
    torch.save({"hyper_parameters": argparse.Namespace(lr=1e-5), "state_dict": tiny.state_dict()}, path)
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        loaded = load_model(path, preset="tiny")
    assert "weights_only=False" in caplog.text and str(path) in caplog.text
    _assert_equal_state(loaded, tiny)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        read_checkpoint(path, allow_pickle=False)


def test_truncated_and_foreign_files_fail_clearly_without_unpickling(tiny, tmp_path, caplog):
    """An interrupted download (half a zip) or bytes that are no pickle: a CheckpointError naming the file
    and its size, never torch's internal error, and never the full (code-running) unpickler's retry."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": tiny.state_dict()}, whole)
    cut = tmp_path / "model.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated: the zip directory torch.save writes") as err:
        load_model(cut, preset="tiny")
    assert str(cut) in str(err.value) and f"{cut.stat().st_size:,} bytes" in str(err.value)
    foreign = tmp_path / "notes.ckpt"
    foreign.write_text("an animator's notes, not a checkpoint\n")
    with (
        caplog.at_level(logging.WARNING, logger="training.checkpoint"),
        pytest.raises(CheckpointError, match=f"cannot read {foreign} .*not a torch.save file"),
    ):
        read_checkpoint(foreign)
    assert "weights_only=False" not in caplog.text


def test_deepspeed_module_dict_round_trip_is_exact(tiny, tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    wrapped = {f"_forward_module.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"module": wrapped, "global_steps": 5}, path)
    _assert_equal_state(load_model(path, preset="tiny"), tiny)


def test_plain_state_dict_with_legacy_key_names(tiny, tmp_path):
    path = tmp_path / "weights.pt"
    legacy = {k.replace("fps_embedding.", "framestride_embed."): v for k, v in tiny.state_dict().items()}
    assert any("framestride_embed" in k for k in legacy)
    torch.save(legacy, path)
    _assert_equal_state(load_model(path, preset="tiny"), tiny)


def test_torch_checkpoints_may_carry_their_config(tiny, tmp_path):
    path = tmp_path / "step_100.ckpt"
    torch.save({"state_dict": tiny.state_dict(), "inbetweener_config": tiny.cfg.to_dict()}, path)
    loaded = load_model(path)
    assert loaded.cfg == tiny.cfg
    _assert_equal_state(loaded, tiny)


def test_half_precision_files_load_into_fp32_models(tiny, tmp_path):
    path = save_safetensors(tiny, tmp_path / "tiny-bf16.safetensors", dtype=torch.bfloat16)
    ckpt = read_checkpoint(path)
    assert ckpt.state_dict["image_proj_model.latents"].dtype == torch.bfloat16
    assert ckpt.state_dict["alphas_cumprod"].dtype == torch.float32  # buffers keep their precision
    loaded = load_model(path)
    assert loaded.image_proj_model.latents.dtype == torch.float32
    torch.testing.assert_close(
        loaded.image_proj_model.latents, tiny.image_proj_model.latents, rtol=1e-2, atol=1e-3
    )


def test_a_vae_only_file_is_rejected_with_a_readable_summary(tiny, tmp_path):
    path = tmp_path / "vae.pt"
    torch.save(tiny.first_stage_model.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(path, preset="tiny")
    message = str(info.value)
    assert str(path) in message
    n_vae = len(tiny.first_stage_model.state_dict())
    n_missing = len(tiny.state_dict())
    assert f"{n_missing} missing, {n_vae} unexpected" in message
    assert "model.diffusion_model (" in message and "decoder (" in message  # grouped by part, with counts
    assert "bare `first_stage_model` state dict" in message


def test_shape_mismatches_are_listed(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    del state["image_proj_model.latents"]
    state["image_proj_model.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_model(path, preset="tiny")
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 with another shape" in message
    assert "model.diffusion_model.input_blocks.0.0.weight: file [32, 4, 3, 3], model [32, 8, 3, 3]" in message
    assert "image_proj_model.latents" in message and "image_proj_model.extra" in message


def test_garbage_and_missing_files_fail_clearly(tmp_path):
    garbage = tmp_path / "model.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match=f"cannot read {garbage}"):
        load_model(garbage, preset="tiny")
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="neither a safetensors header nor a PyTorch file"):
        load_model(bad_st, preset="tiny")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.ckpt", preset="tiny")
    no_config = tmp_path / "no_config.pt"
    torch.save({"a": torch.zeros(1)}, no_config)
    with pytest.raises(CheckpointError, match="carries no config"):
        load_model(no_config)


def test_plain_decoder_checkpoint_starts_the_dual_reference_decoder_as_the_plain_one(tmp_path, caplog):
    plain = _randomised(build_tooncrafter("tiny", dual_ref_decoder=False), seed=1)
    path = save_safetensors(plain, tmp_path / "dynamicrafter.safetensors")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        dual = load_model(path, dual_ref_decoder=True)
    added = dual_ref_only_keys(dual.cfg)
    assert f"initialised the {len(added)} tensors" in caplog.text
    dual_state, plain_state = dual.state_dict(), plain.state_dict()
    assert set(dual_state) - set(plain_state) == added
    for key, value in plain_state.items():
        assert torch.equal(dual_state[key], value), key

    # The decoder computes what the plain decoder computes, keyframe features or not.
    video = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior, refs = dual.first_stage_model.encode_video(video)
        z = rearrange(posterior.mean, "b c t h w -> (b t) c h w")
        expected = plain.first_stage_model.decoder(plain.first_stage_model.post_quant_conv(z))
        ours = dual.first_stage_model.decoder(dual.first_stage_model.post_quant_conv(z), refs, 4)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

    # Into an already built (not meta) model, the same happens in place.
    fresh = build_tooncrafter("tiny")
    initialised = load_state_dict(fresh, plain_state, source="plain state dict")
    assert set(initialised) == added


def test_a_dual_reference_file_into_a_plain_model_says_what_to_do(tiny, tmp_path):
    path = save_safetensors(tiny, tmp_path / "toon.safetensors")
    with pytest.raises(CheckpointMismatchError, match="dual_ref_decoder=True"):
        load_model(path, dual_ref_decoder=False)


def test_read_checkpoint_reports_what_it_found(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        read_checkpoint(path)
    path = tmp_path / "dict.pt"
    torch.save({"epoch": 1, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        read_checkpoint(Path(path))


def test_files_as_people_have_them_load(tiny, tmp_path, caplog):
    """A torch.compile'd model's keys (`_orig_mod.`, whole or one part), a Lightning file with its EMA copy
    (`model_ema.*`), a trainer's config object of a library not installed here, a training step folder or a
    DeepSpeed folder given for the file, a safetensors file named .ckpt: each was refused."""
    state = tiny.state_dict()
    compiled = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, compiled)
    _assert_equal_state(load_model(compiled, preset="tiny"), tiny)
    unet = tmp_path / "compiled_unet.ckpt"
    part = "model.diffusion_model."
    torch.save({"state_dict": {k.replace(part, part + "_orig_mod."): v for k, v in state.items()}}, unet)
    _assert_equal_state(load_model(unet, preset="tiny"), tiny)
    ema = tmp_path / "ema.ckpt"
    litema = {"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(7)}
    litema.update(
        {
            "model_ema." + k.removeprefix(part).replace(".", ""): v
            for k, v in state.items()
            if k.startswith(part)
        }
    )
    torch.save({"state_dict": {**state, **litema}}, ema)
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        _assert_equal_state(load_model(ema, preset="tiny"), tiny)
    assert f"{len(litema)} EMA entries (model_ema.*) left out" in caplog.text
    step = tmp_path / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    save_safetensors(tiny, step / "model.safetensors")
    (step.parent / "latest").write_text("step_0000001\n")
    for given in (step, step.parent / "latest"):
        _assert_equal_state(load_model(given), tiny)
    deepspeed = tmp_path / "last.ckpt" / "checkpoint"
    deepspeed.mkdir(parents=True)
    torch.save({"module": state}, deepspeed / "mp_rank_00_model_states.pt")
    _assert_equal_state(load_model(tmp_path / "last.ckpt", preset="tiny"), tiny)
    raw = tmp_path / "ds_save" / "global_step100"  # DeepSpeed's own layout: a tag folder and `latest`
    raw.mkdir(parents=True)
    torch.save({"module": state}, raw / "mp_rank_00_model_states.pt")
    (raw.parent / "latest").write_text("global_step100")
    for given in (raw.parent, raw.parent / "latest", raw):
        _assert_equal_state(load_model(given, preset="tiny"), tiny)
    with pytest.raises(
        CheckpointError, match=r"is a folder without a checkpoint file .*it holds: checkpoints"
    ):
        read_checkpoint(tmp_path)
    named = tmp_path / "renamed.ckpt"
    named.write_bytes((step / "model.safetensors").read_bytes())
    _assert_equal_state(load_model(named), tiny)


def test_a_pickled_object_of_a_library_not_installed_is_a_placeholder(tiny, tmp_path, caplog, monkeypatch):
    import sys
    import types

    library = types.ModuleType("lvdm_not_here")

    class Cfg:
        def __init__(self):
            self.lr = 1e-5

    class AttrDict(dict):  # EasyDict/addict-style hparams: rebuilt by item assignment
        pass

    class Steps(list):  # rebuilt by appends
        pass

    for cls in (Cfg, AttrDict, Steps):
        cls.__module__, cls.__qualname__ = library.__name__, cls.__name__
        setattr(library, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, library.__name__, library)
    path = tmp_path / "trainer.ckpt"
    hparams = {"cfg": Cfg(), "opt": AttrDict(lr=1e-5, betas=[0.9, 0.999]), "milestones": Steps([10, 20])}
    torch.save({"state_dict": tiny.state_dict(), "hyper_parameters": hparams}, path)
    monkeypatch.delitem(sys.modules, library.__name__)
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        _assert_equal_state(load_model(path, preset="tiny"), tiny)
    assert "pickles objects of lvdm_not_here, not installed here" in caplog.text


def test_what_is_not_a_checkpoint_is_named_by_what_it_is(tmp_path):
    lfs = tmp_path / "model.ckpt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 10725445003\n")
    with pytest.raises(CheckpointError, match="a Git LFS pointer, not the weights: run `git lfs pull`"):
        read_checkpoint(lfs)
    page = tmp_path / "page.safetensors"
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(CheckpointError, match="an HTML page"):
        read_checkpoint(page)


def test_an_embedded_config_decides_unless_it_contradicts_the_preset(tiny, tmp_path, caplog):
    """A tiny file with its config trained the tiny model on toon-512's 16x320x512 profile under
    `--preset toon-512` (an info line only); a config from a newer version made the file unloadable."""
    path = save_safetensors(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(
        CheckpointError, match="carries the config of preset 'tiny', not 'toon-512': give preset tiny"
    ):
        load_model(path, preset="toon-512")
    newer = tiny.cfg.to_dict()
    newer["unet"]["future_knob"] = 3
    torch.save({"state_dict": tiny.state_dict(), "inbetweener_config": newer}, tmp_path / "newer.pt")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        _assert_equal_state(load_model(tmp_path / "newer.pt", preset="tiny"), tiny)
    assert "future_knob" in caplog.text and "key layout decides" in caplog.text


def test_a_schedule_stored_in_half_precision_is_recomputed(tiny, tmp_path):
    """A checkpoint cast whole to fp16 held alphas_cumprod 9% off near t = 999, and sampling used it."""
    path = tmp_path / "fp16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in tiny.state_dict().items()}, path)
    loaded = load_model(path, preset="tiny", dtype=None)
    assert loaded.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(loaded.alphas_cumprod, tiny.alphas_cumprod)


def test_a_safetensors_file_whose_first_byte_looks_like_a_pickle_keeps_its_config(tiny, tmp_path):
    """A safetensors file starts with its header's length; for one in 32 files its low byte is 0x80, a
    pickle's first byte: the file was read as a torch file, without its embedded config."""
    from safetensors.torch import save_file

    from training.checkpoint_files import header_config

    base = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    meta = {"inbetweener.config": json.dumps(tiny.cfg.to_dict())}
    path = tmp_path / "padded.safetensors"
    for pad in range(0, 264, 8):  # the header's length moves with the metadata's, in steps of 8
        save_file(base, str(path), metadata={**meta, "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert header_config(path) == tiny.cfg
    assert read_checkpoint(path).config == tiny.cfg


def test_convert_refuses_a_preset_the_files_config_contradicts(tiny, tmp_path, capsys):
    """`convert tiny.safetensors --preset toon-512` wrote the tiny model and exited 0 (a file without a
    config is refused so): the preset given was dropped without a word."""
    from training import convert

    src = save_safetensors(tiny, tmp_path / "tiny.safetensors")
    out = tmp_path / "out.safetensors"
    assert (
        convert.main([str(src), str(out), "--preset", "toon-512"]) == 2
    )  # refused input, as train and interpolate exit
    assert "carries the config of preset 'tiny', not 'toon-512'" in capsys.readouterr().err
    assert not out.exists()
    assert convert.main([str(src), str(out), "--preset", "tiny"]) == 0 and out.is_file()


def test_convert_into_a_folder_that_is_a_file_says_so_before_reading(tmp_path, capsys, monkeypatch):
    """`convert model.ckpt notes.txt/model.safetensors` read the whole input (10 GB at full size), then said
    "cannot write ...: File exists"."""
    from training import checkpoint_files, convert

    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr(
        checkpoint_files, "read_checkpoint", lambda *a, **k: pytest.fail("the input was read")
    )
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(tmp_path / "in.ckpt"), str(tmp_path / "notes.txt" / "sub" / "out.safetensors")])
    assert exit_.value.code == 2
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
