"""torch.compile for training, sampling and the GPU benches.

* regional compilation: `compile_blocks` compiles each block in place; `compile_unet_blocks` does it under
  TrainConfig.recompute_budget; `check_compile_backend` / `check_recompute_budget` check the settings.
* `compile_progress`: what a long compile has captured so far, printed while it runs.
* the compile cache: `save_compile_cache` / `load_compile_cache` (a file in parts the device tool brings
  back), `cache_saved` (how a bench reports it).
* `wait_for_file`: how two benches sharing one GPU keep one's compiling out of the other's timed runs.
"""

from __future__ import annotations

import contextlib
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


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
