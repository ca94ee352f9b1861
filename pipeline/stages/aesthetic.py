"""aesthetic: the LAION improved aesthetic predictor on the first, middle and last keyframes.

The predictor (christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`)
is an MLP over L2-normalised CLIP ViT-L/14 image embeddings (OpenAI weights, the ones it was trained
on). Its released layout is `layers` = Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1): no activations (they
are commented out in the release), so the state dict holds layers.{0,2,4,6,7}.{weight,bias}.
Scores are on the AVA scale (1..10); `aesthetic_min` is the minimum over the three frames.

The CLIP image embeddings (normalised, float32, [3, D]: first, mid, last) are kept in the heavy
column `clip_image_emb`, so the alignment stage needs no second image forward.

Defaults and why: CLIP `ViT-L-14` with the `openai` weights (the predictor's input space; QuickGELU
as OpenAI trained it), fp16 on a GPU (CLIP's own release precision) and fp32 on CPU, the predictor
always in fp32; preprocessing is open_clip's eval transform (shortest side to 224, bicubic,
centre crop, CLIP mean/std) done on the device for the whole batch. The reject threshold
AESTHETIC_MIN = 4.0: flat-colour cartoon frames score lower than photographs on this scale (about
4.5-5.5), so 4.0 only removes the clearly broken or blank frames; raise it with `select`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.models import (
    WeightFile,
    add_lineage,
    aesthetic_file,
    clip_file,
    file_sha256,
    load_verified,
    pick_device,
    pick_dtype,
    resolve_models_dir,
)
from pipeline.stages.base import Stage

AESTHETIC_MIN = 4.0  # default aesthetic.min: reject clips whose worst keyframe scores below this


# --------------------------------------------------------------------------- CLIP (shared with alignment)


def register_clip_config(model: str, models_dir: Path) -> None:
    """A model name open_clip does not know is read from MODELS_DIR/open_clip/NAME.json (open_clip's
    model config format: embed_dim, vision_cfg, text_cfg); tests use it for a tiny CLIP."""
    import open_clip

    path = models_dir / "open_clip" / f"{model}.json"
    if open_clip.get_model_config(model) is None and path.exists():
        open_clip.add_model_config(path)


def _build_clip(model: str, pretrained: str, device):
    import open_clip

    quick_gelu = bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    # open_clip warns "Model initialized randomly" when it loads no weights itself: ours load next
    with _quiet_root_warning("No pretrained weights loaded"):
        return open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu, device=device)


@contextlib.contextmanager
def _quiet_root_warning(start: str):
    """Drop the root logger's records beginning with `start` while the block runs."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(start)

    root = logging.getLogger()
    root.addFilter(keep)
    handlers = list(root.handlers)
    for h in handlers:  # logging.warning() before any configuration goes to the last-resort handler
        h.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        for h in handlers:
            h.removeFilter(keep)


