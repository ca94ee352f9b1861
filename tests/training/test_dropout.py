"""Seeded dropout (training/models/dropout.py): nn.Dropout's statistics, masks that a recompute reproduces,
and train.recompute_budget's compiled blocks computing the gradients that the default partition does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models.dropout import SeededDropout, keep_mask, seed_dropouts
from training.models.tooncrafter import build_tooncrafter


@pytest.fixture
def budget_config():
    """torch._functorch.config, its activation memory budget restored afterwards (monkeypatch would
    delete the entry on undo: the config module serves its values through __getattr__)."""
    import torch._functorch.config as config

    before = config.activation_memory_budget
    yield config
    config.activation_memory_budget = before


def test_keep_mask_rate_seeds_and_independence():
    shape = torch.Size([8, 64, 40, 64])
    seed = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)
    mask = keep_mask(shape, seed, 0.1)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.9) < 0.003  # 1.3M draws: ~0.0003 standard deviation
    assert torch.equal(mask, keep_mask(shape, seed.clone(), 0.1))  # a function of the seed
    other = keep_mask(shape, seed + 1, 0.1)
    both_dropped = (~mask & ~other).float().mean().item()
    assert abs(both_dropped - 0.01) < 0.001  # neighbouring seeds: independent masks
    flat = mask.flatten().float()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01  # nor neighbours
    high = keep_mask(shape, seed + (1 << 40), 0.1)  # the high 32 bits key the hash too
    assert not torch.equal(mask, high)
    assert keep_mask(shape, seed, 0.0).all()


def test_seeded_dropout_scales_like_nn_dropout_and_keeps_layout():
    drop = SeededDropout(0.25)
    drop.seed, drop.seeded = torch.tensor(7), True
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    out = drop(x)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.75)  # kept elements scaled as nn.Dropout does
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        SeededDropout(1.0)
    with pytest.raises(RuntimeError, match="seed_dropouts"):
        SeededDropout(0.1).train()(x)  # never seeded: refuses instead of one mask forever


def test_seed_dropouts_swaps_the_unets_and_reseeds_each_forward():
    torch.manual_seed(0)
    unet = build_tooncrafter("tiny").unet
    keys = set(unet.state_dict())
    plain = [m for m in unet.modules() if type(m) is nn.Dropout and m.p > 0]
    assert seed_dropouts(unet) is not None
    seeded = [m for m in unet.modules() if isinstance(m, SeededDropout)]
    assert len(seeded) == len(plain) > 0 and not any(
        type(m) is nn.Dropout and m.p > 0 for m in unet.modules()
    )
    assert set(unet.state_dict()) == keys  # checkpoints load and save as before
    assert seed_dropouts(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) is None
    drop = seeded[0]
    seen = []
    drop.register_forward_hook(lambda m, args, out: seen.append(m.seed.clone()))
    c = unet.cfg
    x = torch.randn(1, c.in_channels, 2, 8, 8)
    context = torch.randn(1, c.text_tokens, c.context_dim)
    fs = torch.tensor([3])
    for _ in range(2):
        unet.train()(x, torch.tensor([10]), context, fs=fs)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # a new mask every forward


def _block_grads(budget: float, config) -> dict[str, torch.Tensor]:
    """One tiny UNet block (ResBlock with temporal conv, spatial and temporal transformers) compiled with
    AOTAutograd's min-cut partitioner under `budget`, in train mode with seeded dropouts: its gradients."""
    config.activation_memory_budget = budget
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = build_tooncrafter("tiny").unet.train()
    block = unet.input_blocks[1]
    for p in block.parameters():  # no zero-initialised output layers: every path carries gradient
        if p.dim() > 1:
            nn.init.normal_(p, std=0.05)
    seed_dropouts(block)
    block.compile(backend="aot_eager_decomp_partition", dynamic=False)
    c, frames = unet.cfg, 4
    g = torch.Generator().manual_seed(3)
    h = torch.randn(frames, c.model_channels, 8, 12, generator=g, requires_grad=True)
    emb = torch.randn(frames, c.time_embed_dim, generator=g)
    context = torch.randn(frames, c.text_tokens + c.image_tokens_per_frame, c.context_dim, generator=g)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = block(h, emb, context, frames, 0, None)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    grads = {"input": h.grad, **{n: p.grad for n, p in block.named_parameters() if p.grad is not None}}
    return grads | {"saved elements": torch.tensor(sum(saved))}


def test_recompute_budget_keeps_less_and_computes_the_same_gradients(budget_config):
    """At budget 0.1 the partitioner moves the dropouts into the backward as well: with nn.Dropout their
    masks are drawn again there and the gradients come out wrong (pytorch#190758; measured here: 75% of
    the largest gradient); seeded, they match the default partition's."""
    full = _block_grads(1.0, budget_config)
    low = _block_grads(0.1, budget_config)
    assert low.pop("saved elements") < 0.5 * full.pop("saved elements")  # it did recompute more
    assert low.keys() == full.keys()
    scale = max(g.abs().max().item() for g in full.values())
    for name, grad in full.items():
        assert torch.allclose(low[name], grad, rtol=1e-4, atol=1e-5 * scale), name


def test_bench_step_with_a_budget_seeds_its_dropouts_and_sets_the_budget(budget_config):
    """training.bench_gpu builds the step as train.py does: with --recompute-budget < 1 the UNet's dropouts
    are seeded and the budget is what the compiled blocks will partition under; the step runs."""
    from training import bench_gpu

    device = torch.device("cpu")
    case = bench_gpu._build("rectify", "tiny", device, False, compile="eager", recompute_budget=0.3)
    assert budget_config.activation_memory_budget == 0.3
    assert any(isinstance(m, SeededDropout) for m in case.unet.modules())
    out = case.net(bench_gpu._batch(1, bench_gpu.SHAPES["tiny"], device))
    out["loss"].backward()
    assert all(p.grad is not None for p in case.params.values())
