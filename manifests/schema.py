"""The clip manifest's schema: one row per candidate clip, rejected and failed ones included.

Every number in a report must be recomputable from these rows, so every stage writes its score
even when it rejects, and errors are rows with `status=error` and a reason, never dropped.
The schema is versioned: `schema_version` lives in the Parquet file's key/value metadata together
with the resolved job config and the code version (see `manifests.io`).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.2"  # 1.1: content_box; 1.2: vfr, ivtc

# The values a reader may rely on (checked when a manifest is read: manifests.io).
STATUSES = ("kept", "rejected", "error")
SPLITS = ("train", "eval", "none")

# (name, type, what it holds). Order is the column order on disk.
_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    # identity
    ("clip_id", pa.string(), "hash of source content id + frame range; the WebDataset key"),
    ("source_id", pa.string(), "content hash (sha256, hex prefix) of the source file"),
    ("source_uri", pa.string(), "where the source was read from (path or object-store URI)"),
    ("group_id", pa.string(), "near-duplicate / series group; the split follows it"),
    # geometry and time
    ("start_frame", pa.int64(), "first frame of the clip in the source"),
    ("end_frame", pa.int64(), "one past the last frame of the clip (exclusive)"),
    ("start_s", pa.float64(), "start time in seconds"),
    ("end_s", pa.float64(), "end time in seconds (exclusive)"),
    (
        "fps",
        pa.float64(),
        "source frame rate (a variable-rate source: the rate of the grid its frames are put on)",
    ),
    (
        "vfr",
        pa.bool_(),
        "the source's frame rate varies: frame numbers count a constant grid at `fps` (FFmpeg's fps"
        " filter: a frame shown longer repeats). Null or false: the source's own frames",
    ),
    (
        "ivtc",
        pa.bool_(),
        "the source is telecined film (3:2 pulldown found by FFmpeg's idet): frame numbers count its film"
        " frames (fieldmatch, yadif, decimate), `fps` their rate (29.97 -> 23.976). Null or false: not",
    ),
    (
        "width",
        pa.int32(),
        "source frame width in pixels, as displayed (a 90-degree display rotation swaps them)",
    ),
    ("height", pa.int32(), "source frame height in pixels, as displayed"),
    ("num_frames", pa.int64(), "end_frame - start_frame"),
    ("codec", pa.string(), "source video codec"),
    (
        "content_box",
        pa.list_(pa.int32()),
        "the picture inside black bars (letterbox/pillarbox) as [x, y, width, height] in source pixels;"
        " clips are cut from it. Null: the whole frame",
    ),
    ("shot_index", pa.int32(), "index of the shot in the source"),
    ("window_index", pa.int32(), "index of the window inside a long shot (0 for short shots)"),
    # animation timing
    ("distinct_frames", pa.int64(), "number of distinct drawings (held frames collapsed)"),
    ("held_ratio", pa.float64(), "fraction of frames that repeat their predecessor"),
    ("timing", pa.string(), "ones / twos / threes / mixed / none (pipeline/stages/timing.py)"),
    # scores: every stage writes its score, also when it rejects
    (
        "motion_mean",
        pa.float64(),
        "mean optical-flow magnitude between distinct frames, in % of frame diagonal",
    ),
    ("motion_p90", pa.float64(), "90th percentile of per-pair mean flow magnitude, in % of frame diagonal"),
    (
        "motion_residual",
        pa.float64(),
        "mean flow left after removing the median (camera) translation, % of diagonal",
    ),
    ("text_area", pa.float64(), "fraction of the frame covered by text boxes (max over sampled frames)"),
    ("text_backend", pa.string(), "which text detector scored the clip (craft / ppocr)"),
    ("aesthetic_first", pa.float64(), "LAION aesthetic score of the first frame"),
    ("aesthetic_mid", pa.float64(), "LAION aesthetic score of the middle frame"),
    ("aesthetic_last", pa.float64(), "LAION aesthetic score of the last frame"),
    ("aesthetic_min", pa.float64(), "minimum of the three"),
    ("caption", pa.string(), "BLIP-2 caption"),
    ("clip_sim_first", pa.float64(), "CLIP caption/frame similarity, first frame"),
    ("clip_sim_mid", pa.float64(), "CLIP caption/frame similarity, middle frame"),
    ("clip_sim_last", pa.float64(), "CLIP caption/frame similarity, last frame"),
    ("clip_sim_min", pa.float64(), "minimum of the three"),
    ("phash", pa.list_(pa.uint64()), "perceptual hashes of a few keyframes (dedup)"),
    # lineage
    ("models", pa.string(), "JSON: stage -> {model, weights sha256} for each scoring stage that ran"),
    ("thresholds", pa.string(), "JSON: the thresholds this row's status was decided with"),
    ("stages_run", pa.list_(pa.string()), "stages that scored this row (skipped stages are absent)"),
    # outcome
    ("status", pa.string(), "kept / rejected / error"),
    (
        "reason",
        pa.string(),
        "rejecting stage and threshold (e.g. 'motion: motion_mean 0.01 < motion.min 0.3') or the error",
    ),
    ("split", pa.string(), "train / eval / none"),
    ("shard", pa.string(), "shard path relative to the shards folder (e.g. train/000000.tar), or null"),
    ("key", pa.string(), "sample key inside the shard, or null"),
]

CLIP_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in _COLUMNS])

# Columns every manifest has had since its first version: without them a row is no clip.
REQUIRED_COLUMNS = ("clip_id", "source_id", "source_uri", "start_frame", "end_frame", "status", "split")
# The columns a stage writes when it scores a row (it is then in the row's `stages_run`).
STAGE_COLUMNS = {
    "motion": ("motion_mean",),
    "text": ("text_area",),
    "aesthetic": ("aesthetic_min",),
    "caption": ("caption",),
    "alignment": ("clip_sim_min",),
}


# What every row of a source repeats from the source's probe.
SOURCE_COLUMNS = ("source_id", "source_uri", "fps", "vfr", "ivtc", "width", "height", "codec", "content_box")


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts; missing columns are null, extra keys are an error) -> a table in schema order."""
    names = set(CLIP_SCHEMA.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"manifest row has columns outside the schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in CLIP_SCHEMA.names}
    return pa.table(columns, schema=CLIP_SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """Cast a table to the schema: missing columns become nulls, extra columns are an error."""
    extra = set(table.column_names) - set(CLIP_SCHEMA.names)
    if extra:
        raise ValueError(f"table has columns outside the manifest schema: {sorted(extra)}")
    arrays = []
    for field in CLIP_SCHEMA:
        if field.name in table.column_names:
            arrays.append(table[field.name].cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=CLIP_SCHEMA)
