"""Training data: 16-frame windows streamed from the curate job's WebDataset shards, resumable exactly.

A shard is a plain tar of samples `KEY.mp4` (the clip), `KEY.json` (its manifest row), `KEY.txt` (its
caption, may be empty). Shards of other tools are read too: the clip in another container (`.mkv`,
`.webm`, `.avi`, `.gif`, ...) or as numbered frames (`KEY.0000.jpg`, ...), the caption in `KEY.caption` or
the json's caption/text/prompt, `.tar.gz` shards. Shards are named by a folder (a curate `OUT`,
`OUT/shards/train`, or any folder of `.tar`/`.tar.gz` files), a glob, a `{000000..000099}` brace
pattern, a list file (`.txt`: one shard per line), `pipe:COMMAND` (the command writes the tar to stdout,
webdataset's convention), or any fsspec URL (`s3://`, `gs://`, `https://`, `file://`; a URL ending in
`/` lists its shards).

The stream (one per reading slot = rank x DataLoader worker) is a pure function of (seed, epoch, slot):
    shards, permuted per epoch -> this slot's part (whole shards when there are at least as many shards
    as slots, else every slots-th sample of every shard) -> tar members grouped by key -> a shuffle
    buffer -> decode one window per clip (crop/stride drawn from a per-clip seed) -> batches.
Its position is (epoch, samples out of the shuffle buffer). A checkpoint stores each slot's position;
a resumed stream re-reads the current epoch's tar bytes up to that position without decoding them, so
the batches after a resume equal those of an uninterrupted run. Workers are rotated on resume so that
the DataLoader's round-robin continues with the worker whose turn it was.

Nothing here is fatal for bad input: an unreadable or truncated shard, a sample without a readable
video, a clip shorter than one window are skipped and counted (`SlotState.counts`; each sample is said
once, with its shard), and the trainer logs the counts, until a reading slot can never get a usable clip
(`_Fruitless`: then a DataError, one line). webdataset (the library) is not used: its pipeline exposes no
position to resume from, and the GPU machines have only torch.

Window policy (stated, as the issue asks):
* frames: `frames` frames at a stride drawn uniformly from [stride_min, stride_max], limited so the
  window fits in the clip; the start is uniform over the positions that fit (DynamiCrafter's WebVid
  loader: random stride 1..6, random start).
* size: scaled to cover height x width (the smallest scale at which both sides fit; antialiased
  bilinear), then cropped to height x width (centre crop by default, `crop: random` draws one offset per
  clip). For clips wider than 1.6:1 this equals the reference's resize-short-side + centre crop; for
  narrower clips it never pads. The curate job already writes 512x320 clips, for which it is a no-op.
  The clip is taken as players show it: turned by its display rotation, its pixels made square.
* frame-stride condition `fs`: with `fs_mode: fps` (the reference's `fps_condition_type: fps`, MODEL.md
  2.4) the clip's frame rate divided by the stride, floored (DynamiCrafter: `fps_ori // frame_stride`);
  with `fs_mode: stride` the stride itself.

Interpolation conditioning (MODEL.md 2.8): `interp_concat` keeps the first and last frames' latents in
the concat channels and zeros between; `conditioning_dropout` draws DynamiCrafter's 5/5/5 % events.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from manifests.remote import local_path
from manifests.tar import EndCheckedTarInfo

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train: str = (
        ""  # train shards (folder, glob, brace pattern, list file, pipe:CMD, fsspec URL); set by --data
    )
    eval: str = ""  # eval shards, same forms; empty: the `eval` split beside `train` when there is one
    frames: int = 16  # frames per window (the UNet's temporal_length)
    height: int = 320  # window height in pixels
    width: int = 512  # window width in pixels
    stride_min: int = 1  # smallest frame stride (DynamiCrafter: random stride 1..6)
    stride_max: int = 6  # largest frame stride
    fs_mode: str = "fps"  # frame-stride condition: "fps" = clip fps // stride (the reference), "stride"
    crop: str = "center"  # "center" or "random" (one offset per clip)
    shuffle_buffer: int = 100  # samples held by the shuffle buffer of each reading slot
    shuffle_shards: bool = True  # permute the shard order every epoch
    num_workers: int = 4  # DataLoader worker processes per rank (0: read in the training process)
    prefetch_factor: int = 2  # batches prefetched per worker


# --- where the shards are ------------------------------------------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    """`a{000..002}b` -> [a000b, a001b, a002b] (zero padding kept), `{0..8..4}` with a step, `{a..c}` letters,
    `{x,y}` alternatives (as the shell and webdataset's braceexpand); nested left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    if ".." in body:
        found = re.fullmatch(r"(\d+|[a-zA-Z])\.\.(\d+|[a-zA-Z])(?:\.\.(\d+))?", body)
        lo, hi, step = found.groups() if found else ("", "", "0")
        numeric = lo.isdigit() and hi.isdigit()
        if not found or int(step or 1) == 0 or (not numeric and (lo.isdigit() or hi.isdigit())):
            raise ValueError(
                f"{pattern}: {{{body}}} is not a range: write {{000000..000099}} (a step: {{0..98..2}}, letters:"
                " {a..f})"
            )
        first, last = (int(lo), int(hi)) if numeric else (ord(lo), ord(hi))
        step = int(step or 1) if first <= last else -int(step or 1)
        # zero padding as bash pads: to the longer end's width when either end has a leading zero
        padded = numeric and any(len(end) > 1 and end.startswith("0") for end in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        values = range(first, last + (1 if step > 0 else -1), step)
        options = [str(v).zfill(width) if numeric else chr(v) for v in values]
    else:
        options = body.split(",")
    return [out for option in options for out in _expand_braces(head + option + tail)]


def is_url(spec: str) -> bool:
    """Whether a shard spec names a stream (fsspec URL or pipe:COMMAND) rather than a local path."""
    return "://" in spec or spec.startswith("pipe:")


def is_tar_name(path: str) -> bool:
    """Whether a local shard's name says tar (plain or gzipped), as webdataset reads them."""
    return path.endswith((".tar", ".tar.gz", ".tgz"))


TRAIN_INDEX = "train_index.parquet"  # in a run folder: the clips it trained on (evaluate checks against it)


def write_train_index(shards: list[str], path: Path) -> int | None:
    """Record which clips a run trains on: clip_id, source_id and the keyframe hashes of every clip in
    `shards`, from the index curate writes beside each shard (NNNNNN.parquet), joined with what `path`
    already holds (a resumed run). Returns the clips recorded; None, writing nothing, when a shard has no
    index beside it (a URL, shards from elsewhere): `evaluate` then cannot check its clips against them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.files import atomic_path

    siblings = [Path(re.sub(r"\.(tar|tar\.gz|tgz)$", "", s) + ".parquet") for s in shards]  # gzipped too
    if not siblings or any(is_url(s) for s in shards) or not all(p.is_file() for p in siblings):
        return None
    columns = ["clip_id", "source_id", "phash"]
    try:
        tables = [pq.read_table(p, columns=columns) for p in siblings]
        if path.is_file():
            tables.append(pq.read_table(path, columns=columns))
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):  # not curate's index, or damaged: no record
        return None
    keep = sorted({cid: i for i, cid in enumerate(table["clip_id"].to_pylist())}.values())
    table = table.take(keep)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows


def split_dirs(spec: str) -> tuple[str, str]:
    """(train, eval) shard specs for `--data`: a curate OUT folder (or its manifest.parquet, as interpolate
    and evaluate take it) gives OUT/shards/{train,eval}. A `file://` URL is its local path."""
    spec = local_path(spec)
    path = Path(spec)
    if not is_url(spec) and path.suffix == ".parquet" and path.is_file():
        if not (path.parent / "shards" / "train").is_dir():
            raise FileNotFoundError(
                f"{spec} is a manifest without OUT/shards/train beside it: give the shards"
            )
        path = path.parent
    if not is_url(spec) and (path / "shards" / "train").is_dir():  # no eval folder: copied without it
        held_out = path / "shards" / "eval"
        return str(path / "shards" / "train"), str(held_out) if held_out.is_dir() else ""
    if not is_url(spec) and path.name == "train" and (path.parent / "eval").is_dir():
        return spec, str(path.parent / "eval")
    if not is_url(spec) and path.name == "eval" and (path.parent / "train").is_dir():
        raise ValueError(
            f"{spec} is the held-out eval split of a curate output: training on it would leak it into the"
            f" model. Give the curate OUT folder or {path.parent / 'train'} (the eval split is then used for"
            " evaluation only)"
        )
    return spec, ""


def list_shards(spec: str) -> list[str]:
    """Shard URLs/paths named by `spec` (see the module docstring), in a stable order."""
    if not spec:
        return []
    spec = local_path(spec)  # a local path: listed as one (fsspec's file:// lists no folder)
    if spec.startswith("pipe:"):
        return _expand_braces(spec)
    if "://" in spec:
        import fsspec

        from manifests.remote import check_backend

        check_backend(spec)  # a missing s3fs/gcsfs/aiohttp: a ValueError naming it, before any work
        if "{" in spec:
            return _expand_braces(spec)
        protocol = spec.split("://", 1)[0]
        if "*" in spec or spec.endswith("/"):
            try:
                fs, _, paths = fsspec.get_fs_token_paths(spec)
                pattern = paths[0].rstrip("/") + ("/*" if spec.endswith("/") else "")
                found = sorted(fs.glob(pattern))
                if spec.endswith("/"):  # its shards, plain or gzipped
                    found = [p for p in found if is_tar_name(p)]
                return [f"{protocol}://{p}" for p in found]
            except Exception as exc:  # offline, denied, no such bucket: one line naming the URL
                raise FileNotFoundError(f"{spec}: cannot list it: {type(exc).__name__}: {exc}") from exc
        return [spec]
    if "{" in spec:
        return _expand_braces(spec)
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    path = Path(spec)
    if path.is_dir():  # its shards, plain or gzipped (a hidden name is a file being written)
        return [str(p) for p in sorted(path.iterdir()) if is_tar_name(p.name) and not p.name.startswith(".")]
    if path.suffix in (".txt", ".lst", ".list") and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        named = [line for line in lines if line and not line.startswith("#")]
        # a relative entry is relative to the list file's folder (as a playlist's), where it is there
        return [
            n if is_url(n) or os.path.isabs(n) or not (path.parent / n).exists() else str(path.parent / n)
            for n in named
        ]
    if path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"no shards at {spec!r}: not a folder, a file, a glob, a pattern or a URL")


def held_out_shards(shards: list[str]) -> list[str]:
    """The shards of a curate job's held-out eval split among `shards` (OUT/shards/eval/*.tar, however they
    were named: a glob over both splits, a list file, the file itself): training on them leaks the eval
    split into the model."""
    out = []
    for s in shards:
        if is_url(s):
            if "/shards/eval/" in s:
                out.append(s)
            continue
        folder = Path(s).resolve().parent
        if folder.name == "eval" and folder.parent.name == "shards" and (folder.parent / "train").is_dir():
            out.append(s)
    return out


def check_shards(shards: list[str]) -> None:
    """Setup errors, said before any model is built (ValueError): local shards named that do not exist (a
    typo in a pattern or list file, an incomplete copy: training on what is left would go unnoticed), eval
    shards of a curate output, and fsspec URLs none of which can be opened (offline, no credentials: the
    first few are tried, so one bad shard is still only skipped)."""
    missing = [s for s in shards if not is_url(s) and not os.path.exists(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{len(missing)} of {len(shards)} shards do not exist: {missing[0]}{more}; fix the pattern or"
            " list, or leave them out"
        )
    leaked = held_out_shards(shards)
    if leaked:
        more = f" (and {len(leaked) - 1} more)" if len(leaked) > 1 else ""
        raise ValueError(
            f"{leaked[0]}{more} is in the held-out eval split of a curate output: training on it would leak"
            " it into the model. Give the curate OUT folder or its shards/train (the eval split is then used"
            " for evaluation only)"
        )
    # not pipe: commands, even of URLs: a probe would run one to its end
    urls = [s for s in shards if "://" in s and not s.startswith("pipe:")][:3]
    errors = []
    for url in urls:
        try:
            with open_shard(url) as stream:
                stream.read(512)
            return
        except DataError:
            raise
        except Exception as exc:  # fsspec backends raise their own types (botocore's NoCredentialsError)
            errors.append(f"{type(exc).__name__}: {exc}")
    if errors:
        raise ValueError(
            f"cannot read the shards: {urls[0]}: {errors[0]}"
            + (f" (and the next {len(errors) - 1} as well)" if len(errors) > 1 else "")
            + "; check the network and the credentials"
        )


def shards_digest(shards: list[str]) -> str:
    """What a data position is a position in: the shards' names in order, with local files' sizes (a moved
    folder keeps its digest; a curate rerun that adds or rewrites shards changes it)."""
    import hashlib

    h = hashlib.sha256()
    for s in shards:
        size = os.path.getsize(s) if not is_url(s) and os.path.isfile(s) else -1
        h.update(f"{s.rstrip('/').rsplit('/', 1)[-1]}\t{size}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[Any]:
    """A readable binary stream of one shard: local file, `pipe:COMMAND`, or fsspec URL."""
    if url.startswith("pipe:"):
        # stderr to a file, not a pipe: a chatty command (wget's progress) would fill a pipe no one reads
        # while stdout is read, and both sides would wait for ever
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=errors)
            try:
                yield proc.stdout
                while proc.stdout.read(
                    1 << 20
                ):  # to the end (tar stops at its end marker): the command exits
                    pass
                status = proc.wait()
                if status:  # its stream may still have parsed: a failed download is not a whole shard
                    errors.seek(max(0, errors.seek(0, 2) - 300))
                    said = errors.read().decode(errors="replace").strip()
                    raise OSError(
                        f"{url}: the command exited with status {status}" + (f": {said}" if said else "")
                    )
            finally:
                proc.stdout.close()
                proc.kill()
                proc.wait()
    elif "://" in url:
        import fsspec

        from manifests.remote import MissingBackendError, check_backend

        try:
            check_backend(url)
        except MissingBackendError as exc:  # a setup error, not a bad shard: stop
            raise DataError(f"{exc}; or stream it with pipe:, e.g. 'pipe:curl -sL {url}'") from exc
        opened = fsspec.open(url, "rb")
        with opened as f:
            yield f
    else:
        with open(url, "rb") as f:
            yield f


def iter_tar_samples(stream: Any) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar read as a stream: {"__key__": key, ext: bytes, ...}.

    Members are grouped by key (the path up to the first dot of the file name), as webdataset does;
    a sample ends where the key changes, or where an extension comes again (the same key twice in a row,
    a tar appended to: two samples, not one whose first clip is lost). Errors of a truncated or garbled tar propagate (a tar cut at a
    member boundary included); the sample being read when one comes is not yielded.
    """
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=EndCheckedTarInfo) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, name = os.path.split(member.name)
            if "." not in name or name.startswith("."):
                continue
            stem, ext = name.split(".", 1)
            key = f"{folder}/{stem}" if folder else stem
            data = tar.extractfile(member).read()
            if current is not None and (current["__key__"] != key or ext.lower() in current):
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = data
    if current is not None:
        yield current


