"""UNet3D: the reference's outputs on the parity fixtures, tiny shapes, control residuals, checkpointing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from training.models.unet import UNET_PRESETS, UNet3D, unet_config_from_reference

TOL = 1e-4  # parity/README.md: suggested acceptance for single forward passes in float32


def _reference_unet(parity, name: str = "unet", **overrides) -> tuple[UNet3D, dict, dict, dict]:
    spec, state_dict, inputs, outputs = parity(name)
    kwargs = spec["constructor_kwargs"]
    kwargs = kwargs.get("unet", kwargs)  # the sketch fixture nests the UNet's kwargs
    model = UNet3D(unet_config_from_reference({**kwargs, **overrides})).eval()
    model.load_state_dict(state_dict, strict=True)
    return model, spec, inputs, outputs


def test_config_from_reference_kwargs_expresses_the_fixture(parity):
    spec, *_ = parity("unet")
    cfg = unet_config_from_reference(spec["constructor_kwargs"])
    assert cfg.model_channels == 32 and cfg.channel_mult == (1, 1, 2) and cfg.attention_resolutions == (2, 1)
    assert cfg.init_attention and cfg.image_cross_attention and cfg.fs_condition and cfg.default_fs == 24
    assert cfg.temporal_length == 4 and not cfg.gradient_checkpointing and not cfg.temporal_causal
    with pytest.raises(ValueError, match="use_relative_position"):
        unet_config_from_reference({**spec["constructor_kwargs"], "use_relative_position": True})
    with pytest.raises(ValueError, match="unknown"):
        unet_config_from_reference({"bogus": 1})


def test_state_dict_keys_equal_the_reference_fixture(parity):
    spec, state_dict, _, _ = parity("unet")
    model = UNet3D(unet_config_from_reference(spec["constructor_kwargs"]))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    assert len(ours) == spec["n_state_dict_tensors"]


@pytest.mark.parametrize("with_fs", [True, False], ids=["fs", "default_fs"])
def test_parity_with_reference(parity, with_fs):
    model, _, inputs, outputs = _reference_unet(parity)
    fs = inputs["fs"] if with_fs else None
    with torch.no_grad():
        y = model(inputs["x"], inputs["timesteps"], inputs["context"], fs=fs)
    expected = outputs["y"] if with_fs else outputs["y_default_fs"]
    diff = (y - expected).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3e}"


def test_temporal_conv_as_conv2d_keeps_parity_and_gradients(parity):
    from training.models.unet import TemporalConvBlock, set_temporal_conv

    model, _, inputs, outputs = _reference_unet(parity)
    set_temporal_conv(model, "conv2d")
    blocks = [m for m in model.modules() if isinstance(m, TemporalConvBlock)]
    assert blocks and all(m.impl == "conv2d" for m in blocks)
    with torch.no_grad():
        y = model(inputs["x"], inputs["timesteps"], inputs["context"], fs=inputs["fs"])
    assert (y - outputs["y"]).abs().max().item() <= TOL

    torch.manual_seed(0)
    block = TemporalConvBlock(32, dropout=0.0)
    for p in block.parameters():  # conv4 starts at zero: give every layer weights
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 32, 5, 3, 4)
    grads = []
    for impl in ("conv3d", "conv2d"):
        block.impl = impl
        block.zero_grad()
        y = block(x)
        y.square().sum().backward()
        grads.append((y.detach(), [p.grad.clone() for p in block.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="conv3d"):
        set_temporal_conv(model, "conv1d")


def test_parity_with_sketch_control_residuals(parity):
    # The sketch fixture's ControlledUnetModel uses unet.safetensors' weights with temporal_length 16.
    _, unet_state, _, _ = parity("unet")
    spec, _, inputs, outputs = parity("sketch")
    cfg = unet_config_from_reference(spec["constructor_kwargs"]["unet"])
    model = UNet3D(cfg).eval()
    model.load_state_dict(unet_state, strict=True)
    x = torch.cat([inputs["x_noisy"], inputs["c_concat"]], dim=1)
    control = [outputs[f"control.{i}"] * spec["control_scale"] for i in range(len(model.input_blocks) + 1)]
    with torch.no_grad():
        y = model(x, inputs["timesteps"], inputs["c_crossattn"], fs=inputs["fs"], control=control)
        y0 = model(x, inputs["timesteps"], inputs["c_crossattn"], fs=inputs["fs"])
    assert (y - outputs["y_controlled"]).abs().max().item() <= TOL
    assert (y0 - outputs["y_uncontrolled"]).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="residuals"):
        model(x, inputs["timesteps"], inputs["c_crossattn"], control=control[:-1])


def test_tiny_forward_shapes():
    cfg = UNET_PRESETS["tiny"]
    model = UNet3D(cfg).eval()
    b, t = 2, 4
    x = torch.randn(b, cfg.in_channels, t, 8, 16)
    context = torch.randn(b, cfg.text_tokens + t * cfg.image_tokens_per_frame, cfg.context_dim)
    with torch.no_grad():
        y = model(x, torch.tensor([10, 900]), context, fs=torch.tensor([10, 3]))
        y_text_only = model(x, torch.tensor([10, 900]), context[:, :77])  # context not split per frame
    assert y.shape == (b, cfg.out_channels, t, 8, 16)
    assert y_text_only.shape == y.shape


def test_guidance_branches_share_the_layers_before_the_context():
    """k contexts for one batch of inputs (the guidance branches): the same output as the inputs repeated k
    times, with the input conv run on the b samples alone and the first cross-attention on all k b;
    control residuals come one per context row."""
    cfg = UNET_PRESETS["tiny"]
    torch.manual_seed(0)
    model = UNet3D(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # a fresh model zeroes the residual branches' last layers
            p.normal_(0.0, 0.2)
    b, t, k = 2, 4, 3
    x = torch.randn(b, cfg.in_channels, t, 8, 16)
    ts, fs = torch.tensor([10, 900]), torch.tensor([10, 3])
    contexts = torch.randn(k * b, cfg.text_tokens + t * cfg.image_tokens_per_frame, cfg.context_dim)
    rows = []
    model.input_blocks[0].register_forward_pre_hook(lambda m, a: rows.append(("conv_in", a[0].shape[0])))
    first_cross = model.input_blocks[1][1]
    first_cross.register_forward_pre_hook(lambda m, a: rows.append(("cross", a[0].shape[0])))
    shapes = []
    hooks = [
        blk.register_forward_hook(lambda m, a, out: shapes.append(out.shape)) for blk in model.input_blocks
    ]
    with torch.no_grad():
        stacked = model(x.repeat(k, 1, 1, 1, 1), ts.repeat(k), contexts, fs=fs.repeat(k))
        for hook in hooks:
            hook.remove()
        rows.clear()
        shared = model(x, ts, contexts, fs=fs)
        assert rows == [("conv_in", b * t), ("cross", k * b * t)]
        torch.testing.assert_close(shared, stacked, atol=1e-5, rtol=1e-5)
        assert shared.shape == (k * b, cfg.out_channels, t, 8, 16) and stacked.abs().mean() > 0.1

        control = [torch.randn(s) for s in shapes] + [
            torch.randn(shapes[-1])
        ]  # the middle keeps its input's shape
        torch.testing.assert_close(
            model(x, ts, contexts, fs=fs, control=control),
            model(x.repeat(k, 1, 1, 1, 1), ts.repeat(k), contexts, fs=fs.repeat(k), control=control),
            atol=1e-5,
            rtol=1e-5,
        )
        with pytest.raises(ValueError, match="5 rows for a batch of 2"):
            model(x, ts, contexts[:5], fs=fs)


def test_fresh_model_is_zero_initialised_where_the_reference_is():
    model = UNet3D(UNET_PRESETS["tiny"])
    assert model.out[-1].weight.abs().sum() == 0 and model.fps_embedding[-1].weight.abs().sum() == 0
    assert model.input_blocks[1][0].temopral_conv.conv4[-1].weight.abs().sum() == 0
    assert model.input_blocks[1][1].proj_out.weight.abs().sum() == 0


def test_gradient_checkpointing_does_not_change_results(monkeypatch):
    import training.models.unet as unet_module

    calls = []
    real_checkpoint = unet_module.checkpoint
    monkeypatch.setattr(
        unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    torch.manual_seed(0)
    plain = UNet3D(UNET_PRESETS["tiny"])
    for p in plain.parameters():  # no zero branches, so that every path carries gradient
        torch.nn.init.normal_(p, std=0.1)
    ckpt = UNet3D(UNET_PRESETS["tiny"])
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_gradient_checkpointing(True)
    assert ckpt.cfg.gradient_checkpointing
    plain.train()
    ckpt.train()
    x = torch.randn(1, 8, 2, 8, 8)
    context = torch.randn(1, 77 + 32, 32)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks
        y = model(x, torch.tensor([500]), context, fs=torch.tensor([7]))
        y.square().mean().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    (y_plain, g_plain), (y_ckpt, g_ckpt) = results
    assert len(calls) == len(ckpt.input_blocks) + 1 + 1 + len(ckpt.output_blocks)  # + init_attn + middle
    assert torch.equal(y_plain, y_ckpt)
    for a, b in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _saved_bytes_and_grads(model: UNet3D, x: torch.Tensor, context: torch.Tensor):
    """Bytes autograd keeps for backward after one forward, and the parameters' gradients."""
    saved = []

    def pack(t: torch.Tensor):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # same dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x, torch.tensor([500]), context, fs=torch.tensor([7]))
    kept = sum(saved)  # checkpointed blocks keep only their inputs; their recompute happens in backward
    y.square().mean().backward()
    return kept, [p.grad.clone() for p in model.parameters()]


