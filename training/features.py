"""Feature extractors behind small interfaces, and the loaders that read their weights from the models dir.

The statistics in `training.metrics` only see arrays; these are the networks that produce them:

| interface | input | output | default implementation | file in the models dir |
|---|---|---|---|---|
| `VideoFeatures` | videos `[N, 3, T, H, W]`, float, 0..255 | `[N, 400]` | StyleGAN-V's TorchScript I3D | `i3d/i3d_torchscript.pt` |
| `ImageEmbedder` | images `[N, 3, H, W]`, float, [0, 1] | `[N, D]` | OpenCLIP ViT-H-14 image tower | `clip/...` (see `CLIP_FILE`) |
| `TextEmbedder` | `N` strings | `[N, D]` | OpenCLIP ViT-H-14 text tower | the same file |
| `PerceptualDistance` | two image batches `[N, 3, H, W]`, [-1, 1] | `[N]` | LPIPS (AlexNet, v0.1) | `lpips/alex.pth` + `lpips/alexnet-owt-7be5be79.pth` |

Nothing here downloads: a missing file raises `MissingWeightsError` naming the file, where to put it
and where it comes from; a file that is there but truncated or another network's raises
`manifests.weights.WeightsError` naming it, its size and what was wrong. Loaders return modules on the
CPU in fp32; the caller moves them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

MODELS_DIR_ENV = "INBETWEENER_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/inbetweener/models")


class VideoFeatures(Protocol):
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        """`[N, 3, T, H, W]` float videos in 0..255 -> `[N, 400]` features."""
        ...


class ImageEmbedder(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` float images in [0, 1] -> `[N, D]` embeddings."""
        ...


class TextEmbedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """`N` strings -> `[N, D]` embeddings."""
        ...


