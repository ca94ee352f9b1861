"""Clips of a curated split, read back from the curate job's shards (ARCHITECTURE.md, "The data contract").

A source is any of:
* a curate output folder `OUT`: read through its manifest (below), shard by shard; without one, its
  `OUT/shards/<split>/*.tar`,
* a folder of shards (`OUT/shards/eval`), or shard files `NNNNNN.tar` (also as a glob or a
  `{000000..000009}` pattern, as train's --data takes them),
* a clip manifest (`OUT/manifest.parquet` or a `manifest/` folder of parts): its kept rows of the split,
  in manifest order, read from the shards beside it (`OUT/shards/<row.shard>`).

A shard sample is `KEY.mp4` + `KEY.json` (its manifest row) + `KEY.txt` (its caption), consecutive in
the tar (WebDataset's grouping). Shards of other tools are read as training reads them
(`training.shard_samples.clip_data`): a video in another container or numbered frames, a caption in
`KEY.caption` or the json's caption/text/prompt field. Only the standard library's tarfile and PyAV read
the shards (webdataset would import torch's data loading machinery for nothing here).
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.media import InputError
from training.shard_samples import (
    CAPTION_FIELDS,
    SampleError,
    clip_data,
    clip_ends,
    decode_clip,
    members,
)
from training.shards import iter_tar_samples

log = logging.getLogger("inbetweener.eval_data")


@dataclass
class EvalClip:
    key: str  # the WebDataset key (= clip_id)
    video: bytes | list[bytes]  # the clip as stored: a video's bytes, or numbered frames' (another tool's)
    caption: str
    meta: dict = field(default_factory=dict)  # its manifest row
    shard: str = ""  # the tar it came from
    missing: str = ""  # why a clip the split names could not be read (then there is no mp4)

    @property
    def content(self) -> str:
        """A digest of the clip's bytes: the same key re-curated (another crop, size or encode) differs."""
        import hashlib

        digest = hashlib.sha256()
        for part in self.video if isinstance(self.video, list) else [self.video]:
            digest.update(part)
        return digest.hexdigest()[:16]

    def ends(self) -> tuple[np.ndarray, np.ndarray]:
        """The first and last frames (an in-between's keyframes), without holding the rest; InputError as
        `frames`."""
        return self._decoded(clip_ends)

    def frames(self, limit: int | None = None) -> np.ndarray:
        """Every frame (or the first `limit`), uint8 [T, H, W, 3], upright; InputError naming the clip when
        it does not decode (or could not be read from its shard)."""
        return self._decoded(lambda video: decode_clip(video, limit))

    def _decoded(self, decode):
        import av

        if self.missing:
            raise InputError(self.missing)
        try:
            return decode(self.video)
        except (av.error.FFmpegError, ValueError, OSError) as exc:  # InputError is a ValueError
            raise InputError(f"{self.shard}:{self.key}: its video does not decode ({exc})") from exc


def _is_manifest(path: Path) -> bool:
    return path.suffix == ".parquet" or (path.is_dir() and path.name == "manifest")


def _samples(tar_path: Path, problems: dict[str, str]) -> Iterator[EvalClip]:
    """The samples of one shard, in order, grouped as training groups them
    (`training.shards.iter_tar_samples`: by key, a repeated extension starting the next sample; gzipped
    shards too). A shard unreadable from some point on (cut short, also exactly between two members;
    damaged) gives the clips before it, and `problems[str(tar_path)]` says why the rest is missing."""
    count = 0
    try:
        with open(tar_path, "rb") as stream:
            for sample in iter_tar_samples(stream):
                clip = _clip_of(sample, tar_path)
                if clip is not None:
                    count += 1
                    yield clip
    except (tarfile.TarError, OSError, EOFError) as exc:  # the sample being read is incomplete: not given
        problems[str(tar_path)] = f"{tar_path}: unreadable after {count} clip(s) ({exc})"


def _clip_of(sample: dict, tar_path: Path) -> EvalClip | None:
    """A sample's clip, manifest row and caption (None: no clip in it, a stray member). Members are known by
    their last extension, so that a key with a dot in it (`a` of `a.v2.mp4`) keeps its json and caption."""
    key = sample["__key__"]
    try:
        video = clip_data(sample)
    except SampleError:
        return None

    def member(*names: str) -> bytes | None:
        return next((sample[ext] for ext in members(sample, names) if sample[ext].strip()), None)

    meta = {}
    if member("json") is not None:
        try:
            meta = json.loads(member("json"))
        except (json.JSONDecodeError, UnicodeDecodeError):  # the clip and its caption still serve
            log.warning("%s:%s: its json member is unreadable; the clip is used without it", tar_path, key)
    if not isinstance(meta, dict):  # valid JSON, not a row
        meta = {}
    caption = next((str(meta[f]) for f in CAPTION_FIELDS if meta.get(f)), "")
    text = member("txt", "caption")
    if text is not None:
        try:
            caption = text.decode()
        except UnicodeDecodeError:  # a shard of another tool (latin-1): a traceback stopped the run
            caption = text.decode(errors="replace")
            log.warning("%s:%s: its caption is not UTF-8; undecodable bytes replaced", tar_path, key)
    return EvalClip(key, video, caption, meta, str(tar_path))


