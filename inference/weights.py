"""Where the interpolation model's files are, and loading them for inference with errors a user can act on.

Nothing downloads. The models dir is `--models-dir`, else `$INBETWEENER_MODELS`, else
`~/.cache/inbetweener/models` (training/features.py); the released files go under `tooncrafter/`.
Loading goes through training/checkpoint.py (every format checkpoint_files.py reads, strict keys): the config embedded
in the file wins, else the preset whose key layout the file has, else `--preset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from inference.media import InputError
from training.features import MODELS_DIR_ENV, WeightFile, models_dir

log = logging.getLogger(__name__)

HF_REPO = "Doubiiu/ToonCrafter"
TOONCRAFTER_FILE = WeightFile(
    "tooncrafter/model.ckpt",
    f"https://huggingface.co/{HF_REPO}/resolve/main/model.ckpt (10.5 GB)",
    "the released ToonCrafter model (UNet, VAE with the dual-reference decoder, CLIP towers, image projector)",
)
SKETCH_FILE = WeightFile(
    "tooncrafter/sketch_encoder.ckpt",
    f"https://huggingface.co/{HF_REPO}/resolve/main/sketch_encoder.ckpt (1.46 GB)",
    "the released ToonCrafter sketch encoder (a frame-wise ControlNet)",
)
# Also accepted in the models dir: the same weights converted by `inbetweener convert`.
ALTERNATIVES = {
    TOONCRAFTER_FILE: ("tooncrafter/model.safetensors",),
    SKETCH_FILE: ("tooncrafter/sketch_encoder.safetensors",),
}


def download_help(weight: WeightFile, root: Path) -> str:
    filename = Path(weight.relpath).name
    folder = root / Path(weight.relpath).parent
    return (
        f"Download `{filename}` from Hugging Face ({HF_REPO}), {weight.source}:\n"
        f"    hf download {HF_REPO} {filename} --local-dir {folder}\n"
        f"(or `huggingface-cli download ...` with older huggingface_hub, or a browser), so that it is at\n"
        f"    {root / weight.relpath}\n"
        f"in the models dir ({root}: set it with --models-dir or ${MODELS_DIR_ENV}), or pass its path with "
        f"{'--sketch-checkpoint' if weight is SKETCH_FILE else '--checkpoint'} PATH."
    )


WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
FOLDER_NAMES = ("model.safetensors", "checkpoint/mp_rank_00_model_states.pt")  # the model in a folder


def _weight_files_beside(path: Path, most: int = 8) -> str:
    """ "; its folder holds: a.safetensors, b.ckpt" for a mistyped path (a training run's checkpoint folder
    names the sketch encoder sketch_encoder.safetensors, not model.safetensors), else ""."""
    folder = path.parent
    if not folder.is_dir():
        return f" (nor its folder {folder})"
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not names:
        return ""
    listed = ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
    return f"; {folder} holds: {listed}"


def find_weights(
    explicit: str | os.PathLike | None, weight: WeightFile, root: str | os.PathLike | None
) -> Path:
    """The file to load: `explicit` when given (it must exist), else the models dir's copy; InputError
    when it is not weights at all or cut short, told from its bytes without loading it (evaluate decoded
    every clip of the eval split before loading a truncated checkpoint)."""
    from training.checkpoint import CheckpointError
    from training.checkpoint_files import existing_checkpoint

    path = _find_weights(explicit, weight, root)
    try:
        existing_checkpoint(path)
    except CheckpointError as exc:
        flag = "--sketch-checkpoint" if weight is SKETCH_FILE else "--checkpoint"
        raise InputError(
            f"{exc}\n{download_help(weight, models_dir(root))}" if explicit is None else f"{flag}: {exc}"
        ) from None
    return path


def _find_weights(
    explicit: str | os.PathLike | None, weight: WeightFile, root: str | os.PathLike | None
) -> Path:
    from training.checkpoint import CheckpointError
    from training.checkpoint_files import checkpoint_file

    base = models_dir(root)
    names = ("sketch_encoder.safetensors",) if weight is SKETCH_FILE else FOLDER_NAMES
    if explicit is not None:
        path = Path(explicit).expanduser()
        try:  # a training step folder (what `train` prints), a DeepSpeed folder
            path = checkpoint_file(path, names)
        except CheckpointError as exc:
            raise InputError(str(exc)) from None
        if not path.is_file():
            flag = "--sketch-checkpoint" if weight is SKETCH_FILE else "--checkpoint"
            raise InputError(
                f"{flag} {path}: no such file{_weight_files_beside(path)}.\n{download_help(weight, base)}"
            )
        return path
    if base.exists() and not base.is_dir():
        raise InputError(
            f"the models dir {base} is a file, not a folder (set by --models-dir or ${MODELS_DIR_ENV})"
        )
    candidates = [base / weight.relpath, *(base / alt for alt in ALTERNATIVES.get(weight, ()))]
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:  # there, but not as a file: say what it is rather than "not found"
        if path.is_dir():  # a Lightning-DeepSpeed `model.ckpt` is a folder
            try:
                found = checkpoint_file(path, names)
            except CheckpointError as exc:
                raise InputError(f"{exc}\n{download_help(weight, base)}") from None
            if found.is_file():
                return found
        elif path.is_symlink():
            raise InputError(
                f"{path} is a link to {os.readlink(path)}, which does not exist.\n{download_help(weight, base)}"
            )
    looked = "\n".join(f"    {p}" for p in candidates)
    raise InputError(f"{weight.what} not found; looked for\n{looked}\n{download_help(weight, base)}")


def load_tooncrafter(path: Path, preset: str | None = None) -> nn.Module:
    """A ToonCrafter with the file's weights, on the CPU in the file's dtype; InputError when the file is
    not a checkpoint of this model (e.g. the sketch encoder, a VAE alone, another network)."""
    from training.checkpoint import CheckpointError, detect_config, model_from_checkpoint, preset_name
    from training.checkpoint_files import read_checkpoint
    from training.models.tooncrafter import tooncrafter_config

    try:
        ckpt = read_checkpoint(path)
        cfg = ckpt.config or detect_config(ckpt.state_dict)
        if cfg is None:
            cfg = tooncrafter_config(preset or "toon-512")  # for the mismatch report below
        model = model_from_checkpoint(ckpt, cfg, dtype=None)
    except CheckpointError as exc:
        raise InputError(
            f"{path} is not a checkpoint of the ToonCrafter model.\n{exc}\n"
            f"Expected the released `model.ckpt` of {HF_REPO} (or a file written by `inbetweener train` / "
            "`inbetweener convert`); the sketch encoder goes to --sketch-checkpoint."
        ) from exc
    log.info(
        "%s: preset %s, %s decoder",
        path,
        preset_name(model.cfg) or "custom",
        "dual-reference" if model.cfg.dual_ref_decoder else "plain (DynamiCrafter)",
    )
    return model


def load_sketch_encoder(path: Path, preset: str | None) -> nn.Module:
    """The sketch encoder of the file, matching the interpolation model's preset (`tiny` or `toon-512`).

    Thin adapter: training/checkpoint_files.py reads the file (any format, wrapper prefixes removed); the keys
    are checked strictly here against `SketchEncoder` (a `control_model.` prefix, as in ControlNet
    checkpoints, is removed)."""
    from training.checkpoint import CheckpointError, compare_keys, describe_mismatch
    from training.checkpoint_files import read_checkpoint
    from training.models.sketch import SKETCH_ENCODER_PRESETS, SketchEncoder

    cfg = SKETCH_ENCODER_PRESETS.get(preset or "toon-512", SKETCH_ENCODER_PRESETS["toon-512"])
    try:
        state = read_checkpoint(path).state_dict
    except CheckpointError as exc:
        raise InputError(f"{path}: cannot read the sketch encoder checkpoint: {exc}") from exc
    for prefix in ("control_model.", "model.control_model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    with torch.device("meta"):
        encoder = SketchEncoder(cfg)
    expected = encoder.state_dict()
    report = compare_keys(expected, state)
    if not report.ok and any(k.startswith("model.diffusion_model.") for k in state):
        raise InputError(
            f"{path} is the interpolation model, not a sketch encoder: it goes to --checkpoint; the sketch"
            f" encoder is `sketch_encoder.ckpt` of {HF_REPO} (or one written by `inbetweener train sketch`)"
        )
    if not report.ok:
        raise InputError(
            f"{path} is not a sketch encoder checkpoint for this model.\n"
            f"{describe_mismatch(report, str(path), expected)}\n"
            f"Expected `sketch_encoder.ckpt` of {HF_REPO} (or one written by `inbetweener train sketch`)."
        )
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder


def file_sha256(path: Path, cache: Path | None = None) -> str:
    """sha256 of a (possibly 10 GB) file; remembered in `cache` (JSON) by path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    ident = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    known = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except json.JSONDecodeError:
            known = {}
        if ident in known:
            return known[ident]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache is not None:
        from manifests.files import write_json_atomic

        write_json_atomic(cache, {**known, ident: value})
    return value
