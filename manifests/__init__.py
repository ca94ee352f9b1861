"""The data contract shared by curation, training and evaluation. Imports with pyarrow alone.

The names below load on first use, so that `manifests.files` (atomic writes) and `manifests.keys`
import with the standard library alone: the GPU machine, which has torch but not pyarrow, writes
the benches' compile caches through `manifests.files`.

Two modules serve every job beside the data contract, here because each package may import
`manifests` and none may import another's way back (ARCHITECTURE.md): `manifests.weights` (what a
weight file holds, one-line errors naming it) and `manifests.messages` (did-you-mean, YAML errors).
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
