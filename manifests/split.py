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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


# Buckets up to _SMALL_BUCKET clips are searched pair by pair (vectorised over all such buckets of a band
# at once), up to _MATRIX_BUCKET as a distance matrix (a repeated opening's copies). Larger ones, which
# flat frames make (every flat picture has the same pHash), are searched again with bands over the bits
# that split their members (down to _MAX_DEPTH levels), when their band was wide enough to be a real
# coincidence (_RESEARCH_BITS: the narrow bands of a large max_distance make large buckets by chance);
# what is still large then is a distance matrix too.
_SMALL_BUCKET = 64
_MATRIX_BUCKET = 256
_MAX_DEPTH = 1
_RESEARCH_BITS = 8
_MATRIX_CELLS = 1 << 22  # cells of one block of a distance matrix (x words x 8 bytes)


def _distances(hashes, i, j):
    import numpy as np

    return np.bitwise_count(hashes[i] ^ hashes[j]).sum(axis=-1, dtype=np.int64)


def _labels(packed):
    """Bucket labels of rows of packed band bits: equal rows, equal labels."""
    import numpy as np

    if packed.shape[1] <= 8:  # one integer per row: a 1-D unique, much faster than rows
        padded = np.zeros((len(packed), 8), dtype=np.uint8)
        padded[:, 8 - packed.shape[1] :] = packed
        return np.unique(padded.view(">u8").ravel(), return_inverse=True)[1].ravel()
    return np.unique(packed, axis=0, return_inverse=True)[1].ravel()


