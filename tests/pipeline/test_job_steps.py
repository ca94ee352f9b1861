"""The curate job's steps after scoring (split, parts, progress), on crafted rows."""

from __future__ import annotations

import random

import pyarrow as pa

from manifests.schema import CLIP_SCHEMA
from pipeline.config import CurateConfig
from pipeline.job import CurateJob
from pipeline.report import funnel


def kept_rows(sizes: list[int], opening: bool = False) -> pa.Table:
    """Kept clips of sources of these sizes; with `opening`, each source starts on the same sequence."""
    rng = random.Random(0)
    op = [rng.getrandbits(64) for _ in range(3)]
    rows = []
    for s, size in enumerate(sizes):
        for k in range(size):
            copy = opening and k == 0
            phash = [h ^ (1 << s) for h in op] if copy else [rng.getrandbits(64) for _ in range(3)]
            rows.append({"clip_id": f"s{s}c{k}", "source_id": f"s{s}", "source_uri": f"/f/s{s}.mp4",
                         "start_frame": 40 * k, "status": "kept", "split": "none", "phash": phash})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


def split_with(
    tmp_path,
    sizes: list[int],
    eval_size: int,
    fraction: float = 0.25,
    opening: bool = False,
    dedup: bool = False,
) -> list[dict]:
    config = CurateConfig()
    config.split.eval_size, config.split.max_eval_fraction, config.split.dedup = eval_size, fraction, dedup
    return CurateJob(["x"], tmp_path, config)._split(kept_rows(sizes, opening)).to_pylist()


def test_eval_short_of_the_size_asked_says_why(tmp_path, capsys):
    rows = split_with(tmp_path, [6, 6, 6, 6, 5, 5], eval_size=10, fraction=0.5)
    assert sum(r["split"] == "eval" for r in rows) == 10 and capsys.readouterr().err == ""
    rows = split_with(tmp_path, [6, 6, 6, 6, 5, 5], eval_size=13, fraction=0.5)
    assert sum(r["split"] == "eval" for r in rows) == 12
    err = capsys.readouterr().err
    assert "eval split: 12 clips (asked 13; no set of whole sources adds up to exactly 13)" in err
    split_with(tmp_path, [6, 6, 6, 6, 5, 5], eval_size=1000)
    err = capsys.readouterr().err
    assert "eval split: 6 clips (asked 1000; a small job gives eval at most 25% of its 34 kept clips" in err


def test_an_opening_in_every_episode_joins_them_unless_dedup_keeps_one_copy(tmp_path, capsys):
    rows = split_with(tmp_path, [6] * 12, eval_size=15, fraction=0.5, opening=True)
    assert sum(r["split"] == "eval" for r in rows) == 0  # one unit of 72 clips: it cannot go to eval
    err = capsys.readouterr().err
    assert "near-duplicate clips join sources into units of up to 72 clips" in err
    assert "--set split.dedup=true keeps one clip of each near-duplicate group" in err
    rows = split_with(tmp_path, [6] * 12, eval_size=15, fraction=0.5, opening=True, dedup=True)
    copies = [r for r in rows if r["status"] == "rejected"]
    assert sorted(r["clip_id"] for r in copies) == sorted(f"s{s}c0" for s in range(1, 12))
    assert all(r["reason"] == "dedup: near-duplicate of s0c0" and r["split"] == "none" for r in copies)
    assert sum(r["split"] == "eval" for r in rows) == 15 and capsys.readouterr().err == ""
    steps = {s["stage"]: s for s in funnel(rows)}
    assert steps["dedup"]["rejected"] == 11 and steps["kept"]["out"] == 72 - 11


def test_scored_parts_are_read_without_their_thumbnails(tmp_path):
    """The final steps read every scored source's part back; the thumbnails (GBs at a million clips)
    stay on disk until the report asks for its few dozen. Measured in a fresh process: Arrow's peak."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import pyarrow as pa
        import os
        from pipeline.config import CurateConfig
        from pipeline.job import CurateJob
        job = CurateJob([], {str(tmp_path)!r}, CurateConfig())
        uris = [f"/f/s{{s}}.mp4" for s in range(4)]
        for uri in uris:  # 40 clips with 256 KB thumbnails each: 10 MB
            job._save_part(uri, [{{"clip_id": f"{{uri}}-{{k}}", "source_uri": uri, "status": "kept",
                                   "thumb": os.urandom(2**18)}} for k in range(10)])
        before = pa.default_memory_pool().max_memory()
        table = job._load_parts(uris)
        assert table.num_rows == 40 and "thumb" not in table.column_names
        print(pa.default_memory_pool().max_memory() - before)
        print(len(job.thumbs_of(table.slice(0, 3).to_pylist())[uris[0] + "-2"]))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[0]) < 2**20  # was 7 MB here: thumbnails read, then the column dropped
    assert int(out[1]) == 2**18  # the report still gets the ones it shows


def test_progress_prints_the_first_and_last_update_and_one_line_per_interval(capsys, monkeypatch):
    from pipeline import job

    clock = iter(range(0, 10_000, 1))  # each call to the clock is one second later
    monkeypatch.setattr(job.time, "monotonic", lambda: next(clock))
    progress = job.Progress("score", 2000, "sources", interval=10.0)
    for _ in range(2000):
        progress.update(1, 100)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[score] 1/2000 sources, 100 clips,")
    assert lines[-1].startswith("[score] 2000/2000 sources, 200000 clips,")
    assert 150 < len(lines) < 250  # 2,000 updates over 2,000 s: a line every 10 s, not 2,000 lines


def test_a_second_job_on_the_same_out_stops_before_any_work(tmp_path, capsys):
    """While a curate (or select) writes OUT, another one stops with one line naming the holder; the
    lock goes with its process, so a killed job leaves none behind."""
    import subprocess
    import sys

    from manifests.files import folder_lock
    from pipeline import samples
    from pipeline.cli import curate_main

    footage, out = tmp_path / "footage", tmp_path / "out"
    samples.generate_footage(footage, seed=3)
    with folder_lock(out, "inbetweener curate"):
        assert (
            curate_main([str(footage), "--out", str(out), "--skip", "text,aesthetic,caption,alignment"]) == 2
        )
    err = capsys.readouterr().err
    assert f"{out} is being written by inbetweener curate (pid " in err and "use another folder" in err
    assert not (out / "manifest.parquet").exists()
    holder = subprocess.Popen(  # a process that takes the lock and is killed holding it
        [sys.executable, "-c", "import sys, time; from manifests.files import folder_lock\n"
         "with folder_lock(sys.argv[1], 'x'):\n print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    with folder_lock(out, "inbetweener select"):  # free again
        pass
