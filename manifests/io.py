"""Reading and writing manifests and shard indexes, with atomic visibility (manifests/files.py).

A file becomes visible only when complete: everything is written to a temporary name in the same
folder, then renamed. Readers therefore never see half a manifest, even after `kill -9`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.files import atomic_path
from manifests.schema import (
    CLIP_SCHEMA,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    SPLITS,
    STAGE_COLUMNS,
    STATUSES,
    conform,
)

CODE_VERSION = "0.1.0"


class ManifestError(ValueError):
    """A manifest file that cannot be read as this project's manifest."""


def manifest_metadata(config: dict | None = None) -> dict[bytes, bytes]:
    return {
        b"inbetweener.schema_version": SCHEMA_VERSION.encode(),
        b"inbetweener.code_version": CODE_VERSION.encode(),
        b"inbetweener.config": json.dumps(config or {}, sort_keys=True, default=str).encode(),
    }


def write_manifest(table: pa.Table, path: Path | str, config: dict | None = None) -> Path:
    """Write clip rows (any subset of the schema's columns) as a versioned Parquet file."""
    table = conform(table)
    table = table.replace_schema_metadata(manifest_metadata(config))
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_manifest(path: Path | str) -> pa.Table:
    """Read a manifest file (or a folder of parquet parts) and check its schema version."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest")
    try:
        if path.is_dir():
            parts = sorted(path.glob("*.parquet"))
            if not parts:
                raise ManifestError(f"{path}: folder holds no .parquet parts")
            table = pa.concat_tables([_read_one(p) for p in parts])
        else:
            table = _read_one(path)
    except (pa.ArrowException, OSError) as exc:  # ArrowException: also a column cast another type can't take
        raise ManifestError(f"{path}: not a readable Parquet manifest ({exc})") from exc
    _check_unique_ids(path, table)
    return table


_PANDAS_INDEX = re.compile(r"__index_level_\d+__")  # a DataFrame's index, written as a column by to_parquet


def _check_columns(path: Path, table: pa.Table) -> None:
    """A manifest edited by hand or by another tool: the columns this code relies on are there, and a
    stage that scored the rows left its score (a dropped `text_area` let title cards through select); a
    column of one's own would be lost at the next write, so it is named rather than dropped."""
    names = set(table.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ManifestError(
            f"{path}: no {', '.join(missing)} column (every manifest has it); not a clip manifest"
        )
    extra = sorted(names - set(CLIP_SCHEMA.names))
    if extra:
        raise ManifestError(
            f"{path}: columns outside the manifest schema: {', '.join(extra)} (keep your own columns in"
            " another table keyed by clip_id; this one is rewritten by select and curate)"
        )
    if "stages_run" in names:
        ran = set(pc.list_flatten(table["stages_run"]).unique().to_pylist()) - {None}
        lost = [c for stage in sorted(ran) for c in STAGE_COLUMNS.get(stage, ()) if c not in names]
        if lost:
            raise ManifestError(
                f"{path}: no {', '.join(lost)} column, though its stage scored the clips; its thresholds could"
                " not be applied (`inbetweener curate` again rescores the clips)"
            )


def _check_unique_ids(path: Path, table: pa.Table) -> None:
    """Each clip once: a duplicated row (manifests concatenated, a row pasted twice) would be written
    into the shards twice. Error rows never are (but a write error's, which select tries again): two
    byte-identical copies of a file that does not decode are two error rows with one source-level id."""
    status, reason = table["status"], pc.fill_null(table["reason"], "")
    may_be_written = pc.or_(
        pc.invert(pc.equal(pc.fill_null(status, ""), "error")), pc.starts_with(reason, "write:")
    )
    ids = pc.drop_null(pc.filter(table["clip_id"], may_be_written))
    counts = pc.value_counts(ids)
    twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    if twice:
        shown = ", ".join(sorted(twice)[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
        raise ManifestError(f"{path}: {len(twice)} clip id(s) on more than one row: {shown}")


def _read_one(path: Path) -> pa.Table:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    version = meta.get(b"inbetweener.schema_version", b"").decode()
    if not version:
        raise ManifestError(
            f"{path}: no inbetweener.schema_version in the file metadata; not a clip manifest"
        )
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ManifestError(f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}")
    table = table.drop_columns([c for c in table.column_names if _PANDAS_INDEX.fullmatch(c)])
    _check_columns(path, table)
    table = conform(table.replace_schema_metadata(None))
    for column, allowed in (("status", STATUSES), ("split", SPLITS)):
        _check_values(path, table, column, allowed)
    return table


def _check_values(path: Path, table: pa.Table, column: str, allowed: tuple[str, ...]) -> None:
    """A value outside the contract (a manifest edited by hand or by another tool: 'Kept', 'val') would
    be read as something else downstream (select re-decides any status but 'error' and 'rejected')."""
    values = table.column(column)
    bad = pc.filter(values, pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(allowed)))))
    if len(bad):
        seen = sorted(set(bad.to_pylist()))
        shown = ", ".join(repr(v) for v in seen[:5]) + (", ..." if len(seen) > 5 else "")
        raise ManifestError(f"{path}: {len(bad)} row(s) with {column} outside {' / '.join(allowed)}: {shown}")


