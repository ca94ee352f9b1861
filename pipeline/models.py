"""Weights: the models directory, what each job's stages need in it, and their checks (`inbetweener models`
is pipeline/models_cli.py).

Nothing downloads implicitly. Stages load their weights from the models directory and fail with a
`WeightsError` that names the file and the command fetching it; only `inbetweener models download`
goes to the network. The directory is `--models-dir`, else $INBETWEENER_MODELS (the inference code
reads the same variable), else ~/.cache/inbetweener/models. Its layout:

  easyocr/craft_mlt_25k.pth                      text (backend craft): easyocr's CRAFT detector
  aesthetic/sac+logos+ava1-l14-linearMSE.pth     aesthetic: the LAION improved aesthetic predictor (MLP)
  open_clip/ViT-L-14.openai.safetensors          aesthetic + alignment: OpenAI CLIP ViT-L/14 with
                                                 open_clip key names (HF timm/vit_large_patch14_clip_224.openai,
                                                 file open_clip_model.safetensors)
  hf/Salesforce/blip2-opt-2.7b/                  caption: a Hugging Face snapshot (config.json,
                                                 safetensors shards + index, tokenizer, processor)

A file is checked without building its model where the format allows: a safetensors header is read
(names, shapes, and whether the data it announces is all there), a PyTorch state dict is unpickled
with `weights_only=True` and its keys and shapes compared with the network's (built on the meta
device, no memory). Hashes are only compared where the publisher states one (easyocr's md5 of
CRAFT); sha256 values of the other files are unknown to us and not invented: they are computed,
cached beside the files (.sha256.json) and recorded in the manifest's `models` lineage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from manifests.files import write_json_atomic
from manifests.weights import (  # the file checks every job shares; curate's stages import them from here
    Shapes,
    WeightsError,
    compare_shapes,
    load_torch_state_dict,
    safetensors_header,
    strip_prefix,
)

ENV_VAR = "INBETWEENER_MODELS"
DEFAULT_DIR = "~/.cache/inbetweener/models"
JOBS: dict[str, tuple[str, ...]] = {"curate": ("text", "aesthetic", "caption", "alignment")}


def resolve_models_dir(path: str | os.PathLike | None = None) -> Path:
    """--models-dir, else $INBETWEENER_MODELS, else ~/.cache/inbetweener/models."""
    chosen = path or os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(chosen).expanduser()


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class WeightFile:
    """One file (or Hugging Face snapshot folder) a stage needs, and where it comes from."""

    path: str  # relative to the models directory
    kind: str  # "torch" (pickled state dict) | "safetensors" | "hf-snapshot" (a folder)
    what: str  # one line for `inbetweener models list`
    hf_repo: str | None = None  # Hugging Face hub repo id
    hf_file: str | None = None  # file inside hf_repo (single-file weights)
    url: str | None = None  # release URL where not on the hub
    url_member: str | None = None  # the file inside a zip at `url`
    size: int | None = None  # bytes, where the publisher states it
    sha256: str | None = None  # where the publisher states it
    md5: str | None = None  # where the publisher states it (easyocr states md5)
    optional: bool = False  # missing is fine (another backend serves), broken is not
    expect: Callable[[], Shapes] | None = field(default=None, compare=False, repr=False)
    prefix: str = ""  # key prefix in the file that the network does not have (CRAFT: "module.")

    def source(self) -> str:
        if self.hf_repo:
            return f"huggingface.co/{self.hf_repo}" + (f" ({self.hf_file})" if self.hf_file else "")
        return self.url + (f" (member {self.url_member})" if self.url_member else "") if self.url else "?"


CRAFT_FILE = "easyocr/craft_mlt_25k.pth"
# md5 as stated by easyocr 1.7.2 (easyocr/config.py, detection_models["craft"]["md5sum"])
CRAFT_MD5 = "2f8227d2def4037cdb3b34389dcf9ec1"
CRAFT_URL = "https://github.com/JaidedAI/EasyOCR/releases/download/pre-v1.1.6/craft_mlt_25k.zip"
AESTHETIC_FILE = "aesthetic/sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
# open_clip model name + pretrained tag -> hub repo holding `open_clip_model.safetensors`
CLIP_HUB = {("ViT-L-14", "openai"): "timm/vit_large_patch14_clip_224.openai"}
BLIP2_REQUIRED_PREFIXES = (
    "vision_model.",
    "qformer.",
    "language_projection.",
    "language_model.",
    "query_tokens",
)


def craft_file(expect: Callable[[], Shapes] | None = None, optional: bool = False) -> WeightFile:
    return WeightFile(
        CRAFT_FILE,
        "torch",
        "CRAFT text detector (easyocr), keys prefixed 'module.'",
        url=CRAFT_URL,
        url_member="craft_mlt_25k.pth",
        md5=CRAFT_MD5,
        optional=optional,
        expect=expect,
        prefix="module.",
    )


def aesthetic_file(expect: Callable[[], Shapes] | None = None) -> WeightFile:
    return WeightFile(
        AESTHETIC_FILE,
        "torch",
        "LAION improved aesthetic predictor MLP (on CLIP ViT-L/14 embeddings)",
        url=AESTHETIC_URL,
        expect=expect,
    )


def clip_path(model: str, pretrained: str) -> str:
    return f"open_clip/{model}.{pretrained}.safetensors"


def clip_file(model: str, pretrained: str, expect: Callable[[], Shapes] | None = None) -> WeightFile:
    return WeightFile(
        clip_path(model, pretrained),
        "safetensors",
        f"open_clip {model} weights '{pretrained}' (safetensors, open_clip key names)",
        hf_repo=CLIP_HUB.get((model, pretrained)),
        hf_file="open_clip_model.safetensors",
        expect=expect,
    )


def hf_folder(repo: str) -> str:
    return repo if Path(repo).is_absolute() else f"hf/{repo}"


def blip2_folder(repo: str) -> WeightFile:
    return WeightFile(
        hf_folder(repo),
        "hf-snapshot",
        f"BLIP-2 {repo} (Hugging Face snapshot: config, safetensors, tokenizer, processor)",
        hf_repo=None if Path(repo).is_absolute() else repo,
    )


def ppocr_det_model() -> Path | None:
    """The PP-OCR text detector ONNX file shipped inside the rapidocr-onnxruntime wheel (no import)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*det*.onnx"))
    return found[0] if found else None