class _Search:
    """Multi-index hashing over distinct fingerprints: rows of `hashes` ([n, words] uint64), their bits
    in `bits` ([n, 64 * words] booleans, the first word's most significant bit first)."""

    def __init__(self, hashes, max_distance: int):
        import numpy as np

        self.hashes, self.max_distance = hashes, max_distance
        self.bits = np.unpackbits(hashes.astype(">u8").view(np.uint8), axis=1).astype(bool)
        self.found: list[tuple] = []

    def run(self) -> tuple:
        """(i, j, distance) arrays of the pairs i < j within max_distance, each pair once, sorted."""
        import numpy as np

        n = len(self.hashes)
        self._search(np.arange(n), np.arange(self.bits.shape[1]), 0)
        if not self.found:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        i, j, d = (np.concatenate(parts) for parts in zip(*self.found))
        code, first = np.unique(i.astype(np.int64) * n + j, return_index=True)  # sorted by (i, j), once
        return code // n, code % n, d[first]

    def _search(self, rows, columns, depth: int) -> None:
        """The near pairs among `rows` (ascending), by bands over the bit `columns` (any subset of the bits:
        a pair within the distance agrees on one of max_distance + 1 bands of any subset)."""
        import numpy as np

        count = self.max_distance + 1
        if len(columns) < count:  # too few bits for the pigeonhole: every pair, as a matrix
            self._matrix(rows)
            return
        edges = [round(k * len(columns) / count) for k in range(count + 1)]
        seen_large: set[bytes] = set()
        for lo, hi in zip(edges, edges[1:]):
            band = columns[lo:hi]
            label = _labels(np.packbits(self.bits[np.ix_(rows, band)], axis=1))
            order = np.argsort(label, kind="stable")  # positions in rows; a bucket stays ascending
            sorted_label = label[order]
            starts = np.flatnonzero(np.r_[True, sorted_label[1:] != sorted_label[:-1]])
            sizes = np.diff(np.r_[starts, len(rows)])
            self._small_buckets(rows[order], starts, sizes)
            rest = np.concatenate([columns[:lo], columns[hi:]])
            for start, size in zip(starts[sizes > _SMALL_BUCKET], sizes[sizes > _SMALL_BUCKET]):
                members = rows[order[start : start + size]]
                signature = members.tobytes()
                if signature in seen_large:  # the same rows share several bands (a flat frame's word)
                    continue
                seen_large.add(signature)
                if size <= _MATRIX_BUCKET or depth >= _MAX_DEPTH or hi - lo < _RESEARCH_BITS:
                    self._matrix(members)
                    continue
                self._search(members, rest[self._informative(members, rest)], depth + 1)

    def _informative(self, rows, columns):
        """Which of `columns` split `rows` (at least 1 in 8 on the rarer side). Bands over any subset of the
        bits find every near pair (a pair within the distance is within it on any subset too); bits that
        the bucket's members nearly all share (a flat frame's word, with a few chance members) would only
        rebuild the same bucket."""
        import numpy as np

        ones = self.bits[rows][:, columns].mean(axis=0)
        return np.minimum(ones, 1 - ones) >= 1 / 8

    def _small_buckets(self, ordered, starts, sizes) -> None:
        """Every pair inside each bucket of 2.._SMALL_BUCKET rows: positions (p, p + k) for k = 1, 2, ..."""
        import numpy as np

        small = (sizes > 1) & (sizes <= _SMALL_BUCKET)
        end_of = np.repeat(starts + sizes, sizes)
        live = np.flatnonzero(np.repeat(small, sizes))
        k = 1
        while live.size:
            live = live[live + k < end_of[live]]
            if live.size:
                i, j = ordered[live], ordered[live + k]
                d = _distances(self.hashes, i, j)
                near = d <= self.max_distance
                self.found.append((i[near], j[near], d[near]))
            k += 1

    def _matrix(self, members) -> None:
        """Every pair of `members` (ascending), block by block of the upper triangle."""
        import numpy as np

        rows = max(1, _MATRIX_CELLS // len(members))
        for r0 in range(0, len(members), rows):
            a, b = members[r0 : r0 + rows], members[r0:]
            d = _distances(self.hashes, a[:, None], b[None, :])
            upper = np.arange(len(b))[None, :] > np.arange(len(a))[:, None]  # b[c] comes after a[r]
            ri, ci = np.nonzero(upper & (d <= self.max_distance))
            self.found.append((a[ri], b[ci], d[ri, ci]))


@dataclass
class _Fingerprints:
    """The distinct fingerprints of one length, their clips, and the near pairs among them."""

    clips: list[list[str]]  # per distinct fingerprint, its clips (sorted)
    pairs: list[tuple[int, int, int]]  # (u, v, distance) between distinct fingerprints, u < v


def _distinct_near_pairs(fingerprints: dict[str, Sequence[int]], max_distance: int) -> list[_Fingerprints]:
    import numpy as np

    by_length: dict[int, list[str]] = defaultdict(list)
    for key, fp in fingerprints.items():
        if fp:
            by_length[len(fp)].append(key)
    out = []
    for keys in by_length.values():
        keys.sort()
        hashes = np.array([[int(h) for h in fingerprints[k]] for k in keys], dtype=np.uint64)
        distinct, which = np.unique(hashes, axis=0, return_inverse=True)
        clips: list[list[str]] = [[] for _ in range(len(distinct))]
        for key, u in zip(keys, which.ravel().tolist()):
            clips[u].append(key)
        i, j, d = _Search(distinct, max_distance).run()
        out.append(_Fingerprints(clips, list(zip(i.tolist(), j.tolist(), d.tolist()))))
    return out


def near_duplicate_links(fingerprints: dict[str, Sequence[int]], max_distance: int) -> list[tuple[str, str]]:
    """Clip pairs whose union gives the near-duplicate groups (a spanning set, not every pair: a thousand
    black clips with the same fingerprint are 999 links, not half a million pairs)."""
    links = []
    for fps in _distinct_near_pairs(fingerprints, max_distance):
        for clips in fps.clips:
            links += [(clips[0], other) for other in clips[1:]]
        links += [(fps.clips[u][0], fps.clips[v][0]) for u, v, _ in fps.pairs]
    return links


def near_duplicate_pairs(
    fingerprints: dict[str, Sequence[int]], max_distance: int, keep=None
) -> list[tuple[str, str, int]]:
    """All pairs (a, b, distance) with distance <= max_distance, a < b, each pair once; with `keep`, only
    the pairs for which keep(a, b) is true.

    Distinct fingerprints are searched with numpy (imported here, so that `manifests` still imports with
    pyarrow alone): the paper's 271K clips take seconds even when thousands share a flat first frame."""
    pairs = []
    for fps in _distinct_near_pairs(fingerprints, max_distance):
        candidates = [(c, c, 0) for c in fps.clips] + [
            (fps.clips[u], fps.clips[v], d) for u, v, d in fps.pairs
        ]
        for left, right, d in candidates:
            same = left is right
            for x, a in enumerate(left):
                for b in left[x + 1 :] if same else right:
                    pair = (a, b) if a < b else (b, a)
                    if keep is None or keep(*pair):
                        pairs.append((*pair, d))
    return sorted(pairs)


@dataclass
class SplitResult:
    group_of: dict[str, str]  # clip id -> near-duplicate group id
    split_of: dict[str, str]  # clip id -> "train" | "eval" (a clip left out by dedup has none)
    eval_size: int
    target: int
    largest_unit: int = 0  # clips in the largest component that goes whole to one side
    duplicate_of: dict[str, str] = field(default_factory=dict)  # dedup: clip id -> the clip kept instead
    # with `previous`: clips of the previous eval that had to go to train (their component now also
    # holds a previous train clip or source, or eval shrank)
    previous_eval_to_train: int = 0


@dataclass(frozen=True)
class PreviousSplit:
    """The split of the manifest a job is about to replace: who was in train and who in eval.

    A clip, or with `by_source` a source, that was in train never goes to eval; clips that were in eval
    stay there while they fit. A model trained on the earlier shards is then never evaluated on its own
    training clips after `select` or a rerun with more footage (a fresh draw moved ~20% of eval)."""

    clips: Mapping[str, str]  # clip id -> "train" | "eval"
    sources: Mapping[str, str] = field(default_factory=dict)  # source id -> "train" | "eval" (by_source)

    @classmethod
    def of(cls, assigned: Iterable[tuple[str, str, str]]) -> PreviousSplit:
        """From (clip id, source id, side) of the clips a split assigned: a source with a clip in train
        counts as train."""
        clips: dict[str, str] = {}
        sources: dict[str, str] = {}
        for clip, source, side in assigned:
            clips[clip] = side
            if sources.get(source) != "train":
                sources[source] = side
        return cls(clips, sources)

    def then(self, later: PreviousSplit) -> PreviousSplit:
        """This history followed by a sticky split's assignment: train once, train for good; a clip or
        source absent now (rejected by tighter thresholds) keeps its side for when it comes back."""

        def merged(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
            out = dict(old)
            out.update((k, v) for k, v in new.items() if out.get(k) != "train")
            return out

        return PreviousSplit(merged(self.clips, later.clips), merged(self.sources, later.sources))


def _order_key(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def assign_split(
    clips: Sequence[dict],
    eval_size: int = 1000,
    max_distance: int = 12,
    by_source: bool = True,
    max_eval_fraction: float = 0.25,
    seed: int = 0,
    dedup: bool = False,
    previous: PreviousSplit | None = None,
) -> SplitResult:
    """clips: dicts with clip_id, source_id and phash (list of ints). Returns groups and splits.

    With `dedup`, each near-duplicate group keeps its first clip (in the order given) and the others
    are left out of both sides (`duplicate_of`), so a sequence repeated in every episode no longer
    joins the episodes into one component.

    Components (near-duplicate groups, joined by source when `by_source`) go whole to one side.
    Eval gets exactly min(eval_size, floor(max_eval_fraction * len(clips))) clips when some whole
    components sum to it, else the closest sum below: first the components in a seeded order, each
    taken while it fits; when that falls short, the subset closest to the target. The rest is train.

    With `previous` the split is sticky: a component holding a clip (or, `by_source`, a source) that
    was in train stays in train; components that were in eval go there first, in the seeded order
    while they fit; new components fill the rest as above.
    """
    ids = [c["clip_id"] for c in clips]
    groups = UnionFind(ids)
    for a, b in near_duplicate_links({c["clip_id"]: c.get("phash") or [] for c in clips}, max_distance):
        groups.union(a, b)
    group_of = {cid: "g" + groups.find(cid) for cid in ids}
    duplicate_of: dict[str, str] = {}
    if dedup:
        first_of_group: dict[str, str] = {}
        for cid in ids:
            first = first_of_group.setdefault(group_of[cid], cid)
            if first != cid:
                duplicate_of[cid] = first
        ids = [cid for cid in ids if cid not in duplicate_of]
        clips = [c for c in clips if c["clip_id"] not in duplicate_of]
    linked = UnionFind(ids)
    for cid in ids if not dedup else ():  # after dedup, a group has one clip left
        linked.union(cid, groups.find(cid))
    if by_source:
        first_of_source: dict[str, str] = {}
        for c in clips:
            first = first_of_source.setdefault(c["source_id"], c["clip_id"])
            linked.union(first, c["clip_id"])
    target = min(eval_size, int(max_eval_fraction * len(ids)))
    components = [
        members
        for _root, members in sorted(linked.components().items(), key=lambda kv: _order_key(kv[0], seed))
    ]
    pinned: list[int] = []  # were in eval, and nothing of them in train
    free = list(range(len(components)))
    if previous is not None:
        source_of = {c["clip_id"]: c["source_id"] for c in clips} if by_source else {}
        was = [{previous.clips.get(cid) for cid in members} for members in components]
        for i, members in enumerate(components):
            was[i] |= {previous.sources.get(source_of[cid]) for cid in members if cid in source_of}
        pinned = [i for i in free if "eval" in was[i] and "train" not in was[i]]
        free = [i for i in free if not was[i] & {"train", "eval"}]
    chosen = [pinned[k] for k in _greedy([components[i] for i in pinned], target)]
    taken = sum(len(components[i]) for i in chosen)
    rest = [components[i] for i in free]
    more = _greedy(rest, target - taken)
    filled = sum(len(rest[k]) for k in more)
    if taken + filled < target:  # whole components skipped some sizes: look for a subset that sums closer
        closer = _closest_subset(rest, target - taken)
        if sum(len(rest[k]) for k in closer) > filled:
            more = closer
    chosen += [free[k] for k in more]
    split_of = {cid: "train" for cid in ids}
    for i in chosen:
        for cid in components[i]:
            split_of[cid] = "eval"
    largest = max((len(members) for members in components), default=0)
    result = SplitResult(
        group_of, split_of, sum(len(components[i]) for i in chosen), target, largest, duplicate_of
    )
    if previous is not None:
        result.previous_eval_to_train = sum(
            previous.clips.get(cid) == "eval" and split_of[cid] == "train" for cid in ids
        )
    return result


def _greedy(components: list[list[str]], target: int) -> list[int]:
    """Components in their (seeded) order, each taken when it still fits."""
    chosen, taken = [], 0
    for i, members in enumerate(components):
        if taken == target:
            break
        if taken + len(members) <= target:
            chosen.append(i)
            taken += len(members)
    return chosen


def _closest_subset(components: list[list[str]], target: int) -> list[int]:
    """The components whose sizes sum closest to `target` from below (exactly, when any subset
    does), preferring earlier ones in the seeded order.

    Subset sum by dynamic programming: `reach[i]` is a bitset (a Python int) of the sums the first
    i fitting components can make, so memory is (components x target) bits: about 34 MB for 271K
    single-clip components and a target of 1,000, and the greedy fills those exactly anyway."""
    fitting = [i for i, members in enumerate(components) if len(members) <= target]
    mask = (1 << (target + 1)) - 1
    reach = [1]
    for i in fitting:
        reach.append((reach[-1] | (reach[-1] << len(components[i]))) & mask)
        if reach[-1] >> target:  # exact with the earliest components: the later ones are not needed
            break
    chosen, need = [], reach[-1].bit_length() - 1
    for k in range(len(reach) - 2, -1, -1):  # leave a later component out whenever the earlier ones suffice
        if not (reach[k] >> need) & 1:
            chosen.append(fitting[k])
            need -= len(components[fitting[k]])
    return sorted(chosen)


def cross_split_pairs(clips: Sequence[dict], max_distance: int = 12) -> list[dict]:
    """The leak check: near-duplicate pairs (and shared sources) across train and eval."""
    by_id = {c["clip_id"]: c for c in clips if c.get("split") in ("train", "eval")}
    leaks = []
    fingerprints = {k: v.get("phash") or [] for k, v in by_id.items()}
    crosses = lambda a, b: by_id[a]["split"] != by_id[b]["split"]  # noqa: E731
    for a, b, d in near_duplicate_pairs(fingerprints, max_distance, keep=crosses):
        leaks.append({"kind": "near-duplicate", "a": a, "b": b, "distance": d})
    sources: dict[str, set[str]] = defaultdict(set)
    for c in by_id.values():
        sources[c["source_id"]].add(c["split"])
    for source, splits in sorted(sources.items()):
        if len(splits) > 1:
            leaks.append({"kind": "source", "a": source, "b": source, "distance": None})
    return leaks
