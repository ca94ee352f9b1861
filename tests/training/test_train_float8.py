"""`train.float8`: torchao fp8 GEMMs for the UNet's transformer linears (training/float8.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import float8
from training.models.attention import SpatialTransformer, TemporalTransformer
from training.models.unet import UNET_PRESETS, UNet3D
from training.profile_unet import float8_share, inputs


def transformer_linears(unet: nn.Module) -> set[str]:
    names = set()
    for prefix, module in unet.named_modules():
        if isinstance(module, (SpatialTransformer, TemporalTransformer)):
            names |= {n for n, m in module.named_modules(prefix=prefix) if isinstance(m, nn.Linear)}
    return names


def test_toon512_choice_of_layers():
    """Only transformer linears with dimensions that are multiples of 16; `large` keeps the layers where
    tensorwise fp8 pays on an H100 (more than 1024 outputs, or more than 4096 inputs)."""
    with torch.device("meta"):
        unet = UNet3D(UNET_PRESETS["toon-512"])
    inside = transformer_linears(unet)
    every = dict(float8.candidates(unet, "all"))
    assert set(every) == inside  # toon-512's transformer widths are all multiples of 16
    assert not any(name.startswith(("time_embed", "fps_embedding")) for name in every)
    large = dict(float8.candidates(unet, "large"))
    level0 = "input_blocks.1.1.transformer_blocks.0"  # the first spatial transformer, 320 wide
    assert f"{level0}.ff.net.0.proj" in large  # 320 -> 2560
    assert f"{level0}.attn1.to_q" in every and f"{level0}.attn1.to_q" not in large  # 320 -> 320
    assert f"{level0}.ff.net.2" not in large  # 1280 -> 320
    assert "middle_block.1.transformer_blocks.0.attn1.to_q" in large  # 1280 -> 1280
    assert all(m.weight.shape[0] > 1024 or m.weight.shape[1] > 4096 for m in large.values())


def test_share_of_forward_flops():
    """The planning count of BENCHMARKS.md: linears are MODEL.md's 12.603 TFLOP forward's non-conv,
    non-attention part; `all` converts all but the embeddings' MLPs."""
    counts = float8_share("toon-512", 1, 16, 40, 64)
    assert counts["total"] == pytest.approx(12.603e12, rel=1e-3)
    assert 0 < counts["tensorwise, large"] < counts["tensorwise, all"] <= counts["linears"] < counts["total"]
    assert counts["tensorwise, all"] > 0.999 * counts["linears"]


def tiny_unet() -> UNet3D:
    torch.manual_seed(0)
    unet = UNet3D(UNET_PRESETS["tiny"])
    with torch.no_grad():  # no zero-initialised branch: every layer does its work
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return unet