# --------------------------------------------------------------------------- reading and checking


def load_verified(wf: WeightFile, models_dir: Path, expected: Shapes | None = None) -> dict:
    """The state dict of a torch / safetensors WeightFile, keys and shapes checked against the network."""
    path = require(wf, models_dir)
    if wf.kind == "safetensors":
        safetensors_header(path)
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = strip_prefix(load_torch_state_dict(path), wf.prefix)
    if expected is None and wf.expect is not None:
        expected = wf.expect()
    if expected is not None:
        compare_shapes(path, {k: tuple(v.shape) for k, v in state.items()}, expected)
    return state


def require(wf: WeightFile, models_dir: Path) -> Path:
    path = models_dir / wf.path
    if not path.exists():
        raise WeightsError(missing_message(wf, models_dir))
    return path


def missing_message(wf: WeightFile, models_dir: Path, stage: str | None = None) -> str:
    stage_arg = f" {stage}" if stage else ""
    return (
        f"missing weights: {models_dir / wf.path} ({wf.what}). Fetch it with "
        f"`inbetweener models --models-dir {models_dir} download{stage_arg}` on a machine that is online "
        f"(source: {wf.source()}), or copy it there."
    )


# the JSON files of a snapshot that transformers reads (a cut one failed deep inside a Ray worker)
SNAPSHOT_JSON = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def _snapshot_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if not index.exists() and not (folder / "model.safetensors").exists():
        shards = sorted(folder.glob("model-*-of-*.safetensors"))
        if shards:
            raise WeightsError(
                f"{index}: missing: the folder holds {len(shards)} safetensors shards but not the index that"
                " names them (download it with the shards)"
            )
        if any(folder.glob("pytorch_model*.bin")):
            raise WeightsError(
                f"{folder}: holds only .bin weights (pytorch_model*.bin); this reads the safetensors files of"
                " the snapshot (download model*.safetensors, as `inbetweener models download caption` does)"
            )
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"{index}: unreadable safetensors index ({exc})") from exc
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"]


