"""Checking, loading and writing ToonCrafter checkpoints; reading their files is training/checkpoint_files.py.

Formats read (`read_checkpoint`, training/checkpoint_files.py):
* Lightning `.ckpt`: a dict whose `state_dict` entry holds the weights (the released ToonCrafter and
  DynamiCrafter files). Read with `torch.load(weights_only=True)`; a file that also pickles Python objects
  (Lightning's training state) is re-read with full unpickling after a warning, unless `allow_pickle=False`;
  a truncated download or a file of another kind is a `CheckpointError` naming it and its size (never
  handed to the full unpickler).
* DeepSpeed-style dicts `{"module": state_dict}`; wrapper prefixes (`_forward_module.`, `module.`) are removed.
* plain `.pt`/`.pth` state dicts, and `.safetensors`.
A torch checkpoint may carry this project's config as `inbetweener_config` (a dict); a safetensors file as the
metadata entry `inbetweener.config` (JSON), written by `save_safetensors` with the code version.

Loading is strict: a file that does not match the model raises `CheckpointMismatchError`, which names the file
and summarises missing and unexpected keys by part (counts and a few examples) and lists shape mismatches. One
documented exception: a plain-decoder (DynamiCrafter) checkpoint loaded into a model with the dual-reference
decoder gets the added decoder layers initialised so that the decoder starts as the plain decoder, with a
warning that counts them. open_clip 3.3 names every CLIP tensor as open_clip 2.22 did (checked by
tests/training/test_clip.py), so no key mapping is needed; the reference's own legacy rename
(`framestride_embed` -> `fps_embedding`, DynamiCrafter-256) is applied.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from manifests.files import atomic_path
from training.checkpoint_files import (
    CONFIG_METADATA,
    Checkpoint,
    CheckpointError,
    quiet_log,
    read_checkpoint,
    read_layout,
)
from training.models.tooncrafter import (
    TOONCRAFTER_PRESETS,
    ToonCrafter,
    ToonCrafterConfig,
    tooncrafter_config,
)

log = logging.getLogger(__name__)

VERSION_METADATA = "inbetweener.code_version"
# Parts of the model, for readable summaries (longest prefix first).
PARTS = (
    "model.diffusion_model.",
    "first_stage_model.encoder.",
    "first_stage_model.decoder.",
    "first_stage_model.",
    "cond_stage_model.model.",
    "embedder.model.",
    "image_proj_model.",
)


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the model."""


def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        version = importlib_metadata.version("inbetweener")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{version}+g{sha}" if sha else version
    except (OSError, subprocess.SubprocessError):
        return version


def check_loadable(path: str | Path, preset: str | None = None, **overrides: Any) -> None:
    """Raise what `load_model(path, preset, **overrides)` would raise for a file of another model (another
    preset, another network, keys missing), from the file's key names and shapes alone: a run checks its
    --init with it before it takes its folder, and loads the tensors later."""
    ckpt = read_layout(path)
    with quiet_log():
        cfg = resolve_config(ckpt, preset, **overrides)
    with torch.device("meta"):
        model = ToonCrafter(cfg)
    _check_keys(model, ckpt.state_dict, str(ckpt.path))


# --- checking --------------------------------------------------------------------------------------------------


