"""What a checkpoint file holds and how it is read: every format `read_checkpoint` takes (Lightning `.ckpt`,
DeepSpeed dicts and folders, plain state dicts, safetensors; see training/checkpoint.py's docstring), the
wrappers, EMA copies and legacy names it removes, the config a file may carry, and which file a folder or a
run's `latest` pointer names. Checking a file against the model, loading it and writing checkpoints are
training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.models.tooncrafter import ToonCrafterConfig

log = logging.getLogger("training.checkpoint")  # one logger for checkpoints, read or loaded (tests, ranks)

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


class CheckpointError(RuntimeError):
    """A file that cannot be read as a checkpoint."""


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    config: ToonCrafterConfig | None = None  # the config embedded in the file, if any
    metadata: dict[str, str] = field(default_factory=dict)


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
    with quiet_log():
        return read_checkpoint(path, layout_only=True)


@contextlib.contextmanager
def quiet_log() -> Iterator[None]:
    """The checkpoint logger's warnings held back: for a check before the real load, which says them once."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
