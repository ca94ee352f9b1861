"""report.html's funnel and thumbnails, on crafted manifest rows."""

from __future__ import annotations

import pyarrow as pa
import pytest

from manifests.schema import CLIP_SCHEMA
from pipeline.config import CurateConfig
from pipeline.report import CANDIDATES, THUMBS_PER_GROUP, funnel, write_report


def row(uri: str, i: int, status: str, reason: str | None = None, **scores) -> dict:
    return {"clip_id": f"{uri}-{i}", "source_id": uri, "source_uri": uri, "start_frame": 10 * i,
            "end_frame": 10 * i + 10, "start_s": i * 1.0, "end_s": i * 1.0 + 0.5, "status": status,
            "reason": reason, "split": "train" if status == "kept" else "none", **scores}  # fmt: skip


def crafted() -> list[dict]:
    rows = [row("a.mp4", i, "kept", motion_mean=1.0) for i in range(5)]
    rows += [row("a.mp4", 5 + i, "rejected", f"motion: motion_mean 0.0{i} < motion.min 0.15", motion_mean=0.01)
             for i in range(3)]  # fmt: skip
    rows += [row("b.mp4", 0, "rejected", "shots: length 0.40 s < min_len_s 1")]
    rows += [row("b.mp4", 1, "error", "write: encoder failed (code 1)", motion_mean=1.0)]
    rows += [row("b.mp4", 2, "rejected", "retime: a stage this report does not know")]
    rows += [row("copy.mp4", 0, "rejected", "probe: duplicate: same content as a.mp4")]
    rows += [row("broken.mp4", 0, "error", "probe: not a video (no video stream)")]
    return rows


def test_funnel_counts_each_clip_once_and_never_a_rejected_one_as_kept():
    steps = {s["stage"]: s for s in funnel(crafted())}
    sources = steps["sources"]
    assert (sources["in_clips"], sources["out"], sources["rejected"]) == (4, 2, 2)
    assert sources["reasons"] == {"probe: duplicate of another source": 1, "probe: not a video": 1}
    assert steps["shots"]["in_clips"] == 11 and steps["shots"]["rejected"] == 1
    assert steps["motion"]["rejected"] == 3 and steps["motion"]["reasons"] == {
        "motion: motion_mean < motion.min 0.15": 3
    }
    assert steps["write"]["rejected"] == 1 and steps["other"]["rejected"] == 1
    assert steps["kept"]["out"] == 5  # the duplicate source's row used to be counted here
    assert steps["kept"]["hours"] == pytest.approx(5 * 0.5 / 3600)
    clip_steps = [s for s in steps.values() if s["stage"] not in ("sources", "kept")]
    for before, after in zip(clip_steps, clip_steps[1:]):
        assert after["in_clips"] == before["out"] == before["in_clips"] - before["rejected"]


def test_report_asks_only_for_the_thumbnails_it_can_show(tmp_path):
    rows = [row("a.mp4", i, "kept", motion_mean=1.0) for i in range(2000)]
    rows += [row("b.mp4", i, "rejected", "motion: motion_mean 0.01 < motion.min 0.15") for i in range(2000)]
    asked: list[dict] = []

    def thumbs(wanted: list[dict]) -> dict[str, bytes]:
        asked.extend(wanted)
        return {r["clip_id"]: b"\xff\xd8jpeg" for r in wanted}

    table = pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
    page = write_report(tmp_path, table, CurateConfig(), thumbs=thumbs).read_text()
    assert 2 * THUMBS_PER_GROUP <= len(asked) <= 2 * CANDIDATES * THUMBS_PER_GROUP  # not 4,000
    assert page.count("<img src='report_files/thumb_") == 2 * THUMBS_PER_GROUP
    assert (tmp_path / "report_files" / "thumb_a.mp4-0.jpg").read_bytes() == b"\xff\xd8jpeg"
    # spread over the job, not the first dozen clips of its first source
    assert "thumb_a.mp4-1833.jpg" in page and "thumb_a.mp4-1.jpg" not in page


def test_reasons_group_by_problem_not_by_the_value_file_or_clip_they_name():
    rows = [
        row(f"/f/missing{i}.mp4", 0, "error", f"probe: no such file: /f/missing{i}.mp4") for i in range(3)
    ]
    rows += [row("s3://bucket/gone.mp4", 0, "error", "probe: no such file: s3://bucket/gone.mp4")]
    rows += [row("a.mp4", i, "rejected", f"dedup: near-duplicate of a.mp4-{i - 1}") for i in range(1, 4)]
    rows += [row("a.mp4", 0, "kept")]
    rows += [row("b.mp4", i, "rejected", f"shots: length 0.{i}4 s < min_len_s 1") for i in range(1, 4)]
    rows += [
        row("b.mp4", i, "error", f"write: decode failed at frame {i}0 (Invalid data)") for i in range(4, 6)
    ]
    steps = {s["stage"]: s for s in funnel(rows)}
    assert steps["sources"]["reasons"] == {"probe: no such file": 4}
    assert steps["dedup"]["reasons"] == {"dedup: near-duplicate of a kept clip": 3}
    assert steps["shots"]["reasons"] == {"shots: length < min_len_s 1": 3}  # was one group per length
    assert steps["write"]["reasons"] == {"write: decode failed at frame N": 2}


def test_report_counts_retimed_sources_but_not_failed_ones(tmp_path):
    rows = [row("vfr.mkv", 0, "kept", fps=24.0, vfr=True), row("vfr.mkv", 1, "kept", fps=24.0, vfr=True)]
    rows += [row("dvd.vob", 0, "kept", fps=24000 / 1001, ivtc=True)]
    rows += [row("broken.mp4", 0, "error", "shots: decode failed at frame 9", fps=30.0, vfr=True)]
    rows += [row("plain.mp4", 0, "kept", fps=25.0, vfr=False, ivtc=False)]
    page = write_report(tmp_path, pa.Table.from_pylist(rows, schema=CLIP_SCHEMA), CurateConfig()).read_text()
    assert "Variable frame rate: 1 of 4 sources were curated on a constant grid (24 fps: 1;" in page
    assert "Telecined film: 1 of 4 sources were decoded back to their film frames" in page


def test_a_score_that_is_not_finite_is_left_out_of_its_histogram(tmp_path):
    """An infinite score (an edited manifest, an fp16 overflow) crashed the report after select had
    replaced the manifest and shards."""
    rows = [row("a.mp4", i, "kept", motion_mean=float(i)) for i in range(4)]
    rows[0]["motion_mean"] = float("inf")
    rows[1]["motion_mean"] = float("nan")
    write_report(tmp_path, pa.Table.from_pylist(rows, schema=CLIP_SCHEMA), CurateConfig())
    assert (tmp_path / "report_files" / "hist_motion_mean.png").exists()