@dataclass
class KeyReport:
    missing: list[str]  # in the model, not in the file
    unexpected: list[str]  # in the file, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, file shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> KeyReport:
    """Keys and shapes of a state dict against a model's `state_dict()` (works on meta models)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    return KeyReport(missing, unexpected, mismatched)


def _part(key: str) -> str:
    for prefix in PARTS:
        if key.startswith(prefix):
            return prefix.rstrip(".")
    return key.split(".")[0] if "." in key else "(root buffers)"


def _group(keys: list[str], examples: int) -> list[str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        groups[_part(key)].append(key)
    lines = []
    for part, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(members[:examples]) + (", ..." if len(members) > examples else "")
        lines.append(f"    {part} ({len(members)}): {shown}")
    return lines


def _hints(report: KeyReport, expected: Mapping[str, torch.Tensor]) -> list[str]:
    if any(
        k.split(".")[0] in ("zero_convs", "input_hint_block", "middle_block_out") for k in report.unexpected
    ):
        return [  # its other keys would also match a bare UNet's: say only what it is
            "the file is a sketch encoder (what `train sketch` exports, or the released sketch_encoder.ckpt):"
            " it goes to `interpolate --sketch-checkpoint`, not in place of the interpolation model"
        ]
    hints = []
    for prefix in ("model.diffusion_model.", "first_stage_model.", "image_proj_model."):
        bare = [k for k in report.unexpected if prefix + k in expected]
        if report.unexpected and len(bare) >= len(report.unexpected) // 2:
            hints.append(
                f"the file looks like a bare `{prefix.rstrip('.')}` state dict (one part, not the model)"
            )
    decoder_extra = [k for k in report.unexpected if "attn_refinement" in k or "time_stack" in k]
    if decoder_extra and not any("attn_refinement" in k for k in expected):
        hints.append("the file has a dual-reference decoder: build the model with dual_ref_decoder=True")
    return hints


def describe_mismatch(
    report: KeyReport, source: str, expected: Mapping[str, torch.Tensor], examples: int = 3
) -> str:
    """A readable summary: counts, keys grouped by model part with a few examples, shape mismatches, hints."""
    lines = [
        f"checkpoint {source} does not match the model: {len(report.missing)} missing, "
        f"{len(report.unexpected)} unexpected, {len(report.mismatched)} with another shape"
    ]
    if report.missing:
        lines += [f"  missing keys ({len(report.missing)}), by part:", *_group(report.missing, examples)]
    if report.unexpected:
        lines += [
            f"  unexpected keys ({len(report.unexpected)}), by part:",
            *_group(report.unexpected, examples),
        ]
    if report.mismatched:
        lines.append(f"  shape mismatches ({len(report.mismatched)}):")
        lines += [f"    {k}: file {list(f)}, model {list(m)}" for k, f, m in report.mismatched[:20]]
        if len(report.mismatched) > 20:
            lines.append(f"    ... and {len(report.mismatched) - 20} more")
    lines += [f"  hint: {h}" for h in _hints(report, expected)]
    return "\n".join(lines)


# --- loading ---------------------------------------------------------------------------------------------------


def dual_ref_only_keys(cfg: ToonCrafterConfig) -> set[str]:
    """State-dict keys of the dual-reference decoder that the plain (DynamiCrafter) decoder lacks."""
    from training.models.vae import AutoencoderKL

    with torch.device("meta"):
        dual = AutoencoderKL(replace(cfg.vae, dual_ref=True)).state_dict()
        plain = AutoencoderKL(replace(cfg.vae, dual_ref=False)).state_dict()
    return {f"first_stage_model.{k}" for k in set(dual) - set(plain)}


def _check_schedule(model: ToonCrafter, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """The file's diffusion schedule against the config's. Buffers stored in half precision (a checkpoint
    cast whole to fp16/bf16) are replaced by the computed fp32 values: fp16 cannot hold alphas_cumprod
    near t = 999 (9% off there), bf16 is off by up to 0.4%."""
    from training.diffusion.schedule import schedule_buffers

    computed = schedule_buffers(model.cfg.schedule)
    low = [n for n in computed if n in state_dict and state_dict[n].dtype in (torch.float16, torch.bfloat16)]
    if low:
        # beyond what half precision explains (~1e-2 relative for bf16), the file's schedule is another one
        other = [
            n
            for n in low
            if not torch.allclose(
                state_dict[n].float().cpu(), computed[n], rtol=2e-2, atol=1e-3, equal_nan=True
            )
        ]
        log.log(
            logging.WARNING if other else logging.INFO,
            "%s: schedule buffers stored in %s; the config's fp32 values are used%s",
            source,
            state_dict[low[0]].dtype,
            f" (the file's {other} differ beyond half precision: another schedule?)" if other else "",
        )
        for name in low:
            state_dict[name] = computed[name].to(torch.float32)
    differ = [
        name
        for name, value in computed.items()
        if name in state_dict
        and not torch.allclose(state_dict[name].float().cpu(), value, rtol=1e-5, atol=1e-7, equal_nan=True)
    ]
    if differ:
        log.warning(
            "%s: schedule buffers %s differ from the ones the config computes; the file's values are used",
            source,
            differ,
        )


def load_state_dict(
    model: ToonCrafter,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    assign: bool = False,
) -> list[str]:
    """Strictly load `state_dict` into `model`; returns the keys it initialised instead of loading (the
    dual-reference decoder layers when the file has the plain decoder), else []. `assign=True` makes the
    file's tensors the model's (for a model built on the meta device); the caller then runs
    `model.init_buffers(device)`."""
    state_dict = dict(state_dict)
    plain_into_dual = _check_keys(model, state_dict, source)
    _check_schedule(model, state_dict, source)
    if not plain_into_dual:
        model.load_state_dict(state_dict, strict=True, assign=assign)
        return []

    # A plain-decoder checkpoint: the VAE is built for real (100 M numbers) and started from the plain one.
    prefix = "first_stage_model."
    vae = model.first_stage_model
    if any(p.is_meta for p in vae.parameters()):
        vae = type(vae)(vae.config)
    vae_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    initialised = [prefix + k for k in vae.init_dual_ref_from_plain(vae_state)]
    model.first_stage_model = vae
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    result = model.load_state_dict(rest, strict=False, assign=assign)
    left = [k for k in result.missing_keys if not k.startswith(prefix)]
    if left or result.unexpected_keys:  # cannot happen after compare_keys; kept as a guard
        raise CheckpointMismatchError(
            f"{source}: unexpected partial load: {left[:5]} {result.unexpected_keys[:5]}"
        )
    log.warning(
        "%s has the plain (DynamiCrafter) decoder: initialised the %d tensors of the dual-reference decoder it "
        "lacks so that the decoder starts as the plain decoder (zero time_stack output convs, zero keyframe "
        "injection, identity time_mix_conv)",
        source,
        len(initialised),
    )
    return initialised


def _check_keys(model: ToonCrafter, state_dict: Mapping[str, torch.Tensor], source: str) -> bool:
    """The file's keys and shapes against the model's (a CheckpointMismatchError naming what differs); True
    when the file has the plain decoder and the model the dual-reference one (initialised from it)."""
    expected = model.state_dict()
    report = compare_keys(expected, state_dict)
    plain_into_dual = bool(
        model.cfg.dual_ref_decoder
        and report.missing
        and not report.unexpected
        and not report.mismatched
        and set(report.missing) == dual_ref_only_keys(model.cfg)
    )
    if not report.ok and not plain_into_dual:
        raise CheckpointMismatchError(describe_mismatch(report, source, expected))
    return plain_into_dual


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(state_dict)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def detect_config(
    state_dict: Mapping[str, torch.Tensor], presets: list[str] | None = None
) -> ToonCrafterConfig | None:
    """The preset (with the dual-reference or the plain decoder) whose key layout the state dict has, if any."""
    for name in presets or list(TOONCRAFTER_PRESETS):
        for dual_ref in (True, False):
            cfg = tooncrafter_config(name, dual_ref_decoder=dual_ref)
            with torch.device("meta"):
                layout = ToonCrafter(cfg).state_dict()
            if compare_keys(layout, state_dict).ok:
                return cfg
    return None


def preset_name(cfg: ToonCrafterConfig) -> str | None:
    """The name of the preset this config is (ignoring dual_ref_decoder), if any."""
    for name, preset in TOONCRAFTER_PRESETS.items():
        if replace(cfg, dual_ref_decoder=preset.dual_ref_decoder) == preset:
            return name
    return None


def resolve_config(ckpt: Checkpoint, preset: str | None = None, **overrides: Any) -> ToonCrafterConfig:
    """The config embedded in the file when present, else the named preset, with top-level overrides."""
    if ckpt.config is not None:
        name = preset_name(ckpt.config)
        if preset is not None and name is not None and name != preset:  # else tiny weights, toon-512 data
            raise CheckpointError(
                f"{ckpt.path} carries the config of preset {name!r}, not {preset!r}: give preset {name}"
                f" (--preset {name})"
            )
        if preset is not None and name is None:
            log.info("%s carries its own (custom) config; preset %r is not used", ckpt.path, preset)
        return replace(ckpt.config, **overrides)
    if preset is not None:
        detected = detect_config(ckpt.state_dict)
        name = preset_name(detected) if detected is not None else None
        if name is not None and name != preset:  # else a wall of shape mismatches, without the cause
            raise CheckpointError(
                f"{ckpt.path} carries no config and has the key layout of preset {name!r}, not {preset!r}:"
                f" give preset {name} (--preset {name})"
            )
        return tooncrafter_config(preset, **overrides)
    raise CheckpointError(f"{ckpt.path} carries no config: pass a preset (e.g. preset='toon-512')")


def model_from_checkpoint(
    ckpt: Checkpoint, cfg: ToonCrafterConfig, dtype: torch.dtype | None = torch.float32
) -> ToonCrafter:
    """Build `cfg` on the meta device and give it the checkpoint's tensors (cast to `dtype` unless None)."""
    with torch.device("meta"):
        model = ToonCrafter(cfg)
    state_dict = _cast(ckpt.state_dict, dtype)
    initialised = load_state_dict(model, state_dict, source=str(ckpt.path), assign=True)
    model.init_buffers("cpu")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: tensors left unloaded: {leftover[:5]}")
    if initialised:  # the VAE was built anew in the default dtype: follow the file's
        vae_dtype = next(v.dtype for k, v in state_dict.items() if k.startswith("first_stage_model."))
        model.first_stage_model.to(vae_dtype)
    return model


