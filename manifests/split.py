"""Near-duplicate groups and the leak-free train/eval split (pyarrow and the standard library only).

A clip's fingerprint is the perceptual hashes (64-bit pHash) of a few keyframes. Two clips are
near-duplicates when the summed Hamming distance of their corresponding keyframe hashes is at most
`max_distance`. Candidate pairs come from multi-index hashing: the concatenated hash is cut into
`max_distance + 1` bands, and by the pigeonhole principle two fingerprints within the distance
agree exactly on at least one band, so only clips sharing a band value are compared (no n^2 scan).

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


def _bands(fingerprint: Sequence[int], count: int) -> list[int]:
    bits = 0
    for value in fingerprint:
        bits = (bits << HASH_BITS) | int(value)
    total = HASH_BITS * len(fingerprint)
    edges = [round(i * total / count) for i in range(count + 1)]
    return [(bits >> (total - hi)) & ((1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]


def near_duplicate_pairs(
    fingerprints: dict[str, Sequence[int]], max_distance: int
) -> list[tuple[str, str, int]]:
    """All pairs (a, b, distance) with distance <= max_distance, a < b, each pair once."""
    usable = {k: v for k, v in fingerprints.items() if v}
    by_length: dict[int, list[str]] = defaultdict(list)
    for key, fp in usable.items():
        by_length[len(fp)].append(key)
    pairs: dict[tuple[str, str], int] = {}
    for length, keys in by_length.items():
        count = min(max_distance + 1, HASH_BITS * length)
        buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key in sorted(keys):
            for band, value in enumerate(_bands(usable[key], count)):
                buckets[(band, value)].append(key)
        for members in buckets.values():
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    if (a, b) in pairs:
                        continue
                    d = fingerprint_distance(usable[a], usable[b])
                    if d <= max_distance:
                        pairs[(a, b)] = d
    return sorted((a, b, d) for (a, b), d in pairs.items())


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
