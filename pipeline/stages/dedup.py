"""dedup: perceptual hashes of the clip's keyframes, for near-duplicate groups and the split.

pHash (imagehash, 64 bits: the DCT of a 32x32 grey image) of the first, middle and last frames,
taken from the grey analysis frames the shots stage already made (no RGB conversion again).
The grouping and the split themselves run once over the whole manifest (`manifests.split`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.stages.base import Stage


def phash64(image) -> int:
    """64-bit perceptual hash of a uint8 frame (grey [h, w] or RGB [h, w, 3])."""
    import imagehash
    from PIL import Image

    return int(str(imagehash.phash(Image.fromarray(image))), 16)


@dataclass
class DedupStage(Stage):
    name = "dedup"
    reads = ("analysis",)
    batch_size = 8

    def process(self, row: dict) -> dict:
        frames = row.get("analysis")
        if row.get("row_kind") != "clip" or frames is None or not len(frames):
            return row
        picks = (frames[0], frames[len(frames) // 2], frames[-1])  # first, mid, last like the keyframes
        return {**row, "phash": [phash64(f) for f in picks]}