def write_shard(path: Path, samples: list[dict[str, Any]]) -> Path:
    """A shard in the curate job's layout from {"key", "mp4": bytes, "meta": manifest row, "caption"} dicts:
    a plain tar of KEY.mp4, KEY.json and KEY.txt (for tests and benchmarks; the curate job writes its own)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            members = (
                ("mp4", s["mp4"]),
                ("json", json.dumps(s["meta"]).encode()),
                ("txt", s["caption"].encode()),
            )
            for ext, data in members:
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# --- one window from one clip ------------------------------------------------------------------------------


class DataError(RuntimeError):
    """The shards give no training data at all (every shard unreadable, no usable clip): a setup error
    the trainer reports in one line, not a bad sample to skip."""


class SampleError(Exception):
    """A sample that cannot give a window; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# Where shards from other tools keep a clip: a video member in any container PyAV reads, or numbered frames
# (KEY.0000.jpg, KEY.0001.jpg, ...). A member is known by its last extension, so that a key with a dot in it
# (KEY = `a` of `a.v2.mp4`: webdataset cuts the key at the first dot) still finds its video and caption.
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "gif", "mpg", "mpeg", "ts", "flv", "ogv")
_FRAME_MEMBER = re.compile(r"(?:.*\.)?(\d+)\.(?:jpe?g|png|webp|bmp)")
# the caption's fields in a sample's json, in this order (img2dataset writes caption, others text or prompt)
CAPTION_FIELDS = ("caption", "text", "prompt")