def clip_shapes(model: str, pretrained: str, models_dir: Path) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the open_clip model, built on the meta device (no memory, no weights)."""
    import open_clip
    import torch

    register_clip_config(model, models_dir)
    if open_clip.get_model_config(model) is None:  # open_clip's own error lists its 200 models
        raise ValueError(f"unknown open_clip model {model!r} (no MODELS_DIR/open_clip/{model}.json either)")
    with torch.device("meta"):
        net = _build_clip(model, pretrained, "meta")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def clip_weight_file(model: str, pretrained: str, models_dir: Path) -> WeightFile:
    return clip_file(model, pretrained, lambda: clip_shapes(model, pretrained, models_dir))


def load_clip(model: str, pretrained: str, models_dir: Path, device="cpu", dtype=None):
    """open_clip model from MODELS_DIR/open_clip/MODEL.PRETRAINED.safetensors, keys checked."""
    register_clip_config(model, models_dir)
    state = load_verified(clip_weight_file(model, pretrained, models_dir), models_dir)
    net = _build_clip(model, pretrained, "cpu")
    net.load_state_dict(state)
    net = net.eval().to(device)
    return net.to(dtype) if dtype is not None else net


def clip_preprocess(frames, cfg: dict):
    """uint8 [n, h, w, 3] tensor -> [n, 3, S, S] float, open_clip's eval transform on the device:
    shortest side to S (long side int(S * long / short), as torchvision), bicubic with antialias,
    rounded to 8 bits like PIL, centre crop, CLIP mean/std."""
    import torch.nn.functional as F

    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    x = frames.permute(0, 3, 1, 2).float()  # [n, 3, h, w], 0..255
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 255).round() / 255.0
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean, std = _channel_stats(tuple(cfg["mean"]), tuple(cfg["std"]), x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=8)
def _channel_stats(mean: tuple, std: tuple, device):
    """CLIP's mean and std as [1, 3, 1, 1] tensors on `device`, made once: a copy from the host inside
    a CUDA graph's recording would fail, and each call would otherwise upload them again."""
    import torch

    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))


def embed_frames(net, dtype, frames):
    """Same-size uint8 frames on the device [n, h, w, 3] -> L2-normalised CLIP image embeddings, float32
    [n, D]: preprocessing and the image tower, nothing that waits for the device (a CUDA graph records it
    whole)."""
    return _embed(net, dtype, clip_preprocess(frames, net.visual.preprocess_cfg))


def _embed(net, dtype, x):
    """Preprocessed images [n, 3, S, S] -> L2-normalised embeddings, float32 [n, D]."""
    import torch

    emb = net.encode_image(x.to(dtype).contiguous())  # one layout, cropped or not
    return torch.nn.functional.normalize(emb.float(), dim=-1)


def _padded(x, n: int):
    """x with zeros appended along the first dimension up to n rows."""
    import torch

    return x if len(x) >= n else torch.cat([x, x.new_zeros((n - len(x), *x.shape[1:]))])


def encode_frames(
    net,
    frames: list[np.ndarray],
    device,
    dtype,
    chunk: int = 256,
    fixed: bool = False,
    host: bool = True,
    graphed=None,
):
    """RGB uint8 frames -> L2-normalised CLIP image embeddings, float32 [n, D] (one forward per frame):
    a numpy array, or with `host=False` a tensor left on `device` (no wait for the device).

    Frames go to the device `chunk` at a time and nothing waits for the device until the end: on a
    GPU, the host stacks the next chunk into pinned memory while the device encodes the previous one,
    and the copies run on a stream of their own (`FrameUploader`), so they overlap the encoding
    instead of queueing behind it. With `fixed`, every forward sees exactly `chunk` images (a short
    chunk is padded with black frames whose embeddings are dropped), so a compiled tower meets one
    shape. `graphed`: `embed_frames` wrapped in an `inference.cuda_graph.GraphedCall` (with `fixed`),
    which then runs each chunk of same-size frames as one replay."""
    import torch

    embed = graphed if graphed is not None else (lambda x: embed_frames(net, dtype, x))
    cfg = net.visual.preprocess_cfg
    upload = FrameUploader(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), chunk):
            part = frames[i : i + chunk]
            size = chunk if fixed else len(part)
            if len({f.shape for f in part}) == 1:
                emb = embed(_padded(upload(part), size))
            else:  # frames of several sizes: each resized on its own, then one batch
                x = torch.cat([clip_preprocess(upload([f]), cfg) for f in part])
                emb = _embed(net, dtype, _padded(x, size))
            out.append(emb[: len(part)])
    emb = torch.cat(out)
    return emb.cpu().numpy() if host else emb


