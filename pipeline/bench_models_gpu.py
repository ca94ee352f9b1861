"""GPU benchmark of the curate job's model stages: clips/s and peak GPU memory per stage.

Each stage's model is built at full size with random weights (no download) and driven through the
stage's own `process_rows` with the pipeline's batch sizes, so preprocessing, transfers and the
text-box geometry are timed too: one worker, one GPU, 3 keyframes per clip at the keyframe size.

  text       CRAFT (VGG16-BN + U-net head, ~20M params), fp16 autocast, first/mid/last frames
  aesthetic  CLIP ViT-L/14 image tower (fp16) + the LAION MLP (fp32), 3 frames per clip; with --fp8
             also the tower with fp8 e4m3 linears (aesthetic.precision=fp8: fast accumulation, the
             biases added by the GEMMs, the patch embedding as a GEMM, the last block for the class
             token alone), then on a GPU the same tower with each forward replayed as a CUDA graph
             (aesthetic.cuda_graph), then the fp8 tower with the biases added after the GEMMs, the
             patch embedding as a convolution and the whole last block (the baseline, the form
             measured before), and how closely each one's embeddings follow the fp16 tower's on
             smooth random images (cosine, L2 distance)
  alignment  CLIP ViT-L/14 text tower (fp16) against stored image embeddings; beside it, the same
             stage with the tower over all 77 positions (its baseline, same run)
  caption    BLIP-2 OPT-2.7b (bf16), middle frame, greedy, exactly max_new_tokens new tokens
             (random weights never stop early; real captions stop sooner, so this is a floor)

The GPU machine has torch, torchvision and transformers but no open_clip or easyocr: CLIP is then
`transformers.CLIPModel` with the ViT-L/14 configuration (same shapes, QuickGELU) and CRAFT the
minimal definition below (same keys and shapes as easyocr's, checked by a test).
Targets on an H100 (issue 3): aesthetic + alignment >= 1,000 clips/s together, captioning >= 20
clips/s, CRAFT >= 100 clips/s.

examples:
  python -m pipeline.bench_models_gpu --out bench_models.json          # on the GPU machine
  python -m pipeline.bench_models_gpu --device cpu --tiny               # smoke run (a test runs it)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.stages.aesthetic import (
    AestheticStage,
    build_aesthetic_mlp,
    check_compile_backend,
    compile_image_tower,
    float8_image_tower,
)
from pipeline.stages.alignment import AlignmentStage
from pipeline.stages.caption import CaptionStage
from pipeline.stages.clip_tokens import clip_tokenizer
from pipeline.stages.text import CraftDetector, TextStage
from training.profile_unet import kernel_table

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- CRAFT without easyocr


def _minimal_craft():
    """easyocr's CRAFT (same module names, keys and shapes), for machines without easyocr."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models import vgg16_bn

    class DoubleConv(nn.Module):
        def __init__(self, cin, mid, cout):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(cin + mid, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )  # fmt: skip

        def forward(self, x):
            return self.conv(x)

    class Trunk(nn.Module):  # easyocr.model.modules.vgg16_bn: torchvision's features in 4 slices + fc6/fc7
        def __init__(self):
            super().__init__()
            features = vgg16_bn(weights=None).features
            for name, (a, b) in {
                "slice1": (0, 12),
                "slice2": (12, 19),
                "slice3": (19, 29),
                "slice4": (29, 39),
            }.items():
                part = nn.Sequential()
                for i in range(a, b):
                    part.add_module(str(i), features[i])
                setattr(self, name, part)
            self.slice5 = nn.Sequential(
                nn.MaxPool2d(3, 1, 1),
                nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                nn.Conv2d(1024, 1024, 1),
            )

        def forward(self, x):
            h2 = self.slice1(x)  # relu2_2, 1/2
            h3 = self.slice2(h2)  # relu3_2, 1/4
            h4 = self.slice3(h3)  # relu4_3, 1/8
            h5 = self.slice4(h4)  # relu5_3, 1/16
            return self.slice5(h5), h5, h4, h3, h2

    class Craft(nn.Module):
        def __init__(self):
            super().__init__()
            self.basenet = Trunk()
            self.upconv1 = DoubleConv(1024, 512, 256)
            self.upconv2 = DoubleConv(512, 256, 128)
            self.upconv3 = DoubleConv(256, 128, 64)
            self.upconv4 = DoubleConv(128, 64, 32)
            self.conv_cls = nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 2, 1),
            )  # fmt: skip

        def forward(self, x):
            s = self.basenet(x)
            y = self.upconv1(torch.cat([s[0], s[1]], 1))
            for up, skip in ((self.upconv2, s[2]), (self.upconv3, s[3]), (self.upconv4, s[4])):
                y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
                y = up(torch.cat([y, skip], 1))
            return self.conv_cls(y).permute(0, 2, 3, 1), y  # [n, h/2, w/2, 2], features

    return Craft()


