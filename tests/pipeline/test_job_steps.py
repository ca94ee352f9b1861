"""The curate job's steps after scoring (split, parts, progress), on crafted rows."""

from __future__ import annotations

import random
import tempfile

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from manifests.schema import CLIP_SCHEMA
from pipeline.config import ConfigError, CurateConfig, load_config
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
    """A fresh OUT each call (an OUT remembers its split: split.sticky)."""
    config = CurateConfig()
    config.split.eval_size, config.split.max_eval_fraction, config.split.dedup = eval_size, fraction, dedup
    out = tempfile.mkdtemp(dir=tmp_path)
    return CurateJob(["x"], out, config)._split(kept_rows(sizes, opening)).to_pylist()


def split_in(out, table, **settings) -> dict[str, str]:
    """clip id -> side, split in `out` (which remembers earlier splits) with eval 20 of at most half."""
    config = CurateConfig()
    config.split.eval_size, config.split.max_eval_fraction = 20, 0.5
    for key, value in settings.items():
        setattr(config.split, key, value)
    return {r["clip_id"]: r["split"] for r in CurateJob(["x"], out, config)._split(table).to_pylist()}


def test_a_rerun_never_moves_a_train_clip_to_eval(tmp_path, capsys):
    """select with tighter thresholds, or a rerun with more footage, splits again. A fresh draw put up
    to a fifth of the new eval on clips the earlier shards had in train: a model trained on those
    shards would be evaluated on its training clips. The split is now sticky."""
    sizes = [3, 9, 4, 7, 5, 8, 6, 3, 9, 5, 4, 7]
    first = kept_rows(sizes)

    def moved(before, after):
        return sorted(c for c, side in before.items() if side == "train" and after.get(c) == "eval")

    v1 = split_in(tmp_path / "out", first)
    assert sum(side == "eval" for side in v1.values()) == 20
    rng = random.Random(1)
    tighter = first.filter(pa.array([rng.random() > 0.3 for _ in range(first.num_rows)]))  # select, stricter
    fresh = split_in(tmp_path / "fresh", tighter, sticky=False)
    assert moved(v1, fresh)  # what a fresh draw does: the test would catch it
    v2 = split_in(tmp_path / "out", tighter)
    assert not moved(v1, v2)
    assert all(v2[c] == "eval" for c, side in v1.items() if side == "eval" and c in v2)  # eval stays eval
    assert "what was in train stays out of eval" in capsys.readouterr().err  # and says why it is short
    # more footage: new sources fill eval again; a source rejected whole in v2 keeps its side when it
    # comes back (the history remembers it, the v2 manifest alone could not)
    gone = next(s for s in sorted({c.split("c")[0] for c in v1}) if v1[f"{s}c0"] == "train")
    without = tighter.filter(pc.not_equal(tighter["source_id"], gone))
    v3 = split_in(tmp_path / "out", without)
    grown = kept_rows(sizes + [4, 6, 5])
    v4 = split_in(tmp_path / "out", grown)
    assert not moved(v1, v4) and not moved(v3, v4) and sum(side == "eval" for side in v4.values()) == 20
    assert all(v4[c] == "train" for c in v1 if c.startswith(gone + "c"))
    # another seed is another split, and the job says what that means for earlier models
    split_in(tmp_path / "out", grown, seed=1)
    assert "split: drawn afresh (split.seed 0 -> 1); clips that were in train may now be in eval" in (
        capsys.readouterr().err
    )
    (tmp_path / "out" / "split_history.parquet").write_bytes(b"damaged")  # one line naming it, no traceback
    with pytest.raises(ConfigError, match=r"split_history.parquet: not a readable split history.*delete it"):
        split_in(tmp_path / "out", grown, seed=1)


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
    from pipeline import job_steps

    clock = iter(range(0, 10_000, 1))  # each call to the clock is one second later
    monkeypatch.setattr(job_steps.time, "monotonic", lambda: next(clock))
    progress = job_steps.Progress("score", 2000, "sources", interval=10.0)
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


def test_a_new_folder_keeps_an_earlier_folders_train_out_of_eval(tmp_path):
    """A new version of a dataset curated into a new folder starts with no history of its own: with
    split.history_from naming the earlier OUT, what was in train there stays out of eval here."""

    sizes = [3, 9, 4, 7, 5, 8, 6, 3, 9, 5, 4, 7]

    v1 = split_in(tmp_path / "v1", kept_rows(sizes))
    rng = random.Random(2)
    first = kept_rows(sizes)
    v2_rows = first.filter(pa.array([rng.random() > 0.3 for _ in range(first.num_rows)]))
    fresh = split_in(tmp_path / "fresh", v2_rows)
    assert any(side == "train" and fresh.get(c) == "eval" for c, side in v1.items())  # the leak it prevents
    v2 = split_in(tmp_path / "v2", v2_rows, history_from=str(tmp_path / "v1"))
    assert not any(side == "train" and v2.get(c) == "eval" for c, side in v1.items())
    with pytest.raises(ConfigError, match=r"v1 was drawn with other split settings \(seed 0"):
        split_in(tmp_path / "v3", v2_rows, history_from=str(tmp_path / "v1"), seed=4)
    with pytest.raises(ConfigError, match="nowhere is neither a curate OUT"):
        split_in(tmp_path / "v4", v2_rows, history_from=str(tmp_path / "nowhere"))


