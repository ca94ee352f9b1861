"""The data contract shared by curation, training and evaluation. Imports with pyarrow alone.

The names below load on first use, so that `manifests.files` (atomic writes) and `manifests.keys`
import with the standard library alone: the GPU machine, which has torch but not pyarrow, writes
the benches' compile caches through `manifests.files`.
"""

from importlib import import_module

_HOMES = {
    "CLIP_SCHEMA": "manifests.schema",
    "SCHEMA_VERSION": "manifests.schema",
    "ManifestError": "manifests.io",
    "clip_id": "manifests.keys",
    "read_manifest": "manifests.io",
    "read_shard_index": "manifests.io",
    "sample_key": "manifests.keys",
    "shard_name": "manifests.keys",
    "write_manifest": "manifests.io",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'manifests' has no attribute {name!r}")
