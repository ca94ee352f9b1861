"""Near-duplicate grouping and the leak-free split."""

from __future__ import annotations

import random

import pytest

from manifests import split
from manifests.split import (
    UnionFind,
    assign_split,
    cross_split_pairs,
    fingerprint_distance,
    near_duplicate_links,
    near_duplicate_pairs,
)


def random_fp(rng: random.Random) -> list[int]:
    return [rng.getrandbits(64) for _ in range(3)]


def flip(fp: list[int], bits: int, rng: random.Random) -> list[int]:
    out = list(fp)
    for _ in range(bits):
        i, b = rng.randrange(3), rng.randrange(64)
        out[i] ^= 1 << b
    return out


def brute_force(fps: dict, max_distance: int) -> list[tuple[str, str, int]]:
    keys = sorted(fps)
    out = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            d = sum(bin(x ^ y).count("1") for x, y in zip(fps[a], fps[b]))
            if d <= max_distance:
                out.append((a, b, d))
    return out


def test_banded_search_finds_exactly_the_brute_force_pairs():
    rng = random.Random(0)
    fps = {}
    for i in range(60):
        base = random_fp(rng)
        fps[f"c{i:03d}"] = base
        if i % 3 == 0:  # near copies at several distances around the threshold
            for j, bits in enumerate((2, 8, 12, 13, 20)):
                fps[f"c{i:03d}_{j}"] = flip(base, bits, rng)
    for max_distance in (0, 6, 12):
        assert near_duplicate_pairs(fps, max_distance) == brute_force(fps, max_distance)


@pytest.mark.parametrize("matrix_bucket", [256, 64])
def test_flat_frames_and_mixed_lengths_give_the_brute_force_pairs_too(matrix_bucket, monkeypatch):
    """Every flat picture has the same pHash, so clips starting on one share a band bucket far larger than
    the pair-by-pair search takes: such a bucket is a distance matrix, or, when larger than
    `_MATRIX_BUCKET` (lowered here to reach that path on a small input), searched again over the bits its
    members do not share. Either way, the brute force's pairs."""
    monkeypatch.setattr(split, "_MATRIX_BUCKET", matrix_bucket)
    rng = random.Random(1)
    fps = {}
    for i in range(150):  # a flat first frame: one bucket of 150 on the first word's bands
        fps[f"flat{i:03d}"] = [0, rng.getrandbits(64), rng.getrandbits(64)]
    base = [0, rng.getrandbits(64), rng.getrandbits(64)]
    for i in range(40):  # near copies inside that bucket
        fps[f"near{i:03d}"] = flip(base, rng.randrange(0, 14), rng)
    for i in range(30):  # other fingerprint lengths are compared among themselves only
        fps[f"one{i:03d}"] = [rng.getrandbits(64) >> rng.choice((0, 60))]
    for i in range(70):  # static black shots: the same fingerprint, all flat
        fps[f"black{i:03d}"] = [0, 0, 0]
    fps["empty"] = []
    for max_distance in (0, 5, 12, 40):
        want = brute_force({k: v for k, v in fps.items() if len(v) == 3}, max_distance)
        want += brute_force({k: v for k, v in fps.items() if len(v) == 1}, max_distance)
        assert near_duplicate_pairs(fps, max_distance) == sorted(want)
        # the links span the same groups with far fewer pairs than all of them
        links = near_duplicate_links(fps, max_distance)
        assert components(fps, links) == components(fps, [(a, b) for a, b, _ in want])
        assert len(links) < len(want) or not want
        black = [(a, b) for a, b in links if a.startswith("black") and b.startswith("black")]
        assert len(black) == 69  # one group of 70 identical fingerprints: 69 links, not 2,415 pairs


def components(fps: dict, links: list[tuple[str, str]]) -> set[frozenset[str]]:
    groups = UnionFind(fps)
    for a, b in links:
        groups.union(a, b)
    return {frozenset(members) for members in groups.components().values()}


def test_fingerprint_distance():
    assert fingerprint_distance([0b1011, 0], [0b0001, 1]) == 3


def make_clips(
    rng: random.Random, sources: int = 40, per_source: int = 5, opening: bool = True
) -> list[dict]:
    shared_opening = random_fp(rng)
    clips = []
    for s in range(sources):
        for k in range(per_source):
            fp = flip(shared_opening, 3, rng) if (opening and k == 0) else random_fp(rng)
            clips.append({"clip_id": f"s{s:02d}c{k}", "source_id": f"src{s:02d}", "phash": fp})
    return clips


def test_split_is_exact_deterministic_and_leak_free_without_sources():
    rng = random.Random(1)
    clips = make_clips(rng)
    result = assign_split(clips, eval_size=30, max_distance=12, by_source=False)
    assert result.eval_size == 30 == sum(v == "eval" for v in result.split_of.values())
    # the repeated opening collapses to one group
    openings = {result.group_of[c["clip_id"]] for c in clips if c["clip_id"].endswith("c0")}
    assert len(openings) == 1
    again = assign_split(clips, eval_size=30, max_distance=12, by_source=False)
    assert again.split_of == result.split_of
    labelled = [{**c, "split": result.split_of[c["clip_id"]]} for c in clips]
    assert [leak for leak in cross_split_pairs(labelled) if leak["kind"] == "near-duplicate"] == []


