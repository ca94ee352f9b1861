"""Near-duplicate groups and the leak-free train/eval split (the standard library; numpy for the pair search).

A clip's fingerprint is the perceptual hashes (64-bit pHash) of a few keyframes. Two clips are
near-duplicates when the summed Hamming distance of their corresponding keyframe hashes is at most
`max_distance`. Candidate pairs come from multi-index hashing: the concatenated hash is cut into
`max_distance + 1` bands, and by the pigeonhole principle two fingerprints within the distance
agree exactly on at least one band, so only clips sharing a band value are compared (no n^2 scan
over the whole set; a bucket of clips that share a flat frame's hash is compared as a matrix).

The split puts whole components in eval: clips linked by near-duplication (and, by default, by
coming from the same source) always land on the same side, so no group and no source leaks.
Components are taken in a deterministic pseudo-random order (a hash of their smallest clip id).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HASH_BITS = 64


class UnionFind:
    def __init__(self, items: Iterable[str]):
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller id becomes the root: components are named deterministically
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def components(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for item in self.parent:
            out[self.find(item)].append(item)
        return out


def fingerprint_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Summed Hamming distance of corresponding keyframe hashes."""
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


# Buckets up to this size are searched pair by pair (vectorised over all such buckets of a band at once);
# larger ones, which flat frames make (every flat picture has the same pHash), as distance matrices.
_SMALL_BUCKET = 64
_MATRIX_CELLS = 1 << 22  # cells of one block of a large bucket's distance matrix (x words x 8 bytes)


