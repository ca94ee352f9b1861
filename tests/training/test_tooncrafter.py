"""ToonCrafter container: the released checkpoints' exact key layout, tiny forward shapes, config round trip."""

from __future__ import annotations

from pathlib import Path

import torch

from training.models.tooncrafter import TOONCRAFTER_PRESETS, ToonCrafterConfig, build_tooncrafter


def _reference_layout(shared_reference: Path, name: str) -> dict[str, tuple[int, ...]]:
    rows = (shared_reference / "state_dict" / f"{name}.tsv").read_text().splitlines()[1:]
    layout = {}
    for row in rows:
        key, shape, *_ = row.split("\t")
        layout[key] = tuple(int(n) for n in shape.split(",")) if shape else ()
    return layout


def _assert_same_layout(model: torch.nn.Module, expected: dict[str, tuple[int, ...]]) -> None:
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]}
    assert not wrong, f"shape mismatches (ours, reference): {wrong}"


def test_toon_512_has_exactly_the_released_tooncrafter_keys_and_shapes(shared_reference):
    with torch.device("meta"):
        model = build_tooncrafter("toon-512")
    expected = _reference_layout(shared_reference, "tooncrafter_512")
    assert len(expected) == 2668
    _assert_same_layout(model, expected)
    assert sum(v.numel() for v in model.state_dict().values()) == 2_625_430_449  # MODEL.md section 0
    # non-persistent buffers stay out of checkpoints
    assert (
        "embedder.mean" not in model.state_dict()
        and "cond_stage_model.model.attn_mask" not in model.state_dict()
    )


def test_plain_decoder_has_exactly_the_dynamicrafter_interp_keys_and_shapes(shared_reference):
    with torch.device("meta"):
        model = build_tooncrafter("toon-512", dual_ref_decoder=False)
    _assert_same_layout(model, _reference_layout(shared_reference, "dynamicrafter_512_interp"))


def test_schedule_buffers_equal_the_reference_fixture(parity):
    _, _, _, outputs = parity("schedule")
    model = build_tooncrafter("tiny")
    schedule = model.schedule()
    assert len(schedule) == 13
    for name, value in schedule.items():
        torch.testing.assert_close(value, outputs[name], rtol=1e-6, atol=0)


def test_tiny_forward_shapes():
    model = build_tooncrafter("tiny").eval()
    cfg = model.cfg
    b, t = 2, cfg.frames
    images = torch.rand(b, 3, 40, 64) * 2 - 1
    with torch.no_grad():
        context = model.context(["an anime scene", ""], images)
        assert context.shape == (b, 77 + 16 * t, cfg.unet.context_dim)
        x_t = torch.randn(b, 4, t, 8, 8)
        c_concat = torch.zeros_like(x_t)
        v = model(x_t, torch.tensor([999, 19]), c_concat, context, fs=torch.tensor([10, 10]))
    assert v.shape == x_t.shape


def test_config_round_trips_through_a_dict():
    for cfg in TOONCRAFTER_PRESETS.values():
        assert ToonCrafterConfig.from_dict(cfg.to_dict()) == cfg
