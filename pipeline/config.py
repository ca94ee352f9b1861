"""The curate job's configuration: one dataclass per stage, YAML files and `--set` overrides.

YAML files and `--set stage.key=value` only override dataclass fields; an unknown stage or key, or
a value of the wrong type, is an error before any work starts, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from manifests.messages import did_you_mean, load_yaml, yaml_problem
from pipeline.stages.aesthetic import AESTHETIC_MIN, AestheticStage
from pipeline.stages.alignment import ALIGNMENT_MIN, AlignmentStage
from pipeline.stages.caption import CaptionStage
from pipeline.stages.text import TEXT_MAX, TextStage


class ConfigError(ValueError):
    """A bad configuration key or value; raised before any work starts."""


@dataclass
class ProbeConfig:
    max_width: int = 4096  # larger frames are an error row (absurd input), not a slow job
    max_height: int = 4096
    # smaller frames are an error row too: a thumbnail or icon video upscaled 8x and more to the 512x320
    # clips is blur, not training data (a 16x16 source was kept)
    min_width: int = 64
    min_height: int = 48
    max_duration_s: float = 6 * 3600.0  # longer than this is an error row
    vfr_tolerance: float = (
        0.05  # frame intervals varying more than this (relative) = variable rate: curated on a constant grid
    )
    vfr_fps: float | None = (
        None  # that grid's rate; None: chosen from the frame intervals (video.frame_intervals)
    )
    ivtc: bool = (
        True  # telecined film (interlaced, 3:2 pulldown found by FFmpeg's idet) back to its film frames
    )
    hash_chunk_bytes: int = 1 << 20  # read size while hashing the source content
    crop_borders: bool = True  # find letterbox/pillarbox bars on a few keyframes; clips are cut inside them
    border_luma: int = 12  # a bar's rows/columns: mean grey at most this, no pixel above 3x (0..255)


@dataclass
class ShotsConfig:
    detector: str = "adaptive"  # PySceneDetect detector: adaptive | content
    threshold: float = 3.0  # adaptive: ratio threshold; content: content_val threshold (27 is its default)
    min_content_val: float = 15.0  # adaptive: minimum content change for a cut
    analysis_width: int = 256  # frames are decoded straight to this size for detection, timing, motion
    analysis_height: int = 160
    detect_width: int = 128  # the scene detector sees frames this small (cuts are coarse; 4x cheaper)
    detect_height: int = 80
    margin_frames: int = 2  # frames dropped on each side of a cut so no neighbouring-shot frame leaks in
    min_len_s: float = 1.0  # shorter clips are rejected (reason shots)
    max_len_s: float = 10.0  # longer shots are cut into windows of this length
    window_stride_s: float = 0.0  # 0 = back-to-back windows; >0 = start every stride seconds
    keyframe_width: int = 512  # first/mid/last frames kept for the model stages and thumbnails
    keyframe_height: int = 320


@dataclass
class TimingConfig:
    held_threshold: float = 0.6  # mean abs difference (0..255) below which a frame may repeat its predecessor
    changed_delta: int = 32  # a pixel changed when its grey level moved by more than this (0..255) ...
    changed_max: float = 0.001  # ... and a frame repeats its predecessor only if at most this share changed
    dominant_share: float = 0.6  # share of holds of one length needed to call a clip ones/twos/threes


@dataclass
class MotionConfig:
    min: float = 0.05  # reject below: mean flow magnitude in % of the frame diagonal (static shots)
    max: float | None = None  # reject above (e.g. flashes, shaky footage); None = no upper bound
    flow_width: int = 256  # fixed analysis size, so the threshold means the same at any resolution
    flow_height: int = 160
    max_pairs: int = 48  # at most this many distinct-drawing pairs are measured per clip (evenly spaced)
    preset: str = "ultrafast"  # OpenCV DIS preset: ultrafast | fast | medium


# The model stages' sections are their stage parameters (the stage dataclasses document each
# field) plus whether the stage runs and its threshold, so a parameter is declared once.
@dataclass
class TextConfig(TextStage):
    enabled: bool = True  # False (or --skip text): the stage does not run; manifest and report say so
    # reject above: fraction of the frame covered by text boxes (title cards, credits, subtitles);
    # the default and why: pipeline/stages/text.py
    max: float | None = TEXT_MAX


@dataclass
class AestheticConfig(AestheticStage):
    enabled: bool = True
    # reject below: the minimum LAION aesthetic score of first/mid/last (scale ~1-10); why this
    # default: pipeline/stages/aesthetic.py
    min: float | None = AESTHETIC_MIN


@dataclass
class CaptionConfig(CaptionStage):
    enabled: bool = True


@dataclass
class AlignmentConfig(AlignmentStage):
    enabled: bool = True
    # reject below: the minimum CLIP cosine similarity of the caption to first/mid/last; why this
    # default: pipeline/stages/alignment.py
    min: float | None = ALIGNMENT_MIN


MODEL_STAGES = ("text", "aesthetic", "caption", "alignment")


@dataclass
class SplitConfig:
    eval_size: int = 1000  # clips in the held-out eval split (the paper's 1K)
    max_eval_fraction: float = 0.25  # small jobs: eval never takes more than this share of kept clips
    max_distance: int = 12  # near-duplicates: summed Hamming distance of the keyframes' 64-bit pHashes
    by_source: bool = True  # no source spans train and eval (not only no near-duplicate group)
    # keep one clip of each near-duplicate group of kept clips (the first by source and time); the
    # others are rejected ("dedup: near-duplicate of ..."). An opening repeated in every episode then
    # trains once, and no longer joins a series' episodes into one unit of the split.
    dedup: bool = False
    seed: int = 0  # changes which components go to eval, deterministically
    # a rerun or `select` keeps what was in train out of eval, and what was in eval there while it fits
    # (OUT/split_history.parquet), so a model trained on earlier shards is never evaluated on its own
    # training clips; false, or another seed, by_source, max_distance or dedup, draws the split afresh
    sticky: bool = True
    # another curate OUT (or its split_history.parquet) whose train must stay out of this OUT's eval: a
    # new version of a dataset curated into a new folder from overlapping footage (sources match by
    # content hash, clips by id); its split settings must be this split's
    history_from: str | None = None


@dataclass
class WriteConfig:
    width: int = 512  # clips are re-encoded at the training resolution (resize + centre crop)
    height: int = 320
    fps: float | None = None  # None keeps the source rate; a number resamples by frame selection
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    shard_bytes: int = 1 << 30  # target tar size; a shard closes once it reaches this many bytes


@dataclass
class RunConfig:
    workers: int = 0  # parallel tasks for the CPU stages; 0 = one per CPU (a cluster: its CPUs less one)
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local Ray
    fail_on_error: bool = False  # exit non-zero when any source failed
    progress: bool = True
    # a local Ray's shared object store, GiB; None = Ray's default (30% of RAM). Workers' RSS counts its
    # pages (decoding queues keyframe rows there ahead of scoring): cap it where memory is counted by RSS
    object_store_gib: float | None = None


@dataclass
class CurateConfig:
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    shots: ShotsConfig = field(default_factory=ShotsConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, sections: tuple[str, ...]) -> str:
        """A stable string of some sections: scores depend on these, thresholds do not."""
        return json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)


# Sections whose values change scores or clip boundaries (a change invalidates finished work);
# thresholds (motion.min/max) are applied from the manifest and can change freely (`select`).
SCORING_SECTIONS = ("probe", "shots", "timing")
THRESHOLD_KEYS = {
    ("motion", "min"),
    ("motion", "max"),
    ("text", "max"),
    ("aesthetic", "min"),
    ("alignment", "min"),
}
# how a stage runs, not what it scores: may differ between a run and its resume
RUNTIME_KEYS = {
    "device",
    "batch_size",
    "num_gpus",
    "threads",
    "models_dir",
    "precision",
    "compile",
    "frames_per_forward",
    "cuda_graph",
}
# what `inbetweener select` may change: thresholds, the split and the shard size (no decoding for scores)
SELECT_KEYS = (
    THRESHOLD_KEYS | {("write", "shard_bytes")} | {("split", f.name) for f in dataclasses.fields(SplitConfig)}
)


def _coerce(value, annotation, key: str):
    """Cast a YAML/--set value to a field's annotated type, or raise ConfigError naming the key."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in hints:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    for hint in hints:
        if hint is type(None):
            continue
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            continue
        if hint in (int, float):
            if isinstance(value, bool):
                continue
            try:
                cast = hint(value)
            except (TypeError, ValueError):
                continue
            if hint is int and isinstance(value, float) and not value.is_integer():
                continue
            if hint is float and not math.isfinite(cast):  # NaN passes every threshold; inf is no setting
                raise ConfigError(f"config key {key!r}: {value!r} is not a finite number")
            return cast
        if hint is str:
            return str(value)
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints if h is not type(None))
    nullable = " (or null)" if type(None) in hints else ""
    raise ConfigError(f"config key {key!r}: {value!r} is not a valid {names}{nullable}")


