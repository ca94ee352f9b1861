"""fp8 training GEMMs for the UNet's transformer linears (`train.float8`), through torchao.

torchao's `Float8Linear` replaces an `nn.Linear` in place, keeping its parameters (same objects, same
names, same dtype: the optimizer, EMA, roles and checkpoints see no change) and casting the input, the
weight and the output gradient to float8 on the fly for each of the three GEMMs of a training step
(output, input gradient, weight gradient). The recipe is torchao's `tensorwise`: one dynamic scale per
tensor, e4m3 for inputs and weights, e5m2 for gradients, cuBLAS's fp8 GEMM. torchao's `rowwise` recipes
are not offered: with torchao 0.18 they fail in eager mode on this UNet (its transformers feed the linears
non-contiguous views, and reshaping a row-scaled fp8 tensor is "not supported yet"), and by torchao's
size rule below they would convert only the 1280 -> 10240 feed-forward projections, 5.6% of a forward's
FLOPs against tensorwise's 27.1% (`python -m training.profile_unet --float8-share`).

Which linears: those inside the UNet's spatial and temporal transformers (attention projections, GEGLU
feed-forwards, linear in/out projections), where the token count is the batch times the frames times the
latent pixels. The embeddings' MLPs see one token per clip and frame and stay as they are. The fp8 GEMM
needs both of a weight's dimensions to be multiples of 16; with `train.float8_layers=large` (the default)
a layer also has to be large enough for fp8 to pay on an H100 by the tables of torchao's README (for
tensorwise and a weight of N outputs and K inputs: not K <= 4096 with N <= 1024), since the casts cost
memory traffic that a small GEMM does not win back. `all` converts every layer that fits the rule of
16 (tests use it: the tiny preset has no large layer).

It needs a CUDA GPU of compute capability 8.9+ (L4, L40S, H100) or the CPU (slow; tests), and it is
only fast compiled (`train.compile`): eager, each cast is a separate pass over the tensor. The model
FLOPs utilisation the bench reports stays against the card's dense bf16 peak, as torchtitan reports its
fp8 runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

RECIPES = ("tensorwise",)
LAYERS = ("large", "all")
ALIGN = 16  # torch._scaled_mm needs both dimensions of the weight to be multiples of 16


def check_settings(recipe: str, layers: str) -> None:
    """Raise a ValueError naming the setting when `train.float8` / `train.float8_layers` is unknown."""
    if recipe and recipe not in RECIPES:
        raise ValueError(f"train.float8 must be one of {list(RECIPES)} or empty, got {recipe!r}")
    if layers not in LAYERS:
        raise ValueError(f"train.float8_layers must be one of {list(LAYERS)}, got {layers!r}")


def check_device(device: torch.device) -> None:
    """fp8 GEMMs run on the CPU and on CUDA GPUs of compute capability 8.9+; anything else is an error."""
    if device.type == "cpu":
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    raise ValueError(
        f"train.float8 needs fp8 tensor cores (CUDA compute capability 8.9+: L4, L40S, H100) or the CPU;"
        f" {name} has none: leave train.float8 empty"
    )


def pays_off(weight_shape: torch.Size) -> bool:
    """Whether an [N, K] weight is large enough for tensorwise fp8 to beat bf16 on an H100 (torchao's
    README tables)."""
    n, k = weight_shape
    return not (k <= 4096 and n <= 1024)


def candidates(unet: nn.Module, layers: str) -> Iterator[tuple[str, nn.Linear]]:
    """(name, linear) of the UNet's transformer linears that `train.float8` converts."""
    from training.models.attention import SpatialTransformer, TemporalTransformer

    seen: set[int] = set()
    for prefix, module in unet.named_modules():
        if not isinstance(module, (SpatialTransformer, TemporalTransformer)):
            continue
        for name, linear in module.named_modules(prefix=prefix):
            if type(linear) is not nn.Linear or id(linear) in seen:
                continue
            seen.add(id(linear))
            n, k = linear.weight.shape
            if n % ALIGN or k % ALIGN:
                continue
            if layers == "large" and not pays_off(linear.weight.shape):
                continue
            yield name, linear


def convert_unet(unet: nn.Module, recipe: str, layers: str = "large") -> list[str]:
    """Swap the chosen linears of `unet` for torchao `Float8Linear`s of `recipe`, in place; returns their
    names. Call it before compiling and before wrapping in DDP/FSDP; the optimizer may come before or
    after (the parameters stay the same objects)."""
    check_settings(recipe, layers)
    if not recipe:
        return []
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError(
            "train.float8 needs torchao (pip install 'inbetweener[training]'): " + str(e)
        ) from e
    chosen = {id(linear): name for name, linear in candidates(unet, layers)}
    convert_to_float8_training(
        unet,
        config=Float8LinearConfig.from_recipe_name(recipe),
        module_filter_fn=lambda module, fqn: id(module) in chosen,
    )
    return sorted(chosen.values())
