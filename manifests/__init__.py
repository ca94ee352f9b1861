"""The data contract shared by curation, training and evaluation. Imports with pyarrow alone."""

from manifests.io import ManifestError, read_manifest, read_shard_index, write_manifest
from manifests.keys import clip_id, sample_key, shard_name
from manifests.schema import CLIP_SCHEMA, SCHEMA_VERSION

__all__ = [
    "CLIP_SCHEMA",
    "SCHEMA_VERSION",
    "ManifestError",
    "clip_id",
    "read_manifest",
    "read_shard_index",
    "sample_key",
    "shard_name",
    "write_manifest",
]
