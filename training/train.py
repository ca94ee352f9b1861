"""`inbetweener train {rectify,decoder,sketch}`: the three ToonCrafter training stages on curated shards.

The config of a run is resolved in layers, later ones winning: the dataclass defaults (TrainConfig,
DataConfig, the stage's config) <- the stage's paper defaults <- the preset's profile (`tiny`: a small,
fast CPU run) <- `--config FILE.yaml` <- `--set section.key=value`. YAML and --set only override fields;
an unknown key is an error. The resolved config is printed, and saved with every checkpoint.

One process, or many under torchrun (DDP; `--set train.fsdp=true` shards the UNet with FSDP2). The loop
below reads top to bottom: batches -> forward under autocast -> backward (gradient accumulation to the
global batch) -> clip -> step -> EMA -> logs, sample videos, eval, checkpoints. `--resume` continues from
OUT/checkpoints/latest exactly: weights, optimizer, EMA, step, data position and RNG states.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from manifests.files import FolderBusy, curate_out_of, folder_lock
from manifests.remote import local_folder, not_a_url
from training import compilation, config_overrides, engine, float8, run_checkpoints
from training.data import DataConfig, DataState, collate, eval_windows, make_loader, to_model_range
from training.engine import TrainConfig
from training.models.layout import set_channels_last
from training.models.vae import resnet_blocks
from training.roles import format_role_table
from training.shards import (
    TRAIN_INDEX,
    DataError,
    check_shards,
    is_tar_name,
    is_url,
    list_shards,
    split_dirs,
    write_train_index,
)
from training.stages import decoder, rectify, sketch
from training.stages.common import unet_blocks

log = logging.getLogger("training.train")

STAGES = {"rectify": rectify, "decoder": decoder, "sketch": sketch}

EXAMPLES = """examples:
  inbetweener train rectify --preset tiny --data out/demo/curated --out runs/rectify-tiny
  inbetweener train rectify --data s3://bucket/curated/shards/train/ --out runs/rectify \\
      --config configs/rectify.yaml --set train.init_checkpoint=models/dynamicrafter_512_interp/model.ckpt
  torchrun --nproc_per_node 8 -m training.train rectify --data /data/curated --out runs/rectify \\
      --config configs/rectify.yaml --init models/dynamicrafter_512_interp/model.ckpt --set train.micro_batch=2
  inbetweener train decoder --data out/demo/curated --out runs/decoder --config configs/decoder.yaml --no-lpips \\
      --init models/dynamicrafter_512_interp/model.ckpt
  inbetweener train sketch --data out/demo/curated --out runs/sketch --config configs/sketch.yaml \\
      --set train.init_checkpoint=runs/rectify/checkpoints/step_0050000/model.safetensors
  inbetweener train rectify --preset tiny --data out/demo/curated --out runs/rectify-tiny --resume

