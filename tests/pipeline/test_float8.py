"""fp8 e4m3 linears (aesthetic.precision=fp8): quantisation error bounds, layers that behave like the
ones they replace, what the conversion touches, and the stage end to end on a tiny saved CLIP.
torch._scaled_mm runs on the CPU too, so these run the same GEMM path as a GPU, only slower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.float8 import (
    E4M3_MAX,
    FirstTokenBlock,
    Float8Linear,
    Float8SelfAttention,
    PatchEmbedding,
    convert_to_float8,
    float8_supported,
    quantize_rows,
)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_rows_are_quantised_within_e4m3_rounding_each_on_its_own_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)
    x[3] *= 1000.0  # an outlier token must not cost the other rows their precision
    x[5] = 0.0  # an all-zero row stays zero (no division by zero)
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    back = q.float() * scale
    # 3 mantissa bits: half a step is 1/16 of the value; below 2^-6 the subnormal step is 2^-9 (x scale)
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2**-10 + 1e-12).all()
    assert torch.equal(back[5], torch.zeros(64))
    np.testing.assert_allclose(q.float().abs().amax(dim=1)[[0, 3]], E4M3_MAX)  # each row uses the full range
    for row in (0, 1, 7):
        assert rel_error(back[row], x[row]) < 0.05


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_follows_the_linear_it_replaces(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    x = torch.randn(2, 5, 64)
    fast = Float8Linear.from_linear(linear)
    y = fast(x.bfloat16())
    assert y.shape == (2, 5, 96) and y.dtype == torch.bfloat16
    # exactly the product of the two quantised operands (up to the bf16 output's rounding) ...
    qx, sx = quantize_rows(x.bfloat16().reshape(10, 64))
    want = (qx.float() * sx) @ (fast.weight_fp8.float() * fast.weight_scale.t()).t()
    if bias:
        want = want + linear.bias.detach().bfloat16().float()
    assert rel_error(y.reshape(10, 96), want) < 0.01
    # ... which is within e4m3's rounding of the full-precision layer (~4% per operand, rms)
    assert rel_error(y, linear(x).detach()) < 0.08
    assert fast.weight_fp8.dtype == torch.float8_e4m3fn  # the weight is stored in one byte per value
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8Linear.from_linear(nn.Linear(64, 40))


def test_fp8_linear_adds_its_bias_in_the_gemm_or_after_it_to_the_same_result(monkeypatch):
    """The stage's form passes the bias to the GEMM (no add kernel after it); the baseline adds it
    after. Same result up to the bf16 output's rounding, which the fused form does once instead of twice."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(10, 64).bfloat16()
    seen = []
    scaled_mm = torch._scaled_mm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("bias"))
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    fused, after = (Float8Linear.from_linear(linear, fused_bias=f) for f in (True, False))
    y_fused, y_after = fused(x), after(x)
    assert seen[0] is fused.bias and seen[1] is None
    # bf16 keeps 8 bits: the two differ by at most a rounding step of the output, never by the bias
    step = y_after.float().abs() * 2**-7 + 1e-3
    assert ((y_fused.float() - y_after.float()).abs() <= step).all()
    assert rel_error(y_fused, linear(x.float()).detach()) < 0.08


