"""Deterministic identities: source content ids, clip ids and sample keys.

The same source bytes and the same frame range always give the same clip id, whatever the file
is called or where it lives, so runs can be resumed, diffed and audited.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

SOURCE_ID_CHARS = 16  # hex chars kept of the sha256: 64 bits, ample for millions of files
CLIP_ID_CHARS = 16


def source_id_from_stream(stream: BinaryIO, chunk_size: int = 1 << 20) -> str:
    """Content id of a source: sha256 over all of its bytes (hex prefix)."""
    digest = hashlib.sha256()
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()[:SOURCE_ID_CHARS]


def clip_id(source_id: str, start_frame: int, end_frame: int) -> str:
    """Clip id = hash of the source content id and the frame range [start, end)."""
    text = f"{source_id}:{int(start_frame)}:{int(end_frame)}"
    return hashlib.sha256(text.encode()).hexdigest()[:CLIP_ID_CHARS]


def sample_key(clip_id_: str) -> str:
    """WebDataset key of a clip. Keys must not contain dots (webdataset splits on them)."""
    if "." in clip_id_ or "/" in clip_id_:
        raise ValueError(f"clip id {clip_id_!r} cannot be a WebDataset key")
    return clip_id_


def shard_name(index: int) -> str:
    """`000000` for index 0: shards sort lexically in write order."""
    return f"{index:06d}"