A full-size preset starts from --init (rectify and decoder: DynamiCrafter-512-interp; sketch: the rectified
model); without it the run is refused unless --from-scratch asks for random weights.
--data takes a curate OUT folder (its shards/train, with shards/eval as the eval split), a folder of
.tar shards, a glob, a {000000..000099} pattern, a list file, pipe:COMMAND or an fsspec URL.
"""

# The `tiny` preset's profile: a run that finishes in well under a minute on a laptop CPU.
TINY_PROFILE: dict[str, dict[str, Any]] = {
    "train": {
        "steps": 20,
        "global_batch": 2,
        "micro_batch": 1,
        "lr": 1e-4,
        "ckpt_every": 10,
        "log_every": 1,
        "sample_every": 10,
        "sample_clips": 1,
        "sample_steps": 4,
        "eval_every": 10,
        "eval_clips": 2,
        "ema_decay": 0.99,
    },
    "data": {"frames": 4, "height": 64, "width": 96, "num_workers": 1, "shuffle_buffer": 8},
    "decoder": {"lpips_net": "alex", "disc_start": 10, "disc_channels": 32},
}


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rectify: rectify.RectifyConfig = field(default_factory=rectify.RectifyConfig)
    decoder: decoder.DecoderConfig = field(default_factory=decoder.DecoderConfig)
    sketch: sketch.SketchConfig = field(default_factory=sketch.SketchConfig)

    def for_stage(self, stage: str) -> dict[str, Any]:
        """The sections a stage's run uses (what is printed and saved)."""
        return {
            "stage": stage,
            "train": config_overrides.to_plain(self.train),
            "data": config_overrides.to_plain(self.data),
            stage: config_overrides.to_plain(getattr(self, stage)),
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="inbetweener train",
        description="Train a ToonCrafter stage: rectify (spatial layers + image projector), decoder "
        "(dual-reference decoder), sketch (sketch encoder).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, module in STAGES.items():
        p = sub.add_parser(
            name,
            help=" ".join((module.__doc__ or "").split("\n\n")[0].split()),  # the whole first sentence
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--data",
            help="training shards (see below); a curate OUT folder (or its manifest.parquet) also gives the eval split",
        )
        p.add_argument(
            "--out",
            required=True,
            type=local_folder,
            help="run folder: checkpoints/, tb/, metrics.jsonl, samples/",
        )
        p.add_argument("--preset", choices=["tiny", "toon-512"], help="model preset (default toon-512)")
        p.add_argument(
            "--config", action="append", default=[], help="YAML overriding config fields (repeatable)"
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one field, e.g. train.lr=1e-5 (repeatable: --set data.num_workers=8 --set ...)",
        )
        p.add_argument("--init", type=not_a_url, help="init checkpoint (= train.init_checkpoint)")
        p.add_argument(
            "--from-scratch",
            action="store_true",
            help="start a full-size preset from random weights, without --init (= train.from_scratch)",
        )
        p.add_argument(
            "--models-dir",
            type=not_a_url,
            help="weights folder (LPIPS, Anime2Sketch); default $INBETWEENER_MODELS, else ~/.cache/inbetweener/models",
        )
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
        p.add_argument(
            "--restart-data",
            action="store_true",
            help="with --resume: read the data in a new order from here (after the shards, data.num_workers or"
            " the number of ranks changed; an FSDP checkpoint needs its own number); the weights, optimizer"
            " and step continue",
        )
        if name == "decoder":
            p.add_argument(
                "--no-lpips", action="store_true", help="train without LPIPS (= decoder.lpips_weight=0)"
            )
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Defaults <- the stage's paper settings <- the preset profile <- --config files <- --set (docstring)."""
    cli: dict[str, Any] = {"train": {}, "data": {}}
    if args.preset:
        cli["train"]["preset"] = args.preset
    if args.init:
        cli["train"]["init_checkpoint"] = args.init  # the file it names: below
    if args.from_scratch:
        cli["train"]["from_scratch"] = True
    if args.data:
        train_spec, eval_spec = split_dirs(args.data)
        cli["data"]["train"] = train_spec
        if eval_spec:
            cli["data"]["eval"] = eval_spec
    if getattr(args, "no_lpips", False):
        cli["decoder"] = {"lpips_weight": 0.0}
    files = [_stage_file(config_overrides.load_overrides(path), path, args.stage) for path in args.config]
    sets = config_overrides.parse_set(args.set)
    for origin, layer in zip([*args.config, "--set"], [*files, sets], strict=True):
        _check_layer(origin, layer, args.stage)  # each error names the file (or --set) it comes from
    preset = "toon-512"
    for layer in [*files, cli, sets]:
        preset = layer.get("train", {}).get("preset", preset)
    layers = [{"train": STAGES[args.stage].TRAIN_DEFAULTS}]
    if preset == "tiny":
        layers.append(TINY_PROFILE)
    layers += [*files, cli, sets]
    merged = config_overrides.merge_overrides(*layers)
    run = config_overrides.apply_overrides(RunConfig(), merged, "config")
    if run.train.init_checkpoint:  # however given: --init, --set train.init_checkpoint, a config file
        run.train.init_checkpoint = _chosen_init(run.train.init_checkpoint)
    check_ranges(run)
    compilation.check_compile_backend(run.train.compile)  # it was said once the model was built
    compilation.check_recompute_budget(run.train.recompute_budget, run.train.compile)
    float8.check_settings(run.train.float8, run.train.float8_layers)
    return run


def _chosen_init(given: str) -> str:
    """The file an init checkpoint names, as the run records it: a checkpoint folder (as the `done:` line
    names it) is its exported model; a `latest` pointer is resolved now (recorded, it would name another
    step at the resume: given by --set or a config file, it was); absolute, so that a resume from another
    folder names the same file (_check_same_start)."""
    from training.checkpoint import CheckpointError, checkpoint_file

    if "://" in given:
        return given  # refused by name with the other input errors
    try:
        chosen = checkpoint_file(given)
    except CheckpointError:
        return given  # said when it is read, with the other input errors
    return os.path.abspath(chosen) if chosen.exists() else given


def _check_layer(origin: str, layer: dict[str, Any], stage: str) -> None:
    """One config file's (or --set's) sections and keys, ValueError naming `origin`: a section given as a
    value (`--set train=5`, `train:` left empty), a key without its section (`--set steps=3`), a section of
    another stage, an unknown key or a value of the wrong type (these named no file)."""
    import difflib

    sections = [f.name for f in dataclasses.fields(RunConfig)]
    for section, values in layer.items():
        if isinstance(values, dict):
            continue
        if section not in sections:  # a bare key: which section's? (this stage's first)
            owner: dict[str, str] = {}
            for name in ["train", "data", stage, *sections]:
                for f in dataclasses.fields(getattr(RunConfig(), name)):
                    owner.setdefault(f.name, f"{name}.{f.name}")
            close = difflib.get_close_matches(section, list(owner), n=1, cutoff=0.6)
            hint = f"; did you mean {owner[close[0]]}?" if close else ""
            raise ValueError(
                f"{origin}: {section!r} is not a setting: settings are section.key (sections"
                f" {sorted(sections)}){hint}"
            )
        raise ValueError(
            f"{origin}: config section {section!r} must be a mapping of settings, got {values!r}"
        )
    wrong = sorted((set(STAGES) - {stage}) & set(layer))
    if wrong:
        raise ValueError(f"{origin}: sections {wrong} belong to other stages than {stage!r}")
    try:
        config_overrides.apply_overrides(RunConfig(), layer, "config")
    except ValueError as exc:
        raise ValueError(f"{origin}: {exc}") from exc


def _stage_file(layer: dict[str, Any], path: str, stage: str) -> dict[str, Any]:
    """A config file; a checkpoint's config.yaml (which names its stage) is one too, for its own stage."""
    named = layer.pop("stage", None)
    if named is not None and named != stage:
        raise ValueError(f"{path} is the config of a {named!r} run, not of {stage!r}")
    return layer


def check_ranges(run: RunConfig) -> None:
    """A ValueError naming the first setting outside its range, before any work (the same values would
    otherwise fail deep in the loader or the optimizer, or, like an EMA decay above 1, not fail at all)."""
    t, d = run.train, run.data
    rules = [
        ("train.steps", t.steps >= 1, ">= 1"),
        ("train.global_batch", t.global_batch >= 1, ">= 1"),
        ("train.micro_batch", t.micro_batch >= 1, ">= 1"),
        ("train.lr", 0 < t.lr < math.inf, "> 0 and finite"),
        ("train.warmup_steps", t.warmup_steps >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay >= 0, ">= 0"),
        ("train.beta1", 0 <= t.beta1 < 1, "in [0, 1)"),
        ("train.beta2", 0 <= t.beta2 < 1, "in [0, 1)"),
        ("train.grad_clip", t.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("train.ema_decay", 0 <= t.ema_decay < 1, "in [0, 1) (0 exports the raw weights)"),
        ("train.checkpoint_levels", t.checkpoint_levels >= 0, ">= 0 (0 = every block)"),
        ("train.seed", t.seed >= 0, ">= 0"),  # numpy's seeding: a traceback once the data was read
        ("train.ckpt_every", t.ckpt_every >= 1, ">= 1"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 0, ">= 0 (0 keeps all)"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps >= 1, ">= 1"),
        ("train.log_every", t.log_every >= 1, ">= 1"),
        ("train.sample_every", t.sample_every >= 0, ">= 0 (0 disables)"),
        ("train.sample_clips", t.sample_clips >= 1, ">= 1"),
        ("train.sample_steps", t.sample_steps >= 1, ">= 1"),
        ("train.eval_every", t.eval_every >= 0, ">= 0 (0 disables)"),
        ("train.eval_clips", t.eval_clips >= 1, ">= 1"),
        ("data.frames", d.frames >= 2, ">= 2 (the first and last frames condition the rest)"),
        ("data.height", d.height >= 1, ">= 1"),
        ("data.width", d.width >= 1, ">= 1"),
        ("data.stride_min", 1 <= d.stride_min <= d.stride_max, f"in 1..data.stride_max ({d.stride_max})"),
        ("data.fs_mode", d.fs_mode in ("fps", "stride"), "fps or stride"),
        ("data.crop", d.crop in ("center", "random"), "center or random"),
        ("data.shuffle_buffer", d.shuffle_buffer >= 1, ">= 1"),
        ("data.num_workers", d.num_workers >= 0, ">= 0 (0 reads in the training process)"),
        ("data.prefetch_factor", d.prefetch_factor >= 1, ">= 1"),
    ]
    rules.append(("train.precision", t.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"))
    from training.models.tooncrafter import TOONCRAFTER_PRESETS, size_step

    presets = sorted(TOONCRAFTER_PRESETS)  # --set train.preset=huge: "preset huge starts from a checkpoint"
    rules.append(("train.preset", t.preset in TOONCRAFTER_PRESETS, f"one of {', '.join(presets)}"))
    if t.preset in TOONCRAFTER_PRESETS:  # other sides crashed in the UNet, or lost rows in the VAE unsaid
        step = size_step(TOONCRAFTER_PRESETS[t.preset])
        why = f"a multiple of {step} (the {t.preset} model's VAE and UNet downsampling)"
        rules += [("data.height", d.height % step == 0, why), ("data.width", d.width % step == 0, why)]
        # more DDIM steps than the schedule has timesteps repeat timesteps (2000: minutes of sampling)
        most = TOONCRAFTER_PRESETS[t.preset].schedule.num_timesteps
        rules.append(
            ("train.sample_steps", t.sample_steps <= most, f"in 1..{most} (the schedule's timesteps)")
        )
    for stage in STAGES:  # the stage sections' probabilities (each given or not, checked alike)
        section = getattr(run, stage)
        if hasattr(section, "uncond_prob"):
            # three disjoint dropout events of p each (text only, both, image only): 3p <= 1
            rules.append((f"{stage}.uncond_prob", 0 <= section.uncond_prob <= 1 / 3, "in [0, 1/3]"))
        if hasattr(section, "train_roles"):
            rules.append((f"{stage}.train_roles", len(section.train_roles) > 0, "at least one role"))
            from training.roles import ROLES  # an unknown one was said once the model was built

            rules.append(
                (f"{stage}.train_roles", set(section.train_roles) <= set(ROLES), f"roles of {list(ROLES)}")
            )
    from training.features import LPIPS_FILES

    nets = f"one of {', '.join(sorted(LPIPS_FILES))}"  # a KeyError traceback once the stage was built
    dc, sk = run.decoder, run.sketch
    rules += [
        ("decoder.lpips_net", dc.lpips_net in LPIPS_FILES, nets),
        # a negative weight trains towards the error, silently; no channels or size was a traceback
        ("decoder.l1_weight", dc.l1_weight >= 0, ">= 0"),
        ("decoder.lpips_weight", dc.lpips_weight >= 0, ">= 0 (0 = no LPIPS)"),
        ("decoder.disc_weight", dc.disc_weight >= 0, ">= 0"),
        ("decoder.disc_lr", 0 <= dc.disc_lr < math.inf, ">= 0 and finite (0 = train.lr)"),
        ("decoder.disc_channels", dc.disc_channels >= 1, ">= 1"),
        ("decoder.disc_layers", dc.disc_layers >= 0, ">= 0"),
        (  # smaller frames failed in the first eval, after training: SSIM's 11-tap window, LPIPS' strides
            "decoder.eval_size",
            dc.eval_size >= EVAL_SIZE_MIN.get(dc.eval_lpips_net, 11),
            f">= {EVAL_SIZE_MIN.get(dc.eval_lpips_net, 11)} (the smallest frame LPIPS ({dc.eval_lpips_net}) takes)",
        ),
        ("decoder.eval_lpips_net", dc.eval_lpips_net in LPIPS_FILES, nets),
        # said once the model was built, the run's folder taken
        ("sketch.extractor", sk.extractor in ("auto", "anime2sketch", "xdog"), "auto, anime2sketch or xdog"),
        ("sketch.frame_prob_min", 0 <= sk.frame_prob_min <= 1, "in [0, 1]"),
        (
            "sketch.frame_prob_max",
            sk.frame_prob_min <= sk.frame_prob_max <= 1,
            "in [sketch.frame_prob_min, 1]",
        ),
    ]
    for name, ok, expected in rules:
        if not ok:
            section, key = name.split(".")
            value = getattr(getattr(run, section), key)
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    if t.global_batch % t.micro_batch:
        raise ValueError(
            f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch {t.micro_batch}"
        )


EVAL_SIZE_MIN = {"alex": 31, "vgg": 16}  # the smallest square each LPIPS backbone's strides take (SSIM: 11)

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
        if key == "init_checkpoint" and then and now and _same_file(_chosen_init(str(then)), now):
            continue
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


def initial_model(cfg: TrainConfig):
    """The ToonCrafter the stage starts from, identical on every rank: the init checkpoint (a plain
    DynamiCrafter decoder becomes a dual-reference one that starts as the plain one), or a seeded random
    init when there is none (tests, benchmarks)."""
    from training.checkpoint import load_model
    from training.models.tooncrafter import build_tooncrafter

    torch.manual_seed(cfg.seed)
    if cfg.init_checkpoint:
        return load_model(cfg.init_checkpoint, preset=cfg.preset, dual_ref_decoder=True)
    log.warning("no train.init_checkpoint: starting from a random %s model (tests, benchmarks)", cfg.preset)
    return build_tooncrafter(cfg.preset)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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


_RUN_OUT: list[Path] = []  # the run's --out, once parsed: what to say after Ctrl-C


def main(argv: list[str] | None = None) -> int:
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, for the whole run
            return _main(argv, held)
    except KeyboardInterrupt:
        last = run_checkpoints.latest_checkpoint(_RUN_OUT[-1]) if _RUN_OUT else None
        hint = (
            f"run it again with --resume to go on from {last}"
            if last is not None
            else "no checkpoint was written yet: run the same command again (without --resume) to start over"
        )
        print(f"\ninbetweener train: interrupted; {hint}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT


def _main(argv: list[str] | None, held: contextlib.ExitStack) -> int:
    args = parse_args(argv)
    _RUN_OUT.append(Path(args.out))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _input_errors():  # everything the user gave is checked before a model is built
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
            given = Path(
                args.out
            ).absolute()  # its checkpoints/ or a step_N as --out: the run folder is above
            above = {given.parent: given.name, given.parent.parent: given.parent.name}
            run_dir = next(
                (p for p, n in above.items() if n == "checkpoints" and run_checkpoints.latest_checkpoint(p)),
                None,
            )
            hint = (
                f": {given} is inside the run folder {run_dir}; resume with --out {run_dir}"
                if run_dir
                else ""
            )
            raise FileNotFoundError(
                f"--resume: no checkpoint in {run_checkpoints.checkpoint_root(given)}{hint}"
            )
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
        if (
            run.train.init_checkpoint
        ):  # a missing, cut-off or other model's file, before the run takes its folder
            from training.checkpoint import check_loadable, existing_checkpoint

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
    tc, stage_name = run.train, args.stage
    out = Path(args.out)
    models_dir = Path(args.models_dir) if args.models_dir else None

    # --- processes, device, precision: decided here and nowhere else -------------------------------------
    d = engine.init_distributed(tc.device)
    if not d.main:  # the settings' and the loading's warnings are the same on every rank: rank 0 says them
        for name in ("training.train", "training.checkpoint", "training.stages"):
            logging.getLogger(name).setLevel(logging.ERROR)
    device = engine.pick_device(tc, d)
    amp = engine.autocast_dtype(tc, device)  # train.precision was checked with the other settings
    with _input_errors():  # the number of ranks is known only now
        accum = engine.accumulation_steps(tc, d.world)
    if d.main:
        with _input_errors():  # one run per folder: a second one would write the same checkpoints
            held.enter_context(folder_lock(out, f"inbetweener train {stage_name}"))
            data = curate_out_of(run.data.train)  # and no `select` swaps the shards under the run
            if data is not None:
                held.enter_context(folder_lock(data, f"inbetweener train {stage_name}", shared=True))
        for stale in run_checkpoints.remove_stale_tmp(out):
            log.info("removed %s, a checkpoint an earlier run left half-written", stale)
        if write_train_index(shards, out / TRAIN_INDEX) is None:  # what evaluate checks its clips against
            log.info("no shard index beside the shards: %s not written", out / TRAIN_INDEX)
        print(json.dumps(run.for_stage(stage_name), indent=1))
        print(
            f"{d.world} rank(s) on {device.type}, autocast {amp}, {accum} micro-batch(es) of {tc.micro_batch} "
            f"per step -> global batch {tc.global_batch}",
            flush=True,
        )

    # --- model and stage ------------------------------------------------------------------------------------
    with _input_errors():
        model = initial_model(tc)
        model.unet.set_gradient_checkpointing(tc.gradient_checkpointing, tc.checkpoint_levels)
        set_channels_last(model, tc.channels_last)  # the UNet and the VAE encoder
        stage = STAGES[stage_name].build(model, run, models_dir)
        if tc.float8:
            float8.check_device(device)
        fp8_layers = float8.convert_unet(model.unet, tc.float8, tc.float8_layers)
        compiled = compilation.compile_unet_blocks(
            model.unet, unet_blocks(model)[:-1], tc.compile, tc.recompute_budget
        )
    frozen = compilation.compile_blocks(
        resnet_blocks(model.vae.encoder), tc.compile
    )  # frozen, run every step
    if d.main:
        print(format_role_table(stage.roles), flush=True)
        if tc.float8:
            print(f"fp8 GEMMs ({tc.float8}, torchao): {len(fp8_layers)} UNet transformer linears", flush=True)
            if not fp8_layers:
                log.warning(
                    "train.float8: no UNet linear of preset %s is large enough to gain from fp8 on a GPU;"
                    " train.float8_layers=all converts them anyway",
                    tc.preset,
                )
            if device.type == "cuda" and not tc.compile:
                log.warning("train.float8 without train.compile: each fp8 cast runs as its own pass (slow)")
        if tc.channels_last and device.type == "cuda" and not tc.compile:
            log.warning(
                "train.channels_last without train.compile: eager GroupNorm converts each activation"
                " to contiguous and back (slower, not faster)"
            )
        if compiled:
            print(
                f"torch.compile ({tc.compile}): {compiled} UNet blocks and {frozen} VAE encoder blocks, "
                "compiled on first use",
                flush=True,
            )
    stage.net.to(device)
    fsdp = tc.fsdp and bool(stage.shard_blocks)
    if tc.fsdp and not fsdp and d.main:
        log.warning(
            "train.fsdp: the %s stage has no UNet blocks to shard; it runs replicated (DDP)", stage_name
        )
    net = engine.wrap(stage.net, d, device, stage.shard_blocks if fsdp else None)
    trainable = {n: p for n, p in stage.net.named_parameters() if p.requires_grad}
    optimizers = {"model": engine.adamw(trainable.values(), tc, device)}
    disc = disc_net = None
    if stage.discriminator is not None:
        disc = stage.discriminator.to(device).train()
        disc_net = engine.wrap(disc, d, device)
        trainable.update({f"discriminator.{n}": p for n, p in disc.named_parameters()})
        disc_lr = run.decoder.disc_lr or tc.lr
        optimizers["discriminator"] = engine.adamw(
            disc.parameters(), tc, device, lr=disc_lr, betas=(0.5, 0.9)
        )
    ema_params = {n: p for n, p in trainable.items() if not n.startswith("discriminator.")}
    ema = engine.EMA(ema_params, tc.ema_decay) if tc.ema_decay > 0 else None

    # --- where to start: fresh, or exactly where the last checkpoint stopped ---------------------------------
    step, data_state = 0, None
    if resume_from is not None:
        folder = resume_from
        with _input_errors():  # a damaged checkpoint, or another number of ranks
            step, rank_state = run_checkpoints.load_checkpoint(
                folder, d, trainable=trainable, optimizers=optimizers, ema=ema, restart_data=args.restart_data
            )
        # the config's optimizer settings, not the saved ones (lr is set every step)
        run_checkpoints.set_hyperparameters(
            optimizers["model"], betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay
        )
        if "discriminator" in optimizers:
            run_checkpoints.set_hyperparameters(
                optimizers["discriminator"], lr=run.decoder.disc_lr or tc.lr, weight_decay=tc.weight_decay
            )
        data_state = DataState.from_dict(rank_state["data"])
        if args.restart_data:
            data_state = data_state.restarted(d.world)
        if data_state.world == d.world and rank_state.get("rank") in (None, d.rank):
            engine.restore_rng(rank_state["rng"], device)
        else:  # on another number of ranks: each rank's noise seeded anew, from the step
            torch.manual_seed(tc.seed + d.rank + 1_000_003 * step)
        if d.main:
            changed = run_checkpoints.config_changes(folder, run.for_stage(stage_name))
            print(
                f"resumed from {folder} at step {step}" + (f"; config changed: {changed}" if changed else ""),
                flush=True,
            )
            if step >= tc.steps:
                print(
                    f"train.steps={tc.steps}: the run is at step {step} already, nothing to train", flush=True
                )
    else:
        torch.manual_seed(tc.seed + d.rank)  # noise differs per rank, identically on every run
    with _input_errors():  # e.g. resuming with another number of ranks or data workers
        loader = make_loader(shards, run.data, tc.micro_batch, tc.seed, d.rank, d.world, data_state)
    data_state = loader.dataset.state
    batches = iter(loader)
    sample_batch = None
    samples_here = d.main or (fsdp and d.active)  # sharded weights: every rank takes part in sampling
    if samples_here and tc.sample_every > 0:
        windows = eval_windows(eval_shards or shards, run.data, tc.sample_clips)
        if not windows and eval_shards:  # an eval split of short clips: there were no sample videos, unsaid
            log.warning(
                "no clip of the eval split (%s) gives a window of data.frames=%d: sample videos from the"
                " training shards",
                run.data.eval,
                run.data.frames,
            )
            windows = eval_windows(shards, run.data, tc.sample_clips)
        sample_batch = collate(windows) if windows else None

    logger = engine.Logger(out, d.main, first_step=step + 1)  # a resume's logs replace what followed
    bar = None
    if d.main:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=f"train {stage_name}", unit="step", dynamic_ncols=True)
        held.callback(bar.close)  # closed before Ctrl-C's line is said (it was redrawn after it)
    t_last, step_last = time.perf_counter(), step
    nonfinite_run, nonfinite_steps = 0, 0  # updates skipped for a gradient that is not finite

    # --- the loop ---------------------------------------------------------------------------------------------
    while step < tc.steps:
        lr = lr_at(step, tc)
        for group in optimizers["model"].param_groups:
            group["lr"] = lr
        use_disc = disc is not None and run.decoder.disc_start >= 0 and step >= run.decoder.disc_start
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = _next_batch(batches, bar)
            data_state.consume(batch)
            batch = to_device(batch, device)
            last = micro == accum - 1
            if disc is not None:
                disc.requires_grad_(False)  # the generator's loss must not train the discriminator
            with engine.no_sync(net, not last), engine.autocast(device, amp):
                outputs = net(batch, disc) if use_disc else net(batch)
            (outputs["loss"] / accum).backward()
            if use_disc:
                disc.requires_grad_(True)
                with engine.no_sync(disc_net, not last), engine.autocast(device, amp):
                    fake = outputs["recon"]  # [(b t), 3, H, W], detached
                    real = rearrange(to_model_range(batch["video"]), "b c t h w -> (b t) c h w")
                    logits = disc_net(torch.cat([real.to(fake.dtype), fake]))  # one pass: real, then fake
                    d_loss = decoder.hinge_d_loss(*logits.float().chunk(2))
                (d_loss / accum).backward()
                outputs["d_loss"] = d_loss.detach()
            for k, v in outputs.items():
                if torch.is_tensor(v) and v.ndim == 0:
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(list(ema_params.values()), tc.grad_clip or math.inf)
        # The same norm on every rank (the gradients are reduced): all skip together. A NaN update would
        # make every weight NaN, and the checkpoints written after it would push the good ones out.
        finite = math.isfinite(float(grad_norm))
        if finite:
            optimizers["model"].step()
            if use_disc:
                optimizers["discriminator"].step()
            if ema is not None:
                ema.update(ema_params)
            nonfinite_run = 0
        else:
            nonfinite_run, nonfinite_steps = nonfinite_run + 1, nonfinite_steps + 1
        optimizers["model"].zero_grad(set_to_none=True)
        if use_disc:
            optimizers["discriminator"].zero_grad(set_to_none=True)
        step += 1
        if not finite:
            if d.main:
                log.warning("step %d: gradient norm %s: the update is skipped", step, float(grad_norm))
            if nonfinite_run >= tc.max_nonfinite_steps:
                if bar is not None:
                    bar.close()
                if d.main:
                    print(
                        f"inbetweener train: error: the gradient has not been finite for {nonfinite_run} steps"
                        f" in a row (to step {step}; the weights were left as they were): the run stops."
                        f" Lower train.lr, or check the data; --resume continues from"
                        f" {run_checkpoints.latest_checkpoint(out) or 'the start (no checkpoint yet)'}",
                        file=sys.stderr,
                    )
                raise SystemExit(1)

        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            skipped = data_state.skipped()
            values = {
                **{f"train/{k}": v for k, v in sums.items()},
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/skipped_updates": float(nonfinite_steps),
                "train/samples_per_s": tc.global_batch * (step - step_last) / max(now - t_last, 1e-9),
                **{f"data/{k}": v for k, v in skipped.items()},
            }
            values = _reduce_over_ranks(values, d, device)
            values["data/bad_shards"] = _distinct_bad_shards(data_state, d)
            logger.scalars(step, values)
            t_last, step_last = now, step
            if bar is not None:
                bar.set_postfix(
                    loss=f"{values['train/loss']:.4f}",
                    lr=f"{lr:.2e}",
                    sps=f"{values['train/samples_per_s']:.2f}",
                )
        if bar is not None:
            bar.update(1)
        if sample_batch is not None and tc.sample_every > 0 and step % tc.sample_every == 0:
            _log_samples(stage, stage.net, ema, ema_params, sample_batch, device, amp, logger, step, tc.seed)
        if stage.evaluate is not None and tc.eval_every > 0 and step % tc.eval_every == 0 and d.main:
            with _ema_applied(ema, ema_params), _eval_mode(stage.net), engine.autocast(device, amp):
                logger.scalars(step, stage.evaluate())
        if (tc.ckpt_every > 0 and step % tc.ckpt_every == 0) or step == tc.steps:
            metadata = {
                "inbetweener.stage": stage_name,
                "inbetweener.step": str(step),
                "inbetweener.run_config": json.dumps(run.for_stage(stage_name)),
            }

            def export(folder: Path, metadata: dict[str, str] = metadata) -> None:
                with _ema_applied(ema, ema_params):
                    stage.export(folder, metadata)

            rank_state = {"data": data_state.to_dict(), "rng": engine.capture_rng(device)}
            try:
                run_checkpoints.save_checkpoint(
                    out,
                    step,
                    d,
                    trainable=trainable,
                    optimizers=optimizers,
                    ema=ema,
                    rank_state=rank_state,
                    config=run.for_stage(stage_name),
                    export=export,
                    keep=tc.keep_checkpoints,
                    sharded=fsdp and d.active,
                )
            except run_checkpoints.CheckpointWriteError as exc:
                if bar is not None:
                    bar.close()
                print(f"inbetweener train: error: {exc}", file=sys.stderr)
                raise SystemExit(1) from exc

    if bar is not None:
        bar.close()
    logger.close()
    skipped = _reduce_over_ranks({f"data/{k}": v for k, v in data_state.skipped().items()}, d, device)
    skipped["data/bad_shards"] = _distinct_bad_shards(data_state, d)
    if d.main:  # the skipped samples of every rank
        skipped = {k.removeprefix("data/"): int(v) for k, v in skipped.items()}
        print(f"done: {step} steps; checkpoint {run_checkpoints.latest_checkpoint(out)}; skipped {skipped}")
    engine.barrier(d)
    if d.active:
        torch.distributed.destroy_process_group()
    return 0


def _next_batch(batches: Iterator[dict], bar: Any) -> dict:
    """The next batch; shards that give no training data at all stop the run with one line, exit code 2."""
    try:
        return next(batches)
    except DataError as exc:
        if bar is not None:
            bar.close()  # the error goes on a line of its own
        # a DataLoader worker's error arrives re-raised with its traceback as text: keep the message
        message = str(exc).rstrip().rsplit("DataError: ", 1)[-1]
        print(f"inbetweener train: error: {message}", file=sys.stderr)
        raise SystemExit(2) from exc


def _distinct_bad_shards(data_state: DataState, d: engine.Dist) -> int:
    """Unreadable shards met by any rank, each once (summed per rank, one bad shard counted N times)."""
    names = data_state.bad_shard_names()
    if d.active:
        every: list[Any] = [None] * d.world
        torch.distributed.all_gather_object(every, sorted(names))
        names = set().union(*(set(n) for n in every))
    return len(names)


def _reduce_over_ranks(values: dict[str, float], d: engine.Dist, device: torch.device) -> dict[str, float]:
    """Losses and throughput averaged over ranks, data counts summed (every rank calls this).

    `train/samples_per_s` is the global batch's rate as each rank timed it, so it is averaged, not summed."""
    if not d.active:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    summed = {k for k in keys if k.startswith("data/")}
    out = {k: v if k in summed else v / d.world for k, v in zip(keys, t.tolist())}
    if "train/lr" in values:
        out["train/lr"] = values["train/lr"]
    return out


class _ema_applied:  # noqa: N801 (a context manager used like a function)
    def __init__(self, ema: engine.EMA | None, params: dict[str, torch.nn.Parameter]):
        self.cm = ema.applied(params) if ema is not None else None

    def __enter__(self) -> None:
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


class _eval_mode:  # noqa: N801
    def __init__(self, net: torch.nn.Module):
        self.net = net

    def __enter__(self) -> None:
        self.net.eval()

    def __exit__(self, *exc: Any) -> None:
        self.net.train()


def _log_samples(stage, net, ema, ema_params, batch, device, amp, logger, step: int, seed: int) -> None:
    """Sample videos with the EMA weights, from a generator of their own (the training RNG is untouched)."""
    generator = torch.Generator(device).manual_seed(seed + step)
    with _ema_applied(ema, ema_params), _eval_mode(net), engine.autocast(device, amp), torch.no_grad():
        videos = stage.samples(to_device(batch, device), generator)
    for tag, video in videos.items():
        logger.videos(step, tag, video)


if __name__ == "__main__":
    sys.exit(main())
