"""`inbetweener bench curate` on a tiny input: every figure it prints comes from a measurement."""

from __future__ import annotations

import pytest

from pipeline.bench import format_results, machine_scaling, run_curate_bench


@pytest.mark.slow
def test_curate_bench_measures_decode_score_and_memory():
    results = run_curate_bench(sources=1, size=(160, 96), workers_list=[1, 2], repeat=1)
    for workers in (1, 2):
        row = results["workers"][workers]
        assert row["frames"] > 100  # one generated episode, every frame decoded
        assert row["decode_fps"] > 0 and row["score_fps"] > 0 and row["job_fps"] > 0
        assert row["score_over_decode"] == pytest.approx(row["score_fps"] / row["decode_fps"])
        assert row["score_peak_mb"] > 50  # the driver alone holds more than this
    assert results["peak_mb_2N"] > 0 and results["machine_scaling"] > 0.3
    text = format_results(results)
    assert "score/decode" in text and "2 CPU-bound processes" in text


def test_machine_scaling_is_a_ratio_of_two_processes_to_one():
    # two processes can at best double the throughput of one (plus timing noise)
    assert 0.3 < machine_scaling(repeat=1, n=300_000) < 2.6