class FrameUploader:
    """Same-shape uint8 frames -> one [n, h, w, 3] tensor on `device`, ready for the current stream.

    On a GPU the frames are stacked into pinned memory and copied on a side stream that the current
    stream then waits for: the copy of one chunk (~24 MB for 48 frames of 320x512) runs on the copy
    engine while the previous chunk is being encoded, not in the encoding stream's queue. Nothing
    waits on the host: torch's pinned-memory cache keeps a block until the copy out of it is done,
    and `record_stream` keeps the device copy's memory from being reused by a later upload until the
    current stream has read it. Elsewhere it is `torch.from_numpy(np.stack(frames)).to(device)`."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, frames: list[np.ndarray]):
        import torch

        if self.stream is None:
            return torch.from_numpy(np.stack(frames)).to(self.device)
        dtype = torch.from_numpy(np.empty(0, frames[0].dtype)).dtype
        host = torch.empty((len(frames), *frames[0].shape), dtype=dtype, pin_memory=True)
        np.stack(frames, out=host.numpy())
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
        consumer.wait_stream(self.stream)
        x.record_stream(consumer)
        return x


def text_positions(net, tokens, multiple: int = 1) -> int | None:
    """How many leading token positions reach some caption's pooled feature, rounded up to `multiple`
    and at most the context length; None for a text tower of another kind.

    CLIP's text tower is causal and pools the end-of-text token, so the padding after the longest
    caption's end-of-text never reaches any caption's feature: the tower runs on the first n positions
    (n = the last end-of-text position + 1) instead of all 77, the same result for ~4x fewer FLOPs
    with a caption of ~15 words (`text_features`). Models of another kind (no causal mask, another
    pooling) take open_clip's own `encode_text`. Tokens on the host cost no wait for the device."""
    pool = getattr(net, "text_pool_type", None)
    mask = getattr(net, "attn_mask", None)
    if pool not in ("argmax", "eos") or mask is None or not hasattr(net, "positional_embedding"):
        return None
    eos = getattr(net, "text_eos_id", None)
    ends = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == eos).int().argmax(dim=-1)
    n = int(ends.max()) + 1
    return min(-(-n // multiple) * multiple, tokens.shape[1])


def text_features(net, tokens):
    """The text tower of an open_clip model of `text_positions`' kind over all of `tokens`' positions
    (already cut to the ones that matter): pooled, projected features [n, D]. Nothing waits for the
    device, so a CUDA graph records it whole."""
    from open_clip.transformer import text_global_pool  # an open_clip model: open_clip is there

    n = tokens.shape[1]
    pool, mask, eos = net.text_pool_type, net.attn_mask, getattr(net, "text_eos_id", None)
    cast = net.transformer.get_cast_dtype()
    x = net.token_embedding(tokens).to(cast) + net.positional_embedding[:n].to(cast)
    x = net.ln_final(net.transformer(x, attn_mask=mask[:n, :n]))
    x = text_global_pool(x, tokens, pool, eos_token_id=eos)
    if net.text_projection is None:
        return x
    return net.text_projection(x) if callable(net.text_projection) else x @ net.text_projection


def float8_image_tower(net, device, fast_accum: bool = True, fused: bool = True) -> dict[str, int]:
    """`aesthetic.precision=fp8`: the image tower's linears and attention projections in fp8 e4m3
    (pipeline/float8.py), with fast accumulation unless `fast_accum=False`, its patch embedding as a
    bf16 GEMM and its last block for the class token alone (open_clip towers that pool it); the tower
    must already be in bf16. `fused=False` (the benchmark's baseline) adds the biases after the GEMMs and
    keeps the convolution and the whole last block. Returns the conversion counts."""
    from pipeline.float8 import (
        convert_to_float8,
        first_token_last_block,
        float8_supported,
        patch_embeddings_as_gemms,
    )

    if not float8_supported(device):
        import torch

        card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(
            f"aesthetic.precision=fp8 needs fp8 tensor cores (CUDA compute capability 8.9 or later:"
            f" L4, L40S, H100, ...) or the CPU; {card} has none: use fp16 or bf16"
        )
    counts = convert_to_float8(net.visual, fast_accum, fused_bias=fused)
    if counts["linear"] + counts["attention"] == 0:
        raise ValueError(
            "aesthetic.precision=fp8: the CLIP image tower has no layer fp8 can run (widths % 16)"
        )
    counts["patch_embedding"] = patch_embeddings_as_gemms(net.visual) if fused else 0
    counts["first_token_block"] = int(fused and first_token_last_block(net.visual))
    return counts


# Inductor's options for the fp8 tower. Inductor keeps a row in registers (a "persistent" reduction, one
# read of the row) only up to 1,024 values; a wider row is reduced in a loop and read twice. The fp8
# tower's widest rows are the MLP's 4,096 hidden values, whose GELU, rowwise amax and e4m3 cast before
# the second linear took 18% of its kernel time on an H100 (BENCHMARKS.md), read twice. With
# `multi_kernel`, inductor also generates the persistent kernel for rows of up to 16x that width and
# keeps whichever of the two runs faster on the first call.
WIDE_REDUCTIONS = {"triton.multi_kernel": 1}


def compile_image_tower(net, backend: str, wide_reductions: bool = False) -> None:
    """`torch.compile` the image tower in place ("" leaves it eager); an unknown backend is an error
    naming `aesthetic.compile`. `wide_reductions` (inductor only; the fp8 tower's setting): the
    WIDE_REDUCTIONS options."""
    if not backend:
        return
    check_compile_backend(backend, "aesthetic.compile")
    options = WIDE_REDUCTIONS if wide_reductions and backend == "inductor" else None
    net.visual.compile(backend=backend, dynamic=False, options=options)


def check_compile_backend(backend: str, key: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"{key}: unknown torch.compile backend {backend!r}; one of {sorted(known)}")


# --------------------------------------------------------------------------- the predictor


def build_aesthetic_mlp(dim: int = 768):
    """The predictor in its released layout (state dict keys layers.{0,2,4,6,7}.{weight,bias})."""
    from torch import nn

    head = nn.Module()
    head.layers = nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    return head


def mlp_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_aesthetic_mlp(dim).state_dict().items()}


def load_aesthetic_mlp(models_dir: Path, dim: int = 768, device="cpu"):
    state = load_verified(aesthetic_file(lambda: mlp_shapes(dim)), models_dir)
    head = build_aesthetic_mlp(dim)
    head.load_state_dict(state)
    return head.eval().to(device)


def clip_embed_dim(model: str, models_dir: Path) -> int:
    import open_clip

    register_clip_config(model, models_dir)
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r} (no MODELS_DIR/open_clip/{model}.json either)")
    return int(cfg["embed_dim"])