def load_model(
    path: str | Path,
    preset: str | None = None,
    dtype: torch.dtype | None = torch.float32,
    allow_pickle: bool = True,
    **overrides: Any,
) -> ToonCrafter:
    """A ToonCrafter with the weights of `path`, on the CPU.

    The config is the one embedded in the file when present, else the named `preset`; `overrides` replace
    top-level config fields (e.g. `dual_ref_decoder=True` to start ToonCrafter's decoder from a DynamiCrafter
    checkpoint). Floating tensors are cast to `dtype` (None keeps the file's). The model is built on the meta
    device and takes the file's tensors, so a 10 GB checkpoint is never held twice.
    """
    ckpt = read_checkpoint(path, allow_pickle)
    return model_from_checkpoint(ckpt, resolve_config(ckpt, preset, **overrides), dtype)


# --- writing ---------------------------------------------------------------------------------------------------


def save_safetensors(
    model: ToonCrafter,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the model's state dict as safetensors, with its config (JSON) and the code version in the metadata.

    `dtype` casts the parameters; buffers (the diffusion schedule) stay as they are, fp32, since fp16 cannot
    hold alphas_cumprod near t = 999. The file appears only when complete (temporary name, then rename).
    """
    path = Path(path)
    params = {name for name, _ in model.named_parameters()}
    tensors = {}
    for key, value in model.state_dict().items():
        if dtype is not None and key in params and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.detach().contiguous().cpu()
    meta = {
        "format": "pt",
        CONFIG_METADATA: json.dumps(model.cfg.to_dict()),
        VERSION_METADATA: code_version(),
        **(metadata or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