def members(sample: dict[str, Any], extensions: tuple[str, ...]) -> list[str]:
    """A sample's members of these extensions, each known by its last one (`a.v2.json` is a json)."""
    return [ext for ext in sample if not ext.startswith("__") and ext.rsplit(".", 1)[-1] in extensions]


def clip_data(sample: dict[str, Any]) -> bytes | list[bytes]:
    """The clip of a sample: its video's bytes, or its numbered frames' bytes in order (SampleError if none)."""
    key = sample["__key__"]
    videos = members(sample, VIDEO_EXTENSIONS)
    if len(videos) > 1:
        dotted = any("." in ext for ext in videos)
        why = (
            "webdataset takes the key up to the first dot of a member's name, so keys with dots run together;"
            " write keys without dots"
            if dotted
            else "which is the clip is not known; keep one video per sample"
        )
        raise SampleError(
            "corrupt", f"{key}: {len(videos)} videos under one key ({', '.join(sorted(videos)[:3])}): {why}"
        )
    if videos:
        return sample[videos[0]]
    numbered = sorted((int(m.group(1)), ext) for ext in sample if (m := _FRAME_MEMBER.fullmatch(ext)))
    if numbered:
        return [sample[ext] for _, ext in numbered]
    present = ", ".join(sorted(ext for ext in sample if not ext.startswith("__"))) or "none"
    raise SampleError(
        "corrupt", f"{key}: no video member ({'/'.join(VIDEO_EXTENSIONS[:6])}/...; it has {present})"
    )


