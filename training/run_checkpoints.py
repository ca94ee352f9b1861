"""A training run's checkpoints: written every few steps, resumed from exactly.

A folder per step, `OUT/checkpoints/step_NNNNNNN/`, written under a temporary name and renamed when
complete, then named in `OUT/checkpoints/latest`:
    model.safetensors / sketch_encoder.safetensors   the weights for inference (EMA), config in metadata
    state.pt        trained weights (raw), optimizer(s), EMA, step (rank 0; FSDP: shard_RANK.pt per rank)
    rank_RANK.pt    that rank's data position and RNG states
    config.yaml     the resolved run config
    meta.json       step, number of ranks, sharded or not
Frozen weights are not in the state: they never change, and a resume rebuilds them exactly as the run began
(the init checkpoint, or the seeded random init). The checks a resume makes before building the model
(`check_world`, `check_state_files`, `read_rank_state`, `read_saved_config`) read the same files.
Model checkpoints to start from (DynamiCrafter, ToonCrafter, exports) are read by checkpoint.py.
"""

from __future__ import annotations

import json
import re
import shutil
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.engine import EMA, Dist, barrier, local


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
