"""The data contract: schema, deterministic ids, versioned reading and writing."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import CLIP_SCHEMA, SCHEMA_VERSION, ManifestError, clip_id, read_manifest, write_manifest
from manifests.io import manifest_config, read_shard_index
from manifests.keys import sample_key, source_id_from_stream
from manifests.schema import to_table


def test_manifests_import_with_pyarrow_alone():
    code = (
        "import sys, manifests; bad = {'torch', 'ray', 'av', 'cv2'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clip_id_is_deterministic_and_depends_on_range_and_content():
    assert clip_id("abc", 0, 48) == clip_id("abc", 0, 48)
    assert clip_id("abc", 0, 48) != clip_id("abc", 0, 49)
    assert clip_id("abc", 0, 48) != clip_id("abd", 0, 48)
    assert "." not in sample_key(clip_id("abc", 0, 48))
    with pytest.raises(ValueError):
        sample_key("a.b")


def test_source_id_is_a_content_hash(tmp_path):
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    ids = [source_id_from_stream(p.open("rb")) for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


def test_write_read_round_trip_keeps_rows_version_and_config(tmp_path):
    rows = [
        {
            "clip_id": "c1",
            "source_id": "s",
            "source_uri": "x.mp4",
            "start_frame": 0,
            "end_frame": 48,
            "status": "kept",
        },
        {
            "clip_id": "c2",
            "source_id": "s",
            "source_uri": "x.mp4",
            "status": "error",
            "reason": "probe: zero-byte file",
        },
    ]
    path = write_manifest(to_table(rows), tmp_path / "m.parquet", config={"motion": {"min": 0.2}})
    table = read_manifest(path)
    assert table.schema.equals(CLIP_SCHEMA)
    assert table["clip_id"].to_pylist() == ["c1", "c2"]
    assert table["reason"].to_pylist()[1] == "probe: zero-byte file"
    assert manifest_config(path) == {"motion": {"min": 0.2}}
    meta = pq.read_schema(path).metadata
    assert meta[b"inbetweener.schema_version"].decode() == SCHEMA_VERSION
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_manifest_config_that_cannot_be_read_is_a_manifest_error(tmp_path):
    path = write_manifest(to_table([{"clip_id": "c1", "status": "kept"}]), tmp_path / "m.parquet", config={})
    table = pq.read_table(path)
    meta = table.schema.metadata
    for value, expected in ((b"{not json", "is not JSON"), (b"[1, 2]", "is not a JSON object")):
        pq.write_table(table.replace_schema_metadata({**meta, b"inbetweener.config": value}), path)
        with pytest.raises(ManifestError, match=expected):
            manifest_config(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ManifestError, match="m.parquet: not a readable Parquet manifest"):
        manifest_config(path)


def test_extra_columns_and_foreign_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="outside the schema"):
        to_table([{"clip_id": "c", "surprise": 1}])
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    with pytest.raises(ManifestError, match="schema_version"):
        read_manifest(foreign)
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "missing.parquet")


def test_shard_index_of_empty_folder_is_empty(tmp_path):
    assert read_shard_index(tmp_path).num_rows == 0


def test_a_manifest_of_schema_1_0_reads_with_the_new_columns_null(tmp_path):
    """1.1 added `content_box`; a 1.0 file (no such column) still reads, the box null (whole frame);
    another major version is refused."""
    old = to_table([{"clip_id": "c1", "source_uri": "a.mp4", "status": "kept"}]).drop_columns(["content_box"])
    for version, readable in (("1.0", True), ("2.0", False)):
        path = tmp_path / f"v{version}.parquet"
        pq.write_table(old.replace_schema_metadata({"inbetweener.schema_version": version}), path)
        if readable:
            table = read_manifest(path)
            assert table.schema.equals(CLIP_SCHEMA) and table["content_box"].to_pylist() == [None]
        else:
            with pytest.raises(ManifestError, match="schema version 2.0"):
                read_manifest(path)


def test_a_status_or_split_outside_the_contract_is_an_error_naming_the_file_and_values(tmp_path):
    """A manifest edited by another tool ('Kept', 'val') must not be read as something else: select
    re-decides every status but 'error' and 'rejected', so 'Error' rows would come back as clips."""
    rows = [
        {"clip_id": f"c{i}", "source_uri": "a.mp4", "status": s, "split": sp}
        for i, (s, sp) in enumerate(
            [("kept", "train"), ("Error", None), ("kept", "eval"), ("rejected", "none")]
        )
    ]
    path = write_manifest(to_table(rows), tmp_path / "m.parquet")
    with pytest.raises(
        ManifestError, match=r"m\.parquet: 1 row\(s\) with status outside kept / rejected / error: 'Error'"
    ):
        read_manifest(path)
    rows[1]["status"] = "error"
    rows[2]["split"] = "val"
    path = write_manifest(to_table(rows), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="split outside train / eval / none: 'val'"):
        read_manifest(path)
    rows[2]["split"] = "eval"
    assert read_manifest(write_manifest(to_table(rows), tmp_path / "m.parquet")).num_rows == 4  # nulls pass


def _edited(tmp_path, table: pa.Table, name: str):
    """A manifest as another tool leaves it: other columns, the file's metadata kept."""
    path = tmp_path / name
    pq.write_table(table.replace_schema_metadata({"inbetweener.schema_version": SCHEMA_VERSION}), path)
    return path


