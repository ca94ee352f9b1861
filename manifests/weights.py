"""Weight files as every job reads them: what a file holds (safetensors, a torch pickle or zip, or not
weights at all: a Git LFS pointer, a saved HTML page, nothing), a safetensors header read without the
data, a state dict loaded safely, and one-line errors (`WeightsError`) naming the file and what is wrong.

It lives here because curate (pipeline), training and inference all load weights, and each of them may
import `manifests` (ARCHITECTURE.md: imports go one way). torch is imported where a function needs it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Shapes = dict[str, tuple[int, ...]]


class WeightsError(RuntimeError):
    """A missing, truncated or wrong weight file; the message names the file and what to do."""


def not_weights(path: Path) -> str | None:
    """What a file that should hold weights holds instead, told from its first bytes (None: it may be
    weights): a Git LFS pointer (a clone made without `git lfs pull`), an HTML page (a login or error
    page saved under the weights' name), nothing, or a folder."""
    try:
        if path.is_dir():
            return "a folder, not a weight file"
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "an empty file (0 bytes): an interrupted download?"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights: run `git lfs pull` in that clone, or download the file itself"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a login or error page saved under the weights' name), not weights"
    return None


def quick_problem(path: Path) -> str | None:
    """What is wrong with a weight file (safetensors or torch.save) that can be told without loading it
    (None: nothing found): not weights at all (`not_weights`, or first bytes of neither format), a
    safetensors file shorter than its header says or cut inside its header, a zip (torch.save) whose
    directory at its end is missing: a download cut short."""
    import zipfile

    odd = not_weights(path)
    if odd:
        return odd
    kind = weights_format(path)
    if kind is None:
        with open(path, "rb") as f:
            head = f.read(262)
        if head[257:262] == b"ustar":  # torch.save's tar format of before 2018, which torch.load still reads
            return None
        if len(head) > 8 and head[8:9] == b"{":  # a header length past the end: cut inside the header
            (length,) = struct.unpack("<Q", head[:8])
            return f"truncated: a safetensors header of {length:,} bytes in a file of {path.stat().st_size:,}"
        return (
            "its first bytes are neither a safetensors header nor a PyTorch file (torch.save): damaged, or"
            " another kind of file"
        )
    if kind == "safetensors":
        try:
            safetensors_header(path)
        except WeightsError as exc:
            return str(exc).removeprefix(f"{path}: ")
    elif kind == "torch":
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(path):
            return (
                "truncated: the zip directory torch.save writes at its end is missing (a download cut short?)"
            )
    return None


def weights_format(path: Path) -> str | None:
    """ "safetensors", "torch" (a zip or a pickle: torch.save) or None, from the file's first bytes rather
    than its name: a safetensors file named .ckpt, an HF cache blob without a suffix."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    # safetensors first: its first byte is the header length's low byte, 0x80 for one file in 32
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        return "torch"  # a zip (torch.save since 1.6) or a pickle of protocol 2-5 (the legacy format)
    return None


def safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets} from a safetensors header; WeightsError when the header
    is unreadable or the file holds less (or more) data than the header announces."""
    odd = not_weights(path)
    if odd:
        raise WeightsError(f"{path}: {odd}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > 100_000_000:
                if weights_format(path) == "torch":  # its first bytes read as a header of exabytes
                    raise WeightsError(
                        f"{path}: a PyTorch file (torch.save: a zip or a pickle), not safetensors: the"
                        " safetensors download of these weights goes here (or convert it with safetensors'"
                        " save_file)"
                    )
                raise WeightsError(f"{path}: truncated or not a safetensors file (header of {length} bytes)")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read the safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end != size:
        raise WeightsError(
            f"{path}: truncated: the header announces {8 + length + end} bytes, the file has {size}"
        )
    return header


def load_torch_state_dict(path: Path) -> dict:
    """A pickled state dict, loaded safely (tensors only); WeightsError naming the file otherwise."""
    import torch

    odd = not_weights(path)
    if odd:
        raise WeightsError(f"{path}: {odd}")
    if weights_format(path) == "safetensors":  # the same tensors saved the other way: read them as they are
        from safetensors.torch import load_file

        safetensors_header(path)  # truncated: named as such
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip / pickle, wrong file: one readable error
        raise unreadable_weights(path, "a PyTorch state dict", exc) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_module_weights(module: torch.nn.Module, path: Path, prefix: str = "", keep: str = "") -> None:
    """Load a pickled state dict file into `module` (strict): `WeightsError` naming the file when it cannot
    be read or its keys or shapes are not the module's, instead of torch's error deep in the call.
    `prefix` is removed when every key has it; with `keep`, only the keys under it are read (stripped)."""
    state = strip_prefix(load_torch_state_dict(path), prefix)
    if keep:
        state = {k.removeprefix(keep): v for k, v in state.items() if k.startswith(keep)}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    compare_shapes(path, {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}, expected)
    module.load_state_dict(state, strict=True)


def unreadable_weights(path: Path, what: str, exc: BaseException) -> WeightsError:
    """The error for a weight file that is there but does not load: the file, its size, what it should
    have been and the loader's reason in one sentence (raise it `from exc`)."""
    return WeightsError(
        f"{path} ({path.stat().st_size:,} bytes): cannot be read as {what} (truncated or wrong file?):"
        f" {load_failure(exc)}"
    )


def load_failure(exc: BaseException, limit: int = 160) -> str:
    """What torch.load's exception says went wrong, in one sentence: its messages run to paragraphs
    ("Weights only load failed. In PyTorch 2.6 ..." before the reason, advice after a zip error)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    sentence = lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def compare_shapes(path: Path, found: Shapes, expected: Shapes) -> None:
    """WeightsError listing missing keys, unexpected keys and shape mismatches (a few of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(
            f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: file {tuple(found[wrong[0]])}, "
            f"expected {tuple(expected[wrong[0]])})"
        )
    raise WeightsError(f"{path}: not the expected weights: {'; '.join(parts)}")


def strip_prefix(state: dict, prefix: str) -> dict:
    if prefix and state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state
