"""Reading, checking, loading and writing ToonCrafter checkpoints.

Formats read (`read_checkpoint`):
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
import pickle
import subprocess
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from manifests.files import atomic_path
from training.models.tooncrafter import (
    TOONCRAFTER_PRESETS,
    ToonCrafter,
    ToonCrafterConfig,
    tooncrafter_config,
)

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_forward_module.", "module.")  # DeepSpeed / Lightning and DDP wrappers
COMPILED = "_orig_mod."  # torch.compile's wrapper, at the top or around one part (model.diffusion_model)
EMA_PREFIX = "model_ema."  # LDM/Lightning's EMA copy (LitEma: names without dots, decay, num_updates)
# What a folder given as a checkpoint holds, in order: a training step folder's exports, a
# Lightning-DeepSpeed checkpoint folder (last.ckpt/checkpoint/...)
FOLDER_FILES = (
    "model.safetensors",
    "sketch_encoder.safetensors",
    "checkpoint/mp_rank_00_model_states.pt",
    "mp_rank_00_model_states.pt",  # a DeepSpeed tag folder (global_stepN)
)
LEGACY_RENAMES = {
    "framestride_embed.": "fps_embedding."
}  # the reference's fallback loader (DynamiCrafter-256)
CONFIG_KEY = "inbetweener_config"  # entry of a torch checkpoint dict
CONFIG_METADATA = "inbetweener.config"  # safetensors metadata entry (JSON)
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


class CheckpointError(RuntimeError):
    """A file that cannot be read as a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the model."""


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    config: ToonCrafterConfig | None = None  # the config embedded in the file, if any
    metadata: dict[str, str] = field(default_factory=dict)


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


# --- reading ---------------------------------------------------------------------------------------------------


# what torch's weights-only unpickler says of bytes that are no pickle (garbage, a file of another kind)
NOT_A_PICKLE = ("Unsupported operand", "String is too long", "unsupported persistent id")


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    from manifests.weights import load_failure

    mmap = zipfile.is_zipfile(path)  # the zip format can be memory-mapped: no copy of a 10 GB file
    unreadable = (
        f"cannot read {path} ({path.stat().st_size:,} bytes) as a PyTorch checkpoint: truncated, damaged"
        " or not a torch.save file"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # a file that pickles Python classes (Lightning's state) is worth unpickling in full; bytes that
        # are no pickle at all are a damaged file, not something to run the full unpickler on
        reason = load_failure(exc)
        if "Weights only load failed" not in str(exc) or reason.startswith(NOT_A_PICKLE):
            raise CheckpointError(f"{unreadable} ({reason})") from exc
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors and allow_pickle is off; "
                "convert it with `inbetweener convert` on a machine where you trust the file"
            ) from exc
        log.warning(
            "%s holds pickled Python objects besides tensors (e.g. Lightning's training state); "
            "re-reading it with weights_only=False, which runs code from the file: only for files you trust",
            path,
        )
    except Exception as exc:  # a truncated zip (an interrupted download) is a RuntimeError
        raise CheckpointError(f"{unreadable} ({load_failure(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (ImportError, AttributeError):  # a class of a library not installed here (lvdm, omegaconf)
        pass
    except Exception as exc:  # any other unpickling failure means: not a checkpoint we can read
        raise CheckpointError(f"{unreadable} ({load_failure(exc)})") from exc
    tolerant = _TolerantPickle()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=tolerant)
    except Exception as exc:
        raise CheckpointError(f"{unreadable} ({load_failure(exc)})") from exc
    log.warning(
        "%s pickles objects of %s, not installed here: read as placeholders (the training state they are part"
        " of is not used); the tensors are loaded",
        path,
        ", ".join(sorted(tolerant.missing)),
    )
    return obj


class _Placeholder(dict):
    """Stands in for an object of a class whose library is not installed (a trainer's config pickled beside
    the weights): it takes whatever the pickle gives it (a dict subclass's items, a list subclass's
    appends, an object's state) and is never used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args, self.kwargs, self.items_appended = args, kwargs, []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:  # the pickle rebuilds it with __new__, not __init__
        self.__dict__.setdefault("items_appended", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items_appended", []).extend(items)


class _TolerantPickle:
    """A `pickle_module` for torch.load whose unpickler makes placeholders of the classes it cannot import,
    recording their top-level modules in `missing`."""

    __name__ = "inbetweener_tolerant_pickle"

    def __init__(self) -> None:
        self.missing: set[str] = set()
        outer = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                try:
                    return super().find_class(module, name)
                except (ImportError, AttributeError):
                    outer.missing.add(module.split(".")[0])
                    return type(name, (_Placeholder,), {"__module__": module})

        self.Unpickler = Unpickler

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    if any(COMPILED in k for k in state_dict):  # saved from a torch.compile'd model or part
        state_dict = {k.replace(COMPILED, ""): v for k, v in state_dict.items()}
    return state_dict


def _drop_ema(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A Lightning file of a run trained with EMA holds the EMA copy beside the weights (`model_ema.*`, its
    names without dots): the weights are what is loaded; the copy is left out, said."""
    ema = [k for k in state_dict if k.startswith(EMA_PREFIX)]
    if ema and len(ema) < len(state_dict):
        log.warning(
            "%s: %d EMA entries (model_ema.*) left out; the model's own weights are loaded", path, len(ema)
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    return state_dict


def _rename_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for old, new in LEGACY_RENAMES.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "module"):
            if isinstance(obj.get(entry), Mapping):
                return dict(obj[entry])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        keys = sorted(str(k) for k in obj)[:10]
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys})")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")


def _parse_config(value: Any, path: Path) -> ToonCrafterConfig | None:
    if value is None:
        return None
    try:
        return ToonCrafterConfig.from_dict(json.loads(value) if isinstance(value, str) else dict(value))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: embedded config is not a ToonCrafterConfig: {exc}") from exc


def _embedded_config(value: Any, path: Path) -> ToonCrafterConfig | None:
    """The file's embedded config; one this version cannot read (written by a newer one, with fields it
    does not know) is set aside, said, and the weights' key layout decides the model as for a file without
    one: the tensors are what must match."""
    try:
        return _parse_config(value, path)
    except CheckpointError as exc:
        log.warning("%s; it is not used: the weights' key layout decides the model", exc)
        return None


def header_config(path: str | Path) -> ToonCrafterConfig | None:
    """The config embedded in a safetensors file's header, read without its tensors (a dry run's frame sizes);
    None for other formats (their config is inside the pickle) or a file without one."""
    from manifests.weights import weights_format

    path = checkpoint_file(path)
    if not Path(path).is_file() or weights_format(Path(path)) != "safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
    return _parse_config(meta.get(CONFIG_METADATA), Path(path))


def checkpoint_file(path: str | Path, names: tuple[str, ...] = FOLDER_FILES) -> Path:
    """The file a checkpoint path names: itself; in a folder (what `train` prints, a DeepSpeed folder), the
    first of `names` it holds; a training run's `checkpoints/latest` pointer, the folder it names."""
    path = Path(path)
    if path.is_file() and path.name == "latest" and path.stat().st_size < 256:
        path = path.parent / path.read_text(errors="replace").strip()
    if not path.is_dir():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    pointer = path / "latest"  # a training run's checkpoints folder, a DeepSpeed save folder (its tag)
    if pointer.is_file() and pointer.stat().st_size < 256:
        target = path / pointer.read_text(errors="replace").strip()
        if target.is_dir() and target.resolve() != path.resolve():
            return checkpoint_file(target, names)
    held = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(
        f"{path} is a folder without a checkpoint file ({' or '.join(names)}); it holds: {', '.join(held) or 'nothing'}"
    )


def existing_checkpoint(path: str | Path) -> Path:
    """The checkpoint file `path` names (see `checkpoint_file`), checked without reading it: CheckpointError
    when it is a URL, missing, or not weights at all (an LFS pointer, an HTML page, a cut-off file)."""
    if "://" in str(path):  # e.g. train.init_checkpoint set in a config file
        raise CheckpointError(f"{path} is a URL; checkpoints are read from local files: download it first")
    from manifests.weights import not_weights, quick_problem, weights_format

    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    odd = not_weights(path)
    if odd:
        raise CheckpointError(f"{path}: {odd}")
    if weights_format(path) is None:
        raise CheckpointError(
            f"cannot read {path} ({path.stat().st_size:,} bytes): its first bytes are neither a safetensors"
            " header nor a PyTorch file: damaged or not a torch.save file"
        )
    cut = quick_problem(path)  # a safetensors file or a torch.save zip shorter than it says
    if cut:
        raise CheckpointError(f"cannot read {path} ({path.stat().st_size:,} bytes): {cut}")
    return path


def read_checkpoint(path: str | Path, allow_pickle: bool = True, layout_only: bool = False) -> Checkpoint:
    """Read any supported file into a flat state dict (wrapper prefixes removed) and its embedded config.
    `layout_only`: a safetensors file's tensors are meta tensors of the header's shapes and dtypes (nothing
    read); a torch file is memory-mapped either way when it is a zip."""
    from manifests.weights import weights_format

    path = existing_checkpoint(path)
    kind = weights_format(path)
    if kind == "safetensors":  # by its bytes: a safetensors file named .ckpt, a torch file named .safetensors
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if layout_only:
                    state_dict = {key: _meta_tensor(f.get_slice(key)) for key in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
            if not layout_only:
                state_dict = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
        config = _embedded_config(meta.get(CONFIG_METADATA), path)
    else:
        obj = _torch_load(path, allow_pickle)
        state_dict = _find_state_dict(obj, path)
        config = _embedded_config(obj.get(CONFIG_KEY), path) if isinstance(obj, Mapping) else None
        meta = {}
    non_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {non_tensors[:5]}")
    return Checkpoint(path, _rename_legacy(_drop_ema(_strip_wrappers(state_dict), path)), config, meta)


def _meta_tensor(view) -> torch.Tensor:
    """A meta tensor of a safetensors slice's shape and dtype."""
    dtype = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)  # a dtype unknown here: keys and shape
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_layout(path: str | Path) -> Checkpoint:
    """`read_checkpoint(path, layout_only=True)` without its warnings (pickled objects, EMA entries): a
    check before the real load, which says them once."""
    quiet = log.level
    log.setLevel(logging.ERROR)
    try:
        return read_checkpoint(path, layout_only=True)
    finally:
        log.setLevel(quiet)


def check_loadable(path: str | Path, preset: str | None = None, **overrides: Any) -> None:
    """Raise what `load_model(path, preset, **overrides)` would raise for a file of another model (another
    preset, another network, keys missing), from the file's key names and shapes alone: a run checks its
    --init with it before it takes its folder, and loads the tensors later."""
    ckpt = read_layout(path)
    quiet = log.level
    log.setLevel(logging.ERROR)
    try:
        cfg = resolve_config(ckpt, preset, **overrides)
    finally:
        log.setLevel(quiet)
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