def check_hf_snapshot(folder: Path) -> list[str]:
    """A BLIP-2 snapshot folder: its config, every safetensors shard whole, the keys' top-level parts,
    a tokenizer and an image processor config."""
    if not folder.is_dir():
        return [f"{folder}: missing (a Hugging Face snapshot folder)"]
    problems = []
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "blip-2":
            problems.append(f"{config}: model_type is {model_type!r}, expected 'blip-2'")
    except (OSError, ValueError) as exc:
        problems.append(f"{config}: missing or unreadable ({exc})")
    for name in SNAPSHOT_JSON[1:]:
        path = folder / name
        if path.exists():
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: not readable JSON ({exc}): a download cut short?")
    shapes: dict[str, tuple[int, ...]] = {}
    whole = True  # every shard there and readable: only then can missing weights be told apart
    try:
        for shard in _snapshot_weight_files(folder):
            if not shard.exists():
                problems.append(f"{shard}: missing (named by the snapshot's index)")
                whole = False
                continue
            try:
                header = safetensors_header(shard)
            except WeightsError as exc:
                problems.append(str(exc))
                whole = False
                continue
            shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
    except WeightsError as exc:
        problems.append(str(exc))
        whole = False
    if shapes and whole:
        absent = [p for p in BLIP2_REQUIRED_PREFIXES if not any(k.startswith(p) for k in shapes)]
        if absent:
            problems.append(f"{folder}: no weights for {', '.join(absent)} (not a BLIP-2 checkpoint?)")
        elif not problems:
            problems += _config_shapes_problems(folder, shapes)
    if not (folder / "tokenizer_config.json").exists():
        problems.append(f"{folder / 'tokenizer_config.json'}: missing (the tokenizer)")
    if not any((folder / n).exists() for n in ("preprocessor_config.json", "processor_config.json")):
        problems.append(f"{folder / 'preprocessor_config.json'}: missing (the image processor)")
    return problems


def _config_shapes_problems(folder: Path, shapes: Shapes) -> list[str]:
    """config.json against the weights: the model it describes, built on the meta device (no memory), must
    have the shapes the files hold (a config of another size loaded into a RuntimeError deep in a worker)
    and every parameter in them (transformers initialises a missing one at random and captions on, with
    only a load report in a worker's log); a parameter tied to one the files hold (OPT's lm_head) is there."""
    try:
        import torch
        from transformers import Blip2Config, Blip2ForConditionalGeneration

        config = Blip2Config.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = Blip2ForConditionalGeneration(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied: dict[int, set[str]] = {}  # tied parameters are one object under several names
        for name, param in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(param), set()).add(name)
    except Exception as exc:  # a config transformers cannot build a model from
        return [f"{folder / 'config.json'}: does not describe a BLIP-2 model ({type(exc).__name__}: {exc})"]
    absent = sorted(k for names in tied.values() if not names & set(shapes) for k in names if k in expected)
    if absent:
        return [
            f"{folder}: {len(absent)} weights missing from the safetensors files (e.g. {', '.join(absent[:3])});"
            " they would be initialised at random: a shard of another download or a cut conversion?"
        ]
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if not wrong:
        return []
    k = wrong[0]
    return [
        f"{folder / 'config.json'}: describes another model than its weights: {len(wrong)} tensors of other"
        f" shapes (e.g. {k}: {list(shapes[k])} in the files, {list(expected[k])} by the config)"
    ]


def check_file(wf: WeightFile, models_dir: Path, verify_hashes: bool = False) -> list[str]:
    """Problems with one present WeightFile (empty: fine). Hashes only with verify_hashes (slow)."""
    path = models_dir / wf.path
    if wf.kind == "hf-snapshot":
        return check_hf_snapshot(path)
    problems = []
    if wf.size is not None and path.stat().st_size != wf.size:
        problems.append(f"{path}: {path.stat().st_size} bytes, expected {wf.size}")
    try:
        if wf.kind == "safetensors":
            header = safetensors_header(path)
            if wf.expect is not None:
                compare_shapes(path, {k: tuple(v["shape"]) for k, v in header.items()}, wf.expect())
        else:
            load_verified(wf, models_dir)
    except WeightsError as exc:
        problems.append(str(exc))
    if verify_hashes and not problems:
        if wf.sha256 and file_sha256(path, models_dir) != wf.sha256:
            problems.append(f"{path}: sha256 {file_sha256(path, models_dir)}, expected {wf.sha256}")
        if wf.md5 and _digest(path, "md5") != wf.md5:
            problems.append(
                f"{path}: md5 {_digest(path, 'md5')}, expected {wf.md5} (as its publisher states)"
            )
    return problems