def sample_caption(sample: dict[str, Any], meta: dict[str, Any]) -> str:
    for ext in members(sample, ("txt", "caption")):
        text = sample[ext].decode("utf-8", errors="replace").strip()
        if text:
            return text
    return next((str(meta[f]).strip() for f in CAPTION_FIELDS if meta.get(f)), "")


def _rgb(frame: Any) -> np.ndarray:
    """uint8 [h, w, 3] of a PyAV frame; one with an alpha channel (a cel with a transparent background:
    PNG, GIF) over white, the paper it was drawn on, not over whatever colour its transparent pixels hold."""
    # gray+alpha, RGBA / YUVA, or a palette with a transparent entry (pngquant's PNGs, GIFs)
    if not (frame.format.name == "pal8" or len(frame.format.components) in (2, 4)):
        return frame.to_ndarray(format="rgb24")
    rgba = frame.to_ndarray(format="rgba").astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)


def _decode_frames(
    data: bytes | list[bytes], needed_last: int, keep: set[int] | None = None
) -> tuple[list[Any], float]:
    """PyAV frames 0..needed_last (fewer if the clip is shorter) and the stream's frame rate (0 for frames
    given as images). With `keep`, the frames at other indices are None: a window late in a long clip (a
    whole episode in a shard of another tool) holds its 16 frames, not the thousands decoded before them."""
    import av

    if isinstance(data, list):  # numbered images: one frame each
        frames = []
        for index, image in enumerate(data[: needed_last + 1]):
            if keep is not None and index not in keep:
                frames.append(None)
                continue
            with av.open(io.BytesIO(image)) as container:
                frames.append(next(container.decode(video=0)))
        return frames, 0.0
    frames = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(stream):
            frames.append(frame if keep is None or len(frames) in keep else None)
            if len(frames) > needed_last:
                break
    return frames, rate