def build_craft(fallback: bool):
    if not fallback:
        try:
            from easyocr.craft import CRAFT

            return CRAFT(pretrained=False, freeze=False), "easyocr.craft.CRAFT"
        except ImportError:
            pass
    return _minimal_craft(), "minimal CRAFT (bench_models_gpu)"


# --------------------------------------------------------------------------- CLIP without open_clip


class HFClip:
    """transformers.CLIPModel behind the three things the stages use from an open_clip model."""

    def __init__(self, model, image_size: int):
        self.model = model
        self.visual = model.vision_model
        self.visual.preprocess_cfg = {
            "size": (image_size, image_size),
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
        }

    @staticmethod
    def _features(out):
        return out if hasattr(out, "dim") else out.pooler_output  # transformers 5 returns an output object

    def encode_image(self, x):
        return self._features(self.model.get_image_features(pixel_values=x))

    def encode_text(self, tokens):
        return self._features(self.model.get_text_features(input_ids=tokens))


def build_clip(tiny: bool, fallback: bool, device, dtype):
    """(model, tokenizer, description): ViT-L/14 (or a tiny ViT) with the OpenAI layout."""
    import torch

    if not fallback:
        try:
            import open_clip

            name = "ViT-L-14"
            if tiny:
                name = "bench-tiny-clip"
                open_clip.factory._MODEL_CONFIGS[name] = {
                    "embed_dim": 32,
                    "vision_cfg": {
                        "image_size": 32,
                        "layers": 1,
                        "width": 32,
                        "head_width": 16,
                        "patch_size": 8,
                    },
                    "text_cfg": {
                        "context_length": 77,
                        "vocab_size": 49408,
                        "width": 32,
                        "heads": 2,
                        "layers": 1,
                    },
                }
            net = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
            return net.eval().to(device, dtype), clip_tokenizer(name), f"open_clip {name}"
        except ImportError:
            pass
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
        vision = {**text, "image_size": 32, "patch_size": 8}
        dim = 32
    else:
        text = {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
        }
        vision = {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "image_size": 224,
            "patch_size": 14,
        }
        dim = 768
    config = CLIPConfig(
        text_config={**text, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        vision_config={**vision, "hidden_act": "quick_gelu"},
        projection_dim=dim,
    )
    net = CLIPModel(config).eval().to(device, dtype)

    def tokenizer(captions):  # caption-like token ids: 16 words, then padding, EOT last
        rng = np.random.default_rng(0)
        ids = np.zeros((len(captions), 77), np.int64)
        ids[:, 0] = 49406
        ids[:, 1:17] = rng.integers(1000, 40000, (len(captions), 16))
        ids[:, 17] = 49407
        return torch.from_numpy(ids)

    return HFClip(net, vision["image_size"]), tokenizer, "transformers CLIPModel (ViT-L/14 config)"


# --------------------------------------------------------------------------- BLIP-2


class BenchProcessor:
    """Blip2Processor's two calls without a tokenizer: the image processor, image tokens + BOS."""

    def __init__(self, image_size: int, queries: int, image_token: int, bos: int):
        from transformers import BlipImageProcessor

        self.images = BlipImageProcessor(
            size={"height": image_size, "width": image_size}, image_mean=OPENAI_MEAN, image_std=OPENAI_STD
        )
        self.prefix = [image_token] * queries + [bos]

    def __call__(self, images, text, return_tensors="pt"):
        import torch

        ids = torch.tensor([self.prefix] * len(images))
        pixels = self.images(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row.tolist()) for row in ids]


