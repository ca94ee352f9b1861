"""training.bench_data: the training loader's windows/s against the decoding it cannot skip, on generated
cartoon clips (the smoke size here; BENCHMARKS.md has the full-size run)."""

from __future__ import annotations

import json


def test_data_bench_times_decode_window_and_the_loader(tmp_path, capsys):
    from training import bench_data

    out = tmp_path / "data.json"
    argv = [
        "--clips",
        "4",
        "--seconds",
        "1",
        "--size",
        "128x80",
        "--windows",
        "4",
        "--workers",
        "1",
        "--json",
        str(out),
    ]
    assert bench_data.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["clips"] == 4 and report["shards"] == 4
    # the decode floor is part of decode_window's work: it is faster; a window needs >= 16 frames decoded
    assert 0 < report["decode_floor_s"] < report["decode_window_s"]
    assert report["frames_decoded_per_window"] >= 16
    (loader,) = report["loader"]
    assert loader["workers"] == 1 and loader["windows_per_s"] > 0
    rate = loader["per_worker"]
    assert report["workers_per_gpu"] == max(1, -(-report["gpu_rate"] // rate))  # ceil(gpu rate / worker rate)
    printed = capsys.readouterr().out
    assert "| loader, 1 worker(s) |" in printed and "loader worker(s) per GPU" in printed


def test_data_bench_bad_arguments_stop_with_one_line(tmp_path):
    import pytest

    from training import bench_data

    for argv, says in (
        (["--data", str(tmp_path / "absent")], "--data: no shards at"),
        (["--size", "512"], "--size: expected integers >= 1 separated by 'x'"),
        (["--workers", "one"], "--workers: expected integers >= 0"),
    ):
        with pytest.raises(SystemExit, match=says):
            bench_data.main(argv)