def _quarter_turns(frame: Any) -> int:
    """Quarter turns counterclockwise (0..3) that show a decoded frame upright, from its display matrix (as
    curate's `pipeline.video.quarter_turns`; phones store portrait video as landscape frames and a rotation)."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def decode_clip(data: bytes | list[bytes], limit: int | None = None) -> np.ndarray:
    """The frames of a clip (`clip_data`: a video's bytes or numbered frames), the first `limit` of them or
    all, uint8 [T, H, W, 3], upright (a display rotation applied, as `decode_window` does) and over white
    where it is transparent. A limit keeps a whole episode in one sample (other tools' shards) from
    filling memory for a window of its first frames."""
    frames, _ = _decode_frames(data, (limit - 1) if limit else 1 << 62)
    if not frames:
        raise ValueError("the clip holds no frames")
    turns = _quarter_turns(frames[0])
    pictures = [np.rot90(_rgb(frame), turns) for frame in frames]
    sizes = sorted({f"{p.shape[1]}x{p.shape[0]}" for p in pictures})
    if len(sizes) > 1:
        raise ValueError(f"frames of different sizes ({', '.join(sizes[:3])})")
    return np.ascontiguousarray(np.stack(pictures))


def clip_ends(data: bytes | list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The first and last frames of a clip (as `decode_clip` gives them), decoded through without holding
    the frames between: the keyframes of an in-between, from a clip of any length."""
    import av

    if isinstance(data, list):
        ends = [_decode_frames([data[0]], 0)[0][0], _decode_frames([data[-1]], 0)[0][0]] if data else []
    else:
        ends = []
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(container.streams.video[0]):
                ends = [ends[0] if ends else frame, frame]
    if not ends:
        raise ValueError("the clip holds no frames")
    turns = _quarter_turns(ends[0])
    first, last = (np.ascontiguousarray(np.rot90(_rgb(frame), turns)) for frame in ends)
    return first, last


def _clip_facts(data: bytes | list[bytes], meta: dict[str, Any]) -> tuple[int, float]:
    """(frames, pixel aspect: width over height of a stored pixel, as DVD's 720x480 for 16:9 has 32/27; 1.0
    when unset or absurd) of a clip, from its container."""
    import av

    if isinstance(data, list):
        return len(data), 1.0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        sar = float(stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1)
        n = int(stream.frames or 0)
        if not n:  # Matroska/WebM (and others) state no frame count: count the packets (nothing is decoded)
            n = sum(1 for packet in container.demux(stream) if packet.size)
    return n or int(meta.get("num_frames") or 0), sar if 0.25 <= sar <= 4.0 else 1.0


def cover_crop(
    video: torch.Tensor,
    height: int,
    width: int,
    crop: str,
    rng: np.random.Generator | None,
    pixel_aspect: float = 1.0,
):
    """uint8 [t, H0, W0, 3] -> uint8 [3, t, height, width]: scale to cover, then crop (module docstring).
    A stored pixel `pixel_aspect` times as wide as high is scaled to a square one (not a stretched clip)."""
    t, h0, w0, _ = video.shape
    x = video.permute(0, 3, 1, 2)  # [t, 3, H0, W0]
    scale = max(height / h0, width / (w0 * pixel_aspect))
    size = (max(height, round(h0 * scale)), max(width, round(w0 * pixel_aspect * scale)))
    if size != (h0, w0):
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    dy, dx = size[0] - height, size[1] - width
    if crop == "random" and rng is not None:
        top, left = int(rng.integers(dy + 1)), int(rng.integers(dx + 1))
    else:
        top, left = dy // 2, dx // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.permute(1, 0, 2, 3).contiguous()  # [3, t, height, width]


# A clip whose aspect is this many times wider or narrower than the window's is not a picture to crop (a
# 4000x2 stream would be scaled to 640000 pixels wide to cover 320x512): counted as corrupt.
MAX_ASPECT_MISMATCH = 8.0


def decode_window(sample: dict[str, Any], cfg: DataConfig, rng: np.random.Generator | None) -> dict[str, Any]:
    """One training window from one sample; `rng=None` gives the eval window (stride_min, start 0, centre).

    -> {"video": uint8 [3, frames, height, width], "caption", "fs", "stride", "start" (its first frame's
    index in the clip), "fps", "key"}.
    Raises SampleError("corrupt" | "too_short", ...) for samples that cannot give one.
    """
    import json

    key = sample["__key__"]
    data = clip_data(sample)
    if not data:
        raise SampleError("corrupt", f"{key}: an empty video member")
    try:
        meta = next((json.loads(sample[ext]) for ext in members(sample, ("json",)) if sample[ext]), {})
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):  # valid JSON, not a row
        meta = {}
    try:
        n, sar = _clip_facts(data, meta)
    except Exception as exc:  # PyAV raises many types for broken files
        raise SampleError("corrupt", f"{key}: {exc}") from exc
    for attempt in range(2):  # a container that over-states its length is decoded once more with the true one
        longest = (n - 1) // (cfg.frames - 1) if n >= cfg.frames else 0
        if longest < cfg.stride_min:
            needs = (cfg.frames - 1) * cfg.stride_min + 1
            raise SampleError(
                "too_short",
                f"{key}: {n} frames, a window of {cfg.frames} at stride {cfg.stride_min} needs {needs}",
            )
        hi = min(cfg.stride_max, longest)
        stride = cfg.stride_min if rng is None else int(rng.integers(cfg.stride_min, hi + 1))
        span = stride * (cfg.frames - 1)
        start = 0 if rng is None else int(rng.integers(n - span))
        try:
            frames, rate = _decode_frames(
                data, start + span, keep=set(range(start, start + span + 1, stride))
            )
        except Exception as exc:
            raise SampleError("corrupt", f"{key}: {exc}") from exc
        if len(frames) > start + span:
            break
        if attempt or not frames:
            raise SampleError("corrupt", f"{key}: decodes {len(frames)} frames, {n} stated")
        n = len(frames)
    # a display rotation (phones store portrait video as landscape frames and a rotation; players turn it):
    # quarter turns counterclockwise that show the frames upright, as the curate job decodes them
    first = frames[start]
    turns = _quarter_turns(first)
    if turns % 2:  # a stored pixel stands on its side once the frame is turned
        sar = 1 / sar
    h0, w0 = (first.width, first.height) if turns % 2 else (first.height, first.width)
    shown = w0 * sar  # the displayed width
    if (
        max(h0 * cfg.width / (shown * cfg.height), shown * cfg.height / (h0 * cfg.width))
        > MAX_ASPECT_MISMATCH
    ):
        raise SampleError("corrupt", f"{key}: a {w0}x{h0} clip is too far from the window's aspect to crop")
    picked = [np.rot90(_rgb(frames[start + i * stride]), turns) for i in range(cfg.frames)]
    sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in picked})
    if len(sizes) > 1:  # numbered frames of other sizes, a stream that changes size: no one crop fits all
        raise SampleError("corrupt", f"{key}: frames of different sizes ({', '.join(sizes[:3])})")
    picked = np.stack(picked)  # [t, h, w, 3], upright
    video = cover_crop(torch.from_numpy(picked), cfg.height, cfg.width, cfg.crop, rng, sar)
    fps = rate or float(meta.get("fps") or 0) or 24.0
    fs = max(1, int(fps // stride)) if cfg.fs_mode == "fps" else stride
    return {
        "video": video,
        "caption": sample_caption(sample, meta),
        "fs": fs,
        "stride": stride,
        "start": start,
        "fps": fps,
        "key": key,
    }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows -> a batch: video uint8 [b, 3, t, H, W], first/last uint8 [b, 3, H, W] (the keyframes),
    fs/stride long [b], fps float [b], caption/key lists."""
    video = torch.stack([it["video"] for it in items])
    return {
        "video": video,
        "first": video[:, :, 0].clone(),
        "last": video[:, :, -1].clone(),
        "caption": [it["caption"] for it in items],
        "fs": torch.tensor([it["fs"] for it in items], dtype=torch.long),
        "stride": torch.tensor([it["stride"] for it in items], dtype=torch.long),
        "fps": torch.tensor([it["fps"] for it in items], dtype=torch.float32),
        "key": [it["key"] for it in items],
    }


def to_model_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (on the tensor's device)."""
    return video.float() / 127.5 - 1.0


# --- the resumable stream ----------------------------------------------------------------------------------


@dataclass
class SlotState:
    """Position of one reading slot: everything it emitted up to (epoch, pos) went into yielded batches."""

    slot: int = 0
    epoch: int = 0
    pos: int = 0  # samples out of the shuffle buffer in this epoch (decoded or skipped)
    counts: dict[str, int] = field(default_factory=dict)  # corrupt / too_short samples since the start
    bad_shards: list[str] = field(default_factory=list)  # "epoch:url" of shards that failed to read

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "epoch": self.epoch,
            "pos": self.pos,
            "counts": dict(self.counts),
            "bad_shards": list(self.bad_shards),
        }


@dataclass
class DataState:
    """What a rank's trainer consumed: batches so far and the latest position of every slot."""

    world: int = 1
    workers: int | None = 0  # None: a restarted position, which any number of workers may take
    batches: int = 0
    slots: dict[int, SlotState] = field(default_factory=dict)
    shards: str = ""  # shards_digest of the shards read ("": a checkpoint from before it was recorded)
    first_epoch: int = 0  # where a slot without a saved position starts (a data restart: a new order)

    def consume(self, batch: dict[str, Any]) -> None:
        self.batches += 1
        state = batch["state"]
        self.slots[state.slot] = state

    def skipped(self) -> dict[str, int]:
        """Totals over this rank's slots: corrupt and too_short samples, distinct unreadable shards."""
        out = {"corrupt": 0, "too_short": 0}
        for s in self.slots.values():
            for k, v in s.counts.items():
                out[k] = out.get(k, 0) + v
        out["bad_shards"] = len(self.bad_shard_names())
        return out

    def bad_shard_names(self) -> set[str]:
        """The distinct unreadable shards this rank's slots met."""
        return {b.split(":", 1)[1] for s in self.slots.values() for b in s.bad_shards}

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "workers": self.workers,
            "batches": self.batches,
            "slots": {str(k): v.to_dict() for k, v in self.slots.items()},
            "shards": self.shards,
            "first_epoch": self.first_epoch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        slots = {int(k): SlotState(**v) for k, v in d["slots"].items()}
        return cls(
            world=d["world"],
            workers=d["workers"],
            batches=d["batches"],
            slots=slots,
            shards=d.get("shards", ""),
            first_epoch=d.get("first_epoch", 0),
        )

    def restarted(self, world: int | None = None) -> DataState:
        """A fresh position for `world` ranks (default: the same), in an order not read before (the epoch
        after the furthest any slot reached): `--restart-data`, after the shards, workers or ranks changed."""
        epoch = max((s.epoch for s in self.slots.values()), default=self.first_epoch - 1) + 1
        return DataState(world=world or self.world, workers=None, first_epoch=epoch)

    def check_resumable(self, shards: list[str], world: int, workers: int) -> None:
        """ValueError when this position cannot continue on `shards` with `world` ranks x `workers` workers:
        the same samples in the same order need the same shards and reading slots."""
        if self.world != world:  # each rank's reading slots continue where that rank stopped
            raise ValueError(
                f"the data position was saved by {self.world} rank(s); resume with the same number (now {world})"
                " to continue the same sample order, or pass --restart-data to go on with the weights,"
                " optimizer and step on these ranks, reading the data in a new order"
            )
        if self.workers is not None and max(1, self.workers) != max(1, workers):
            raise ValueError(
                f"the data position was saved with {self.workers} DataLoader worker(s) per rank; resume with"
                f" the same (now {workers}) to continue the same sample order, or pass --restart-data to read"
                " the data in a new order from here"
            )
        if self.shards and self.shards != shards_digest(shards):
            raise ValueError(
                "the shards differ from those the data position was saved on (other files, or the same names"
                " at other sizes: a curate rerun?); pass --restart-data to read the new shards in a new order"
                " from here (the weights, optimizer and step continue), or give the same --data"
            )


def slot_shards(shards: list[str], slot: int, slots: int) -> tuple[list[str], int | None]:
    """(the shards a slot reads in one epoch's order, which of every `slots` samples it takes: None = all).
    Whole shards per slot when there are at least as many shards as slots, else every slots-th sample of
    every shard."""
    if len(shards) >= slots:
        return shards[slot::slots], None
    return shards, slot


def _raw_samples(
    shards: list[str], slot: int, slots: int, epoch: int, bad: list[str], why: dict[str, str] | None = None
) -> Iterator[dict]:
    """This slot's samples of one epoch; an unreadable shard is tagged in `bad` (and its error kept in
    `why`) and skipped."""
    mine, take = slot_shards(shards, slot, slots)
    index = 0
    for url in mine:
        try:
            with open_shard(url) as stream:
                for sample in iter_tar_samples(stream):
                    if take is None or index % slots == take:
                        sample["__url__"] = url  # which shard, for the message of a sample skipped
                        yield sample
                    index += 1
        except DataError:  # a setup error (a missing fsspec backend): stop
            raise
        except Exception as exc:  # tarfile, OSError, and fsspec backends' own types (botocore's, aiohttp's)
            tag = f"{epoch}:{url}"
            if why is not None:
                why.setdefault(url, f"{type(exc).__name__}: {exc}")
            if tag not in bad:
                bad.append(tag)
                log.warning("skipping the rest of unreadable shard %s: %s", url, exc)


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer (webdataset's `shuffle`): emit a random held sample per new one."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], sample = sample, buffer[j]
        yield sample
    order = rng.permutation(len(buffer))
    for j in order:
        yield buffer[j]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The window draws of one clip in one epoch: independent of the reading history."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class ClipStream(IterableDataset):
    """Endless batches of windows for one rank; each DataLoader worker is one reading slot."""

    def __init__(
        self,
        shards: list[str],
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        state: DataState | None = None,
    ):
        if not shards:
            raise ValueError("no training shards: pass --data (a curate OUT folder, a shard folder or a URL)")
        self.shards, self.cfg, self.batch_size, self.seed = shards, cfg, batch_size, seed
        self.rank, self.world = rank, world
        if state is not None:
            state.check_resumable(shards, world, cfg.num_workers)
        state = state or DataState(world=world)
        state.workers, state.shards = cfg.num_workers, shards_digest(shards)
        self.state = state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.cfg.num_workers)
        physical = info.id if info is not None else 0
        worker = (physical + self.state.batches) % workers  # whose turn it was when the state was saved
        slot, slots = self.rank * workers + worker, self.world * workers
        start = self.state.slots.get(slot, SlotState(slot=slot, epoch=self.state.first_epoch))
        counts = {"corrupt": 0, "too_short": 0, **start.counts}
        bad = list(start.bad_shards)
        epoch, skip = start.epoch, start.pos
        pending: list[dict[str, Any]] = []
        # (shard, key) of the skipped samples warned of: each once, not every epoch
        said: set[tuple[str, str]] = set()
        # An epoch in which this slot's shards give no usable clip (they are the bad ones this time) is not
        # an error: the next epoch deals it other shards. Only when the slot's fruitless epochs have covered
        # every shard is there no training data at all.
        fruitless = _Fruitless(self.shards, slots, self.cfg.shuffle_shards)
        while True:
            order = list(self.shards)
            if self.cfg.shuffle_shards:
                order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
            rng = np.random.default_rng([self.seed, epoch, slot])
            unreadable: dict[str, str] = {}
            raw = _raw_samples(order, slot, slots, epoch, bad, unreadable)
            pos = good = 0
            for sample in _shuffled(raw, self.cfg.shuffle_buffer, rng):
                pos += 1
                if pos <= skip:
                    continue  # replaying up to the saved position: bytes read, nothing decoded
                try:
                    item = decode_window(sample, self.cfg, sample_rng(self.seed, epoch, sample["__key__"]))
                except Exception as exc:  # an input no one foresaw too: that sample is lost, not the run
                    reason = exc.reason if isinstance(exc, SampleError) else "corrupt"
                    counts[reason] = counts.get(reason, 0) + 1
                    where = (sample.get("__url__", ""), sample["__key__"])
                    if where not in said:
                        said.add(where)
                        detail = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
                        log.warning("skipping sample %s of shard %s (%s)", where[1], where[0], detail)
                    continue
                good += 1
                pending.append(item)
                if len(pending) == self.batch_size:
                    batch = collate(pending)
                    batch["state"] = SlotState(slot, epoch, pos, dict(counts), list(bad))
                    pending = []
                    yield batch
            if good or skip:
                fruitless = _Fruitless(self.shards, slots, self.cfg.shuffle_shards)
            else:
                fruitless.add(slot_shards(order, slot, slots)[0], pos, unreadable)
                if fruitless.covered():
                    raise DataError(fruitless.message(slot, counts))
            epoch, skip = epoch + 1, 0


class _Fruitless:
    """A reading slot's run of epochs without a usable clip: the shards they dealt it and what they gave.

    It ends (`covered`) when reading on cannot help: whole shards per slot, shuffled, and every shard dealt
    to this slot without a usable clip (then no shard has one); a fixed deal (data.shuffle_shards=false:
    each epoch gives the slot what the last one did); or EPOCHS in a row (the bound when fewer shards than
    slots make each epoch take other samples of every shard)."""

    EPOCHS = 64

    def __init__(self, shards: list[str], slots: int, shuffled: bool):
        self.shards, self.slots, self.shuffled = shards, slots, shuffled
        self.tried: set[str] = set()
        self.epochs = self.samples = 0
        self.unreadable: dict[str, str] = {}

    def add(self, dealt: list[str], samples: int, unreadable: dict[str, str]) -> None:
        self.tried.update(dealt)
        self.epochs += 1
        self.samples += samples
        self.unreadable.update(unreadable)

    def _whole_shards(self) -> bool:
        return len(self.shards) >= self.slots

    def covered(self) -> bool:
        if self.epochs >= self.EPOCHS or not self.shuffled:
            return True
        if not self._whole_shards():  # every epoch reads every shard; no sample at all stays so
            return self.samples == 0
        return self.tried >= set(self.shards)

    def message(self, slot: int, counts: dict[str, int]) -> str:
        example = next(iter(self.unreadable), None) or min(self.tried, default=self.shards[0])
        everything = self._whole_shards() and self.tried >= set(self.shards) or len(self.shards) < self.slots
        if everything and self.samples == 0 and len(self.unreadable) == len(self.shards):
            return (
                f"no shard could be read ({len(self.unreadable)} of {len(self.shards)} unreadable, e.g. {example}:"
                f" {self.unreadable[example]}); --data takes a curate OUT folder, a folder of .tar shards, a glob,"
                " a list file or a URL"
            )
        if len(self.shards) < self.slots and self.samples == 0:
            return (
                f"reading slot {slot} of {self.slots} gets no samples from {len(self.shards)} shard(s): fewer"
                " samples than ranks x workers? lower data.num_workers"
            )
        found = (
            f"{self.samples} samples over {self.epochs} epoch(s); {counts['corrupt']} corrupt and"
            f" {counts['too_short']} too short in all; {len(self.unreadable)} shard(s) unreadable"
        )
        if self._whole_shards() and self.tried >= set(self.shards):
            return f"no usable clip in any of the {len(self.shards)} shard(s) ({found}), e.g. {example}"
        fixed = " (the same every epoch: data.shuffle_shards=false)" if not self.shuffled else ""
        return (
            f"reading slot {slot} of {self.slots} found no usable clip in what it was dealt: {len(self.tried)} of"
            f" {len(self.shards)} shard(s){fixed} ({found}), e.g. {example}; other slots may have clips, but"
            " every slot must give batches: lower data.num_workers"
            + (" or set data.shuffle_shards=true" if not self.shuffled else "")
        )


def make_loader(
    shards: list[str],
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    state: DataState | None = None,
) -> DataLoader:
    """The rank's DataLoader: workers build whole batches; in-order round-robin over workers.

    The loader gets its own generator so that creating it never draws from the training RNG.
    """
    dataset = ClipStream(shards, cfg, batch_size, seed, rank, world, state)
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_windows(shards: list[str], cfg: DataConfig, count: int) -> list[dict[str, Any]]:
    """The first `count` usable eval windows in shard order (stride_min, start 0, centre crop)."""
    out: list[dict[str, Any]] = []
    for sample in _raw_samples(shards, 0, 1, 0, []):
        try:
            out.append(decode_window(sample, cfg, None))
        except Exception as exc:  # as in the training stream: that sample is lost, not the run
            detail = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "no eval window from sample %s of shard %s (%s)", sample["__key__"], sample["__url__"], detail
            )
            continue
        if len(out) >= count:
            break
    return out


# --- the interpolation conditioning (MODEL.md 2.2, 2.8) ----------------------------------------------------


def interp_concat(z: torch.Tensor) -> torch.Tensor:
    """Concat condition from clip latents z [b, c, t, h, w]: the first and last frames' latents, zeros
    between (DynamiCrafter's `interp_mode`; ToonCrafter's release dropped this training branch)."""
    cond = torch.zeros_like(z)
    cond[:, :, 0] = z[:, :, 0]
    cond[:, :, -1] = z[:, :, -1]
    return cond


def conditioning_dropout(
    batch: int, p: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamiCrafter's classifier-free-guidance dropout: r ~ U(0, 1) per clip; text dropped if r < 2p,
    image dropped if p <= r < 3p; so text only, both, image only are three disjoint events of p each
    (uncond_prob p = 0.05 in config_interp.yaml). -> (drop_text [b] bool, drop_image [b] bool)."""
    r = torch.rand(batch, device=device)
    return r < 2 * p, (r >= p) & (r < 3 * p)
