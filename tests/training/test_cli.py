"""`inbetweener describe` and `inbetweener convert` through their real entry points."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import inbetweener_cli
from training import convert, describe
from training.checkpoint import load_model
from training.models.tooncrafter import build_tooncrafter

# MODEL.md 1.2, 1.4 and 5.4 (parameter counts verified by building the reference model): table label -> count
MODEL_MD_COUNTS = {
    "model.diffusion_model (UNet3D)": 1_438_854_980,
    "temporal convs": 266_891_520,
    "temporal transformers": 272_850_880,
    "init_attn": 5_580_736,
    "image cross-attn K/V": 25_559_040,
    "first_stage_model.encoder": 34_163_592,
    "first_stage_model.decoder (dual-reference)": 65_778_223,
    "first_stage_model.quant_conv": 72,
    "first_stage_model.post_quant_conv": 20,
    "cond_stage_model": 354_032_641,
    "embedder": 683_800_065,
    "image_proj_model": 48_787_456,
    "schedule buffers": 13_400,
    "total": 2_625_430_449,
    "sketch encoder": 364_227_952,  # MODEL.md section 4
}


def test_describe_prints_the_reference_parameter_counts(capsys):
    assert inbetweener_cli.main(["describe", "toon-512"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for label, count in MODEL_MD_COUNTS.items():
        line = next(line for line in lines if line.strip().startswith(label))
        assert line.split()[-1] == f"{count:,}", line


def test_describe_json_of_the_tiny_plain_decoder_model(capsys):
    assert describe.main(["tiny", "--plain-decoder", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["unet"] == 1_653_860  # the UNet parity fixture's element count
    parts = ["unet", "vae.encoder", "vae.decoder", "vae.quant_conv", "vae.post_quant_conv", "text_tower"]
    parts += ["image_tower", "resampler", "schedule_buffers"]
    assert sum(counts[k] for k in parts) == counts["total"]


@pytest.mark.parametrize("module", [describe, convert])
def test_help_has_an_example(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def _random_tiny(**overrides):
    model = build_tooncrafter("tiny", **overrides)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_convert_round_trip_from_a_lightning_ckpt(tmp_path, capsys):
    model = _random_tiny()
    src, out = tmp_path / "model.ckpt", tmp_path / "model.safetensors"
    torch.save({"state_dict": model.state_dict(), "global_step": 7}, src)
    assert convert.main([str(src), str(out)]) == 0  # preset detected from the keys
    assert "preset tiny, dual-reference decoder" in capsys.readouterr().out
    loaded = load_model(out).state_dict()  # the config travels in the file
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["inbetweener.source"] == "model.ckpt"


def test_convert_casts_parameters_not_schedule_buffers(tmp_path):
    src, out = tmp_path / "model.pt", tmp_path / "model-bf16.safetensors"
    torch.save(_random_tiny().state_dict(), src)
    assert convert.main([str(src), str(out), "--dtype", "bf16", "--preset", "tiny"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.bfloat16
        assert f.get_tensor("alphas_cumprod").dtype == torch.float32


def test_convert_keeps_a_plain_decoder_unless_asked_to_start_the_dual_one(tmp_path, capsys):
    src = tmp_path / "dynamicrafter.ckpt"
    torch.save({"state_dict": _random_tiny(dual_ref_decoder=False).state_dict()}, src)
    plain_out, dual_out = tmp_path / "plain.safetensors", tmp_path / "dual.safetensors"
    assert convert.main([str(src), str(plain_out), "--preset", "tiny"]) == 0
    assert "plain (DynamiCrafter) decoder" in capsys.readouterr().out
    assert not load_model(plain_out).cfg.dual_ref_decoder
    assert convert.main([str(src), str(dual_out), "--preset", "tiny", "--init-dual-ref"]) == 0
    assert load_model(dual_out).cfg.dual_ref_decoder


def test_convert_reports_a_wrong_file(tmp_path, capsys):
    src = tmp_path / "vae.pt"
    torch.save(build_tooncrafter("tiny").first_stage_model.state_dict(), src)
    assert (
        convert.main([str(src), str(tmp_path / "out.safetensors"), "--preset", "tiny"]) == 2
    )  # refused input, as train and interpolate exit
    err = capsys.readouterr().err
    assert str(src) in err and "missing" in err and "unexpected" in err
    assert not (tmp_path / "out.safetensors").exists()
