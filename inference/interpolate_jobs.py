"""The jobs of `inbetweener interpolate`: what its inputs (two or more keyframes and sketches, a CSV/TSV/JSONL
batch file, a curate manifest's eval clips) make of work, one `Job` per output, every row checked by its
files' headers before anything runs; and a job's pictures fitted to the model's frame when its turn comes
(`prepare_frames`), with the warnings about frames far from what the model was trained on.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.media import (
    InputError,
    check_keyframe_files,
    check_size,
    fit_frame,
    frame_size,
    image_size,
    parse_sketch_args,
    read_keyframes,
    read_sketch,
    same_aspect,
)

log = logging.getLogger("inbetweener.interpolate")


@dataclass
class Job:
    """One output: keyframes of one aspect ratio, a prompt, optional sketches by global frame index. Its pictures
    are read when its turn comes (`read_keyframes`, `read_sketches`), so a batch of any length runs in the
    memory of one row; what can be checked without decoding them was checked when the job was made."""

    name: str  # output subfolder under --out ("" = --out itself)
    labels: list[str]  # where each keyframe came from
    prompt: str
    seed: int
    read_keyframes: Callable[[], list[np.ndarray]]  # uint8 [H, W, 3], one aspect ratio
    sketch_files: dict[int, Path] = field(default_factory=dict)
    size: tuple[int, int] | None = None  # the first keyframe's (height, width), where known before reading

    @property
    def sketch_labels(self) -> dict[int, str]:
        return {i: str(p) for i, p in self.sketch_files.items()}

    def read_sketches(self) -> dict[int, np.ndarray]:  # grey uint8 [H, W]
        return {i: read_sketch(p) for i, p in self.sketch_files.items()}


BATCH_STATUS = "batch.json"  # OUT/batch.json: so no row's output folder may take that name


# --- jobs ------------------------------------------------------------------------------------------------------


NAME_BYTES = 120  # a row's folder name at most (file systems allow 255 bytes)


def _safe_name(text: str) -> str:
    """A row's name as a folder name: letters, marks and digits of any script kept (歩く, Scène, कुत्ता; NFC),
    runs of anything else (path separators, spaces, control characters) made one `_`, cut to NAME_BYTES."""
    import unicodedata

    kept = "".join(
        c if unicodedata.category(c)[0] in "LMN" or c in "._-" else "\0"
        for c in unicodedata.normalize("NFC", text)
    )
    name = re.sub("\0+", "_", kept).strip("._")
    while len(name.encode()) > NAME_BYTES:
        name = name[:-1]
    return name or "clip"


def _sketch_files(
    items: list[str], keyframes: list[Path], keyframe_size: tuple[int, int], frames: int, resolve=Path
) -> dict[int, Path]:
    """`--sketch` items -> {frame index: file}, each index inside the output's frames (`frames` per
    segment) and each file's header checked (image_size): readable, and of the keyframes' aspect ratio,
    since a sketch is cropped to the frame as they are."""

    def resolved(item: str) -> str:  # a file, or INDEX=FILE: the file relative to the batch file too
        spec, sep, file = item.partition("=")
        if sep and spec.strip().isdigit():
            return f"{spec}={resolve(file.strip())}"
        return str(resolve(item))

    files = parse_sketch_args([resolved(i) for i in items], keyframes)
    total = (len(keyframes) - 1) * (frames - 1) + 1
    outside = sorted(i for i in files if not 0 <= i < total)
    if outside:
        raise InputError(f"sketches for frames {outside}: the output has frames 0..{total - 1}")
    for file in files.values():
        h, w = image_size(file)
        if not same_aspect((h, w), keyframe_size):
            kh, kw = keyframe_size
            raise InputError(
                f"sketch {file} is {w}x{h}, the keyframes {kw}x{kh}: a sketch needs the keyframes' aspect ratio"
                " (it is scaled and cropped to the frame as they are, so another aspect would misplace its lines)"
            )
    return files


MAX_LISTED = 20  # problems a refused batch lists before "... and N more"


def _row_jobs(path: Path, args: argparse.Namespace) -> list[Job]:
    """Rows of a CSV/TSV/JSONL batch file as jobs (keyframes read and checked)."""
    data = path.read_bytes()
    try:  # utf-8-sig: the byte-order mark Excel's "CSV UTF-8" and Notepad write is not part of the header
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}; Excel's plain CSV is"
            " Windows-1252): save it as UTF-8 (Excel: CSV UTF-8)"
        ) from None
    if path.suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path}: line {number} is not JSON ({exc.msg}, column {exc.colno})"
                ) from None
            if not isinstance(rows[-1], dict):
                raise InputError(
                    f'{path}: line {number} is not a JSON object (a row is {{"start": ..., "end": ...}})'
                )
    elif path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",")
        if reader.fieldnames:  # `Start`, ` END `: a spreadsheet's header as typed
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
        rows = list(reader)
        header = list(reader.fieldnames or [])
        if rows and "keyframes" not in header and not {"start", "end"} <= set(header):
            raise InputError(
                f"{path}: its first line is the header, and it names no `start` and `end` (or `keyframes`)"
                f" column: {', '.join(header)}. Begin the file with a line such as `start,end,prompt`"
            )
    else:
        raise InputError(f"{path}: batch files are .csv, .tsv, .jsonl or a clip manifest .parquet")

    def resolve(p: str) -> Path:
        p = Path(str(p).strip()).expanduser()
        return p if p.is_absolute() or not (path.parent / p).exists() else path.parent / p

    def split(value) -> list[str]:
        if isinstance(value, list):
            return [str(v) for v in value]
        return [v for v in (str(value or "").split(";")) if v.strip()]

    jobs, problems = [], []
    names: dict[str, list[str]] = {}  # output folder -> the rows' names that give it
    for i, row in enumerate(rows):
        try:
            keys = split(row.get("keyframes")) or [row.get("start"), row.get("end")]
            if any(not k for k in keys):
                empty = [c for c in ("start", "end") if c in row and not row[c]]
                if empty and "keyframes" not in row:
                    raise InputError(f"its {' and '.join(f'`{c}`' for c in empty)} is empty")
                raise InputError("needs `start` and `end` (or `keyframes`) columns")
            paths = [resolve(k) for k in keys]
            size = check_keyframe_files(paths)  # headers only: the pixels are read at the row's turn
            sketch_files = _sketch_files(split(row.get("sketch")), paths, size, args.frames, resolve)
            seed = row.get("seed")
            try:
                seed = args.seed if seed in (None, "") else int(seed)
            except ValueError:
                raise InputError(f"seed {seed!r} is not an integer") from None
        except InputError as exc:
            problems.append(f"row {i + 1}: {exc}")
            continue
        name = row.get("name") or f"{i:04d}_{paths[0].stem}_{paths[-1].stem}"
        if _safe_name(str(name)).casefold() == BATCH_STATUS:
            problems.append(
                f"row {i + 1}: the name {name!r} is the batch's own OUT/{BATCH_STATUS}; give another"
            )
            continue
        # one folder on a case-insensitive file system (macOS, Windows) counts as one here too
        names.setdefault(_safe_name(str(name)).casefold(), []).append(str(name))
        prompt = row.get("prompt")
        jobs.append(
            Job(
                _safe_name(str(name)),
                [str(p) for p in paths],
                args.prompt if prompt is None else str(prompt),
                seed,
                functools.partial(read_keyframes, paths),
                sketch_files,
                size,
            )
        )
    if problems:  # every problem at once, not one per attempt
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InputError(
            f"{path}: {len(problems)} of {len(rows)} rows cannot be used (nothing was run; fix or remove them):"
            f"\n  {listed}{more}"
        )
    shared = [given for given in names.values() if len(given) > 1]
    if shared:
        listed = "; ".join(
            f"{', '.join(repr(g) for g in sorted(set(given)))} -> {_safe_name(given[0])}/"
            for given in shared[:5]
        )
        raise InputError(f"{path}: rows share an output folder: {listed} (give each row a unique `name`)")
    return jobs


def _manifest_jobs(path: Path, args: argparse.Namespace) -> list[Job]:
    from inference.eval_data import iter_clips

    def ends(clip) -> list[np.ndarray]:
        return list(clip.ends())  # decoded at the clip's turn: the job holds only its encoded bytes

    jobs, missing = [], []
    for clip in iter_clips([path], split=args.split):
        if clip.missing:  # as a batch file's unusable rows: all listed before anything runs
            missing.append(f"{clip.key}: {clip.missing}")
            continue
        label = f"{clip.shard}:{clip.key}"
        jobs.append(
            Job(
                _safe_name(clip.key),
                [f"{label}[0]", f"{label}[-1]"],
                clip.caption,
                args.seed,
                functools.partial(ends, clip),
            )
        )
    if missing:
        listed = "\n  ".join(missing[:MAX_LISTED])
        more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise InputError(
            f"{path}: {len(missing)} of {len(jobs) + len(missing)} clips cannot be read (nothing was run):"
            f"\n  {listed}{more}"
        )
    return jobs


def build_jobs(args: argparse.Namespace) -> list[Job]:
    if args.batch is not None:
        if args.inputs or args.keyframes:
            raise InputError("give keyframes or --batch, not both")
        if not args.batch.exists():
            raise InputError(f"batch file {args.batch} not found")
        is_manifest = args.batch.suffix == ".parquet" or args.batch.is_dir()
        if args.sketch:  # one drawing for every row's frame i would guide them all towards one pose
            where = (
                "a clip manifest's rows have none"
                if is_manifest
                else "give each row's in its `sketch` column"
            )
            raise InputError(f"--sketch is for one job, not --batch: {where}")
        jobs = _manifest_jobs(args.batch, args) if is_manifest else _row_jobs(args.batch, args)
        if not jobs:
            raise InputError(f"{args.batch}: no rows")
        names = [j.name for j in jobs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(
                f"{args.batch}: output names used twice: {duplicates[:5]} (give each row a unique `name`)"
            )
        return jobs
    paths = args.keyframes or args.inputs
    if args.keyframes and args.inputs:
        raise InputError("give the keyframes either as positionals or with --keyframes, not both")
    if len(paths or []) < 2:
        swallowed = (
            " (--sketch takes every value after it: put the keyframes before --sketch)" if args.sketch else ""
        )
        raise InputError(
            f"give two keyframes (START END), more to chain, or --batch FILE; see --help{swallowed}"
        )
    paths = [Path(p) for p in paths]
    images = read_keyframes(paths)  # one job: read now, every error before the model loads
    size = images[0].shape[:2]
    job = Job(
        "",
        [str(p) for p in paths],
        args.prompt,
        args.seed,
        lambda: images,
        _sketch_files(args.sketch or [], paths, size, args.frames),
        size,
    )
    job.read_sketches()  # likewise: a sketch that does not decode stops here, not at its turn
    return [job]


TRAINED_ASPECT = 512 / 320  # the frames ToonCrafter was trained on
FAR_ASPECT = 2.5  # a frame whose long side is more than this many times its short side is warned about


def warn_far_from_training(size: tuple[int, int], name: str = "") -> bool:
    """Warn (and say True) when a frame's shape is far from the model's training frames: a 20:1 pan background
    becomes a 320x6400 frame, slow and outside anything the model has seen."""
    aspect = max(size) / min(size)
    if aspect <= FAR_ASPECT:
        return False
    log.warning(
        "%sframe %dx%d is %.1f:1; the model was trained on %.1f:1 frames (320x512), so expect a slow run and"
        " poor in-betweens: crop the keyframes closer to the model's shape, or give --size",
        f"{name}: " if name else "",
        size[1],
        size[0],
        aspect,
        TRAINED_ASPECT,
    )
    return True


FAR_UPSCALE = 4  # a keyframe scaled up more than this many times to the frame is warned about


def warn_upscaled(keyframe: tuple[int, int], size: tuple[int, int], name: str = "") -> bool:
    """Warn (and say True) when a keyframe (height, width) is much smaller than the frame it is scaled to: a
    1x1 or thumbnail-sized picture became a 320-pixel frame of blur, and nothing said why."""
    factor = min(size) / max(min(keyframe), 1)
    if factor <= FAR_UPSCALE:
        return False
    log.warning(
        "%skeyframe %dx%d is scaled up %.0fx to the %dx%d frame, so the in-betweens have no more detail than it:"
        " give larger keyframes, or a smaller --short-side",
        f"{name}: " if name else "",
        keyframe[1],
        keyframe[0],
        factor,
        size[1],
        size[0],
    )
    return True


def warn_long_prompts(jobs: list[Job]) -> None:
    """The text encoder reads 77 tokens (75 of the prompt); a longer prompt is cut there, as the reference
    does. Said, so that a detail at the end of a long prompt is not believed to be used."""
    from training.models.clip import CLIPTextEncoder

    long = [(j.name, n) for j in jobs if (n := CLIPTextEncoder.token_count(j.prompt)) > PROMPT_TOKENS]
    if long:
        rows = ", ".join(f"{name or 'the prompt'} ({n} tokens)" for name, n in long[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        log.warning("prompts longer than %d tokens are cut there: %s%s", PROMPT_TOKENS, rows, more)


PROMPT_TOKENS = 75  # 77 minus the start and end tokens


def prepare_frames(job: Job, size: tuple[int, int] | None, short_side: int, multiple: int):
    """The job's keyframes and sketches fitted to the model frame -> (keyframe tensors, sketch hints, size)."""
    import torch

    from inference.media import sketch_hint, to_model_range

    images = job.read_keyframes()
    h, w = images[0].shape[:2]
    target = size or frame_size(h, w, short_side, multiple)
    check_size(target, multiple)
    warn_far_from_training(target, job.name)
    warn_upscaled(min((img.shape[:2] for img in images), key=min), target, job.name)
    keyframes = [to_model_range(fit_frame(k, target)) for k in images]
    hints = {i: torch.from_numpy(sketch_hint(fit_frame(s, target))) for i, s in job.read_sketches().items()}
    return keyframes, hints, target
