"""Dropout whose mask is a function of a seed (`seed_dropouts`), so that recomputing it gives the same mask.

torch's memory-budget partitioner (`torch._functorch.config.activation_memory_budget` < 1, our
train.recompute_budget) may move a dropout's random draw into the backward graph, where it draws again:
the backward then uses another mask than the forward did and the gradients are silently wrong
(pytorch/pytorch#190758, open; a test here shows it on the CPU). `SeededDropout` draws no random numbers
inside the network: each element's keep/drop decision is an integer hash of its index and of a seed
tensor that the network's forward pre-hook draws, from the global RNG, once per forward. A recomputation
of the same call reads the same seed, so the mask is the same wherever the compiler puts it. The hash is
a handful of integer operations that inductor fuses into the kernel around it.

Same probability and scaling as nn.Dropout (kept elements are divided by 1 - p); masks differ from
nn.Dropout's for the same RNG state (another generator), so a run is reproducible against itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from training.models.layout import channels_last_format

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 values in [0, 2^32): xorshift-multiply rounds; the multipliers are odd and
    below 2^31, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def keep_mask(shape: torch.Size, seed: torch.Tensor, p: float) -> torch.Tensor:
    """bool tensor of `shape`: True with probability 1 - p, a function of the element's index and `seed`
    (an int64 scalar tensor: its low and high 32 bits key two rounds of the hash)."""
    index = torch.arange(shape.numel(), device=seed.device, dtype=torch.int64).view(shape) & _MASK32
    x = _mix32(index ^ (seed & _MASK32))
    x = _mix32(x ^ ((seed >> 32) & _MASK32))
    return x >= int(p * 2**32)


class SeededDropout(nn.Module):
    """nn.Dropout(p) whose mask comes from `keep_mask(x.shape, self.seed, p)`. `seed` is a buffer (not in
    the state dict) that `seed_dropouts`' hook replaces before each forward of the network; in train
    mode a module that was never seeded refuses to run rather than repeat one mask forever."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64), persistent=False)
        self.seeded = False  # set by the hook of seed_dropouts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.seeded:
            raise RuntimeError("SeededDropout ran in train mode without a seed: use seed_dropouts(network)")
        out = x * keep_mask(x.shape, self.seed, self.p) * (1.0 / (1.0 - self.p))
        fmt = channels_last_format(x)
        return out if fmt is None else out.contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _reseeder(modules: list[SeededDropout]):
    """A forward pre-hook giving each of `modules` a fresh seed, all drawn in one call (in train mode)."""

    def reseed(network: nn.Module, _args) -> None:
        if network.training:
            seeds = torch.randint(0, 2**62, (len(modules),), dtype=torch.int64, device=modules[0].seed.device)
            for module, seed in zip(modules, seeds.unbind(0), strict=True):
                module.seed, module.seeded = seed, True

    return reseed


def seed_dropouts(network: nn.Module) -> RemovableHandle | None:
    """Replace every nn.Dropout with p > 0 inside `network` by a SeededDropout of the same p (no state-dict
    change: dropout has none), and reseed them before each forward of `network`. Returns the hook's handle,
    or None when `network` has no such dropout."""
    swapped: list[SeededDropout] = []
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                swapped.append(SeededDropout(child.p).to(_device(network)))
                setattr(parent, name, swapped[-1])
    return network.register_forward_pre_hook(_reseeder(swapped)) if swapped else None


def _device(network: nn.Module) -> torch.device:
    param = next(network.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