def test_a_manifest_edited_elsewhere_is_read_or_refused_by_name(tmp_path):
    """Edits that were tracebacks deep in select (a pandas index column, a dropped clip_id) or that let
    clips through it (a dropped score column, a duplicated row written into the shards twice) are one
    line naming the file and the problem; a pandas index is no data and is dropped."""
    base = to_table(
        [
            {"clip_id": f"c{i}", "source_id": "s", "source_uri": "a.mp4", "start_frame": 0, "end_frame": 9,
             "status": "kept", "split": "train", "text_area": 0.0, "stages_run": ["shots", "text"]}
            for i in range(3)
        ]
    )  # fmt: skip
    indexed = base.append_column("__index_level_0__", pa.array([0, 1, 2]))
    assert read_manifest(_edited(tmp_path, indexed, "pandas.parquet")).schema.equals(CLIP_SCHEMA)
    mine = base.append_column("notes", pa.array(["", "", ""]))
    with pytest.raises(ManifestError, match=r"mine\.parquet: columns outside the manifest schema: notes"):
        read_manifest(_edited(tmp_path, mine, "mine.parquet"))
    with pytest.raises(ManifestError, match=r"no clip_id column"):
        read_manifest(_edited(tmp_path, base.drop_columns(["clip_id"]), "noid.parquet"))
    with pytest.raises(ManifestError, match=r"no text_area column, though its stage scored the clips"):
        read_manifest(_edited(tmp_path, base.drop_columns(["text_area"]), "notext.parquet"))
    broken = to_table(  # two byte-identical copies of a file that does not decode: one source-level id
        [{"clip_id": "src", "source_id": "s", "source_uri": u, "status": "error", "reason": "probe: not a video"}
         for u in ("a.mp4", "copy of a.mp4")]
    )  # fmt: skip
    assert read_manifest(_edited(tmp_path, broken, "copies.parquet")).num_rows == 2
    twice = pa.concat_tables([base, base.slice(1, 1)])
    with pytest.raises(ManifestError, match=r"twice\.parquet: 1 clip id\(s\) on more than one row: c1"):
        read_manifest(_edited(tmp_path, twice, "twice.parquet"))
    words = base.set_column(base.schema.get_field_index("text_area"), "text_area", pa.array(["low"] * 3))
    with pytest.raises(ManifestError, match=r"words\.parquet: not a readable Parquet manifest"):
        read_manifest(_edited(tmp_path, words, "words.parquet"))