def build_blip2(tiny: bool, device, dtype):
    """Blip2ForConditionalGeneration shaped like Salesforce/blip2-opt-2.7b (or tiny), random weights."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if tiny:
        small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        vision = {**small, "image_size": 32, "patch_size": 8}
        qformer = {**small, "encoder_hidden_size": 32}
        opt = {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        opt |= {"word_embed_proj_dim": 32, "vocab_size": 50304, "max_position_embeddings": 128}
        queries = 4
    else:  # the released config: EVA ViT-g/14, the default Q-Former, OPT-2.7b
        vision, qformer, queries = {}, {}, 32
        opt = {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32}
        opt |= {"word_embed_proj_dim": 2560, "vocab_size": 50304, "max_position_embeddings": 2048}
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config={"model_type": "opt", **opt, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
        num_query_tokens=queries,
        image_token_index=50265,
    )
    with torch.device(device):  # built where it runs: no 15 GB fp32 copy in host memory
        model = Blip2ForConditionalGeneration(config)
    model = model.eval().to(dtype)
    for generation in (model.generation_config, model.language_model.generation_config):
        generation.eos_token_id = None  # random weights: always generate max_new_tokens (worst case)
    image_size = config.vision_config.image_size
    return model, BenchProcessor(image_size, queries, 50265, 2)


# --------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(stage, rows: list[dict], device, batches: int) -> dict:
    """Clips/s of stage.process_rows over `batches` calls after one warm-up call; peak GPU memory."""
    import torch

    list(stage.process_rows(rows))  # warm-up: cudnn autotuning, allocator, lazy inits
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(batches):
        out = list(stage.process_rows(rows))
    _sync(device)
    seconds = time.perf_counter() - start
    clips = sum(r.get("row_kind") == "clip" for r in out) * batches
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "batch_size": len(rows),
        "batches": batches,
        "seconds": round(seconds, 4),
        "clips_per_s": round(clips / seconds, 2),
        "peak_gpu_mem_gib": None if peak is None else round(peak, 3),
    }


def _rows(n: int, size: tuple[int, int], seed: int = 0) -> list[dict]:
    """n clip rows with 3 random keyframes [h, w, 3] (random pixels: worst case for text geometry)."""
    rng = np.random.default_rng(seed)
    h, w = size
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    return [{"row_kind": "clip", "clip_id": f"c{i}", "keyframes": list(frames)} for i in range(n)]


# words of BLIP-2-like captions: the bench's captions differ, as a job's do (open_clip caches each
# word's merges, not each caption's)
CAPTION_WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "a an the cartoon anime character girl boy man woman dog cat bird robot monster walks runs jumps"
    " flies sits stands looks smiles talks holds with red blue green yellow hair hat dress ball sword"
    " umbrella in on at across through under over front of room forest street city sky night sunny"
    " meadow house car train water beach two three people group is are and 's"
).split()


def _captions(n: int, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(CAPTION_WORDS, rng.integers(6, 15))) for _ in range(n)]


def _caption_rows(rows: list[dict], emb: np.ndarray) -> list[dict]:
    """rows with a caption each and the stored image embeddings the aesthetic stage leaves."""
    return [
        {**r, "caption": c, "clip_image_emb": emb} for r, c in zip(rows, _captions(len(rows)), strict=True)
    ]


def tokenizer_row(tokenizer, n: int = 1024, repeats: int = 3) -> dict | None:
    """Captions/s of open_clip's tokenizer and of the stage's (`FastClipTokenizer`) on n captions,
    interleaved, the best of `repeats` each; whether their ids agree. None for another tokenizer."""
    import torch

    from pipeline.stages.clip_tokens import FastClipTokenizer

    if not isinstance(tokenizer, FastClipTokenizer):
        return None
    captions = _captions(n, seed=4)
    best = {"open_clip": float("inf"), "fast": float("inf")}
    for _ in range(repeats):
        for name, tok in (("open_clip", tokenizer.simple), ("fast", tokenizer)):
            start = time.perf_counter()
            ids = tok(captions)
            best[name] = min(best[name], time.perf_counter() - start)
            if name == "open_clip":
                reference = ids
    return {
        "captions": n,
        "open_clip_captions_per_s": round(n / best["open_clip"], 1),
        "fast_captions_per_s": round(n / best["fast"], 1),
        "speedup": round(best["open_clip"] / best["fast"], 2),
        "same_ids": bool(torch.equal(reference, ids)),
    }


def _smooth_rows(n: int, size: tuple[int, int], seed: int = 2) -> list[dict]:
    """n clip rows of 3 distinct smooth random images (a 6x10 colour grid upsampled bicubically):
    closer to drawn frames than pixel noise, for comparing two precisions of one tower."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    grid = torch.rand((3 * n, 3, 6, 10), generator=g) * 255
    frames = F.interpolate(grid, size=size, mode="bicubic", align_corners=False).clamp(0, 255)
    frames = frames.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [
        {"row_kind": "clip", "clip_id": f"s{i}", "keyframes": list(frames[3 * i : 3 * i + 3])}
        for i in range(n)
    ]


