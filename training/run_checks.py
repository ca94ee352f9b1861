"""What `inbetweener train` refuses before any work: each setting and input of a run, checked before a model
is built (minutes at full size) or the run folder taken, and said in one line naming it, exit code 2
(`_input_errors`), not as a traceback from deep in the loader, the model or the first checkpoint.

`check_inputs` checks them in this order: --out; the config (run_config.resolve_config) and the device; a
--resume's start (the run's stage, preset, init and trained parameters: `_check_same_start`); --init or
--from-scratch; the shards and the eval split; --resume and --restart-data against the checkpoints --out
holds; the stage's own weights; the global batch; --init's file (`_check_init_kind`, then loadable); --out
apart from the curate output it reads, and writable; last, a resume's checkpoint files, number of ranks and
data position.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from manifests.files import FolderBusy, curate_out_of
from training import config_overrides, engine, run_checkpoints
from training.data import DataState
from training.run_config import RunConfig, _chosen_init, resolve_config
from training.shards import check_shards, is_tar_name, is_url, list_shards

log = logging.getLogger("training.train")  # the train command's logger, as in train.py


INIT_HINT = {  # what each stage starts from (the paper's order: rectify, then sketch; decoder apart)
    "rectify": "the DynamiCrafter-512-interp model.ckpt",
    "decoder": "the DynamiCrafter-512-interp or ToonCrafter model.ckpt",
    "sketch": "the rectify stage's exported model.safetensors",
}


def _same_file(then: str, now: str) -> bool:
    """Whether --init names the file the run began from: the same file by another path (relative, from
    another folder), or, when that file is gone (converted, moved), whatever is given now (said)."""
    if os.path.exists(then) and os.path.exists(now):
        return os.path.samefile(then, now)
    if not os.path.exists(then) and os.path.exists(now):
        print(f"the run began from {then}, which is not there now: resuming with {now} as its weights")
        return True
    return False


def _check_writable(out: Path) -> None:
    """--out made and written to once, before any work (a read-only disk was a traceback from the lock)."""
    from manifests.files import make_writable_folder

    problem = make_writable_folder(out)
    if problem:
        raise ValueError(f"--out {out}: {problem}")


# The settings that choose which tensors a stage trains, and their shapes: a resume with another value has
# other parameters than its checkpoint (torch's "parameter group that doesn't match", a size mismatch).
TRAINED_SET = {"rectify": ("train_roles",), "decoder": ("disc_channels", "disc_layers")}


def _check_same_start(folder: Path, run: RunConfig, stage: str) -> None:
    """A resume rebuilds the frozen weights from the init checkpoint and the preset the run began with: a
    resume without --init, or with another file or preset, silently trained on other (random) frozen
    weights. Refused, naming what the run began with; so is a resume of another stage's run, or one whose
    trained parameters differ (those were found only once the model was built, in torch's words)."""
    whole = run_checkpoints.read_saved_config(folder)
    run_dir = folder.parent.parent
    then_stage = whole.get("stage")
    if then_stage is not None and then_stage != stage:
        raise ValueError(
            f"the run in {run_dir} is a {then_stage!r} run, not {stage!r}: resume it with `inbetweener train"
            f" {then_stage} ... --resume`, or give this {stage} run another --out"
        )
    section = whole.get(stage)
    for key in TRAINED_SET.get(stage, ()):
        if not isinstance(section, dict) or key not in section:
            continue
        then, now = section[key], config_overrides.to_plain(getattr(getattr(run, stage), key))
        if then != now:
            raise ValueError(
                f"the run in {run_dir} began with {stage}.{key}={then!r}, this one has {now!r}: that changes the"
                f" parameters it trains, so its checkpoint cannot continue; resume with --set {stage}.{key}="
                f"{json.dumps(then).replace(' ', '')}, or start a new run from its model (--init"
                f" {folder})"
            )
    saved = whole.get("train", {})
    if not isinstance(saved, dict):
        saved = {}
    for key, flag in (
        ("preset", "--preset"),
        ("init_checkpoint", "--init"),
        ("from_scratch", "--from-scratch"),
    ):
        then, now = saved.get(key), getattr(run.train, key)
        # a run begun before init paths were resolved recorded the folder or `latest` pointer it was given
        root = _pointer_root(str(then)) if key == "init_checkpoint" and then and now else None
        if (
            key == "init_checkpoint"
            and then
            and now
            and root is None
            and _same_file(_chosen_init(str(then)), now)
        ):
            continue
        if root is not None:  # which step it named then is not known: one of that run's, said
            if Path(now).resolve().is_relative_to(root.resolve()):
                print(
                    f"the run began from {then}, a pointer to the newest checkpoint of that run, which may name a"
                    f" later step now: resuming with {now}, the one given"
                )
                continue
            raise ValueError(
                f"the run in {folder.parent.parent} began with train.init_checkpoint={then!r}, a pointer to the"
                f" newest checkpoint of {root}, this one has {now!r}: its frozen weights come from there; resume"
                f" with --init the step folder of {root} the run began from"
            )
        if key in saved and then != now:
            given = (
                f"{flag} {then}"
                if key != "from_scratch"
                else ("--from-scratch" if then else "no --from-scratch")
            )
            raise ValueError(
                f"the run in {folder.parent.parent} began with train.{key}={then!r}, this one has {now!r}: its"
                f" frozen weights come from there; resume with {given}"
            )


def _pointer_root(recorded: str) -> Path | None:
    """The checkpoints folder when a recorded init path is a training run's `latest` pointer (the file, or
    the checkpoints folder it is in), else None: what it names changes as that run goes on."""
    path = Path(recorded)
    if path.is_file() and path.name == "latest":
        return path.parent
    if path.is_dir() and (path / "latest").is_file():
        return path
    return None


def _check_init_kind(path: Path, stage: str) -> None:
    """--init names a file of a training checkpoint that is no model, said by its header or its name before
    the run takes its folder: a sketch encoder (a sketch run's `step_N` folder, or its export) was a
    20-line key mismatch once the run had taken its folder; a checkpoint's state.pt "no state dict found"."""
    import re

    from manifests.weights import weights_format
    from training.stages.sketch import SKETCH_CONFIG_METADATA

    wanted = f"--init takes a whole model ({INIT_HINT[stage]})"
    if weights_format(path) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 (said in full when the model loads)
            return
        if SKETCH_CONFIG_METADATA in meta:
            raise ValueError(
                f"--init {path} is a sketch encoder (what `train sketch` exports): {wanted}; a sketch encoder"
                " goes to `interpolate --sketch-checkpoint`"
            )
    elif re.fullmatch(r"state\.pt|(rank|shard)_\d+\.pt", path.name) and (path.parent / "meta.json").is_file():
        raise ValueError(
            f"--init {path} is the training state of a checkpoint, not its model: {wanted}; give the checkpoint"
            f" folder {path.parent} (its model.safetensors), or --resume to continue that run"
        )


@contextlib.contextmanager
def _input_errors():
    """A bad setting, a missing shard folder, a wrong checkpoint or weight file: one line naming it and exit
    code 2, not a traceback (errors inside the training loop keep theirs)."""
    from manifests.weights import WeightsError
    from training.checkpoint import CheckpointError

    try:
        yield
    except (ValueError, FileNotFoundError, CheckpointError, WeightsError, FolderBusy) as exc:
        print(f"inbetweener train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def check_inputs(args: argparse.Namespace) -> tuple[RunConfig, Path | None, list[str], list[str]]:
    """Everything the user gave, checked before a model is built: -> (the resolved config, the checkpoint
    to resume from or None, the training shards, the eval split's shards). A refusal is a ValueError or a
    FileNotFoundError naming what to change (said by `_input_errors`)."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the run")
    run = resolve_config(args)
    engine.check_device(run.train)
    resume_from = run_checkpoints.latest_checkpoint(Path(args.out)) if args.resume else None
    if resume_from is not None:  # first: a resume must start as its run began (its preset, its init)
        _check_same_start(resume_from, run, args.stage)
    if run.train.preset != "tiny" and not run.train.init_checkpoint and not run.train.from_scratch:
        raise ValueError(
            f"train {args.stage}: preset {run.train.preset} starts from a checkpoint: pass --init"
            f" ({INIT_HINT[args.stage]}), or --from-scratch to train it from random weights"
        )
    if not run.data.train:  # it said "no training shards ... at : pass --data"
        raise ValueError(
            "no training data given: pass --data (a curate OUT folder, a shard folder, a glob or a URL),"
            " or set data.train in a --config file"
        )
    shards = list_shards(run.data.train)
    if not shards:
        raise FileNotFoundError(
            f"no training shards (*.tar, *.tar.gz) at {run.data.train}: pass --data (a curate OUT folder, a shard"
            " folder, a glob or a URL)"
        )
    not_tar = [s for s in shards if not is_url(s) and not is_tar_name(s)]
    if not_tar:
        raise FileNotFoundError(
            f"{not_tar[0]} is not a shard (.tar, .tar.gz){f' (and {len(not_tar) - 1} more)' if len(not_tar) > 1 else ''}:"
            " pass --data a curate OUT folder (or its manifest.parquet), a shard folder, a glob or a URL"
        )
    check_shards(shards)  # missing files, the eval split, URLs that cannot be read at all
    eval_shards = list_shards(run.data.eval) if run.data.eval else []  # sample videos, decoder's metrics
    if args.restart_data and not args.resume:
        raise ValueError("--restart-data goes with --resume (a new run reads the data from its start)")
    if args.resume and resume_from is None:  # said before the initial checkpoint loads (minutes)
        given = Path(args.out).absolute()  # its checkpoints/ or a step_N as --out: the run folder is above
        above = {given.parent: given.name, given.parent.parent: given.parent.name}
        run_dir = next(
            (p for p, n in above.items() if n == "checkpoints" and run_checkpoints.latest_checkpoint(p)),
            None,
        )
        hint = f": {given} is inside the run folder {run_dir}; resume with --out {run_dir}" if run_dir else ""
        raise FileNotFoundError(f"--resume: no checkpoint in {run_checkpoints.checkpoint_root(given)}{hint}")
    earlier = run_checkpoints.latest_checkpoint(Path(args.out)) if not args.resume else None
    if earlier is not None:  # its pruning would delete the new run's checkpoints (lower steps) first
        raise ValueError(
            f"--out {args.out} holds the checkpoints of an earlier run (latest {earlier.name}): --resume"
            " continues it; for a new run give another --out (or move its checkpoints/ aside)"
        )
    if args.stage == "sketch" and not run.train.init_checkpoint:
        log.warning(
            "train sketch without --init: the UNet's output conv starts at zero and is frozen, so no"
            " gradient reaches the sketch encoder (grad_norm 0); give the rectify stage's model as --init"
        )
    if args.stage in ("decoder", "sketch"):  # the stage's own weights, before the run takes its folder
        from training.stages import decoder as decoder_stage
        from training.stages import sketch as sketch_stage

        given = Path(args.models_dir) if args.models_dir else None
        if args.stage == "decoder":  # the eval's LPIPS only where the eval runs
            evaluates = run.train.eval_every > 0 and bool(eval_shards)
            problem = decoder_stage.missing_weights(run.decoder, given, evaluates)
        else:
            problem = sketch_stage.missing_weights(run.sketch, given)
        if problem:
            raise FileNotFoundError(problem)
    engine.accumulation_steps(run.train, int(os.environ.get("WORLD_SIZE", 1)))  # a batch the ranks split
    if run.train.init_checkpoint:  # a missing, cut-off or other model's file, before the run takes its folder
        from training.checkpoint import check_loadable
        from training.checkpoint_files import existing_checkpoint

        _check_init_kind(existing_checkpoint(run.train.init_checkpoint), args.stage)
        check_loadable(run.train.init_checkpoint, preset=run.train.preset, dual_ref_decoder=True)
    source = curate_out_of(run.data.train)
    if source is not None and Path(args.out).resolve() == source.resolve():  # it said to wait for itself
        raise ValueError(
            f"--out {args.out} is the curate output the run reads (--data): give the run a folder of its"
            f" own, e.g. {Path(args.out) / 'runs' / args.stage}"
        )
    _check_writable(Path(args.out))  # last: a run refused above leaves no empty folder
    if resume_from is not None:  # said before the model is built (minutes)
        world = int(os.environ.get("WORLD_SIZE", 1))
        run_checkpoints.check_world(resume_from, world, args.restart_data)
        run_checkpoints.check_state_files(resume_from)  # it was found damaged once the model was built
        if not args.restart_data:
            saved = DataState.from_dict(run_checkpoints.read_rank_state(resume_from)["data"])
            saved.check_resumable(shards, world, run.data.num_workers)
    return run, resume_from, shards, eval_shards
