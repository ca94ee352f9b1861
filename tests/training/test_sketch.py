"""SketchEncoder: the released key layout, the reference's residuals and controlled UNet on the parity
fixture, ControlNet initialisation from the UNet, and the per-frame sketch mask."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from training.models.sketch import (
    SKETCH_ENCODER_PRESETS,
    SketchEncoder,
    init_from_unet,
    sketch_config_from_reference,
)
from training.models.unet import UNET_PRESETS, UNet3D, unet_config_from_reference

TOL = 1e-4  # parity/README.md: suggested acceptance for single forward passes in float32


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere, so that every path (zero convs included) contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else p[0].numel() ** -0.5))


@pytest.fixture(scope="module")
def reference(parity):
    """(spec, encoder loaded from the fixture, UNet loaded from unet.safetensors, inputs, outputs)."""
    spec, state, inputs, outputs = parity("sketch")
    _, unet_state, _, _ = parity("unet")
    prefix = "controlnet."
    encoder = SketchEncoder(sketch_config_from_reference(spec["constructor_kwargs"]["controlnet"])).eval()
    encoder.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
    )
    unet = UNet3D(unet_config_from_reference(spec["constructor_kwargs"]["unet"])).eval()
    unet.load_state_dict(unet_state, strict=True)
    return spec, encoder, unet, inputs, outputs


def _unet_input(inputs: dict) -> torch.Tensor:
    return torch.cat([inputs["x_noisy"], inputs["c_concat"]], dim=1)


def _random_inputs(b: int, t: int, h: int = 4, w: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = SKETCH_ENCODER_PRESETS["tiny"]
    x = torch.randn(b, 4, t, h, w, generator=g)
    hint = (torch.rand(b, 1, t, 8 * h, 8 * w, generator=g) > 0.9).float()
    timesteps = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, 77 + 16 * t, cfg.context_dim, generator=g)
    return x, hint, timesteps, context


def test_toon512_state_dict_equals_the_released_sketch_encoder(shared_reference):
    with open(shared_reference / "state_dict" / "tooncrafter_sketch_encoder.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    expected = {r["key"]: tuple(int(n) for n in r["shape"].split(",")) for r in rows}
    with torch.device("meta"):
        encoder = SketchEncoder(SKETCH_ENCODER_PRESETS["toon-512"])
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert len(ours) == 340 and all(r["kind"] == "param" and r["dtype"] == "float32" for r in rows)
    assert sum(p.numel() for p in encoder.parameters()) == 364_227_952  # MODEL.md section 4: 1.457 GB fp32


def test_config_from_reference_kwargs(parity):
    spec, *_ = parity("sketch")
    kwargs = spec["constructor_kwargs"]["controlnet"]
    assert sketch_config_from_reference(kwargs) == SKETCH_ENCODER_PRESETS["tiny"]
    assert sketch_config_from_reference(kwargs, control_scale=1.0).control_scale == 1.0
    with pytest.raises(ValueError, match="legacy"):
        sketch_config_from_reference({**kwargs, "legacy": True})
    with pytest.raises(ValueError, match="unknown"):
        sketch_config_from_reference({**kwargs, "bogus": 1})


def test_residuals_and_controlled_unet_match_the_reference(reference):
    spec, encoder, unet, inputs, outputs = reference
    with torch.no_grad():
        control = encoder(
            inputs["x_noisy"], inputs["control_cond"], inputs["timesteps"], inputs["c_crossattn"], scale=1.0
        )
        assert len(control) == 7
        for i, c in enumerate(control):
            diff = (c - outputs[f"control.{i}"]).abs().max().item()
            assert diff <= TOL, f"residual {i}: max abs diff {diff:.3e}"
        # the fork multiplies the raw residuals by its control_scale before the UNet adds them
        scaled = [c * spec["control_scale"] for c in control]
        y = unet(
            _unet_input(inputs), inputs["timesteps"], inputs["c_crossattn"], fs=inputs["fs"], control=scaled
        )
    diff = (y - outputs["y_controlled"]).abs().max().item()
    assert diff <= TOL, f"controlled UNet: max abs diff {diff:.3e}"


def test_init_from_unet_copies_the_unet_and_leaves_it_unchanged(reference):
    _, _, unet, _, _ = reference
    encoder = SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"]).eval()
    _randomise(encoder, seed=1)
    copied, zeroed, kept = init_from_unet(encoder, unet)
    params = dict(encoder.named_parameters())
    unet_params = dict(unet.named_parameters())
    assert sorted(copied + zeroed + kept) == sorted(params)
    assert all(k.startswith("input_hint_block.") for k in kept)  # the only new path
    assert {k.split(".")[0] for k in zeroed} == {"zero_convs", "middle_block_out", "input_hint_block"}
    assert all(params[k].abs().sum() == 0 for k in zeroed)
    for key in copied:
        source = key.replace("middle_block.2.", "middle_block.3.")  # the UNet's has a temporal layer at .2
        expected = unet_params[source][:, :4] if key == "input_blocks.0.0.weight" else unet_params[source]
        assert torch.equal(params[key], expected), key
    assert "middle_block.2.in_layers.2.weight" in copied and "time_embed.0.weight" in copied

    x, hint, timesteps, context = _random_inputs(b=1, t=2)
    unet_input = torch.cat([x, torch.randn_like(x)], dim=1)
    with torch.no_grad():
        control = encoder(x, hint, timesteps, context)
        assert all(c.abs().sum() == 0 for c in control)
        controlled = unet(unet_input, timesteps, context, fs=torch.tensor([5]), control=control)
        plain = unet(unet_input, timesteps, context, fs=torch.tensor([5]))
    assert torch.equal(controlled, plain)


def test_sketch_mask_zeroes_unsketched_frames():
    encoder = SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"]).eval()
    _randomise(encoder)
    b, t = 2, 3
    x, hint, timesteps, context = _random_inputs(b, t)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    with torch.no_grad():
        full = encoder(x, hint, timesteps, context)
        masked = encoder(x, hint, timesteps, context, sketch_mask=mask)
        none = encoder(x, hint, timesteps, context, sketch_mask=torch.zeros(b, t, dtype=torch.bool))
    keep = mask.flatten()
    for f, m, z in zip(full, masked, none, strict=True):
        assert m.shape == f.shape == z.shape
        assert f[~keep].abs().sum() > 0  # without a mask a blank or unsketched frame still contributes
        assert m[~keep].abs().sum() == 0 and z.abs().sum() == 0
        torch.testing.assert_close(m[keep], f[keep], rtol=0, atol=1e-5)
    assert [tuple(r.shape) for r in full] == encoder.residual_shapes(b * t, 4, 8)

    unet = UNet3D(UNET_PRESETS["tiny"]).eval()
    _randomise(unet, seed=2)
    concat = torch.randn(b, 4, t, 4, 8)
    with torch.no_grad():
        plain = unet(torch.cat([x, concat], 1), timesteps, context)
        unsketched = unet(torch.cat([x, concat], 1), timesteps, context, control=none)
    assert torch.equal(plain, unsketched)


def test_batches_pair_clips_with_their_context_and_the_default_scale_is_0_6():
    encoder = SketchEncoder(SKETCH_ENCODER_PRESETS["tiny"]).eval()
    _randomise(encoder)
    x, hint, timesteps, context = _random_inputs(b=2, t=2, seed=3)
    with torch.no_grad():
        batched = encoder(x, hint, timesteps, context)
        single = encoder(x[1:], hint[1:], timesteps[1:], context[1:])
        raw = encoder(x[1:], hint[1:], timesteps[1:], context[1:], scale=1.0)
    for r, s, u in zip(batched, single, raw, strict=True):
        torch.testing.assert_close(r[2:], s, rtol=0, atol=1e-5)
        torch.testing.assert_close(s, u * 0.6, rtol=0, atol=1e-6)  # the default scale: the fork's 0.6
    x, hint, timesteps, context = _random_inputs(b=1, t=1, h=5, w=3)  # odd sizes round up, as the convs
    with torch.no_grad():
        odd = encoder(x, hint, timesteps, context)
    assert [tuple(r.shape) for r in odd] == encoder.residual_shapes(1, 5, 3)
    with pytest.raises(ValueError, match="8x"):
        encoder(x, hint[..., :-8], timesteps, context)


def test_gradient_checkpointing_does_not_change_gradients():
    cfg = SKETCH_ENCODER_PRESETS["tiny"]
    plain = SketchEncoder(cfg).train()
    _randomise(plain)
    ckpt = SketchEncoder(replace(cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, hint, timesteps, context = _random_inputs(b=1, t=2, seed=4)
    grads = []
    for model in (plain, ckpt):
        sum(r.square().mean() for r in model(x, hint, timesteps, context)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