def test_checkpointing_only_the_finest_levels_trades_memory_for_recompute(monkeypatch):
    """checkpoint_levels=N recomputes only the blocks at the N finest resolutions: the gradients stay
    those of the plain network, and the activations kept lie between full checkpointing and none."""
    import training.models.unet as unet_module

    widths = []
    real_checkpoint = unet_module.checkpoint

    def counting(block, h, *args, **kwargs):
        widths.append(h.shape[-1])
        return real_checkpoint(block, h, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    torch.manual_seed(0)
    plain = UNet3D(UNET_PRESETS["tiny"])  # levels at widths 8, 4, 2
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, context = torch.randn(1, 8, 2, 8, 8), torch.randn(1, 77 + 32, 32)
    results = {}
    for levels in (None, 0, 1, 2):
        model = UNet3D(UNET_PRESETS["tiny"])
        model.load_state_dict(plain.state_dict())
        model.train()
        if levels is not None:
            model.set_gradient_checkpointing(True, levels=levels)
        widths.clear()
        results[levels] = (*_saved_bytes_and_grads(model, x, context), sorted(set(widths)))
    assert results[0][2] == [2, 4, 8]  # every level recomputes
    assert results[1][2] == [8]
    assert results[2][2] == [4, 8]
    kept = {levels: r[0] for levels, r in results.items()}
    assert kept[0] < kept[2] < kept[1] < kept[None]
    for levels in (0, 1, 2):
        for a, b in zip(results[None][1], results[levels][1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resolution_level_follows_the_downsamplings():
    from training.models.unet import resolution_level

    assert [resolution_level(64, w) for w in (64, 32, 16, 8)] == [0, 1, 2, 3]
    assert [resolution_level(68, w) for w in (68, 34, 17, 9)] == [0, 1, 2, 3]  # 17 -> 9 rounds up
    with pytest.raises(ValueError, match="checkpoint levels"):
        UNet3D(UNET_PRESETS["tiny"]).set_gradient_checkpointing(True, levels=-1)


def test_channels_last_activations_give_the_same_outputs_and_gradients(parity):
    """set_channels_last: every convolution reads channels-last activations (2-D convs channels_last,
    the temporal Conv3d channels_last_3d), the output is plain contiguous, and values and gradients
    are those of the default layout (parity fixture; then a training step with checkpointing and the
    guidance branches' shared input)."""
    from torch import nn

    from training.models.layout import set_channels_last

    model, _, inputs, outputs = _reference_unet(parity)
    set_channels_last(model)
    layouts = []

    def record(module, args):
        x = args[0]
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        layouts.append(x.is_contiguous(memory_format=fmt) and not x.is_contiguous())

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        y = model(inputs["x"], inputs["timesteps"], inputs["context"], fs=inputs["fs"])
    assert y.is_contiguous() and (y - outputs["y"]).abs().max().item() <= TOL
    batch = inputs["x"].shape[0]
    assert batch > 1 and layouts and all(layouts)  # (a CPU Conv3d writes a batch of 1 contiguous)

    # without dropout: its random mask follows the memory order, so the layouts would draw different masks
    cfg = replace(UNET_PRESETS["tiny"], dropout=0.0, temporal_conv_dropout=0.0)
    torch.manual_seed(0)
    plain = UNet3D(cfg)
    for p in plain.parameters():  # no zero branches, so that every path carries gradient
        torch.nn.init.normal_(p, std=0.1)
    last = UNet3D(cfg)
    last.load_state_dict(plain.state_dict())
    set_channels_last(last)
    x = torch.randn(2, 8, 3, 8, 8)
    context = torch.randn(4, 77 + 48, 32)  # two branches per sample
    results = []
    for model in (plain, last):
        model.train().set_gradient_checkpointing(True, levels=1)
        y = model(x, torch.tensor([500, 20]), context, fs=torch.tensor([7, 3]))
        y.square().mean().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    (y_plain, g_plain), (y_last, g_last) = results
    assert y_last.is_contiguous() and y_plain.abs().mean() > 0.1
    torch.testing.assert_close(y_last, y_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_plain, g_last, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    set_channels_last(last, False)
    assert not last.channels_last


@pytest.mark.parametrize("shape", [(2, 32, 5, 6), (2, 32, 3, 5, 6)])
def test_group_norm_keeps_a_channels_last_layout_where_the_kernel_does_not(monkeypatch, shape):
    """CUDA's GroupNorm kernel (and the decomposition inductor compiles) return plain contiguous
    tensors: the UNet's GroupNorm puts a channels-last input's layout back, same values."""
    import torch.nn.functional as F

    from training.models.layout import GroupNorm

    real = F.group_norm
    monkeypatch.setattr(F, "group_norm", lambda *a, **k: real(*a, **k).contiguous())
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    norm = GroupNorm(8, 32)
    x = torch.randn(shape)
    out = norm(x.contiguous(memory_format=fmt))
    assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous()
    torch.testing.assert_close(out, norm(x))
    assert norm(x).is_contiguous()  # a plain input stays plain