class PerceptualDistance(Protocol):
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two `[N, 3, H, W]` float image batches in [-1, 1] -> `[N]` distances."""
        ...


@dataclass(frozen=True)
class WeightFile:
    """A file a metric needs: its path inside the models dir and where it is published."""

    relpath: str  # path under the models dir
    source: str  # where to get it (the loaders never fetch it)
    what: str  # one line for error messages and `inbetweener models`


I3D_FILE = WeightFile(
    "i3d/i3d_torchscript.pt",
    "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1 (StyleGAN-V's FVD detector)",
    "Kinetics-400 I3D as TorchScript, for FVD and KVD",
)
CLIP_FILE = WeightFile(
    "clip/ViT-H-14-laion2b_s32b_b79k/open_clip_pytorch_model.bin",
    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (open_clip_pytorch_model.bin)",
    "OpenCLIP ViT-H-14 (laion2b_s32b_b79k), for CLIP_img and CLIP_txt",
)
LPIPS_FILES = {
    "alex": (
        WeightFile(
            "lpips/alex.pth",
            "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
            "LPIPS v0.1 linear layers for AlexNet",
        ),
        WeightFile(
            "lpips/alexnet-owt-7be5be79.pth",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision ImageNet AlexNet)",
            "AlexNet backbone of LPIPS",
        ),
    ),
    "vgg": (
        WeightFile(
            "lpips/vgg.pth",
            "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
            "LPIPS v0.1 linear layers for VGG16",
        ),
        WeightFile(
            "lpips/vgg16-397923af.pth",
            "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision ImageNet VGG16)",
            "VGG16 backbone of LPIPS",
        ),
    ),
}


class MissingWeightsError(FileNotFoundError):
    """A weight file is absent from the models dir; the message says which file and how to get it."""


def models_dir(path: str | os.PathLike | None = None) -> Path:
    """The models dir: `path` if given, else `$INBETWEENER_MODELS`, else `~/.cache/inbetweener/models`."""
    chosen = path if path is not None else os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR
    return Path(chosen).expanduser()


def require_file(weight: WeightFile, root: str | os.PathLike | None = None) -> Path:
    """The path of `weight` under the models dir; `MissingWeightsError` if it is not there."""
    base = models_dir(root)
    path = base / weight.relpath
    if not path.is_file():
        raise MissingWeightsError(
            f"missing weight file {path} ({weight.what}). Put `{weight.relpath}` under the models dir "
            f"{base} (set by --models-dir or ${MODELS_DIR_ENV}); it comes from {weight.source}"
        )
    return path


class I3DFeatures:
    """FVD features from StyleGAN-V's TorchScript I3D: Kinetics-400 logits, averaged over time inside.

    Called as the protocol fixes: uint8-range float videos `[N, 3, T, H, W]` with `rescale=True` (0..255
    -> [-1, 1] inside), `resize=True` (to 224x224 inside) and `return_features=True` (the 400 logits
    before the softmax). Videos go through in batches on the detector's device; features come back as
    float64 on the CPU.
    """

    def __init__(self, detector: torch.nn.Module, batch_size: int = 16):
        self.detector = detector.eval()
        self.batch_size = batch_size

    def to(self, device: torch.device | str) -> I3DFeatures:
        self.detector = self.detector.to(device)
        return self

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"I3D takes videos [N, 3, T, H, W], got shape {tuple(videos.shape)}")
        param = next(iter(self.detector.parameters()), None)
        device = param.device if param is not None else videos.device
        out = []
        for chunk in videos.split(self.batch_size):
            chunk = chunk.to(device, torch.float32)
            feats = self.detector(chunk, rescale=True, resize=True, return_features=True)
            out.append(feats.to("cpu", torch.float64))
        return torch.cat(out)


def load_i3d(root: str | os.PathLike | None = None, batch_size: int = 16) -> I3DFeatures:
    """Load `i3d/i3d_torchscript.pt` from the models dir with `torch.jit.load`, on the CPU."""
    from manifests.weights import unreadable_weights

    path = require_file(I3D_FILE, root)
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this file ships in
        warnings.filterwarnings("ignore", message="`torch.jit", category=FutureWarning)
        try:
            detector = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # a truncated download or another file: name it, not torch's internals
            raise unreadable_weights(path, "TorchScript", exc) from exc
    return I3DFeatures(detector, batch_size=batch_size)


# OpenAI CLIP's normalisation, which OpenCLIP's ViT-H-14 (laion2b) was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipEncoder:
    """CLIP image and text embeddings from any model with `encode_image` / `encode_text` (OpenCLIP's API).

    Images are resized as whole frames to the tower's square input (bicubic, antialiased) rather than
    centre-cropped, so that the score sees the whole 512x320 frame; this is also how the model's own image
    conditioner feeds CLIP. Then OpenAI CLIP normalisation. Embeddings are returned unnormalised in
    float64; the cosine similarity normalises them.
    """

    def __init__(self, model: Any, tokenizer: Any, image_size: int | None = None, batch_size: int = 32):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.tokenizer = tokenizer
        if image_size is None:  # the tower's own input size (224 for ViT-H-14)
            size = getattr(getattr(model, "visual", None), "image_size", 224)
            image_size = size[0] if isinstance(size, tuple | list) else int(size)
        self.image_size = image_size
        self.batch_size = batch_size

    def _device(self) -> torch.device:
        param = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return param.device if param is not None else torch.device("cpu")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` in [0, 1] -> `[N, 3, S, S]` normalised CLIP input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP takes images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        size = (self.image_size, self.image_size)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        device = self._device()
        out = [
            self.model.encode_image(self.preprocess(chunk.to(device))).to("cpu", torch.float64)
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = self._device()
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(device)
            out.append(self.model.encode_text(tokens).to("cpu", torch.float64))
        return torch.cat(out)

    __call__ = embed_images


def load_open_clip(
    root: str | os.PathLike | None = None, model_name: str = "ViT-H-14", weight: WeightFile = CLIP_FILE
) -> OpenClipEncoder:
    """Build an OpenCLIP model from the local checkpoint `weight` (never the hub) and wrap it.

    The released ToonCrafter checkpoint carries the same ViT-H-14 towers; an encoder built from it (the
    training package's conditioners) can stand in for this one, since the metrics only need the callables.
    """
    path = require_file(weight, root)
    import open_clip  # heavy: imported only when a CLIP metric is asked for

    from manifests.weights import unreadable_weights

    try:
        model = open_clip.create_model(model_name, pretrained=str(path), device="cpu")
    except Exception as exc:  # truncated, or another model's weights (open_clip loads strictly)
        raise unreadable_weights(path, f"OpenCLIP {model_name} weights", exc) from exc
    return OpenClipEncoder(model, open_clip.get_tokenizer(model_name))