def manifest_config(path: Path | str) -> dict:
    """The resolved job config stored in a manifest's metadata (ManifestError when the file or its config
    cannot be read: a manifest cut short by a copy, metadata rewritten by another tool)."""
    try:
        meta = pq.read_schema(path).metadata or {}
        config = json.loads(meta.get(b"inbetweener.config", b"{}"))
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet manifest ({exc})") from exc
    except ValueError as exc:  # json's JSONDecodeError, UnicodeDecodeError
        raise ManifestError(
            f"{path}: its job config (inbetweener.config metadata) is not JSON ({exc})"
        ) from exc
    if not isinstance(config, dict):
        raise ManifestError(f"{path}: its job config (inbetweener.config metadata) is not a JSON object")
    return config


def read_shard_index(shard_dir: Path | str) -> pa.Table:
    """The rows of every shard in a folder (from the `NNNNNN.parquet` siblings), in shard order."""
    shard_dir = Path(shard_dir)
    parts = sorted(p for p in shard_dir.glob("*.parquet") if not p.name.startswith("."))
    if not parts:
        return CLIP_SCHEMA.empty_table()
    return pa.concat_tables([conform(pq.read_table(p).replace_schema_metadata(None)) for p in parts])


def list_shards(shard_dir: Path | str) -> list[Path]:
    """Complete shard tars of a folder in order (temporary files are hidden by a leading dot)."""
    return sorted(p for p in Path(shard_dir).glob("*.tar") if not p.name.startswith("."))


def write_split_history(history, path: Path | str, settings: dict) -> Path:
    """The split's memory (manifests.split.PreviousSplit): every clip and source id with its side, and
    the split settings it holds for (a split drawn with other settings is another split)."""
    ids = [*history.clips, *history.sources]
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "kind": pa.array(["clip"] * len(history.clips) + ["source"] * len(history.sources), pa.string()),
            "split": pa.array([*history.clips.values(), *history.sources.values()], pa.string()),
        }
    ).replace_schema_metadata({b"inbetweener.split_settings": json.dumps(settings, sort_keys=True).encode()})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_split_history(path: Path | str):
    """(PreviousSplit, the settings it was drawn with) from `write_split_history`'s file."""
    from manifests.split import PreviousSplit

    try:
        table = pq.read_table(path)
        settings = json.loads((table.schema.metadata or {})[b"inbetweener.split_settings"])
        ids, kinds, splits = (table.column(c).to_pylist() for c in ("id", "kind", "split"))
    except (pa.ArrowInvalid, OSError, KeyError, ValueError) as exc:
        raise ManifestError(
            f"{path}: not a readable split history ({exc}); delete it to draw the split afresh"
        ) from exc
    clips = {i: s for i, k, s in zip(ids, kinds, splits) if k == "clip"}
    sources = {i: s for i, k, s in zip(ids, kinds, splits) if k == "source"}
    return PreviousSplit(clips, sources), settings
