"""write: clips re-encoded with PyAV, WebDataset shards sized by bytes, atomic visibility.

Encoding reads each source once at the training size (resize to cover + centre crop) and encodes
every kept clip of it. Shards are plain tars written with `tarfile` (webdataset's writer imports
torch, which the curate job never needs): a sample is `KEY.mp4`, `KEY.json` (its manifest row)
and `KEY.txt` (its caption). Each `NNNNNN.tar` has a `NNNNNN.parquet` with the same rows and a
`NNNNNN.stats.json`; a shard folder is built beside the old one and swapped in whole.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.files import atomic_path, write_json_atomic
from manifests.keys import sample_key, shard_name, source_id_from_stream
from manifests.schema import CLIP_SCHEMA, to_table
from pipeline.video import (
    SourceError,
    SourceMissing,
    as_box,
    open_binary,
    source_retime,
)
from pipeline.video_decode import iter_pictures
from pipeline.video_encode import encode_clip


@dataclass
class EncodeSource:
    """Encode the given clips of one source (frame ranges) at the configured size and rate."""

    width: int = 512
    height: int = 320
    fps: float | None = None
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"

    def __call__(self, job: dict) -> dict:
        """job: {source_uri, fps, vfr, ivtc, content_box, clips: [{clip_id, start_frame, end_frame}]} ->
        {source_uri, encoded: {clip_id: mp4 bytes}, errors: {clip_id: reason}, missing: why the source is not
        there, or None}."""
        clips = sorted(job["clips"], key=lambda c: c["start_frame"])
        src_fps = float(job["fps"])
        out_fps = float(self.fps or src_fps)
        wanted: dict[int, list[int]] = {}  # source frame -> clips that use it
        plans = {}
        for i, clip in enumerate(clips):
            frames = _resample(clip["start_frame"], clip["end_frame"], src_fps, out_fps)
            plans[clip["clip_id"]] = frames
            for f in frames:
                wanted.setdefault(f, []).append(i)
        buffers: dict[str, list[np.ndarray]] = {c["clip_id"]: [] for c in clips}
        encoded: dict[str, bytes] = {}
        errors: dict[str, str] = {}
        missing = None  # the source is not there (as opposed to a source that fails to decode)
        last = max(wanted) if wanted else -1
        try:
            _check_unchanged(job["source_uri"], job.get("source_id"))
            box = as_box(job.get("content_box"))
            # YUV planes from decoder to encoder (no RGB in between: half the cost of a frame)
            decoded = iter_pictures(
                job["source_uri"], self.width, self.height, box=box, only=wanted, retime=source_retime(job)
            )
            for index, image in enumerate(decoded):  # None for a frame in no clip
                for i in wanted.get(index, ()):
                    cid = clips[i]["clip_id"]
                    buffers[cid].append(image)
                    if len(buffers[cid]) == len(plans[cid]):
                        try:
                            encoded[cid] = encode_clip(
                                buffers.pop(cid), out_fps, self.codec, self.crf, self.preset
                            )
                        except Exception as exc:  # this clip's row, not a worker crash retried and given up
                            errors[cid] = f"write: encoding failed ({type(exc).__name__}: {exc})"
                if index >= last:
                    break
        except SourceError as exc:
            missing = str(exc) if isinstance(exc, SourceMissing) else None
            for cid in buffers:
                errors[cid] = f"write: {exc}"
        except Exception as exc:  # a decoder error no one foresaw: the clips not yet encoded fail, named
            for cid in buffers:
                errors.setdefault(cid, f"write: {type(exc).__name__}: {exc}")
        for cid in list(buffers):
            if cid not in encoded and cid not in errors:
                errors[cid] = "write: source ended before the clip's last frame"
        return {"source_uri": job["source_uri"], "encoded": encoded, "errors": errors, "missing": missing}


CHANGED = "changed since it was scored"  # in the reason of a replaced source's `write:` error rows


def says_changed(reason: str | None) -> bool:
    """Whether an error row's reason says its source was replaced since it was scored (`_check_unchanged`):
    a curate rerun scores it again."""
    return (reason or "").startswith("write: ") and f" {CHANGED} (content id " in reason


def _check_unchanged(uri: str, scored: str | None) -> None:
    """The source's bytes are those its clips were scored on (its content id): a file replaced under the
    same name (a new cut, a re-encode) had its frames written as the earlier file's clips, with their ids,
    scores and captions. Said as a source that is not there: select stops, curate makes error rows."""
    if not scored:
        return
    with open_binary(uri) as handle:
        now = source_id_from_stream(handle)
    if now != scored:
        raise SourceMissing(
            f"{uri} {CHANGED} (content id {scored}, now {now}): its clips' scores are of the earlier file; put"
            " that back, or curate the new one"
        )


def _resample(start: int, end: int, src_fps: float, out_fps: float) -> list[int]:
    """Source frame indices for a clip at out_fps (nearest frame; identity when the rates match)."""
    if abs(src_fps - out_fps) < 1e-6:
        return list(range(start, end))
    count = max(1, int(round((end - start) * out_fps / src_fps)))
    return [min(end - 1, start + int(round(k * src_fps / out_fps))) for k in range(count)]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same clips give the same shard
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    rows: list[dict], clip_dir: Path, shard_dir: Path, split: str, shard_bytes: int
) -> list[dict]:
    """Write the given kept rows (in order) as the next version of `shard_dir`; returns rows with
    shard/key set.

    The folder is built as `.<name>.tmp` (`staging_dir`); the caller swaps it in whole (`swap_in`)
    once every folder that belongs with it is complete, so a reader sees either the old complete set
    or the new one, and no stale shard of an earlier selection survives.
    """
    shard_dir = Path(shard_dir)
    tmp_dir = staging_dir(shard_dir)
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    out_rows: list[dict] = []
    shard_rows: list[dict] = []
    index = 0
    tar = None
    size = 0

    def close() -> None:
        nonlocal tar, shard_rows, index, size
        if tar is None:
            return
        tar.close()
        name = shard_name(index)
        table = to_table(shard_rows)
        pq.write_table(table, tmp_dir / f"{name}.parquet", compression="zstd")
        stats = {
            "shard": f"{split}/{name}.tar",
            "clips": len(shard_rows),
            "bytes": (tmp_dir / f"{name}.tar").stat().st_size,
            "frames": int(sum(r["num_frames"] or 0 for r in shard_rows)),
            "seconds": float(sum((r["end_s"] or 0) - (r["start_s"] or 0) for r in shard_rows)),
        }
        write_json_atomic(tmp_dir / f"{name}.stats.json", stats)
        tar, shard_rows, size = None, [], 0
        index += 1

    try:
        for row in rows:
            if tar is None:
                tar = tarfile.open(tmp_dir / f"{shard_name(index)}.tar", "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
            key = sample_key(row["clip_id"])
            row = {**row, "split": split, "shard": f"{split}/{shard_name(index)}.tar", "key": key}
            mp4 = (clip_dir / f"{row['clip_id']}.mp4").read_bytes()
            meta = json.dumps(
                {k: row.get(k) for k in CLIP_SCHEMA.names}, sort_keys=True, default=_json_default
            ).encode()
            _tar_member(tar, f"{key}.mp4", mp4)
            _tar_member(tar, f"{key}.json", meta)
            _tar_member(tar, f"{key}.txt", (row.get("caption") or "").encode())
            size += len(mp4) + len(meta)
            shard_rows.append(row)
            out_rows.append(row)
            if size >= shard_bytes:
                close()
        close()
    except OSError as exc:  # a write to an open tar or Parquet file names no file: the shard it was writing
        if not exc.filename:
            exc.filename = str(shard_dir / f"{shard_name(index)}.tar")
        raise
    return out_rows


def staging_dir(shard_dir: Path) -> Path:
    """Where `write_shards` builds the next version of `shard_dir`."""
    return shard_dir.parent / f".{shard_dir.name}.tmp"


def swap_in(shard_dir: Path) -> None:
    """Replace `shard_dir` with its complete staged version (two renames)."""
    old = shard_dir.parent / f".{shard_dir.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if shard_dir.exists():
        shard_dir.rename(old)
    staging_dir(shard_dir).rename(shard_dir)
    if old.exists():
        shutil.rmtree(old)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_clip(clip_dir: Path, clip_id: str, data: bytes) -> None:
    with atomic_path(clip_dir / f"{clip_id}.mp4", suffix=".mp4") as tmp:
        tmp.write_bytes(data)


def empty_table() -> pa.Table:
    return CLIP_SCHEMA.empty_table()