def test_a_history_from_whose_manifest_cannot_be_read_is_named(tmp_path):
    """An earlier OUT without split_history.parquet is read through its manifest: one cut short, or without
    a split column, was a pyarrow traceback."""
    import pyarrow.parquet as pq

    from manifests.io import write_manifest

    rows = kept_rows([3, 4])
    for name, damage in (("cut", "cut"), ("nosplit", "split")):
        old = tmp_path / name
        old.mkdir()
        write_manifest(rows, old / "manifest.parquet", CurateConfig().to_dict())
        if damage == "cut":
            (old / "manifest.parquet").write_bytes((old / "manifest.parquet").read_bytes()[:500])
            expected = r"cut/manifest.parquet: not a readable Parquet manifest"
        else:
            table = pq.read_table(old / "manifest.parquet")
            pq.write_table(table.drop_columns(["split"]), old / "manifest.parquet")
            expected = r"nosplit/manifest.parquet: no split column"
        with pytest.raises(ConfigError, match=expected):
            split_in(tmp_path / f"new_{name}", rows, history_from=str(old))


def test_a_rerun_whose_only_split_record_is_unreadable_says_how_to_go_on(tmp_path):
    """An OUT written before split_history.parquet existed keeps its split in its manifest alone: cut short,
    the rerun was a pyarrow traceback, and with split.sticky=false too (which needs no earlier split)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"PAR1 cut short")
    config = load_config(sets=["aesthetic.enabled=false", "caption.enabled=false", "alignment.enabled=false"])
    config.run.progress = False
    with pytest.raises(
        ConfigError, match=r"not a readable Parquet manifest .*; it holds this OUT's earlier split"
    ):
        CurateJob([str(tmp_path / "x.mp4")], out, config).run()
    config.split.sticky = False
    assert CurateJob([str(tmp_path / "x.mp4")], out, config)._had_a_split()


def test_the_leak_check_across_folders_finds_what_a_fresh_draw_leaks(tmp_path, capsys):
    """report OUT --leaks --against OTHER checks the folders as one dataset: a fresh draw of a new version
    in a new folder leaks the old one's train into its eval; split.history_from does not."""
    from manifests.io import write_manifest
    from pipeline.cli import report_main

    sizes = [3, 9, 4, 7, 5, 8, 6, 3, 9, 5, 4, 7]
    first = kept_rows(sizes)
    rng = random.Random(2)
    second = first.filter(pa.array([rng.random() > 0.3 for _ in range(first.num_rows)]))

    def curated(out, table, **settings):
        config = CurateConfig()
        config.split.eval_size, config.split.max_eval_fraction = 20, 0.5
        for key, value in settings.items():
            setattr(config.split, key, value)
        write_manifest(
            CurateJob(["x"], out, config)._split(table), out / "manifest.parquet", config.to_dict()
        )
        return out

    v1 = curated(tmp_path / "v1", first)
    fresh = curated(tmp_path / "fresh", second)
    kept = curated(tmp_path / "v2", second, history_from=str(v1))
    capsys.readouterr()
    assert report_main([str(fresh), "--leaks"]) == 0  # each folder alone is clean
    assert report_main([str(fresh), "--leaks", "--against", str(v1)]) == 1
    out = capsys.readouterr().out
    assert "in 2 folders" in out and f"{v1}:" in out and "near-duplicate" in out and "source" in out
    assert report_main([str(kept), "--leaks", "--against", str(v1)]) == 0


def test_work_of_an_earlier_version_is_adopted_not_redone(tmp_path, monkeypatch):
    """Sources were named as typed (relative paths), clips cached for every write setting alike: a part
    saved under the relative path is the absolute path's, and loose clips go to the folder of the write
    settings the manifest was written with."""
    import os

    import pyarrow.parquet as pq

    from manifests.io import write_manifest
    from pipeline.job_resume import WORK_SCHEMA, clip_cache_name, uri_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    source = str(tmp_path / "in" / "ep.mp4")
    out = tmp_path / "out"
    job = CurateJob([source], out, CurateConfig())
    job.parts.mkdir(parents=True)
    row = {"source_uri": "in/ep.mp4", "clip_id": "c1", "status": "kept", "split": "none"}
    pq.write_table(
        pa.Table.from_pylist([row], schema=WORK_SCHEMA), job.parts / f"{uri_key('in/ep.mp4')}.parquet"
    )
    job._adopt_relative_parts([source])
    adopted = job.parts / f"{uri_key(source)}.parquet"
    assert adopted.exists() and not (job.parts / f"{uri_key('in/ep.mp4')}.parquet").exists()
    assert pq.read_table(adopted)["source_uri"].to_pylist() == [source]

    earlier = CurateConfig()
    earlier.write.width, earlier.write.height = 256, 160
    write_manifest(pa.Table.from_pylist([], schema=CLIP_SCHEMA), out / "manifest.parquet", earlier.to_dict())
    (out / ".work" / "clips").mkdir(parents=True)
    (out / ".work" / "clips" / "c1.mp4").write_bytes(b"clip")
    job._adopt_clip_cache()
    assert (out / ".work" / "clips" / clip_cache_name(earlier.write) / "c1.mp4").read_bytes() == b"clip"
    assert job.clips.name == clip_cache_name(CurateConfig().write) != clip_cache_name(earlier.write)
    assert os.listdir(out / ".work" / "clips") == [clip_cache_name(earlier.write)]