def _parse_scalar(text: str):
    """`--set` values are YAML scalars: 0.3, true, null, ultrafast."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {text!r}: {exc}") from exc
    if isinstance(value, str):  # YAML 1.1 reads 1e-2 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(config: CurateConfig, overrides: dict[str, dict], validate: bool = True) -> CurateConfig:
    """Apply {section: {key: value}} to a config, checking every section, key and value (`validate`: and
    the settings together, which a config read back from a manifest leaves to the overrides given with it)."""
    for section, values in overrides.items():
        if section not in {f.name for f in dataclasses.fields(config)}:
            known = [f.name for f in dataclasses.fields(config)]
            raise ConfigError(
                f"unknown config section {section!r}{did_you_mean(section, known)} (known: {known})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys to values")
        target = getattr(config, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {section}.{key}{did_you_mean(key, fields, section + '.')}"
                    f" (known: {sorted(fields)})"
                )
            setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))
    if validate:
        _validate(config)
    return config


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)


def _validate(config: CurateConfig) -> None:
    checks = [
        (config.shots.detector in ("adaptive", "content"), "shots.detector must be adaptive or content"),
        (config.shots.min_len_s > 0, "shots.min_len_s must be > 0"),
        (config.shots.max_len_s >= config.shots.min_len_s, "shots.max_len_s must be >= shots.min_len_s"),
        (config.shots.margin_frames >= 0, "shots.margin_frames must be >= 0"),
        (
            config.motion.preset in ("ultrafast", "fast", "medium"),
            "motion.preset must be ultrafast, fast or medium",
        ),
        (config.motion.max_pairs >= 1, "motion.max_pairs must be >= 1"),
        (
            config.write.width % 2 == 0 and config.write.height % 2 == 0,
            "write.width and write.height must be even",
        ),
        (config.write.shard_bytes > 0, "write.shard_bytes must be > 0"),
        (config.write.fps is None or config.write.fps > 0, "write.fps must be > 0 or null"),
        (config.run.workers >= 0, "run.workers must be >= 0"),
        (
            config.run.object_store_gib is None or config.run.object_store_gib >= 0.1,
            "run.object_store_gib must be >= 0.1 (Ray's smallest store is 75 MiB) or null",
        ),
        (config.split.eval_size >= 0, "split.eval_size must be >= 0"),
        (
            not config.alignment.enabled or (config.aesthetic.enabled and config.caption.enabled),
            "alignment compares the caption with the aesthetic stage's CLIP image embeddings: "
            "skip alignment too (--skip alignment), or enable aesthetic and caption",
        ),
        (0 <= config.split.max_eval_fraction <= 1, "split.max_eval_fraction must be in [0, 1]"),
        (config.split.max_distance >= 0, "split.max_distance must be >= 0"),
        (config.aesthetic.frames_per_forward >= 1, "aesthetic.frames_per_forward must be >= 1"),
    ]
    probe, timing, motion, write = config.probe, config.timing, config.motion, config.write
    checks += [
        (probe.max_width >= 1 and probe.max_height >= 1, "probe.max_width and probe.max_height must be >= 1"),
        (
            1 <= probe.min_width <= probe.max_width and 1 <= probe.min_height <= probe.max_height,
            "probe.min_width and probe.min_height must be >= 1 and at most probe.max_width and probe.max_height",
        ),
        (probe.max_duration_s > 0, "probe.max_duration_s must be > 0"),
        (probe.vfr_tolerance >= 0, "probe.vfr_tolerance must be >= 0"),
        (probe.vfr_fps is None or 1 <= probe.vfr_fps <= 240, "probe.vfr_fps must be in 1..240 or null"),
        (probe.hash_chunk_bytes >= 1, "probe.hash_chunk_bytes must be >= 1"),
        (0 <= probe.border_luma <= 255, "probe.border_luma must be in 0..255"),
        (timing.held_threshold >= 0, "timing.held_threshold must be >= 0"),
        (0 <= timing.changed_delta <= 255, "timing.changed_delta must be in 0..255"),
        (0 <= timing.changed_max <= 1, "timing.changed_max must be in [0, 1]"),
        (0 < timing.dominant_share <= 1, "timing.dominant_share must be in (0, 1]"),
        (motion.min is None or motion.min >= 0, "motion.min must be >= 0 (0 keeps still shots too)"),
        (  # a fraction of the frame: below 0 every clip was rejected, as if text covered them all
            config.text.max is None or config.text.max >= 0,
            f"text.max must be >= 0 (the largest fraction of the frame text may cover; 1 or null keeps every"
            f" clip), got {config.text.max}",
        ),
        (  # a cosine similarity: above 1 every clip was rejected
            config.alignment.min is None or -1 <= config.alignment.min <= 1,
            f"alignment.min must be in [-1, 1] (a cosine similarity; null keeps every clip), got"
            f" {config.alignment.min}",
        ),
        (
            motion.max is None or motion.min is None or motion.max > motion.min,
            "motion.max must be > motion.min (or null: no upper bound)",
        ),
        (
            motion.flow_width >= 16 and motion.flow_height >= 16,
            "motion.flow_width and flow_height must be >= 16",
        ),
        (write.width >= 2 and write.height >= 2, "write.width and write.height must be >= 2"),
        (
            write.codec not in ("libx264", "libx265") or 0 <= write.crf <= 51,
            f"write.crf must be in 0..51 for {write.codec}, got {write.crf}",
        ),
        (
            write.codec not in ("libx264", "libx265") or write.preset in X264_PRESETS,
            f"write.preset must be one of {', '.join(X264_PRESETS)} for {write.codec}, got {write.preset!r}",
        ),
    ]
    for name in MODEL_STAGES:
        stage = getattr(config, name)
        checks.append((stage.batch_size >= 1, f"{name}.batch_size must be >= 1"))
        checks.append((stage.num_gpus >= 0, f"{name}.num_gpus must be >= 0"))
        frames = getattr(stage, "frames", None)
        if frames is not None:
            picked = [f.strip() for f in str(frames).split(",") if f.strip()]
            checks.append(
                (
                    bool(picked) and set(picked) <= {"first", "mid", "last"},
                    f"{name}.frames must be a comma list of first, mid, last, got {frames!r}",
                )
            )
    checks.append((config.text.canvas_size >= 32, "text.canvas_size must be >= 32"))
    checks.append((config.text.threads >= 1, "text.threads must be >= 1"))
    precisions = {"auto", "fp32", "fp16", "bf16"}
    for name in ("text", "aesthetic", "alignment", "caption"):
        allowed = precisions | ({"fp8"} if name == "aesthetic" else set())
        value = getattr(config, name).precision
        checks.append((value in allowed, f"{name}.precision must be one of {sorted(allowed)}, got {value!r}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name in ("aesthetic", "alignment"):
        stage = getattr(config, name)
        if stage.enabled and stage.compile:  # only then is torch worth importing here
            from pipeline.stages.aesthetic import check_compile_backend

            try:
                check_compile_backend(stage.compile, f"{name}.compile")
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc


def parse_set(items: list[str]) -> dict[str, dict]:
    """['motion.min=0.3', 'write.fps=24'] -> {'motion': {'min': 0.3}, 'write': {'fps': 24}}."""
    out: dict[str, dict] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects stage.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        section, key = (part.strip() for part in dotted.split(".", 1))  # "motion.min = 0.1", quoted
        raw = raw.strip()
        out.setdefault(section, {})[key] = _parse_scalar(raw)
    return out


def load_config(path: Path | str | None = None, sets: list[str] | None = None) -> CurateConfig:
    """Defaults, then a YAML file, then `--set` items; every key checked."""
    config = CurateConfig()
    if path is not None:
        path = Path(path)
        try:
            data = load_yaml(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({yaml_problem(exc)})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file is a mapping of stage sections")
        apply_overrides(config, data)
    if sets:
        apply_overrides(config, parse_set(sets))
    return config


def config_from_dict(data: dict, validate: bool = True) -> CurateConfig:
    """A config saved in a manifest. `validate=False` for select, whose --set may correct a value an earlier
    version let through (text.max=-0.1 was refused even with --set text.max=0.02), and report."""
    return apply_overrides(CurateConfig(), data, validate)
