"""`inbetweener train`'s command line (`parse_args`) and the config of a run (`RunConfig`, `resolve_config`).

The config of a run is resolved in layers, later ones winning: the dataclass defaults (TrainConfig,
DataConfig, the stage's config) <- the stage's paper defaults <- the preset's profile (`tiny`: a small,
fast CPU run) <- `--config FILE.yaml` <- `--set section.key=value`. YAML and --set only override fields;
an unknown key is an error, and so is a setting outside its range (`check_ranges`), before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from manifests.remote import local_folder, not_a_url
from training import compilation, config_overrides, float8
from training.data import DataConfig
from training.engine import TrainConfig
from training.shards import split_dirs
from training.stages import decoder, rectify, sketch

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
    from training.checkpoint import CheckpointError
    from training.checkpoint_files import checkpoint_file

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
            dc.eval_size >= EVAL_SIZE_MIN.get(dc.eval_lpips_net, 11) or t.eval_every == 0,  # else unused
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