def test_model_stages_get_the_models_dir_the_driver_resolved(tmp_path, monkeypatch):
    """On a cluster the workers have another working directory and environment: INBETWEENER_MODELS or a
    relative --models-dir resolved there scored with another text detector than the driver had checked."""
    from pipeline.config import load_config
    from pipeline.job import CurateJob

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INBETWEENER_MODELS", "models")  # relative, and an environment variable
    config = load_config(sets=["aesthetic.enabled=false", "caption.enabled=false", "alignment.enabled=false"])
    (text,) = CurateJob([], tmp_path / "out", config).model_stages()
    assert text.models_dir == str(tmp_path / "models")


def test_byte_identical_broken_sources_keep_an_error_row_each_with_its_own_id(tmp_path):
    """Two empty downloads, or one broken file under two names: each is an error row naming its file, and
    clip ids stay unique (both rows took the id of their shared content, so a manifest keyed by clip id
    lost one of them). A good file and its copy still give one curated source and one duplicate row."""
    from pipeline.stages.discover import ProbeStage

    for name in ("a_empty.mp4", "b_empty.mp4"):
        (tmp_path / name).write_bytes(b"")
    for name in ("c_text.mp4", "d_text.mp4"):
        (tmp_path / name).write_text("not a video\n")
    probe = ProbeStage()
    rows = [probe.process({"source_uri": str(p)}) for p in sorted(tmp_path.glob("*.mp4"))]
    rows += [
        {"clip_id": f"e{k}", "source_id": "e", "source_uri": uri, "start_frame": 40 * k, "status": "kept"}
        for uri in ("/f/e.mp4", "/f/e_copy.mp4")
        for k in range(2)
    ]
    rows += [  # clips of a good file that failed (a decode error at frame 80), in the file and in its copy
        {"clip_id": f"e{k}", "source_id": "e", "source_uri": uri, "start_frame": 40 * k, "num_frames": 40,
         "status": "error", "reason": "shots: decode failed at frame 80"}
        for uri in ("/f/e.mp4", "/f/e_copy.mp4")
        for k in (2, 3)
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
    out = CurateJob(["x"], tmp_path / "out", CurateConfig())._drop_duplicate_sources(table).to_pylist()
    errors = [r for r in out if r["status"] == "error"]
    assert sorted((tmp_path / r["source_uri"]).name for r in errors) == [
        "a_empty.mp4",
        "b_empty.mp4",
        "c_text.mp4",
        "d_text.mp4",
        "e.mp4",  # the curated file's two failed clips; its copy's are folded into its duplicate row
        "e.mp4",
    ]
    assert len({r["clip_id"] for r in out}) == len(out) == 4 + 2 + 2 + 1
    assert [r["reason"] for r in out if r["status"] == "rejected"] == [
        "probe: duplicate: same content as /f/e.mp4"
    ]


def test_a_history_from_that_select_changed_is_a_change_and_a_relative_one_is_its_path(tmp_path, monkeypatch):
    """`select --set split.history_from=X` then a plain curate rerun was still "nothing to do" (the path was
    left out of the comparison); the same folder given relative to the working directory is no change."""
    from pipeline import job_resume

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"PAR1")
    older = tmp_path / "v1"
    written = CurateConfig().to_dict()
    written["split"]["history_from"] = str(older)
    monkeypatch.setattr(job_resume, "manifest_config", lambda path: written)
    plain = CurateJob(["x"], out, CurateConfig())
    assert [name for name, _, _ in plain._thresholds_changed()] == ["split.history_from"]
    monkeypatch.chdir(tmp_path)
    relative = CurateJob(["x"], out, load_config(sets=["split.history_from=v1"]))
    assert relative._thresholds_changed() == []


def test_a_dry_run_names_a_read_only_out_as_the_run_does(tmp_path, monkeypatch):
    """A dry run into a read-only mount said `Permission denied` (the run itself: `Read-only file system`),
    sending the user to chmod, which cannot help."""
    import os

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ep1.mp4").write_bytes(b"x")
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", ReadOnly)
    job = CurateJob([str(inputs)], tmp_path / "mnt" / "out", CurateConfig())
    with pytest.raises(ConfigError, match="out cannot be written: Read-only file system$"):
        job.plan()
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    with pytest.raises(ConfigError, match="out cannot be written: Permission denied$"):
        job.plan()