def agreement(reference: list[dict], other: list[dict]) -> dict:
    """How closely one run of the aesthetic stage follows another on the same rows: cosine (min,
    mean) and largest L2 distance of the normalised CLIP embeddings. The released predictor is linear
    in the embedding (no activations), so a score moves by at most |its weight vector| x that
    distance; with random weights here, the scores themselves would mean nothing."""
    a = np.concatenate([r["clip_image_emb"] for r in reference])
    b = np.concatenate([r["clip_image_emb"] for r in other])
    return {
        "frames": len(a),
        "embedding_cosine_min": round(float((a * b).sum(-1).min()), 6),
        "embedding_cosine_mean": round(float((a * b).sum(-1).mean()), 6),
        "embedding_l2_max": round(float(np.linalg.norm(a - b, axis=-1).max()), 6),
    }


def record(results: dict, name: str, row: dict) -> None:
    """Keep a stage's row and print it at once: a part stopped at its time limit still shows it."""
    results["stages"][name] = row
    print(f"measured {name}: {json.dumps(row)}", flush=True)


def _aesthetic_stage(clip, mlp, device, dtype, batch_size: int, precision: str = "auto") -> AestheticStage:
    """The aesthetic stage around models built here (random weights), as its setup() would leave it."""
    stage = AestheticStage(device=str(device), batch_size=batch_size, precision=precision)
    stage._device, stage._dtype, stage._clip, stage._mlp = device, dtype, clip, mlp
    stage._model, stage._sha256, stage._clip_sha256 = "laion (random)", None, None
    return stage


def _compiled_row(
    stage: AestheticStage, backend: str, rows: list[dict], device, batches: int, wide: bool = False
) -> dict:
    """Compile the stage's image tower in place (`wide`: with WIDE_REDUCTIONS) and time it: the first
    call (which compiles), then `measure`. The stage pads short chunks, so the tower meets one shape and
    compiles once."""
    compile_image_tower(stage._clip, backend, wide_reductions=wide)
    stage.compile = backend
    start = time.perf_counter()
    list(stage.process_rows(rows))
    _sync(device)
    return {"first_call_s": round(time.perf_counter() - start, 2), **measure(stage, rows, device, batches)}


def _measure_fp8(
    clip, aesthetic, tiny, fallback, device, backend, batch, size, batches, fused: bool = True, wide=False
) -> dict:
    """The aesthetic stage with a copy of `clip` (same weights) in bf16 with fp8 linears (with the
    biases in the GEMMs and the patch embedding as a GEMM, or not: `fused`), compiled with `backend` (""
    eager; `wide`: inductor's WIDE_REDUCTIONS); its row, with the stage under "stage" for the agreement
    check."""
    import torch

    clip8, _, _ = build_clip(tiny, fallback, device, torch.bfloat16)
    _module(clip8).load_state_dict(_module(clip).state_dict())
    counts = float8_image_tower(clip8, device, fused=fused)
    fast = _aesthetic_stage(clip8, aesthetic._mlp, device, torch.bfloat16, batch["aesthetic"], "fp8")
    rows = _rows(batch["aesthetic"], size)
    timing = (
        _compiled_row(fast, backend, rows, device, batches, wide)
        if backend
        else measure(fast, rows, device, batches)
    )
    return {"converted": counts, **timing, "stage": fast}


FP8_ROWS = (
    "aesthetic_fp8",
    "aesthetic_fp8_compiled",
    "aesthetic_fp8_graph",
    "aesthetic_fp8_compiled_graph",
    "aesthetic_fp8_unfused",
    "aesthetic_fp8_unfused_compiled",
)
FUSED = ", biases added by the GEMMs, patch embedding as a GEMM, last block for the class token"
UNFUSED = ", biases added after the GEMMs, patch embedding as a convolution, whole last block"
WIDE = ", persistent reductions over the MLP's 4,096-wide rows (inductor multi-kernel)"


def _graph_row(stage: AestheticStage, rows: list[dict], device, batches: int) -> dict:
    """The same stage with each forward replayed as a CUDA graph (recorded in the first call)."""
    stage.cuda_graph = True
    stage.graph_image_tower()
    start = time.perf_counter()
    list(stage.process_rows(rows))
    _sync(device)
    return {"first_call_s": round(time.perf_counter() - start, 2), **measure(stage, rows, device, batches)}