# --------------------------------------------------------------------------- the stage


@dataclass
class AestheticStage(Stage):
    clip_model: str = "ViT-L-14"  # open_clip model name; the predictor was trained on its embeddings
    clip_pretrained: str = "openai"  # weights tag: MODELS_DIR/open_clip/<model>.<tag>.safetensors
    models_dir: str | None = None  # None: $INBETWEENER_MODELS, else ~/.cache/inbetweener/models
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # CLIP tower: auto = fp16 on GPU, fp32 on CPU; fp32|fp16|bf16|fp8 (MLP: fp32)
    # clips per call (3 frames each): 256 measured 1.04x over 64 on an H200 (the GPU idles at a call's
    # start and end; 1024: 1.05x), ~380 MB of 512x320 keyframes per batch in Ray's object store
    batch_size: int = 256
    num_gpus: float = 0.25  # ViT-L/14 fp16 needs ~1 GB; set 0 on machines without GPU
    compile: str = ""  # a torch.compile backend for the image tower ("inductor" on GPU); "": eager
    frames_per_forward: int = 48  # CLIP forward size: the host prepares one chunk while the GPU runs another
    cuda_graph: bool = False  # GPU only: replay each forward (preprocessing + tower) as a CUDA graph

    name = "aesthetic"
    reads = ("keyframes",)
    _graphed = None  # set by setup() (graph_image_tower): the CUDA-graph replay of each forward
    num_cpus = 1.0

    def weight_files(self) -> list[WeightFile]:
        root = resolve_models_dir(self.models_dir)
        dim = lambda: clip_embed_dim(self.clip_model, root)  # noqa: E731 - deferred: needs open_clip
        return [
            aesthetic_file(lambda: mlp_shapes(dim())),
            clip_weight_file(self.clip_model, self.clip_pretrained, root),
        ]

    def setup(self) -> None:
        root = resolve_models_dir(self.models_dir)
        self._device = pick_device(self.device)
        fp8 = self.precision == "fp8"
        self._dtype = pick_dtype("bf16" if fp8 else self.precision, self._device)
        self._clip = load_clip(self.clip_model, self.clip_pretrained, root, self._device, self._dtype)
        if fp8:
            float8_image_tower(self._clip, self._device)
        compile_image_tower(self._clip, self.compile, wide_reductions=fp8)
        self.graph_image_tower()
        dim = clip_embed_dim(self.clip_model, root)
        self._mlp = load_aesthetic_mlp(root, dim, self._device)
        self._model = f"laion-aesthetic sac+logos+ava1-l14-linearMSE on open_clip {self.clip_model}/{self.clip_pretrained}"
        self._model += " (image tower linears in fp8 e4m3)" if fp8 else ""
        self._sha256 = file_sha256(root / aesthetic_file().path, root)
        self._clip_sha256 = file_sha256(root / clip_file(self.clip_model, self.clip_pretrained).path, root)

    def graph_image_tower(self) -> None:
        """With `cuda_graph` on a CUDA device: each forward of the image tower, its preprocessing
        included, is recorded once per frame size and replayed (`inference.cuda_graph.GraphedCall`;
        the tower meets one batch shape, short chunks padded): one launch instead of hundreds, so the
        GPU does not idle between kernels while the host launches them. Elsewhere: nothing."""
        from inference.cuda_graph import GraphedCall

        self._graphed = None
        if self.cuda_graph and GraphedCall.applies(self._device):
            self._graphed = GraphedCall(functools.partial(embed_frames, self._clip, self._dtype))

    def scores(self, emb):
        """Normalised embeddings [n, D] (a tensor on the stage's device) -> aesthetic scores [n], fp32 MLP."""
        import torch

        with torch.inference_mode():
            return self._mlp.layers(emb.to(self._device, torch.float32))[:, 0]

    def process_rows(self, rows: list[dict]):
        todo = [
            i for i, r in enumerate(rows) if r.get("row_kind") == "clip" and r.get("keyframes") is not None
        ]
        frames = [f for i in todo for f in rows[i]["keyframes"][:3]]
        emb = scores = None
        if frames:  # embeddings and scores computed on the device, then one wait for both
            emb = encode_frames(
                self._clip,
                frames,
                self._device,
                self._dtype,
                self.frames_per_forward,
                fixed=bool(self.compile) or self._graphed is not None,
                host=False,
                graphed=self._graphed,
            )
            scores = self.scores(emb).float().cpu().numpy()
            emb = emb.cpu().numpy()
        done = {i: j for j, i in enumerate(todo)}
        for i, row in enumerate(rows):
            if i not in done:
                yield row
                continue
            j = done[i]
            first, mid, last = (float(s) for s in scores[3 * j : 3 * j + 3])
            yield {
                **row,
                "aesthetic_first": first,
                "aesthetic_mid": mid,
                "aesthetic_last": last,
                "aesthetic_min": min(first, mid, last),
                "clip_image_emb": emb[3 * j : 3 * j + 3].copy(),  # float32 [3, D]: first, mid, last
                **add_lineage(row, self.name, self._model, self._sha256, clip_sha256=self._clip_sha256),
            }
