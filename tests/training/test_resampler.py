"""Resampler: the reference's outputs on the parity fixture, presets, reference kwargs."""

from __future__ import annotations

import pytest
import torch

from training.models.resampler import RESAMPLER_PRESETS, Resampler, resampler_config_from_reference

TOL = 1e-4


def test_parity_with_reference(parity):
    spec, state_dict, inputs, outputs = parity("resampler")
    model = Resampler(resampler_config_from_reference(spec["constructor_kwargs"])).eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        latents = model(inputs["x"])
    diff = (latents - outputs["latents"]).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3e}"


def test_tiny_preset_is_the_fixture_configuration(parity):
    spec, *_ = parity("resampler")
    assert resampler_config_from_reference(spec["constructor_kwargs"]) == RESAMPLER_PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown"):
        resampler_config_from_reference({"bogus": 1})


def test_toon_512_shapes_on_meta():
    with torch.device("meta"):
        model = Resampler(RESAMPLER_PRESETS["toon-512"])
        out = model(torch.empty(2, 257, 1280))
    assert out.shape == (2, 256, 1024)
    assert sum(p.numel() for p in model.parameters()) == 48_787_456  # MODEL.md 1.2