def _fastest_together(stages: dict) -> dict:
    """The fastest aesthetic form and the fastest alignment form measured at the stages' own clips per
    call, and their clips/s together (one after the other on one GPU)."""

    def fastest(names):
        rows = [(stages[n]["clips_per_s"], n) for n in names if "clips_per_s" in stages.get(n, {})]
        return max(rows)

    a, a_name = fastest(["aesthetic", "aesthetic_compiled", *FP8_ROWS])
    b, b_name = fastest(["alignment", "alignment_compiled", "alignment_compiled_graph"])
    return {"aesthetic": a_name, "alignment": b_name, "clips_per_s": round(1 / (1 / a + 1 / b), 2)}


def _alignment_forms(results: dict, alignment, impl: str, backend: str, rows, device, batches: int) -> str:
    """Rows alignment_compiled and alignment_compiled_graph (GPU only): the text tower compiled, then
    each forward replayed; a form that fails is a row with its error, and the stage is left in the last
    form that worked (the one the per-call rows measure), whose row name is returned."""
    from inference.cuda_graph import GraphedCall

    forms = [("alignment_compiled", False)] + (
        [("alignment_compiled_graph", True)] if GraphedCall.applies(device) else []
    )
    worked = "alignment"
    for name, graph in forms:
        model = f"{impl}, text tower torch.compile {backend}" + (", CUDA graph" if graph else "")
        try:
            alignment.compile, alignment.cuda_graph = backend, graph
            alignment.tune_text_tower()
            record(results, name, {"model": model, **measure(alignment, rows, device, batches)})
            worked = name
        except Exception as exc:  # one shot on a lent GPU: keep the other rows
            alignment.cuda_graph, alignment._graphed = False, None
            if not graph:  # the compile failed: back to the eager tower (a compiled one raises again)
                alignment.compile = ""
                alignment._clip.transformer._compiled_call_impl = None
            record(results, name, {"model": model, "error": f"{type(exc).__name__}: {exc}"[:600]})
            break
    return worked


def _module(clip):
    return getattr(clip, "model", clip)  # HFClip wraps a CLIPModel; an open_clip model is the module