def test_converted_unet_trains_like_the_original():
    """Same parameters (objects and names), fp8 really in the GEMMs (not bit-equal), output and gradients
    close to the original's; frozen weights still get no gradient."""
    from torchao.float8.float8_linear import Float8Linear

    ref = tiny_unet()
    fp8 = copy.deepcopy(ref)
    for unet in (ref, fp8):  # freeze the temporal transformers, as rectify does
        for name, p in unet.named_parameters():
            p.requires_grad_("temporal_transformer" not in name and "init_attn" not in name)
    params = dict(fp8.named_parameters())
    names = float8.convert_unet(fp8, "tensorwise", "all")
    assert names and set(names) == transformer_linears(fp8)
    modules = dict(fp8.named_modules())
    assert all(type(modules[n]) is Float8Linear for n in names)
    assert dict(fp8.named_parameters()) == params and fp8.state_dict().keys() == ref.state_dict().keys()

    x, t, context, fs = inputs(fp8, 1, 4, 8, 16, torch.device("cpu"))
    outs = []
    for unet in (ref, fp8):
        torch.manual_seed(1)  # the same dropout masks (train mode, as in training)
        out = unet(x, t, context, fs=fs)
        out.square().mean().backward()
        outs.append(out.detach())
    assert not torch.equal(outs[0], outs[1])
    assert F.cosine_similarity(outs[0].flatten(), outs[1].flatten(), dim=0) > 0.995
    ref_params = dict(ref.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    assert all(params[n].grad is None for n in params.keys() - set(trained))
    # e4m3 forward, e5m2 gradients: per tensor the gradient of a random tiny net wanders (cosine 0.85-1.0
    # here), the whole gradient stays close
    g = torch.cat([params[n].grad.flatten() for n in trained])
    g_ref = torch.cat([ref_params[n].grad.flatten() for n in trained])
    assert F.cosine_similarity(g, g_ref, dim=0) > 0.95


def test_settings_and_device_errors():
    from training.run_config import parse_args, resolve_config

    with pytest.raises(ValueError, match="train.float8 must be one of"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.float8=fp4"]))
    with pytest.raises(ValueError, match="train.float8_layers must be one of"):
        resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.float8_layers=x"]))
    run = resolve_config(parse_args(["rectify", "--out", "x", "--set", "train.float8=tensorwise"]))
    assert (run.train.float8, run.train.float8_layers) == ("tensorwise", "large")
    float8.check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="train.float8 needs fp8 tensor cores"):
        float8.check_device(torch.device("meta"))
    assert float8.convert_unet(tiny_unet(), "", "all") == []  # off: nothing changes


def test_rectify_runs_with_fp8_linears(tmp_path, train_shards, capsys):
    """`inbetweener train rectify --set train.float8=tensorwise` end to end (one step: the CPU's fp8 GEMM
    is ~100x slower than its fp32 one, ~35 s for this step): the fp8 layers are counted at
    start, the loss is finite, the checkpoint is a plain ToonCrafter state dict, and the frozen temporal
    layers (fp8 GEMMs in forward and input gradient) do not move while the trained ones do."""
    from safetensors.torch import load_file

    from training import roles
    from training.engine import TrainConfig
    from training.train import initial_model, main

    torch.set_num_threads(1)
    out = tmp_path / "run"
    argv = ["rectify", "--preset", "tiny", "--data", str(train_shards), "--out", str(out)]
    for setting in ("data.num_workers=0", "train.sample_every=0", "train.steps=1", "train.ckpt_every=1",
                    "train.ema_decay=0", "train.float8=tensorwise", "train.float8_layers=all"):  # fmt: skip
        argv += ["--set", setting]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    count = int(printed.split("fp8 GEMMs (tensorwise, torchao): ")[1].split()[0])
    assert count == len(transformer_linears(initial_model(TrainConfig(preset="tiny")).unet))
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 1 and all(math.isfinite(v) for v in losses)
    model = initial_model(TrainConfig(preset="tiny"))
    start, params = model.state_dict(), {n for n, _ in model.named_parameters()}
    root = out / "checkpoints"
    after = load_file(str(root / (root / "latest").read_text().strip() / "model.safetensors"))
    assert after.keys() == start.keys()
    moved: dict[str, list[bool]] = {}
    for key in params:
        moved.setdefault(roles.role(key), []).append(not torch.equal(after[key], start[key]))
    assert not any(moved["temporal_attention"]) and any(moved["spatial"])


def test_fp8_blocks_compile_without_graph_breaks():
    """What the GPU run compiles: each UNet block with torchao's fp8 linears goes through Dynamo and
    AOTAutograd ("aot_eager": no kernels generated) in one graph per block shape, and the compiled step
    computes the eager one's gradients."""
    from training import bench_gpu

    device = torch.device("cpu")
    batch = bench_gpu._batch(1, bench_gpu.SHAPES["tiny"], device)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    grads = []
    for backend in ("", "aot_eager"):
        case = bench_gpu._build(
            "rectify", "tiny", device, True, backend, float8="tensorwise", float8_layers="all"
        )
        assert case.float8_linears > 0
        torch.manual_seed(1)  # the same noise and timesteps for both
        case.net(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in case.params.items()})
    assert counters["stats"]["unique_graphs"] >= 4 and not counters["graph_break"], dict(
        counters["graph_break"]
    )
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name