def default_stages(names: Iterable[str], models_dir: Path) -> list:
    """Stage objects with default parameters (the model names the stages use unless configured)."""
    from pipeline.stages.aesthetic import AestheticStage
    from pipeline.stages.alignment import AlignmentStage
    from pipeline.stages.caption import CaptionStage
    from pipeline.stages.text import TextStage

    classes = {
        "text": TextStage,
        "aesthetic": AestheticStage,
        "caption": CaptionStage,
        "alignment": AlignmentStage,
    }
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f"unknown model stage(s) {unknown}; known: {sorted(classes)}")
    return [classes[n](models_dir=str(models_dir)) for n in names]


def check_weights(
    stages: Iterable, models_dir: str | os.PathLike | None = None, verify_hashes: bool = False
) -> list[str]:
    """Problems that would stop the given stages (Stage objects or names): each missing file named
    with the command that fetches it, each truncated or wrong file with what was expected.
    An empty list: every stage can load its weights. Call it before any work starts."""
    root = resolve_models_dir(models_dir)
    if root.exists() and not root.is_dir():
        return [f"the models dir {root} is a file, not a folder (set by --models-dir or ${ENV_VAR})"]
    stages = list(stages)
    if any(isinstance(s, str) for s in stages):
        stages = [default_stages([s], root)[0] if isinstance(s, str) else s for s in stages]
    problems: list[str] = []
    for stage in stages:
        stage_dir = resolve_models_dir(getattr(stage, "models_dir", None) or root)
        for wf in stage.weight_files():
            if not (stage_dir / wf.path).exists():
                if not wf.optional:
                    problems.append(f"{stage.name}: {missing_message(wf, stage_dir, stage.name)}")
                continue
            try:
                problems += [f"{stage.name}: {p}" for p in check_file(wf, stage_dir, verify_hashes)]
            except ValueError as exc:  # a setting that names no model (aesthetic.clip_model with a typo)
                problems.append(f"{stage.name}: {exc}")
    return problems


# --------------------------------------------------------------------------- device and precision


def pick_device(device: str):
    """The model stages' device: "auto" = cuda when this worker sees a GPU, else cpu."""
    import torch

    return torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def pick_dtype(precision: str, device, gpu_default: str = "fp16"):
    """The model stages' precision: "auto" = gpu_default on a GPU (bf16 falls back to fp16 where the
    card lacks it), fp32 on CPU; or fp32 / fp16 / bf16 as asked."""
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        if gpu_default == "bf16" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return names[gpu_default]
    if precision not in names:
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    return names[precision]


# --------------------------------------------------------------------------- hashes and lineage


def _digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _visible_files(folder: Path) -> list[Path]:
    """A folder's files, hidden paths left out (.cache/huggingface's download records carry timestamps)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def file_stamp(path: Path) -> str:
    """Size and mtime of a file, or of a folder's files: what changes when a file is replaced, got
    without reading it."""
    files = _visible_files(path) if path.is_dir() else [path]
    lines = [
        f"{p.relative_to(path) if path.is_dir() else p.name} {p.stat().st_size} {p.stat().st_mtime_ns}"
        for p in files
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def file_sha256(path: Path, models_dir: Path | None = None) -> str:
    """sha256 of a file (or of a folder: of its files' names and sha256s), cached in
    MODELS_DIR/.sha256.json by size and mtime so a 15 GB snapshot is hashed once."""
    path = Path(path)
    if path.is_dir():
        files = _visible_files(path)
        lines = [f"{p.relative_to(path)} {file_sha256(p, models_dir)}" for p in files]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    cache_file = (models_dir or path.parent) / ".sha256.json"
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and cache[key][:2] == stamp:
        return cache[key][2]
    digest = _digest(path)
    cache[key] = [*stamp, digest]
    with contextlib.suppress(OSError):  # an unwritable models dir only costs the cache
        write_json_atomic(cache_file, cache)
    return digest


def add_lineage(row: dict, stage: str, model: str, sha256: str | None, **more: str | None) -> dict:
    """The row's `models` JSON with `stage` -> {model, sha256 of its weights, any further weights
    (e.g. clip_sha256)} added. (`stages_run` is kept by Stage.mark.)"""
    try:
        models = json.loads(row.get("models") or "{}")
    except ValueError:
        models = {}
    models[stage] = {"model": model, "sha256": sha256, **more}
    return {"models": json.dumps(models, sort_keys=True)}