def run(
    device_name: str,
    tiny: bool,
    fallback: bool,
    batches: int,
    stages: list[str],
    compile_backend: str = "",
    frames_per_forward: tuple[int, ...] = (),
    fp8: bool = False,
    profile: Path | None = None,
    clips_per_call: tuple[int, ...] = (),
) -> dict:
    import torch

    from pipeline.models import pick_device, pick_dtype

    device = pick_device(device_name)
    size = (64, 96) if tiny else (320, 512)  # keyframe (h, w): the config's 512x320
    clip_dtype = pick_dtype("auto", device)
    batch = {
        "text": TextStage.batch_size,
        "aesthetic": AestheticStage.batch_size,
        "alignment": AlignmentStage.batch_size,
        "caption": CaptionStage.batch_size,
    }
    if tiny:
        batch = dict.fromkeys(batch, 2)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "keyframe_size": [size[1], size[0]],
        "tiny": tiny,
        "stages": {},
    }
    torch.backends.cudnn.benchmark = True

    if "text" in stages:
        net, impl = build_craft(fallback)
        stage = TextStage(backend="craft", device=str(device))
        stage._frames, stage._backend, stage._model, stage._sha256 = (
            [0, 1, 2],
            "craft",
            "craft (random)",
            None,
        )
        stage._detector = CraftDetector(
            net.eval().to(device), stage.canvas_size, device, pick_dtype("auto", device)
        )
        record(
            results, "text", {"model": impl, **measure(stage, _rows(batch["text"], size), device, batches)}
        )
        del net, stage

    if "aesthetic" in stages or "alignment" in stages:
        clip, tokenizer, impl = build_clip(tiny, fallback, device, clip_dtype)
        mlp = build_aesthetic_mlp(32 if tiny else 768).eval().to(device)
        aesthetic = _aesthetic_stage(clip, mlp, device, clip_dtype, batch["aesthetic"])
        profiled, profiled_name = aesthetic, "aesthetic"  # the fastest form measured so far
        alignment, alignment_form = None, "alignment"  # the alignment stage's form after its rows
        if "aesthetic" in stages:
            rows = _rows(batch["aesthetic"], size)
            record(
                results,
                "aesthetic",
                {
                    "model": impl,
                    "frames_per_forward": aesthetic.frames_per_forward,
                    **measure(aesthetic, rows, device, batches),
                },
            )
            default_fpf = aesthetic.frames_per_forward
            for fpf in frames_per_forward:  # the same stage with other forward sizes, same run
                aesthetic.frames_per_forward = fpf
                record(
                    results,
                    f"aesthetic_{fpf}_per_forward",
                    {"model": impl, "frames_per_forward": fpf, **measure(aesthetic, rows, device, batches)},
                )
            aesthetic.frames_per_forward = default_fpf
            if fp8:  # the fp16 tower's embeddings of the comparison images, before anything compiles
                smooth = _smooth_rows(8 if tiny else 64, size)
                reference = list(aesthetic.process_rows(smooth))
        if "alignment" in stages:
            alignment = AlignmentStage(device=str(device))
            alignment._device, alignment._dtype, alignment._clip = device, clip_dtype, clip
            alignment._tokenizer, alignment._model, alignment._sha256 = tokenizer, "clip (random)", None
            # stored image embeddings as the aesthetic stage leaves them (random unit vectors: only
            # their dot products with the caption's embedding are computed here)
            emb = np.random.default_rng(1).standard_normal((3, 32 if tiny else 768)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
            rows = _caption_rows(_rows(batch["alignment"], size), emb)
            record(results, "alignment", {"model": impl, **measure(alignment, rows, device, batches)})
            tokens = tokenizer_row(tokenizer)
            if tokens:
                results["alignment_tokenizer"] = tokens
            # baseline, same run: the text tower over all 77 positions (open_clip's encode_text)
            trimmed = alignment.text_embeddings
            alignment.text_embeddings = functools.partial(trimmed, trim=False)
            record(
                results,
                "alignment_all_positions",
                {"model": impl, **measure(alignment, rows, device, batches)},
            )
            alignment.text_embeddings = trimmed
            if compile_backend and hasattr(clip, "text_pool_type"):  # an open_clip tower (not --fallbacks):
                # the text tower compiled, then (on a GPU) replayed as CUDA graphs
                alignment_form = _alignment_forms(
                    results, alignment, impl, compile_backend, rows, device, batches
                )
        if "aesthetic" in stages and compile_backend:
            # the same tower compiled in place, after every eager use
            row = _compiled_row(aesthetic, compile_backend, _rows(batch["aesthetic"], size), device, batches)
            record(
                results, "aesthetic_compiled", {"model": f"{impl}, torch.compile {compile_backend}", **row}
            )
            profiled_name = "aesthetic_compiled"
        if "aesthetic" in stages and fp8:
            # a second tower with the same weights, bf16 around fp8 linears (aesthetic.precision=fp8);
            # compiled with the fp16 row's backend; if that fails, the error is a row and fp8 runs eager.
            # First the stage's form (with inductor, the wide rows' persistent reductions too: if
            # only those fail, the error is a row and the form compiles without them), then (on a GPU)
            # the same tower replayed as CUDA graphs, then the baseline: the biases after the GEMMs,
            # the patch embedding as a convolution, the whole last block, loop reductions
            from inference.cuda_graph import GraphedCall

            for fused, suffix in ((True, ""), (False, "_unfused")):
                tried_first = (compile_backend, fused and compile_backend == "inductor")
                tries = dict.fromkeys([tried_first, (compile_backend, False), ("", False)])
                for backend, wide in tries:
                    name = f"aesthetic_fp8{suffix}" + ("_compiled" if backend else "")
                    impl8 = f"{impl}, fp8 e4m3 linears, fast accumulation{FUSED if fused else UNFUSED}"
                    impl8 += f", torch.compile {backend}" if backend else ""
                    impl8 += WIDE if wide else ""
                    try:
                        row = _measure_fp8(
                            clip,
                            aesthetic,
                            tiny,
                            fallback,
                            device,
                            backend,
                            batch,
                            size,
                            batches,
                            fused,
                            wide,
                        )
                        row["agreement_with_fp16"] = agreement(
                            reference, list(row["stage"].process_rows(smooth))
                        )
                        stage8 = row.pop("stage")
                        record(results, name, {"model": impl8, **row})
                    except Exception as exc:  # one shot on a lent GPU: keep the other rows
                        failed = name + ("_wide_reductions" if wide else "")
                        record(
                            results, failed, {"model": impl8, "error": f"{type(exc).__name__}: {exc}"[:600]}
                        )
                        continue
                    if fused:
                        profiled, profiled_name = stage8, name
                    if fused and GraphedCall.applies(device):
                        try:
                            row = _graph_row(stage8, _rows(batch["aesthetic"], size), device, batches)
                            row["agreement_with_fp16"] = agreement(
                                reference, list(stage8.process_rows(smooth))
                            )
                            record(results, f"{name}_graph", {"model": f"{impl8}, CUDA graph", **row})
                            profiled_name = f"{name}_graph"
                        except Exception as exc:
                            stage8.cuda_graph, stage8._graphed = False, None
                            record(
                                results,
                                f"{name}_graph",
                                {
                                    "model": f"{impl8}, CUDA graph",
                                    "error": f"{type(exc).__name__}: {exc}"[:600],
                                },
                            )
                    break
        if "aesthetic" in stages and profile:  # the fastest form of the stage measured above
            profile.parent.mkdir(parents=True, exist_ok=True)
            rows = _rows(batch["aesthetic"], size)
            call = lambda: list(profiled.process_rows(rows))  # noqa: E731
            profile.write_text(kernel_table(call, device, 30, f"one call of {len(rows)} clips"))
            print(f"wrote {profile}: {profile.read_text().splitlines()[0]}", flush=True)
        for n in clips_per_call:  # the fastest forms with more clips per call: the per-call waits amortised
            if "aesthetic" in stages:
                row = measure(profiled, _rows(n, size), device, batches)
                form = results["stages"][profiled_name]["model"]
                record(results, f"aesthetic_{n}_per_call", {"model": form, "form": profiled_name, **row})
            if alignment is not None:
                rows = _caption_rows(_rows(n, size), emb)
                form = results["stages"][alignment_form]["model"]
                record(
                    results,
                    f"alignment_{n}_per_call",
                    {"model": form, "form": alignment_form, **measure(alignment, rows, device, batches)},
                )
        del clip, aesthetic
        if {"aesthetic", "alignment"} <= set(results["stages"]):
            a, b = (
                results["stages"]["aesthetic"]["clips_per_s"],
                results["stages"]["alignment"]["clips_per_s"],
            )
            results["aesthetic_plus_alignment_clips_per_s"] = round(1 / (1 / a + 1 / b), 2)
            if "aesthetic_compiled" in results["stages"]:
                a = results["stages"]["aesthetic_compiled"]["clips_per_s"]
                results["aesthetic_compiled_plus_alignment_clips_per_s"] = round(1 / (1 / a + 1 / b), 2)
            for name in FP8_ROWS:
                if "clips_per_s" in results["stages"].get(name, {}):
                    a = results["stages"][name]["clips_per_s"]
                    results[f"{name}_plus_alignment_clips_per_s"] = round(1 / (1 / a + 1 / b), 2)
            for n in clips_per_call:
                a, b = (
                    results["stages"].get(f"{k}_{n}_per_call", {}).get("clips_per_s")
                    for k in ("aesthetic", "alignment")
                )
                if a and b:
                    results[f"{n}_per_call_plus_alignment_clips_per_s"] = round(1 / (1 / a + 1 / b), 2)
            results["fastest_forms_together"] = _fastest_together(results["stages"])

    if "caption" in stages:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dtype = pick_dtype("auto", device, gpu_default="bf16")
        model, processor = build_blip2(tiny, device, dtype)
        stage = CaptionStage(device=str(device))
        stage._frames, stage._device, stage._dtype = [1], device, dtype
        stage._processor, stage._model, stage._sha256 = processor, model, None
        impl = "BLIP-2 OPT-2.7b config" if not tiny else "BLIP-2 tiny config"
        rows = _rows(batch["caption"], size)
        record(
            results,
            "caption",
            {"model": impl, "max_new_tokens": stage.max_new_tokens, **measure(stage, rows, device, batches)},
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench_models_gpu",
        description="clips/s and peak GPU memory of the model stages at full size with random weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m pipeline.bench_models_gpu --out bench_models.json\n"
        "  python -m pipeline.bench_models_gpu --device cpu --tiny",
    )
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default)")
    p.add_argument("--tiny", action="store_true", help="tiny models and frames: a smoke run on CPU")
    p.add_argument("--fallbacks", action="store_true", help="use the no-open_clip / no-easyocr paths")
    p.add_argument("--batches", type=int, default=None, help="timed calls per stage (default 5; tiny 1)")
    p.add_argument("--stages", default="text,aesthetic,alignment,caption", help="comma-separated")
    p.add_argument(
        "--compile",
        default="",
        metavar="BACKEND",
        help="also measure the aesthetic stage with its CLIP image tower torch.compile'd (e.g. inductor)",
    )
    p.add_argument(
        "--frames-per-forward",
        default="",
        metavar="N,M",
        help="also measure the aesthetic stage with these CLIP forward sizes (the stage's default is 48)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="also measure the aesthetic stage with fp8 e4m3 linears in the image tower (compiled with"
        " --compile's backend if given) and its agreement with the fp16 tower",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="write torch.profiler's table of one more aesthetic call (its last form: fp8 or compiled"
        " when measured) here, after how busy the device was during it",
    )
    p.add_argument(
        "--clips-per-call",
        default="",
        metavar="N,M",
        help="also measure the fastest aesthetic form and the alignment stage with these many clips per"
        " call (the stages' defaults: 64 and 128), and the two together at each",
    )
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        per_call = tuple(int(x) for x in args.clips_per_call.split(",") if x.strip())
        if any(n < 1 for n in per_call):
            raise ValueError
    except ValueError:
        p.error(f"--clips-per-call: expected positive integers like 256,512, got {args.clips_per_call!r}")
    try:
        fpf = tuple(int(x) for x in args.frames_per_forward.split(",") if x.strip())
        if any(n < 1 for n in fpf):
            raise ValueError
    except ValueError:
        p.error(
            f"--frames-per-forward: expected positive integers like 48,192, got {args.frames_per_forward!r}"
        )
    if args.compile:
        try:
            check_compile_backend(args.compile, "--compile")
        except ValueError as exc:
            p.error(str(exc))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    batches = args.batches or (1 if args.tiny else 5)
    results = run(
        args.device,
        args.tiny,
        args.fallbacks,
        batches,
        stages,
        args.compile,
        fpf,
        args.fp8,
        args.profile,
        per_call,
    )
    print(f"device: {results['device']}  torch {results['torch']}  keyframes {results['keyframe_size']}")
    width = max(map(len, results["stages"]), default=0)
    for name, r in results["stages"].items():
        if "error" in r:
            print(f"  {name:<{width}} failed: {r['error']}")
            continue
        mem = "-" if r["peak_gpu_mem_gib"] is None else f"{r['peak_gpu_mem_gib']:.2f} GiB"
        print(
            f"  {name:<{width}} {r['clips_per_s']:>9.1f} clips/s  batch {r['batch_size']:>3}  peak {mem:<10} {r['model']}"
        )
    if "alignment_all_positions" in results["stages"]:
        trimmed, full = (
            results["stages"][k]["clips_per_s"] for k in ("alignment", "alignment_all_positions")
        )
        print(f"  alignment, text tower up to the longest caption vs all 77 positions: {trimmed / full:.2f}x")
    if "alignment_tokenizer" in results:
        t = results["alignment_tokenizer"]
        print(
            f"  alignment's tokenizer (open_clip's ids, BPE in Rust) vs open_clip's: {t['speedup']:.2f}x"
            f" ({t['fast_captions_per_s']:.0f} vs {t['open_clip_captions_per_s']:.0f} captions/s,"
            f" same ids: {t['same_ids']})"
        )
    if "aesthetic_plus_alignment_clips_per_s" in results:
        print(
            f"  aesthetic + alignment together: {results['aesthetic_plus_alignment_clips_per_s']:.1f} clips/s"
        )
    if "aesthetic_compiled_plus_alignment_clips_per_s" in results:
        print(
            "  aesthetic (compiled) + alignment together:"
            f" {results['aesthetic_compiled_plus_alignment_clips_per_s']:.1f} clips/s"
        )
    for name in FP8_ROWS:
        if "agreement_with_fp16" in results["stages"].get(name, {}):
            agree = results["stages"][name]["agreement_with_fp16"]
            print(
                f"  {name} vs the fp16 tower on {agree['frames']} smooth random images: embedding cosine"
                f" min {agree['embedding_cosine_min']:.5f} mean {agree['embedding_cosine_mean']:.5f},"
                f" largest L2 distance {agree['embedding_l2_max']:.4f}"
            )
        if f"{name}_plus_alignment_clips_per_s" in results:
            print(
                f"  {name} + alignment together: {results[f'{name}_plus_alignment_clips_per_s']:.1f} clips/s"
            )
    if "fastest_forms_together" in results:
        best = results["fastest_forms_together"]
        print(
            f"  the fastest forms at the stages' own clips per call, {best['aesthetic']} + {best['alignment']}"
            f" together: {best['clips_per_s']:.1f} clips/s"
        )
    for n in per_call:
        if f"{n}_per_call_plus_alignment_clips_per_s" in results:
            print(
                f"  {n} clips per call, the fastest aesthetic form + alignment together:"
                f" {results[f'{n}_per_call_plus_alignment_clips_per_s']:.1f} clips/s"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
