"""LPIPS (Zhang et al., CVPR 2018), version 0.1, written here over the standard weight files.

`LPIPS(net)` holds a torchvision-layout backbone (`features.N.*` keys, so that torchvision's ImageNet
file loads strictly) and the five 1x1 "linear" layers in the layout of the authors' `alex.pth` /
`vgg.pth` (`lin{k}.model.1.weight`, shape `[1, C_k, 1, 1]`). The distance, per image pair:

    d(x, y) = sum_k mean_hw( w_k . (f_k(x)/|f_k(x)| - f_k(y)/|f_k(y)|)^2 )

with f_k the backbone's activations after the k-th ReLU stage, unit-normalised over channels (eps 1e-10),
and inputs in [-1, 1] shifted and scaled by the v0.1 `ScalingLayer`. The protocol uses AlexNet.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from training.features import LPIPS_FILES, MissingWeightsError, require_file

# Backbone layers as torchvision builds them: (op, args); the LPIPS taps are after the ReLUs listed.
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]  # fmt: skip
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
BACKBONE_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}  # indices of the tapped ReLUs
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}

# v0.1 input scaling: inputs in [-1, 1] -> roughly ImageNet-normalised.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _backbone(net: Literal["alex", "vgg"]) -> nn.Sequential:
    layers: list[nn.Module] = []
    if net == "alex":
        for op in _ALEX:
            if op[0] == "conv":
                c_in, c_out, k, s, p = op[1:]
                layers.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
            elif op[0] == "relu":
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    elif net == "vgg":
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
    else:
        raise ValueError(f"LPIPS backbone must be 'alex' or 'vgg', got {net!r}")
    return nn.Sequential(*layers)


class _Lin(nn.Module):
    """One LPIPS 1x1 layer; the Sequential (dropout, conv) keeps the `model.1.weight` key of the files."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance between `[N, 3, H, W]` images in [-1, 1] -> `[N]`."""

    def __init__(self, net: Literal["alex", "vgg"] = "alex"):
        super().__init__()
        self.net = net
        self.features = _backbone(net)
        self.taps = BACKBONE_TAPS[net]
        for k, c in enumerate(CHANNELS[net]):
            self.add_module(f"lin{k}", _Lin(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                taps.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS takes two [N, 3, H, W] batches of one shape, got {a.shape}, {b.shape}")
        dist = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for k, (fa, fb) in enumerate(zip(self._activations(a), self._activations(b))):
            lin = getattr(self, f"lin{k}").model[1]
            dist = dist + F.conv2d((fa - fb).square(), lin.weight).mean(dim=(1, 2, 3))
        return dist


def load_lpips(root: str | os.PathLike | None = None, net: Literal["alex", "vgg"] = "alex") -> LPIPS:
    """LPIPS with the backbone and linear layers read from the models dir (both files are required)."""
    lin_file, backbone_file = LPIPS_FILES[net]
    paths, missing = [], []
    for weight in (lin_file, backbone_file):  # name every missing file at once, not one per rerun
        try:
            paths.append(require_file(weight, root))
        except MissingWeightsError as exc:
            missing.append(str(exc))
    if missing:
        raise MissingWeightsError("\n".join(missing))
    lin_path, backbone_path = paths
    from manifests.weights import WeightsError, load_module_weights, load_torch_state_dict

    model = LPIPS(net)
    # The torchvision file also holds the classifier; only `features.*` belongs to LPIPS.
    load_module_weights(model.features, backbone_path, keep="features.")
    lins = load_torch_state_dict(lin_path)
    lin_keys = [f"lin{k}.model.1.weight" for k in range(len(CHANNELS[net]))]
    missing = [k for k in lin_keys if k not in lins]
    if missing:
        raise WeightsError(f"{lin_path} lacks {missing}: not an LPIPS v0.1 linear-layer file")
    model.load_state_dict({**model.state_dict(), **{k: lins[k] for k in lin_keys}}, strict=True)
    return model.eval()


@torch.no_grad()
def lpips_frames(distance, gen: torch.Tensor, gt: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-frame LPIPS of videos `[b, t, 3, h, w]` in [-1, 1] -> `[b, t]`; `distance` is a PerceptualDistance.

    Frames are compared at the size given (the eval clips' 320x512), each generated frame against the
    ground-truth frame of the same index; pool with `frame_average` (all 16 and the 14 interior frames).
    """
    if gen.shape != gt.shape or gen.ndim != 5:
        raise ValueError(f"expected two [b, t, 3, h, w] videos of one shape, got {gen.shape}, {gt.shape}")
    b, t = gen.shape[:2]
    flat_gen, flat_gt = gen.reshape(b * t, *gen.shape[2:]), gt.reshape(b * t, *gt.shape[2:])  # (b t) c h w
    out = [
        distance(x, y).float().cpu() for x, y in zip(flat_gen.split(batch_size), flat_gt.split(batch_size))
    ]
    return torch.cat(out).reshape(b, t)
