"""`inbetweener bench curate` on a tiny input: every figure it prints comes from a measurement."""

from __future__ import annotations

import pytest

from pipeline.bench import format_results, run_curate_bench


@pytest.mark.slow
def test_curate_bench_measures_decode_score_and_memory():
    results = run_curate_bench(sources=1, size=(160, 96), workers_list=[1, 2], repeat=1)
    for workers in (1, 2):
        row = results["workers"][workers]
        assert row["frames"] > 100  # one generated episode, every frame decoded
        assert row["decode_fps"] > 0 and row["score_fps"] > 0 and row["job_fps"] > 0
        assert row["score_over_decode"] == pytest.approx(row["score_fps"] / row["decode_fps"])
        assert row["score_peak_mb"] > 50  # the driver alone holds more than this
        assert 0 < row["score_ray_cores"] < 2  # the driver at least works; 2 cores is the whole machine
    assert results["peak_mb_2N"] > 0
    # the control decodes the same frames without Ray: its scaling is two processes' rate over one's (how
    # close to 2x depends on the machine's load: a benchmark's number, not this test's)
    plain = results["plain_decode_fps"]
    assert plain[1] > 0 and plain[2] > 0
    assert results["plain_decode_scaling"] == pytest.approx(plain[2] / plain[1], rel=0.01)
    text = format_results(results)
    assert "score/decode" in text and "plain processes (no Ray)" in text and "Ray's own processes" in text


def test_split_bench_times_both_searches_on_the_same_fingerprints(tmp_path, capsys):
    """`inbetweener bench split`: the vectorised search and its pure-Python baseline find the same pairs on
    a corpus where a tenth of the clips share a flat first frame; a row without the baseline says so."""
    import json

    from pipeline.bench import main

    assert main(["split", "--clips", "3000", "4000", "--flat", "0.1", "--baseline-max", "3000",
                 "--json", str(tmp_path / "split.json")]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "split.json").read_text())
    assert [r["clips"] for r in rows] == [3000, 4000]
    assert rows[0]["same"] is True and rows[0]["pairs"] > 0 and rows[0]["python_s"] > 0
    assert "python_s" not in rows[1] and rows[1]["numpy_s"] > 0
    out = capsys.readouterr().out
    assert "same pairs: True" in out and "not run: --baseline-max" in out


def test_finalize_bench_times_the_final_steps_and_checks_the_funnel_against_its_old_form(tmp_path, capsys):
    """`inbetweener bench finalize`: every step is timed on a synthetic manifest, the split has its eval
    clips and no leaks, and the one-pass funnel counts what the list-membership funnel counted."""
    import json

    from pipeline.bench import main

    assert main(["finalize", "--rows", "3000", "4000", "--sources", "40", "--baseline-max", "3500",
                 "--json", str(tmp_path / "finalize.json")]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "finalize.json").read_text())
    assert [r["rows"] for r in rows] == [39 * 75 + 1, 39 * 100 + 1]  # 40 sources; one fails to open
    for r in rows:
        assert 0.7 * r["rows"] < r["kept"] < 0.95 * r["rows"]
        assert r["eval"] <= min(1000, 0.25 * r["kept"]) and r["leaks"] == 0
        assert all(r[f"{step}_s"] > 0 for step in ("duplicates", "decide", "split", "funnel", "report"))
    assert rows[0]["same_funnel"] is True and rows[0]["list_funnel_s"] > 0 and "same_funnel" not in rows[1]
    assert "same counts: True" in capsys.readouterr().out
    # every episode opens on its series' opening: dedup keeps one copy of each of its shots
    assert (
        main(["finalize", "--rows", "3000", "--sources", "40", "--dedup", "--json", str(tmp_path / "d.json")])
        == 0
    )
    (deduped,) = json.loads((tmp_path / "d.json").read_text())
    assert (
        0.8 * 5 * 38 < deduped["dedup_rejected"] <= 5 * 38
    )  # 5 shots without credits, 2 series of 20 and 19
    assert deduped["kept"] == rows[0]["kept"] - deduped["dedup_rejected"] and deduped["leaks"] == 0


def test_finalize_bench_refuses_sizes_it_cannot_build(capsys):
    from pipeline.bench import main

    for argv in (["--rows", "100", "--sources", "0"], ["--rows", "10", "--sources", "20"]):
        with pytest.raises(SystemExit) as stopped:
            main(["finalize", *argv])
        assert stopped.value.code == 2
        assert "finalize needs --sources >= 1 and every --rows >= --sources" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["probe", "--minutes", "0"], "--minutes"),
        (["probe", "--minutes", "nan"], "--minutes"),
        (["probe", "--minutes", "0.0001"], "--minutes"),  # less than one frame
        (["probe", "--minutes", "1e12"], "GB free"),  # a source larger than the temp folder's disk
        (["probe", "--mbps", "1e9"], "--mbps"),
        (["probe", "--mbps", "-1"], "--mbps"),
        (["probe", "--repeat", "0"], "--repeat"),
        (["split", "--max-distance", "-1"], "--max-distance"),
        (["split", "--flat", "2"], "--flat"),
        (["split", "--clips", "0"], "--clips"),
        (["curate", "--sources", "0"], "--sources"),
        (["curate", "--workers", "1", "0"], "--workers"),
        (["curate", "--width", "321"], "--width"),
        (["curate", "--repeat", "0"], "--repeat"),
        (["finalize", "--rows", "100", "--baseline-max", "x"], "--baseline-max"),
        (["probe", "--json", "no/such/folder/probe.json"], "does not exist"),
    ],
)
def test_bench_refuses_values_it_cannot_measure_before_measuring(argv, named, capsys):
    """One line naming the option, exit 2, before any footage is made or Ray is started (these crashed with
    a traceback, some after minutes of measuring, or printed meaningless rows)."""
    from pipeline.bench import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_curate_bench_names_the_worker_counts_it_compared():
    results = {
        "sources": 1,
        "episodes_per_source": 1,
        "frame_size": [160, 96],
        "repeat": 1,
        "peak_mb_N": 100.0,
        "peak_mb_2N": 110.0,
        "score_scaling": 1.5,
        "decode_scaling": 1.6,
        "plain_decode_scaling": 1.7,
    }
    row = dict.fromkeys(("decode_fps", "score_fps", "job_fps", "score_over_decode", "job_over_decode"), 1.0)
    row.update(frames=10, score_peak_mb=100.0, job_peak_mb=100.0, score_ray_cores=0.5)
    results["workers"] = {2: row, 4: row}
    assert "4 workers / 2 workers: score 1.50x" in format_results(results)


def test_curate_bench_that_fails_making_its_footage_says_why_and_cleans_up(tmp_path, monkeypatch):
    """A full disk while drawing the footage surfaced as an UnboundLocalError ('control') from the cleanup."""
    import tempfile

    from pipeline import bench

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def disk_full(root, *args):
        root.mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "make_footage", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_curate_bench(sources=1, size=(160, 96), workers_list=[1, 2])
    assert list(tmp_path.iterdir()) == []  # its temporary footage folder is gone