def _manifest_clips(path: Path, split: str) -> Iterator[EvalClip]:
    """The kept clips of `split` in manifest order, read from the shards beside the manifest. A clip that
    cannot be read (its row names no shard, its shard is missing, cut short, or does not hold it) comes
    as an EvalClip with `missing` saying why, so that the evaluation reports it instead of dropping it."""
    from manifests.io import ManifestError, read_manifest

    try:
        table = read_manifest(path)
    except ManifestError as exc:  # a damaged or foreign file: one line, not a traceback
        raise InputError(str(exc)) from exc
    rows = [
        r
        for r in table.select(["key", "shard", "split", "status"]).to_pylist()
        if r["status"] == "kept" and r["split"] == split and r["key"]
    ]
    if not rows:
        raise InputError(
            f"{path}: the manifest has no kept rows in the {split!r} split{_resplit_hint(path.parent, split)}"
        )
    root = path.parent / "shards"  # OUT/manifest.parquet or OUT/manifest/ -> OUT/shards
    wanted: dict[str, set[str]] = {}
    for r in rows:
        if r["shard"]:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    # Shards are read when a row first needs one, so that memory holds the clips read and not yet given
    # (one shard's, when the manifest lists them shard by shard, as curate writes them) and a --limit
    # reads only the shards its clips are in.
    found: dict[str, EvalClip] = {}
    read: set[str] = set()
    why: dict[str, str] = {}  # shard -> why some of its clips are missing

    def read_shard(shard: str) -> None:
        read.add(shard)
        tar_path = root / shard
        if not tar_path.is_file():
            why[shard] = f"its shard {tar_path}, named by {path}, is missing"
            return
        problems: dict[str, str] = {}
        for clip in _samples(tar_path, problems):
            if clip.key in wanted[shard]:
                found[clip.key] = clip
        if problems:
            why[shard] = problems[str(tar_path)]

    for r in rows:
        shard = r["shard"]
        if shard and shard not in read:
            read_shard(shard)
        clip = found.pop(r["key"], None)
        if clip is not None:
            yield clip
            continue
        reason = (
            f"its row in {path} names no shard"
            if not shard
            else why.get(shard, f"{root / shard} does not hold it (the manifest and the shards disagree)")
        )
        yield EvalClip(r["key"], b"", "", {}, str(root / shard) if shard else "", missing=reason)


def shard_files(source: Path, split: str = "eval") -> list[Path]:
    """The shard tars a (non-manifest) source names, in order."""
    from training.shards import is_tar_name

    if source.is_file():
        if not is_tar_name(source.name):
            raise InputError(
                f"{source}: expected a shard (.tar, .tar.gz), a shard folder, a curate output or a manifest"
            )
        return [source]
    if not source.is_dir():
        raise InputError(f"{source}: no such file or folder")
    for folder in (source, source / split, source / "shards" / split):
        # complete shards (a temporary one is hidden by a leading dot), gzipped ones of other tools too
        tars = sorted(
            p
            for p in (folder.iterdir() if folder.is_dir() else [])
            if is_tar_name(p.name) and not p.name.startswith(".")
        )
        if tars:
            return tars
    raise InputError(
        f"{source}: no shards found (looked for *.tar and *.tar.gz in it, in {split}/ and in shards/{split}/)"
        + _resplit_hint(source, split)
    )


def _resplit_hint(out: Path, split: str) -> str:
    """For a curate output whose eval split is empty: how to re-split it."""
    if split != "eval" or not (out / "manifest.parquet").is_file():
        return ""
    return (
        " (a small job gives eval at most split.max_eval_fraction of its kept clips, in whole sources):"
        f" `inbetweener select {out} --set split.by_source=false` re-splits it by near-duplicate groups,"
        " and a larger split.max_eval_fraction lets eval take more"
    )


def iter_clips(
    sources: Sequence[str | Path], split: str = "eval", limit: int | None = None
) -> Iterator[EvalClip]:
    """The clips of `sources` in order (sources in the order given), at most `limit`. A curate output folder
    is read through its manifest (so a clip of a missing or cut shard is reported, not silently absent);
    a clip that cannot be read comes with `missing` set (and counts toward `limit`)."""
    from manifests.remote import local_path

    count = 0
    sources = _local_files([local_path(str(s)) for s in sources])  # a file:// URL is its local path
    for source in map(Path, _local_files([local_path(s) for s in _expanded(sources)])):  # a list's lines too
        if not source.exists():
            raise InputError(f"{source}: no such file or folder")
        if source.is_dir() and (source / "shards").is_dir():  # a curate output: its manifest says what the
            manifest = next(
                (m for m in (source / "manifest.parquet", source / "manifest") if m.exists()), None
            )
            source = manifest or source  # split holds
        clips = _manifest_clips(source, split) if _is_manifest(source) else _shard_clips(source, split)
        for clip in clips:
            if limit is not None and count >= limit:
                return
            yield clip
            count += 1