def _band_columns(hashes, count: int) -> list:
    """For each of `count` bands of the concatenated hashes (rows of an [n, words] uint64 array, the first
    word the most significant), an [n, pieces] array whose rows are equal exactly when the band's bits are."""
    import numpy as np

    total = HASH_BITS * hashes.shape[1]
    edges = [round(i * total / count) for i in range(count + 1)]
    bands = []
    for lo, hi in zip(edges, edges[1:]):
        pieces = []
        for word in range(lo // HASH_BITS, (hi - 1) // HASH_BITS + 1):
            top = max(lo - word * HASH_BITS, 0)  # bit offsets from the word's most significant bit
            bottom = min(hi - word * HASH_BITS, HASH_BITS)
            shifted = hashes[:, word] >> np.uint64(HASH_BITS - bottom)
            pieces.append(shifted & np.uint64((1 << (bottom - top)) - 1))
        bands.append(np.stack(pieces, axis=1))
    return bands


def _distances(hashes, i, j):
    import numpy as np

    return np.bitwise_count(hashes[i] ^ hashes[j]).sum(axis=-1, dtype=np.int64)


def _pairs_of_length(hashes, max_distance: int):
    """(i, j, distance) arrays of the row pairs i < j within `max_distance`, each pair once."""
    import numpy as np

    n = len(hashes)
    count = min(max_distance + 1, HASH_BITS * hashes.shape[1])
    found: list[tuple] = []
    seen_large: set[bytes] = set()
    for band in _band_columns(hashes, count):
        _, label = np.unique(band, axis=0, return_inverse=True)
        order = np.argsort(label.ravel(), kind="stable")  # rows of a bucket stay in ascending order
        sorted_label = label.ravel()[order]
        starts = np.flatnonzero(np.r_[True, sorted_label[1:] != sorted_label[:-1]])
        sizes = np.diff(np.r_[starts, n])
        # small buckets: the pairs (p, p + k) of sorted positions inside one bucket, for k = 1, 2, ...
        small = (sizes > 1) & (sizes <= _SMALL_BUCKET)
        end_of = np.repeat(starts + sizes, sizes)
        live = np.flatnonzero(np.repeat(small, sizes))
        k = 1
        while live.size:
            live = live[live + k < end_of[live]]
            if live.size:
                i, j = order[live], order[live + k]
                d = _distances(hashes, i, j)
                near = d <= max_distance
                found.append((i[near], j[near], d[near]))
            k += 1
        # large buckets: block by block of the upper triangle of their distance matrix
        for start, size in zip(starts[sizes > _SMALL_BUCKET], sizes[sizes > _SMALL_BUCKET]):
            members = order[start : start + size]
            signature = members.tobytes()
            if signature in seen_large:  # the same rows share several bands (a flat first frame)
                continue
            seen_large.add(signature)
            rows = max(1, _MATRIX_CELLS // int(size))
            for r0 in range(0, int(size), rows):
                a = members[r0 : r0 + rows]
                b = members[r0:]
                d = _distances(hashes, a[:, None], b[None, :])
                upper = np.arange(len(b))[None, :] > np.arange(len(a))[:, None]  # b[c] comes after a[r]
                ri, ci = np.nonzero(upper & (d <= max_distance))
                found.append((a[ri], b[ci], d[ri, ci]))
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    i, j, d = (np.concatenate(parts) for parts in zip(*found))
    code, first = np.unique(i.astype(np.int64) * n + j, return_index=True)  # sorted by (i, j), once each
    return code // n, code % n, d[first]


def near_duplicate_pairs(
    fingerprints: dict[str, Sequence[int]], max_distance: int
) -> list[tuple[str, str, int]]:
    """All pairs (a, b, distance) with distance <= max_distance, a < b, each pair once.

    Vectorised with numpy (imported here, so that `manifests` still imports with pyarrow alone): the
    paper's 271K clips are searched in seconds even when thousands of them share a flat first frame."""
    import numpy as np

    usable = {k: v for k, v in fingerprints.items() if v}
    by_length: dict[int, list[str]] = defaultdict(list)
    for key, fp in usable.items():
        by_length[len(fp)].append(key)
    pairs = []
    for keys in by_length.values():
        keys.sort()
        hashes = np.array([[int(h) for h in usable[k]] for k in keys], dtype=np.uint64)
        for i, j, d in zip(*_pairs_of_length(hashes, max_distance)):
            pairs.append((keys[i], keys[j], int(d)))
    return sorted(pairs)


@dataclass
class SplitResult:
    group_of: dict[str, str]  # clip id -> near-duplicate group id
    split_of: dict[str, str]  # clip id -> "train" | "eval"
    eval_size: int
    target: int


def _order_key(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def assign_split(
    clips: Sequence[dict],
    eval_size: int = 1000,
    max_distance: int = 12,
    by_source: bool = True,
    max_eval_fraction: float = 0.25,
    seed: int = 0,
) -> SplitResult:
    """clips: dicts with clip_id, source_id and phash (list of ints). Returns groups and splits.

    Eval gets exactly min(eval_size, floor(max_eval_fraction * len(clips))) clips when whole
    components can reach it (components that would overshoot are skipped); the rest is train.
    """
    ids = [c["clip_id"] for c in clips]
    groups = UnionFind(ids)
    for a, b, _ in near_duplicate_pairs({c["clip_id"]: c.get("phash") or [] for c in clips}, max_distance):
        groups.union(a, b)
    group_of = {cid: "g" + groups.find(cid) for cid in ids}
    linked = UnionFind(ids)
    for cid in ids:
        linked.union(cid, groups.find(cid))
    if by_source:
        first_of_source: dict[str, str] = {}
        for c in clips:
            first = first_of_source.setdefault(c["source_id"], c["clip_id"])
            linked.union(first, c["clip_id"])
    target = min(eval_size, int(max_eval_fraction * len(ids)))
    split_of = {cid: "train" for cid in ids}
    taken = 0
    for _root, members in sorted(linked.components().items(), key=lambda kv: _order_key(kv[0], seed)):
        if taken == target:
            break
        if taken + len(members) <= target:
            for cid in members:
                split_of[cid] = "eval"
            taken += len(members)
    return SplitResult(group_of, split_of, taken, target)


def cross_split_pairs(clips: Sequence[dict], max_distance: int = 12) -> list[dict]:
    """The leak check: near-duplicate pairs (and shared sources) across train and eval."""
    by_id = {c["clip_id"]: c for c in clips if c.get("split") in ("train", "eval")}
    leaks = []
    for a, b, d in near_duplicate_pairs({k: v.get("phash") or [] for k, v in by_id.items()}, max_distance):
        if by_id[a]["split"] != by_id[b]["split"]:
            leaks.append({"kind": "near-duplicate", "a": a, "b": b, "distance": d})
    sources: dict[str, set[str]] = defaultdict(set)
    for c in by_id.values():
        sources[c["source_id"]].add(c["split"])
    for source, splits in sorted(sources.items()):
        if len(splits) > 1:
            leaks.append({"kind": "source", "a": source, "b": source, "distance": None})
    return leaks