def test_split_by_source_keeps_sources_whole():
    rng = random.Random(2)
    clips = make_clips(rng, opening=False)
    result = assign_split(clips, eval_size=20, max_distance=12, by_source=True)
    assert result.eval_size == 20
    labelled = [{**c, "split": result.split_of[c["clip_id"]]} for c in clips]
    assert cross_split_pairs(labelled) == []


def test_leak_check_reports_planted_leaks():
    rng = random.Random(3)
    base = random_fp(rng)
    clips = [
        {"clip_id": "a", "source_id": "s1", "phash": base, "split": "train"},
        {"clip_id": "b", "source_id": "s2", "phash": flip(base, 4, rng), "split": "eval"},
        {"clip_id": "c", "source_id": "s2", "phash": random_fp(rng), "split": "train"},
    ]
    kinds = sorted(leak["kind"] for leak in cross_split_pairs(clips))
    assert kinds == ["near-duplicate", "source"]


def test_eval_is_capped_for_small_jobs():
    rng = random.Random(4)
    clips = make_clips(rng, sources=4, per_source=2, opening=False)
    result = assign_split(clips, eval_size=1000, max_eval_fraction=0.25)
    assert result.target == 2 and result.eval_size == 2


def test_eval_is_exact_when_whole_sources_can_sum_to_it():
    # four sources of 6 clips and two of 5: only the two 5s make 10, whichever comes first
    rng = random.Random(5)
    clips = [
        {"clip_id": f"s{s}c{k}", "source_id": f"s{s}", "phash": random_fp(rng)}
        for s, size in enumerate([6, 6, 6, 6, 5, 5])
        for k in range(size)
    ]
    for seed in range(8):
        result = assign_split(clips, eval_size=10, max_eval_fraction=0.5, seed=seed)
        chosen = sorted({c["source_id"] for c in clips if result.split_of[c["clip_id"]] == "eval"})
        assert result.eval_size == 10 and chosen == ["s4", "s5"], seed
    # no subset makes 13 (two sources make at most 12, three at least 16): the closest below
    result = assign_split(clips, eval_size=13, max_eval_fraction=0.5)
    assert result.eval_size == 12 and result.target == 13


def test_dedup_keeps_one_clip_of_an_opening_repeated_in_every_source():
    # every source opens on the same sequence: by source, the opening joins all 40 sources into one unit
    clips = make_clips(random.Random(6), sources=40, per_source=5)
    joined = assign_split(clips, eval_size=20, by_source=True)
    assert joined.largest_unit == 200 and joined.eval_size == 0 and joined.duplicate_of == {}
    result = assign_split(clips, eval_size=20, by_source=True, dedup=True)
    assert result.duplicate_of == {f"s{s:02d}c0": "s00c0" for s in range(1, 40)}  # the first copy stays
    assert result.largest_unit == 5 and result.eval_size == 20
    assert not set(result.split_of) & set(result.duplicate_of)  # a left-out copy is on neither side
    labelled = [
        {**c, "split": result.split_of[c["clip_id"]]} for c in clips if c["clip_id"] in result.split_of
    ]
    assert cross_split_pairs(labelled) == []
    backwards = assign_split(clips[::-1], eval_size=20, by_source=True, dedup=True)  # the last copy stays
    assert backwards.duplicate_of == {f"s{s:02d}c0": "s39c0" for s in range(39)} and backwards.eval_size == 20


def test_split_history_remembers_train_for_good_and_a_damaged_file_is_named(tmp_path):
    from manifests.io import ManifestError, read_split_history, write_split_history
    from manifests.split import PreviousSplit

    first = PreviousSplit({"a": "eval", "b": "train", "c": "eval"}, {"s1": "eval", "s2": "train"})
    now = PreviousSplit.of([("a", "s1", "train"), ("b", "s1", "eval"), ("d", "s3", "eval")])
    assert now == PreviousSplit({"a": "train", "b": "eval", "d": "eval"}, {"s1": "train", "s3": "eval"})
    later = first.then(PreviousSplit({"a": "train", "b": "eval"}, {"s1": "eval"}))  # c rejected now
    assert later.clips == {"a": "train", "b": "train", "c": "eval"} and later.sources == first.sources
    path = write_split_history(later, tmp_path / "split_history.parquet", {"seed": 3, "by_source": True})
    assert read_split_history(path) == (later, {"seed": 3, "by_source": True})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ManifestError, match="split_history.parquet: not a readable split history.*delete it"):
        read_split_history(path)


def test_a_sticky_split_fills_eval_from_new_components_only():
    clips = [{"clip_id": f"s{s}c{k}", "source_id": f"s{s}", "phash": []} for s in range(8) for k in range(5)]
    previous = split.PreviousSplit({}, {"s0": "eval", "s1": "train", "s2": "train", "s3": "eval"})
    result = split.assign_split(clips, eval_size=15, max_eval_fraction=1.0, previous=previous)
    eval_sources = {c["source_id"] for c in clips if result.split_of[c["clip_id"]] == "eval"}
    assert result.eval_size == 15 and {"s0", "s3"} < eval_sources and not eval_sources & {"s1", "s2"}
