"""The machinery every training stage shares; the loop itself reads top to bottom in train.py.

* `TrainConfig`: the engine's knobs (optimizer, batch, precision, checkpoints, logging).
* config files: `load_overrides` / `apply_overrides` (YAML and `--set key=value` only override dataclass
  fields; an unknown key is an error, a value of the wrong type too).
* distributed: `init_distributed` (torchrun's env: DDP over NCCL on GPUs, gloo on CPU; one process without
  torchrun), `wrap` (DDP, or FSDP2 `fully_shard` per UNet block).
* precision: `pick_device` and `autocast` (bf16 autocast on CUDA, fp32 on CPU): the one place they are
  decided.
* `EMA` of the trained weights; `capture_rng` / `restore_rng`.
* checkpoints: a folder per step, `OUT/checkpoints/step_NNNNNNN/`, written under a temporary name and
  renamed when complete, then named in `OUT/checkpoints/latest`:
      model.safetensors / sketch_encoder.safetensors   the weights for inference (EMA), config in metadata
      state.pt        trained weights (raw), optimizer(s), EMA, step (rank 0; FSDP: shard_RANK.pt per rank)
      rank_RANK.pt    that rank's data position and RNG states
      config.yaml     the resolved run config
  Frozen weights are not in the state: they never change, and a resume rebuilds them exactly as the run
  began (the init checkpoint, or the seeded random init).
* `Logger`: TensorBoard (scalars, sample videos as frame strips and GIFs) and `metrics.jsonl`, rank 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import lzma
import math
import os
import random
import re
import shutil
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from manifests.files import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    preset: str = "toon-512"  # model preset (training/models/tooncrafter.py); set by --preset
    init_checkpoint: str = (
        ""  # weights to start from (DynamiCrafter-interp / ToonCrafter / rectified); "" = random
    )
    from_scratch: bool = False  # a full-size preset without init_checkpoint is refused unless this is set
    steps: int = 50_000  # optimizer steps
    global_batch: int = 32  # clips per optimizer step over all ranks = micro_batch x ranks x accumulation
    micro_batch: int = 1  # clips per forward pass per rank
    lr: float = 1e-6  # AdamW learning rate (constant after warm-up, as the reference)
    warmup_steps: int = 0  # linear learning-rate warm-up (the reference has none)
    weight_decay: float = 0.01  # AdamW weight decay (torch's default, which the reference uses)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 0.5  # max global gradient norm (DynamiCrafter: gradient_clip_val 0.5); 0 disables
    ema_decay: float = 0.9999  # EMA of the trained weights, exported for inference; 0 exports the raw weights
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"
    gradient_checkpointing: bool = True  # recompute UNet / sketch-encoder / decoder blocks in backward
    checkpoint_levels: int = 0  # UNet: recompute only the blocks at the N finest resolutions; 0 = all
    # With train.compile: the share of each compiled UNet block's activations its backward may keep, the
    # compiler recomputing the cheapest ops for the rest (torch's activation memory budget; 1 = keep what
    # the compiler keeps by default, 0 = recompute all it can). Unlike gradient_checkpointing, which runs a
    # block's whole forward again, this recomputes norms and activations but can keep conv/attention outputs.
    recompute_budget: float = 1.0
    compile: str = ""  # torch.compile backend for each UNet block ("inductor" on GPU; "" = eager)
    channels_last: bool = False  # UNet + VAE encoder activations stored channels-last (train.compile, GPU)
    float8: str = ""  # "tensorwise": the UNet's transformer linears as torchao fp8 GEMMs; "" = off
    float8_layers: str = "large"  # with float8: "large" (where fp8 pays on an H100) or "all" (tests)
    fsdp: bool = False  # shard the UNet with FSDP2 (fully_shard per block) instead of replicating it (DDP)
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda"
    seed: int = 123  # model init (without init_checkpoint), data order, noise
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the last step)
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 keeps all
    max_nonfinite_steps: int = (
        20  # updates with a NaN/inf gradient are skipped; this many in a row stop the run
    )
    log_every: int = 10  # steps between scalar logs
    sample_every: int = 1000  # steps between sample videos in TensorBoard; 0 disables
    sample_clips: int = 2  # clips per sample video log
    sample_steps: int = 25  # DDIM steps of the sample videos
    eval_every: int = 0  # steps between eval-split metrics (stages that have them); 0 disables
    eval_clips: int = 16  # eval-split clips per evaluation


# --- config files ---------------------------------------------------------------------------------------------


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # `steps: 5e4` (YAML 1.1 reads it as a string)
            with contextlib.suppress(ValueError):
                number = float(value)
                if number.is_integer():
                    return int(number)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, list | tuple):
            args = typing.get_args(hint)
            item = args[0] if args else Any
            return tuple(_coerce(v, item, where) if item is not Any else v for v in value)
    elif hint is Any:
        return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def apply_overrides(obj: Any, values: Mapping[str, Any], where: str = "config") -> Any:
    """A copy of dataclass `obj` with `values` applied (nested dataclasses from nested mappings).

    Unknown keys and values of the wrong type raise ValueError naming the key."""
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"{where} is not a config section")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            from manifests.messages import did_you_mean

            section = where.removeprefix("config").lstrip(".")
            hint = did_you_mean(key, known, f"{section}." if section else "")
            listing = f" Known keys: {sorted(known)}" if hint else f"; known keys: {sorted(known)}"
            raise ValueError(f"unknown key {where}.{key}{hint}{listing}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key} is a section: give a mapping")
            changes[key] = apply_overrides(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "data.frames=16"]` -> {"train": {"lr": 1e-4}, "data": {"frames": 16}} (YAML values)."""
    import yaml

    from manifests.messages import load_yaml, yaml_problem

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item}: the value is not valid YAML ({yaml_problem(exc)})") from exc
    return out


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: no overrides)."""
    import yaml

    from manifests.messages import load_yaml, yaml_problem

    try:
        data = load_yaml(Path(path).read_text()) or {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid YAML config ({yaml_problem(exc)})") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a config file is a mapping of sections (train, data, <stage>)")
    return dict(data)


def merge_overrides(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win, recursively."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_overrides(out[key], value)
            else:
                out[key] = value
    return out


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (for JSON/YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


# --- distributed, device, precision ------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """torchrun's environment -> a process group (NCCL on CUDA, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def check_device(cfg: TrainConfig) -> None:
    """A ValueError naming train.device when it is not one this machine has (checked before any work)."""
    kind = cfg.device.split(":", 1)[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={cfg.device}: no CUDA device is available here (train.device=auto uses one when"
            " present, else the CPU)"
        )


def pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device == "cuda":
        return torch.device(f"cuda:{d.local_rank}")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for "auto"; fp16 is not offered (it would need loss scaling)."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    raise ValueError(f"train.precision must be auto, bf16 or fp32, got {cfg.precision!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step so that micro_batch x world x steps = global_batch."""
    per_step = cfg.micro_batch * world
    if cfg.global_batch % per_step:
        raise ValueError(
            f"train.global_batch {cfg.global_batch} is not a multiple of micro_batch {cfg.micro_batch} x "
            f"{world} rank(s); change one of them"
        )
    return cfg.global_batch // per_step


def wrap(
    net: nn.Module, d: Dist, device: torch.device, shard_blocks: list[nn.Module] | None = None
) -> nn.Module:
    """The module the loop calls: `net` itself on one process; DDP over the trainable parameters; or with
    `shard_blocks` (FSDP), FSDP2 `fully_shard` on each of them in order (inner blocks first, then their
    containers); every trained parameter must lie in one, the rest (frozen towers) stays replicated.
    Frozen parameters are left out of DDP's gradient reduction and of its start-up broadcast (every rank
    built them identically)."""
    if not d.active:
        return net
    if shard_blocks is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        for block in shard_blocks:
            fully_shard(block, mesh=mesh)
        unsharded = [
            n for n, p in net.named_parameters() if p.requires_grad and not hasattr(p, "device_mesh")
        ]
        if unsharded:
            raise ValueError(f"FSDP: trained parameters outside the sharded blocks: {unsharded[:5]}")
        return net
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in net.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, frozen)
    ids = [device.index] if device.type == "cuda" else None
    # Every buffer is in the ignore list, so DDP syncs none, at init or per forward; no
    # broadcast_buffers argument (deprecated in torch 2.14, which warns on every rank).
    return DistributedDataParallel(net, device_ids=ids)


def compile_blocks(blocks: list[nn.Module], backend: str) -> int:
    """Regional compilation: `torch.compile` each block in place (the UNet repeats a few block types,
    so this compiles far faster than the whole network, and it composes with checkpointing, DDP and
    FSDP, which wrap around the blocks). Returns the number of blocks compiled; "" compiles nothing."""
    if not backend:
        return 0
    check_compile_backend(backend)
    # The blocks share a few forward functions and Dynamo keeps 8 graphs per function by default: the
    # UNet's blocks need more (one per block shape), or the blocks past the 8th would silently run eager.
    dynamo = torch._dynamo.config
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 2 * len(blocks))
    dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 4 * len(blocks))
    # dynamic=False: the blocks of one class share its forward, so under Dynamo's default the second width
    # it meets (or the reference decode's 14-frame pass) recompiles that forward with symbolic shapes, a
    # slower compile of slower kernels: 12 of the tiny rectify step's 17 graphs were symbolic. Static, each
    # shape gets a graph of its own.
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def check_compile_backend(backend: str) -> None:
    """ValueError naming train.compile when torch.compile has no such backend ("" compiles nothing)."""
    if not backend:
        return
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"train.compile: unknown torch.compile backend {backend!r}; one of {sorted(known)}")


def check_recompute_budget(budget: float, backend: str) -> None:
    """TrainConfig.recompute_budget is a share in [0, 1] and, below 1, needs a compile backend."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"train.recompute_budget must be in [0, 1], got {budget}")
    if budget != 1.0 and not backend:
        raise ValueError("train.recompute_budget needs train.compile: the compiler does the recomputing")


def compile_unet_blocks(
    unet: nn.Module, blocks: list[nn.Module], backend: str, recompute_budget: float = 1.0
) -> int:
    """compile_blocks for the UNet's blocks under TrainConfig.recompute_budget: AOTAutograd's partitioner
    saves the most expensive-to-recompute tensors first (its runtime estimate is the ops' FLOPs, so norms
    and pointwise ops are recomputed first), up to that share of what it would keep by default. Below 1 the
    partitioner may also recompute dropouts with fresh randomness (training/models/dropout.py), so the
    UNet's dropouts are seeded first. The budget is process-wide, read when a graph compiles (the first
    call of a compiled block). Returns the number of blocks compiled."""
    check_recompute_budget(recompute_budget, backend)
    if recompute_budget < 1.0:
        from training.models.dropout import seed_dropouts

        seed_dropouts(unet)
    compiled = compile_blocks(blocks, backend)
    if compiled:
        import torch._functorch.config

        torch._functorch.config.activation_memory_budget = float(recompute_budget)
    return compiled


@contextlib.contextmanager
def compile_progress(label: str, interval: float = 30.0) -> Iterator[None]:
    """While the block runs, print every `interval` seconds how many graphs Dynamo has captured so far: a
    GPU check stopped at its time limit in the middle of compiling still tells how far it got."""
    import threading
    import time

    from torch._dynamo.utils import counters

    done = threading.Event()
    start = time.perf_counter()

    def report() -> None:
        while not done.wait(interval):
            graphs = counters["stats"]["unique_graphs"]
            print(f"{label}: {time.perf_counter() - start:.0f} s, {graphs} graphs so far", flush=True)

    thread = threading.Thread(target=report, name="compile-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# The device tool brings back files of at most 16 MiB: a larger cache is written in parts (path, path.1, ...).
CACHE_PART_BYTES = 15 * 2**20


def _cache_parts(path: Path) -> list[Path]:
    parts, i = [], 1
    while (part := path.with_name(f"{path.name}.{i}")).is_file():
        parts.append(part)
        i += 1
    return parts


def load_compile_cache(path: Path) -> bool:
    """Warm torch.compile's caches (compiled graphs and kernels) from a file `save_compile_cache` wrote (and
    its parts `path.1`, ... when it was split), possibly on another machine with the same torch, Triton and
    GPU: compilation then mostly loads instead of compiling (Dynamo still traces). False when the file does
    not exist."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = lzma.decompress(b"".join(p.read_bytes() for p in [path, *_cache_parts(path)]))
    except lzma.LZMAError as e:
        raise ValueError(f"{path}: not a compile cache written by save_compile_cache ({e})") from e
    torch.compiler.load_cache_artifacts(data)
    return True


def save_compile_cache(path: Path, part_bytes: int = CACHE_PART_BYTES) -> int:
    """Write what torch.compile has compiled in this process (torch.compiler.save_cache_artifacts, xz
    compressed) to `path`, atomically, split into `path`, `path.1`, ... of at most `part_bytes` each;
    returns the bytes written (0, and no file, when nothing was compiled)."""
    from manifests.files import write_bytes_atomic

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    path = Path(path)
    # preset 1: 14x faster than xz's default 6 for 1.4x the bytes (98 MB of the sampling UNet's artifacts, on
    # this machine: 1.9 s and 7.8 MB against 26.6 s and 5.5 MB). At 6, the sample's artifacts with the
    # decoder's (16.5 MiB compressed, ~3x the UNet's) cost an estimated minute of a GPU run's time.
    data = lzma.compress(saved[0], preset=1)
    for stale in _cache_parts(path):
        stale.unlink()
    chunks = [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)]
    for i, chunk in enumerate(chunks):
        write_bytes_atomic(path.with_name(f"{path.name}.{i}") if i else path, chunk)
    return len(data)


def cache_saved(size: int, seconds: float) -> str:
    """How a bench reports `save_compile_cache`'s result (and how long compressing took)."""
    return (
        f"saved {size / 2**20:.1f} MiB in {seconds:.1f} s"
        if size
        else "nothing compiled by inductor, nothing saved"
    )


def wait_for_file(path: Path, max_s: float, label: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Wait until `path` exists, at most `max_s` seconds: how two benches sharing one GPU keep out of each
    other's timed runs (one creates a file when it no longer needs the GPU quiet, the other waits for it).
    Returns (and prints) how long it waited and whether the file came."""
    import time

    start = time.perf_counter()
    path = Path(path)
    while not (found := path.exists()) and time.perf_counter() - start < max_s:
        time.sleep(poll_s)
    waited = {"file": str(path), "waited_s": round(time.perf_counter() - start, 1), "found": found}
    print(f"{label}: {'found' if found else 'gave up on'} {path} after {waited['waited_s']} s", flush=True)
    return waited


def adamw(params, cfg: TrainConfig, device: torch.device, **overrides: Any) -> torch.optim.AdamW:
    """AdamW with the config's hyper-parameters; the fused CUDA kernel where every tensor is on CUDA
    (one launch for all parameters instead of a few per tensor: 942 M parameters in ~1,300 tensors)."""
    options = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay, **overrides}
    return torch.optim.AdamW(params, fused=device.type == "cuda", **options)


def no_sync(wrapped: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if skip and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's part of an FSDP (DTensor) parameter; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP (DTensor) parameter (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# --- EMA and RNG -----------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the trained weights, in fp32, with the LDM warm-up
    decay_n = min(decay, (1 + n) / (10 + n)) (LitEma)."""

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float):
        self.decay = decay
        self.updates = 0
        self.names = list(params)
        self.shadow = [p.detach().float().clone() for p in params.values()]

    @torch.no_grad()
    def update(self, params: Mapping[str, nn.Parameter]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = [p.detach().float() for p in params.values()]
        torch._foreach_lerp_(self.shadow, current, 1.0 - d)

    @contextlib.contextmanager
    def applied(self, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
        """Swap the EMA weights into `params` for the duration (bitwise restored after)."""
        backup = [p.detach().clone() for p in params.values()]
        with torch.no_grad():
            for p, s in zip(params.values(), self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params.values(), backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "shadow": {n: local(s).cpu() for n, s in zip(self.names, self.shadow)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                local(s).copy_(state["shadow"][n])


def capture_rng(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The folder named by OUT/checkpoints/latest; when that folder is gone (moved aside because it was
    damaged), the newest complete one left (step_N with its meta.json, which is written last); else None."""
    root = checkpoint_root(out)
    pointer = root / "latest"
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if folder.is_dir():
            return folder
    complete = sorted(p for p in checkpoint_folders(root) if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under `root`: step_NNNNNNN exactly (a damaged one renamed aside,
    `step_0000300.bad`, is not one: it is neither resumed from nor pruned)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d{7}", p.name))


def set_hyperparameters(optimizer: torch.optim.Optimizer, **values: Any) -> None:
    """Put the config's values into a restored optimizer's param groups: `load_state_dict` brings back the
    saved ones, so a resume with another weight decay or betas said so but trained with the old."""
    for group in optimizer.param_groups:
        group.update(values)


def config_changes(folder: Path, config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs from the checkpoint's config.yaml: {"train.steps": (old, new)}."""

    saved = read_saved_config(folder)

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
        return out

    old, new = flat(saved), flat(config)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    state = opt.state_dict()
    state["state"] = {
        k: {n: local(v).cpu() if torch.is_tensor(v) else v for n, v in s.items()}
        for k, s in state["state"].items()
    }
    return state


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state written by `_optimizer_state`; FSDP moments go back into DTensors like their params."""
    opt.load_state_dict(state)
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        for name, value in list(opt.state.get(p, {}).items()):
            if torch.is_tensor(value) and hasattr(p, "device_mesh") and not hasattr(value, "device_mesh"):
                from torch.distributed.tensor import DTensor

                if value.dim() == 0:  # `step` stays a plain tensor
                    continue
                opt.state[p][name] = DTensor.from_local(
                    value.to(local(p).device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )  # uneven shards


def save_checkpoint(
    out: Path,
    step: int,
    d: Dist,
    *,
    trainable: Mapping[str, nn.Parameter],
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: EMA | None,
    rank_state: dict[str, Any],
    config: dict[str, Any],
    export: typing.Callable[[Path], None],
    keep: int,
    sharded: bool,
) -> Path | None:
    """Write the checkpoint of `step` (every rank calls this; see the module docstring for the files)."""
    import yaml

    root = checkpoint_root(out)
    name = f"step_{step:07d}"
    tmp = root / f".{name}.tmp"
    if d.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(d)
    try:
        export(tmp)  # collective under FSDP; writes on rank 0
        state = {
            "step": step,
            "trainable": {n: local(p).detach().cpu() for n, p in trainable.items()},
            "optimizers": {k: _optimizer_state(o) for k, o in optimizers.items()},
            "ema": ema.state_dict() if ema is not None else None,
        }
        if sharded:
            torch.save(state, tmp / f"shard_{d.rank}.pt")
        elif d.main:
            torch.save(state, tmp / "state.pt")
        torch.save(rank_state, tmp / f"rank_{d.rank}.pt")
    except (OSError, RuntimeError) as exc:  # torch.save on a full disk: "unexpected pos", no errno
        shutil.rmtree(tmp, ignore_errors=True)  # gigabytes at full size
        raise _write_failed(root, name, exc) from exc
    barrier(d)
    if not d.main:
        barrier(d)
        return None
    meta = {"step": step, "world": d.world, "sharded": sharded}
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    pointer.replace(root / "latest")
    if keep > 0:
        for old in checkpoint_folders(root)[:-keep]:
            shutil.rmtree(old)
    barrier(d)
    return final


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a folder gone): the last complete one is intact."""


def _write_failed(root: Path, name: str, exc: BaseException) -> CheckpointWriteError:
    import errno

    try:
        free = shutil.disk_usage(root.parent if not root.exists() else root).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < 256 * 2**20)
    why = f"no space left on its disk ({free / 2**20:.0f} MiB free)" if full and free is not None else None
    why = why or (
        "no space left on its disk" if full else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    )
    last = latest_checkpoint(root.parent)
    after = (
        f"the last complete checkpoint, {last.name}, is intact: free space, then --resume"
        if last is not None
        else "no checkpoint is complete yet"
    )
    return CheckpointWriteError(f"cannot write checkpoint {name} in {root}: {why}; {after}")


def remove_stale_tmp(out: Path) -> list[Path]:
    """Remove the temporary folders of checkpoints a killed run left half-written (.step_N.tmp)."""
    root = checkpoint_root(out)
    stale = sorted(p for p in root.glob(".step_*.tmp") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_checkpoint(
    folder: Path,
    d: Dist,
    *,
    trainable: Mapping[str, nn.Parameter],
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: EMA | None,
    restart_data: bool = False,
) -> tuple[int, dict[str, Any]]:
    """Restore what `save_checkpoint` wrote into the live objects; -> (step, this rank's rank_state). With
    `restart_data` a replicated (DDP) checkpoint continues on another number of ranks: its state is one
    file, the same for every rank; a rank it had no data position for gets rank 0's (restarted anyway),
    marked with the rank it came from."""
    meta = read_meta(folder)
    check_world(folder, d.world, restart_data)
    state_file = folder / (f"shard_{d.rank}.pt" if meta["sharded"] else "state.pt")
    state = _load_state(state_file, folder)
    missing = sorted(set(trainable) - set(state["trainable"]))
    if missing:
        raise ValueError(f"{state_file} lacks trained parameters {missing[:5]}: another stage or model?")
    extra = sorted(set(state["trainable"]) - set(trainable))  # the optimizer's groups would not match
    other = sorted(n for n, p in trainable.items() if state["trainable"][n].shape != local(p).shape)
    if extra or other:  # each rank's own part under FSDP, as saved
        raise ValueError(
            f"{state_file} trained other parameters than this run: "
            + (f"{len(extra)} this run does not train (e.g. {extra[:3]})" if extra else "")
            + ("; " if extra and other else "")
            + (f"{len(other)} of another shape (e.g. {other[:3]})" if other else "")
            + ": resume with the settings the run began with (its config.yaml)"
        )
    with torch.no_grad():
        for n, p in trainable.items():
            local(p).copy_(state["trainable"][n])
    for k, opt in optimizers.items():
        _load_optimizer_state(opt, state["optimizers"][k])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError(f"{state_file} has no EMA but train.ema_decay > 0")
        ema.load_state_dict(state["ema"])
    if meta["world"] == d.world:
        return int(state["step"]), read_rank_state(folder, d.rank)
    return int(state["step"]), {**read_rank_state(folder, 0), "rank": 0}


def check_world(folder: Path, world: int, restart_data: bool) -> None:
    """ValueError when the checkpoint in `folder` cannot continue on `world` ranks: a sharded (FSDP) one
    holds one shard per rank; a replicated one needs --restart-data (the data position is per rank)."""
    meta = read_meta(Path(folder))
    if meta["world"] == world:
        return
    if meta.get("sharded"):
        raise ValueError(
            f"{folder} was written by {meta['world']} FSDP rank(s), one shard each; resume it with the same"
            f" number (now {world})"
        )
    if not restart_data:
        raise ValueError(
            f"{folder} was written by {meta['world']} rank(s); resume it with the same number (now {world}) to"
            " continue the same sample order, or pass --restart-data to go on with the weights, optimizer and"
            " step on these ranks, reading the data in a new order"
        )


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's meta.json (step, world, sharded); a damaged one is the ValueError of `_load_state`."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not {"world", "sharded"} <= set(meta):
            raise ValueError("not the mapping of step, world and sharded a checkpoint writes")
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise _damaged(path, Path(folder), str(exc)) from exc
    return meta


def read_saved_config(folder: Path) -> dict[str, Any]:
    """The run config a checkpoint saved (config.yaml); a damaged one is the ValueError of `_load_state`."""
    import yaml

    from manifests.messages import yaml_problem

    path = Path(folder) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise _damaged(path, Path(folder), exc.strerror or str(exc)) from exc
    except (yaml.YAMLError, ValueError) as exc:  # cut-off bytes: a ReaderError of several lines
        raise _damaged(path, Path(folder), yaml_problem(exc).splitlines()[0]) from exc
    if not isinstance(saved, dict):
        raise _damaged(path, Path(folder), "not the mapping of sections a checkpoint writes")
    return saved


def _damaged(path: Path, folder: Path, why: str) -> ValueError:
    return ValueError(
        f"cannot read {path} ({why}): the checkpoint {folder.name} is damaged or incomplete; move {folder}"
        " aside and --resume continues from the one before it"
    )


def check_state_files(folder: Path) -> None:
    """The training state of a checkpoint, checked without loading it (missing, cut short): said before a
    resume builds the model (minutes at full size), as `_load_state` would say it after."""
    from manifests.weights import quick_problem

    meta = read_meta(folder)
    names = [f"shard_{r}.pt" for r in range(meta["world"])] if meta["sharded"] else ["state.pt"]
    for name in names:
        path = Path(folder) / name
        problem = "No such file" if not path.is_file() else quick_problem(path)
        if problem:
            raise _damaged(path, Path(folder), problem)


def read_rank_state(folder: Path, rank: int = 0) -> dict[str, Any]:
    """One rank's data position and RNG states from a checkpoint (a small file: read before a resume
    builds the model, to check the data position against the run's shards and workers)."""
    return _load_state(folder / f"rank_{rank}.pt", folder)


def _load_state(path: Path, folder: Path) -> dict[str, Any]:
    """One file of a checkpoint this project wrote (full unpickling: optimizer state, RNG states); a
    damaged or missing one is a ValueError that says how to resume from the checkpoint before it."""
    from manifests.weights import load_failure

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _damaged(path, folder, load_failure(exc)) from exc


# --- logging -------------------------------------------------------------------------------------------------


def _drop_records_from(path: Path, first_step: int) -> None:
    """Rewrite metrics.jsonl without its records of steps >= first_step (a line cut by a kill is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) < first_step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


class Logger:
    """TensorBoard + metrics.jsonl on rank 0; does nothing on the other ranks."""

    def __init__(self, out: Path, enabled: bool, first_step: int = 1):
        """`first_step`: the first step this run logs. What an earlier run logged from there on (a run that
        went past the checkpoint it is resumed from, or stopped before its first one) is dropped, from
        TensorBoard (its purge_step) and from metrics.jsonl, so that each step is logged once."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / "tb"), purge_step=first_step)
            path = Path(out) / "metrics.jsonl"
            if path.is_file():
                _drop_records_from(path, first_step)
            self.jsonl = path.open("a")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        # NaN and inf as null: the file stays JSON that strict parsers (jq, browsers) read
        record = {k: float(v) if math.isfinite(float(v)) else None for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()

    def videos(self, step: int, tag: str, video: torch.Tensor, fps: int = 8) -> None:
        """video [b, 3, t, H, W] in [-1, 1]: one image per clip (its frames side by side) and an animated
        GIF beside the logs (`samples/TAG_STEP.gif`; TensorBoard's own add_video needs moviepy)."""
        if not self.enabled:
            return
        frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        strip = torch.cat(list(frames.permute(0, 2, 1, 3, 4)), dim=2)  # [t, 3, b*H, W]
        strip = torch.cat(list(strip), dim=2)  # [3, b*H, t*W]
        self.writer.add_image(tag, strip, step)
        self.writer.flush()
        folder = Path(self.writer.log_dir).parent / "samples"
        folder.mkdir(exist_ok=True)
        _write_gif(folder / f"{tag.replace('/', '_')}_{step:07d}.gif", frames, fps)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _write_gif(path: Path, frames: torch.Tensor, fps: int) -> None:
    """frames uint8 [b, 3, t, H, W] -> one GIF with the clips side by side (PIL when installed)."""
    try:
        from PIL import Image
    except ImportError:
        return
    grid = torch.cat(list(frames), dim=3)  # [3, t, H, b*W]
    images = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in grid.permute(1, 0, 2, 3)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
