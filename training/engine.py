"""The machinery every training stage shares; the loop itself reads top to bottom in train.py.

* `TrainConfig`: the engine's knobs (optimizer, batch, precision, checkpoints, logging).
* distributed: `init_distributed` (torchrun's env: DDP over NCCL on GPUs, gloo on CPU; one process without
  torchrun), `wrap` (DDP, or FSDP2 `fully_shard` per UNet block).
* precision: `pick_device` and `autocast` (bf16 autocast on CUDA, fp32 on CPU): the one place they are
  decided.
* the step: `adamw`, `no_sync` (gradient accumulation); `local` / `full` parts of FSDP tensors.
* `EMA` of the trained weights; `capture_rng` / `restore_rng`.
* `Logger`: TensorBoard (scalars, sample videos as frame strips and GIFs) and `metrics.jsonl`, rank 0 only.

Beside it: config files and `--set` in config_overrides.py, torch.compile of the blocks in compilation.py,
a run's checkpoints (written, resumed from) in run_checkpoints.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
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