def test_fp8_attention_hands_sdpa_views_of_the_projection_not_copies(monkeypatch):
    """With the bias in the GEMM, q, k and v are strided views of the packed projection's output:
    nothing writes them out again before SDPA."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    attn = Float8SelfAttention(nn.MultiheadAttention(64, 4, batch_first=True).eval())
    seen = {}
    real_proj, real_sdpa = attn.in_proj.forward, F.scaled_dot_product_attention

    def proj(x):
        seen["qkv"] = real_proj(x)
        return seen["qkv"]

    def sdpa(q, k, v, **kwargs):
        seen["qkv_in"] = (q, k, v)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attn.in_proj, "forward", proj)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    x = torch.randn(2, 7, 64).bfloat16()
    attn(x, x, x)
    base = seen["qkv"].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in seen["qkv_in"])
    assert all(t.stride(-1) == 1 and t.shape == (2, 4, 7, 16) for t in seen["qkv_in"])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(32, 48), (35, 50)])  # the second leaves partial patches, dropped
def test_patch_embedding_as_a_gemm_equals_the_convolution(bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel_size=8, stride=8, bias=bias)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want, got = conv(x), PatchEmbedding(conv)(x)
    assert got.shape == want.shape == (2, 24, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stride is its kernel size"):
        PatchEmbedding(nn.Conv2d(3, 24, kernel_size=8, stride=4))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_fp8_self_attention_follows_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    n = 7
    x = torch.randn(2, n, 64) if batch_first else torch.randn(n, 2, 64)
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = may not attend
    attn_mask = {None: None, "bool": causal, "float": torch.zeros(n, n).masked_fill(causal, float("-inf"))}[
        mask
    ]
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        xb = x.bfloat16()
        got, weights = Float8SelfAttention(mha)(xb, xb, xb, attn_mask=attn_mask)
    assert weights is None and got.shape == want.shape
    assert rel_error(got, want) < 0.12  # two fp8 GEMMs in a row; a wrong mask or head split: ~1
    with pytest.raises(ValueError, match="self-attention only"):
        Float8SelfAttention(mha)(x, torch.zeros_like(x), torch.zeros_like(x))


def test_conversion_touches_only_the_aligned_linears_and_attentions():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 1),  # not a linear: untouched
        nn.Linear(16, 32),
        nn.MultiheadAttention(32, 2, batch_first=True),
        nn.MultiheadAttention(40, 2, batch_first=True),  # 40 % 16: stays, with its own out_proj
        nn.Sequential(nn.Linear(32, 20), nn.Linear(20, 16)),  # 20 % 16: both stay
    )
    counts = convert_to_float8(net)
    assert counts == {"linear": 1, "attention": 1, "skipped_linear": 2, "skipped_attention": 1}
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[1], Float8Linear)
    assert isinstance(net[2], Float8SelfAttention)
    assert type(net[3]) is nn.MultiheadAttention and type(net[3].out_proj) is not Float8Linear
    assert [type(m) for m in net[4]] == [nn.Linear, nn.Linear]
    x = torch.randn(2, 3, 40)
    assert net[3](x, x, x)[0].shape == (2, 3, 40)  # the skipped attention still works


@pytest.mark.parametrize("fast_accum", [True, False])
def test_every_fp8_gemm_runs_with_the_chosen_accumulation(monkeypatch, fast_accum):
    """Fast accumulation by default (the rowwise kernel's fast path on Hopper), fp32 accumulation when
    asked: every GEMM of a converted net, the attention's projections too, gets the choice."""
    seen = []
    scaled_mm = torch._scaled_mm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_fast_accum", False))
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    net = nn.Sequential(nn.Linear(32, 32), nn.MultiheadAttention(32, 2, batch_first=True))
    convert_to_float8(net, **({} if fast_accum else {"fast_accum": False}))
    x = net[0](torch.randn(2, 3, 32).bfloat16())
    net[1](x, x, x)
    assert seen == [fast_accum] * 3  # the linear, the attention's in and out projections


def test_fp8_needs_fp8_tensor_cores_or_the_cpu():
    from pipeline.stages.aesthetic import float8_image_tower

    assert float8_supported(torch.device("cpu"))
    assert not float8_supported(torch.device("meta"))
    with pytest.raises(
        ValueError, match=r"aesthetic.precision=fp8 needs fp8 tensor cores .* use fp16 or bf16"
    ):
        float8_image_tower(nn.Module(), torch.device("meta"))


def test_fp8_aesthetic_stage_follows_the_fp32_stage(tmp_path):
    """The stage loaded through the real loader with precision=fp8 (a tiny CLIP whose widths are
    multiples of 16): every linear of the image tower converted, embeddings within a cosine of the
    fp32 ones, the manifest's lineage says fp8."""
    from test_models_clip import TAG, TINY, clip_rows, save_tiny_clip_models

    from pipeline.stages.aesthetic import AestheticStage

    models = save_tiny_clip_models(tmp_path)
    stages = {}
    for precision in ("fp32", "fp8"):
        stages[precision] = AestheticStage(
            clip_model=TINY, clip_pretrained=TAG, models_dir=str(models), device="cpu", precision=precision
        )
        stages[precision].setup()
    visual = stages["fp8"]._clip.visual
    assert not any(type(m) is nn.Linear for m in visual.modules())
    assert (
        sum(isinstance(m, Float8SelfAttention) for m in visual.modules()) == 1
    )  # the tiny tower's one block
    assert isinstance(visual.conv1, PatchEmbedding)  # open_clip's patch embedding, now a GEMM
    assert isinstance(visual.transformer.resblocks[-1], FirstTokenBlock)  # its one block: the class token
    rows = clip_rows()
    want, got = (list(stages[p].process_rows(rows)) for p in ("fp32", "fp8"))
    for w, g in zip(want[:2], got[:2], strict=True):
        cosine = (w["clip_image_emb"] * g["clip_image_emb"]).sum(-1)
        assert (cosine > 0.995).all(), cosine
        assert g["aesthetic_min"] == min(g["aesthetic_first"], g["aesthetic_mid"], g["aesthetic_last"])
    assert got[2] == rows[2]
    assert "fp8 e4m3" in json.loads(got[0]["models"])["aesthetic"]["model"]


def test_precision_values_are_checked_before_any_work():
    from pipeline.config import ConfigError, load_config

    assert load_config(sets=["aesthetic.precision=fp8"]).aesthetic.precision == "fp8"
    with pytest.raises(ConfigError, match=r"caption.precision must be one of .*'fp16'.*got 'fp8'"):
        load_config(sets=["caption.precision=fp8"])
    with pytest.raises(ConfigError, match="text.precision must be one of"):
        load_config(sets=["text.precision=half"])


def _tiny_open_clip(pool: str = "tok"):
    import open_clip

    name = f"float8-test-clip-{pool}"
    open_clip.factory._MODEL_CONFIGS[name] = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "head_width": 16,
            "patch_size": 8,
            "pool_type": pool,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=True).eval()


def test_last_block_for_the_class_token_alone_gives_the_same_embedding():
    """FirstTokenBlock: the tower pools the class token, so its last block runs for that token alone
    (keys and values from every token): the same embeddings, in fp32 and with fp8 attention, whose
    per-token scales make the class token's numbers independent of the other rows."""
    from pipeline.float8 import first_token_last_block

    net = _tiny_open_clip()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net.encode_image(x)
        last = net.visual.transformer.resblocks[-1]
        tokens = net.visual._embeds(x)
        for block in net.visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        assert first_token_last_block(net.visual)
        assert isinstance(net.visual.transformer.resblocks[-1], FirstTokenBlock)
        assert not first_token_last_block(net.visual)  # once
        got = net.encode_image(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert net.visual.transformer.resblocks[-1](tokens).shape == (3, 1, 64)

        # fp8: the converted attention's first_token matches the whole block's first row
        convert_to_float8(last)
        full = last(tokens.bfloat16())[:, :1]
        first = FirstTokenBlock(last)(tokens.bfloat16())
        torch.testing.assert_close(first.float(), full.float(), rtol=1e-2, atol=1e-2)  # bf16 rounding
    assert not first_token_last_block(_tiny_open_clip("avg").visual)  # pools every token: left whole
