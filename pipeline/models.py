"""Weights: the models directory, what each job's stages need in it, checks, and `inbetweener models`.

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

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from manifests.files import default_file_mode, write_json_atomic
from manifests.remote import not_a_url
from manifests.weights import (  # the file checks every job shares; curate's stages import them from here
    Shapes,
    WeightsError,
    compare_shapes,
    load_torch_state_dict,
    quick_problem,
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


# --------------------------------------------------------------------------- downloading


def _download_url(url: str, dest: Path, member: str | None, timeout: float = 60) -> None:
    import urllib.request
    import zipfile

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "download"
        with urllib.request.urlopen(url, timeout=timeout) as response, open(raw, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 22)
        if member:
            with zipfile.ZipFile(raw) as archive:
                archive.extract(member, tmp)
            raw = Path(tmp) / member
        os.replace(raw, dest)


def _download_hf_file(repo: str, filename: str, dest: Path) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            got = hf_hub_download(repo, filename, local_dir=tmp)
        except EntryNotFoundError:
            if filename != "open_clip_model.safetensors":
                raise
            # older open_clip repos hold only the pickled file: convert it to the safetensors we load
            import torch
            from safetensors.torch import save_file

            pickled = hf_hub_download(repo, "open_clip_pytorch_model.bin", local_dir=tmp)
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            got = str(Path(tmp) / filename)
            save_file({k: v.contiguous() for k, v in state.items()}, got)  # (safetensors writes it 0600)
        os.chmod(got, default_file_mode())
        os.replace(got, dest)


def _check_reachable(host: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, on a machine without network (proxies are trusted as they are)."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise WeightsError(f"cannot reach {host} ({exc}): this machine seems to be offline") from exc


def download(wf: WeightFile, models_dir: Path) -> None:
    """Fetch one WeightFile into the models directory (atomically); hashes checked where stated."""
    from urllib.parse import urlparse

    _check_reachable("huggingface.co" if wf.hf_repo else urlparse(wf.url or "https://github.com").hostname)
    dest = models_dir / wf.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    if wf.kind == "hf-snapshot":
        from huggingface_hub import snapshot_download

        if not wf.hf_repo:
            raise WeightsError(f"{dest}: a local folder, nothing to download")
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
        snapshot_download(wf.hf_repo, local_dir=dest, allow_patterns=patterns)
    elif wf.hf_repo:
        _download_hf_file(wf.hf_repo, wf.hf_file, dest)
    elif wf.url:
        _download_url(wf.url, dest, wf.url_member)
    else:
        raise WeightsError(f"{dest}: no known source; place the file there yourself")
    problems = check_file(wf, models_dir, verify_hashes=True)
    if problems:
        raise WeightsError("; ".join(problems))


# --------------------------------------------------------------------------- the command line


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _list(stages: list, root: Path, hashes: bool, everything: bool = True) -> int:
    for job, names in JOBS.items():
        print(f"job {job}")
        for stage in stages:
            if stage.name not in names:
                continue
            files = stage.weight_files()
            if stage.name == "text" and (det := ppocr_det_model()) is not None:
                print(f"  {'text':<10} [embedded] {det}  present  {_human(det.stat().st_size)}")
            if not files:
                print(f"  {stage.name:<10} (no files needed with backend {getattr(stage, 'backend', '?')})")
            for wf in files:
                path = root / wf.path
                if not path.exists():
                    state = "missing (optional)" if wf.optional else "MISSING"
                    print(f"  {stage.name:<10} {wf.path}  {state}  <- {wf.source()}")
                    continue
                problems = check_file(wf, root)
                state = "present" if not problems else "BROKEN: " + "; ".join(problems)
                digest = f"  sha256 {file_sha256(path, root)}" if hashes else ""
                print(f"  {stage.name:<10} {wf.path}  {state}  {_human(_size(path))}{digest}")
    if everything:
        _list_other_jobs(root)
    return 0


def other_jobs_files() -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
    """The weights of the jobs after curation, by job: (accepted paths under the models dir, the first
    being the published name; what it is for; where it is published). Their loaders name a missing file
    and its source when a run needs it; `inbetweener models` lists them all in one place."""
    from inference.weights import ALTERNATIVES, SKETCH_FILE, TOONCRAFTER_FILE
    from training.features import CLIP_FILE, I3D_FILE, LPIPS_FILES
    from training.stages.sketch import ANIME2SKETCH_FILES, ANIME2SKETCH_SOURCE

    def spec(wf, what: str | None = None):
        return ((wf.relpath, *ALTERNATIVES.get(wf, ())), what or wf.what, wf.source)

    return {
        "interpolate": [
            spec(TOONCRAFTER_FILE, "ToonCrafter (UNet, VAE, CLIP towers); or pass --checkpoint"),
            spec(SKETCH_FILE, "the sketch encoder, for --sketch; or pass --sketch-checkpoint"),
        ],
        "evaluate": [
            spec(TOONCRAFTER_FILE, "ToonCrafter, for --method model and --decoder-only"),
            spec(I3D_FILE),
            spec(CLIP_FILE, "OpenCLIP ViT-H-14 for CLIP_img/CLIP_txt (else ToonCrafter's own towers)"),
            *(spec(wf) for wf in LPIPS_FILES["alex"]),
        ],
        "train": [
            *(spec(wf, f"{wf.what}, for the decoder stage's LPIPS loss") for wf in LPIPS_FILES["vgg"]),
            *(spec(wf, f"{wf.what}, for the decoder stage's eval LPIPS") for wf in LPIPS_FILES["alex"]),
            (
                ANIME2SKETCH_FILES,
                "Anime2Sketch, the sketch stage's extractor (else XDoG)",
                ANIME2SKETCH_SOURCE,
            ),
        ],
    }


def _list_other_jobs(root: Path) -> None:
    try:
        jobs = other_jobs_files()
    except ImportError as exc:  # a pipeline-only install: the other jobs' code needs the training extra
        print(f"jobs interpolate, evaluate, train: not listed ({exc}; install the training extra)")
        return
    for job, files in jobs.items():
        print(f"job {job}")
        for paths, what, source in files:
            found = next((root / p for p in paths if (root / p).exists()), None)
            if found is None:
                print(f"  {paths[0]}  missing  ({what})  <- {source}")
            elif problem := quick_problem(found):
                print(f"  {found.relative_to(root)}  BROKEN: {problem}  ({what})  <- {source}")
            else:
                print(f"  {found.relative_to(root)}  present  {_human(_size(found))}  ({what})")
    print(
        "job train: the DynamiCrafter-interp checkpoint it starts from is passed with --init (not looked up"
        " here). The files above are fetched by hand: `download` fetches the curate stages' only."
    )


def _download(stages: list, root: Path) -> int:
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # tests and CI: say so at once instead of timing out
        print(
            "inbetweener models download: offline mode (HF_HUB_OFFLINE=1); unset it on a machine that is "
            "online, or copy the files listed by `inbetweener models list` into the models directory",
            file=sys.stderr,
        )
        return 1
    failed = 0
    for stage in stages:
        for wf in stage.weight_files():
            path = root / wf.path
            if path.exists() and not check_file(wf, root):
                print(f"{stage.name}: {wf.path} present")
                continue
            print(f"{stage.name}: fetching {wf.path} from {wf.source()} ...", flush=True)
            try:
                download(wf, root)
                print(f"{stage.name}: {wf.path} ok ({_human(_size(path))})")
            except Exception as exc:  # offline, 404, bad file: say which and go on with the next
                failed += 1
                print(
                    f"{stage.name}: cannot download {wf.path}: {type(exc).__name__}: {exc}\n"
                    f"  fetch {wf.source()} on a machine that is online and copy it to {path}",
                    file=sys.stderr,
                )
    return 1 if failed else 0


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inbetweener models",
        description="List the weights every job needs (curate, interpolate, evaluate, train); check and download"
        " the curate stages' weights. Nothing else downloads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""examples:
  inbetweener models                         list every file: present / missing, size, sha256
  inbetweener models list --no-hashes        the same without hashing (sha256s are cached once computed)
  inbetweener models check                   exit 1 when a file is missing or broken
  inbetweener models download aesthetic      fetch what the aesthetic stage needs

models directory: --models-dir, else ${ENV_VAR}, else {DEFAULT_DIR}""",
    )
    p.add_argument(
        "--models-dir", type=not_a_url, help=f"the models directory (default: ${ENV_VAR} or {DEFAULT_DIR})"
    )
    p.add_argument("action", nargs="?", default="list", choices=("list", "check", "download"))
    p.add_argument("stages", nargs="*", help="stages (default: all): text aesthetic caption alignment")
    p.add_argument(
        "--no-hashes", dest="hashes", action="store_false", help="list: skip the sha256 of present files"
    )
    args = p.parse_intermixed_args(argv)  # `list --no-hashes text`: options between the positionals
    root = resolve_models_dir(args.models_dir)
    if root.exists() and not root.is_dir():  # every file would read as "missing"
        print(f"inbetweener models: {root} is a file, not a models folder", file=sys.stderr)
        return 2
    names = args.stages or [n for names in JOBS.values() for n in names]
    try:
        stages = default_stages(names, root)
    except ValueError as exc:
        print(f"inbetweener models: {exc}", file=sys.stderr)
        return 2
    source = "--models-dir" if args.models_dir else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "default")
    print(f"models directory: {root} ({source})")
    if args.action == "download":
        return _download(stages, root)
    if args.action == "check":
        problems = check_weights(stages, root, verify_hashes=True)
        for problem in problems:
            print(problem, file=sys.stderr)
        print("all weights present and valid" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    return _list(stages, root, args.hashes, everything=not args.stages)