def _local_files(sources: list[str]) -> list[str]:
    """`sources`, or an InputError naming the first URL among them (Path() would fold s3://b/x into s3:/b/x
    and report that as a missing file)."""
    urls = [s for s in sources if "://" in s]
    if urls:
        raise InputError(
            f"{urls[0]}: evaluate reads local files; copy the curate output (its"
            " manifest.parquet and shards/eval/) to this machine, or mount the bucket, and give that path"
        )
    return sources


LIST_SUFFIXES = (".txt", ".lst", ".list")  # a file listing shards, as train's --data takes it


def _expanded(sources: Sequence[str]) -> list[str]:
    """Each source, a glob, a `{000000..000099}` pattern or a list file (as train's --data takes them:
    quoted, or past the shell's argument limit) as the paths it names, in order; a path that exists is
    taken as it is."""
    import glob
    import os

    from training.shards import list_shards

    out = []
    for source in sources:
        if Path(source).suffix in LIST_SUFFIXES and Path(source).is_file():  # a list of shards, one a line
            out += list_shards(source)
            continue
        if os.path.lexists(source) or not (glob.has_magic(source) or "{" in source):
            out.append(source)
            continue
        for pattern in list_shards(source) if "{" in source else [source]:  # braces first, as the shell
            matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matched:
                raise InputError(f"{source}: no file or folder matches it")
            out += matched
    return out


def _shard_clips(source: Path, split: str) -> Iterator[EvalClip]:
    """The clips of a shard folder or file; a shard unreadable from some point on gives its clips before
    it and then one EvalClip (keyed by the shard) with `missing` saying what was lost."""
    for tar in shard_files(source, split):
        problems: dict[str, str] = {}
        yield from _samples(tar, problems)
        if problems:
            reason = problems[str(tar)] + "; the rest of the shard is not evaluated"
            yield EvalClip(f"{tar.name}:rest", b"", "", {}, str(tar), missing=reason)


def clip_window(
    frames: np.ndarray, num_frames: int = 16, stride: int = 1, start: int = 0
) -> np.ndarray | None:
    """Frames start, start + stride, ... (num_frames of them), or None when the clip is too short."""
    last = start + (num_frames - 1) * stride
    if last >= len(frames):
        return None
    return frames[start : last + 1 : stride]


def training_overlap(checkpoint: Path, clips: Sequence[EvalClip], max_distance: int = 12) -> dict:
    """Which evaluated clips the checkpoint's training run saw: the same clip, a near-duplicate (keyframe
    pHashes within `max_distance`, the curate split's default), or a clip of a source it trained on.
    The run's `train_index.parquet` (written by `inbetweener train` beside its checkpoints) says what it
    trained on; a checkpoint without one (the released ToonCrafter, a run on shards without an index)
    cannot be checked, and the record says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.split import cross_split_pairs
    from training.shards import TRAIN_INDEX

    index = next((p / TRAIN_INDEX for p in list(checkpoint.parents)[:4] if (p / TRAIN_INDEX).is_file()), None)
    if index is None:
        return {
            "checked": False,
            "why": f"no {TRAIN_INDEX} beside the checkpoint: its training data is unknown",
        }
    try:
        trained = pq.read_table(index, columns=["clip_id", "source_id", "phash"]).to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        return {"checked": False, "why": f"{index}: unreadable ({exc})"}
    ids = {r["clip_id"] for r in trained}
    same = sorted(c.key for c in clips if c.key in ids)
    rows = [{**r, "clip_id": f"train:{r['clip_id']}", "split": "train"} for r in trained]
    rows += [
        {
            "clip_id": f"eval:{c.key}",
            "source_id": c.meta.get("source_id") or f"unknown:{c.key}",  # an unknown source matches nothing
            "phash": c.meta.get("phash") or [],
            "split": "eval",
        }
        for c in clips
    ]
    near: set[str] = set()
    sources: set[str] = set()
    for leak in cross_split_pairs(rows, max_distance):
        if leak["kind"] == "source":
            sources.add(leak["a"])
        else:
            near.update(x.removeprefix("eval:") for x in (leak["a"], leak["b"]) if x.startswith("eval:"))
    near = near | set(same)
    return {
        "checked": True,
        "index": str(index),
        "train_clips": len(trained),
        "same_clips": len(same),
        "near_duplicates": len(near),
        "shared_sources": len(sources),
        "examples": sorted(near)[:5],
    }
