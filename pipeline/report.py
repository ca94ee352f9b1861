"""report.html: the funnel, each score's distribution with its threshold, thumbnails.

Everything is recomputed from the manifest rows (and the thumbnails the shots stage saved), so
`inbetweener report OUT` rebuilds the same page at any time. Images are PNG/JPEG files beside the
page in `report_files/`; the page opens from disk without a server.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

import pyarrow as pa

from manifests.files import write_bytes_atomic
from pipeline.config import CurateConfig
from pipeline.select import rules

FUNNEL_STAGES = ["probe", "shots", "motion", "text", "aesthetic", "caption", "alignment", "dedup", "write"]
HISTOGRAMS = [("motion_mean", "motion"), ("motion_residual", None), ("held_ratio", None), ("text_area", "text"),
              ("aesthetic_min", "aesthetic"), ("clip_sim_min", "alignment")]  # fmt: skip
THUMBS_PER_GROUP = 12
CANDIDATES = 2  # rows looked at per thumbnail shown: 24 rows spread over a group, each a part read

Thumbs = Mapping[str, bytes] | Callable[[list[dict]], Mapping[str, bytes]]


def _stage_of(reason: str | None) -> str:
    return (reason or "").split(":", 1)[0].strip() or "unknown"


def _leaves_at_source(row: dict) -> bool:
    """A source that gave no clips: it failed to open or decode, or it repeats another file's bytes."""
    stage = _stage_of(row["reason"])
    return (row["status"] == "error" and stage in ("probe", "shots")) or (
        row["status"] == "rejected" and stage == "probe"
    )


def funnel(rows: list[dict]) -> list[dict]:
    """Clips and hours entering each stage, and what each stage rejected (by reason).

    One pass over the rows: each row that was not kept leaves at the stage its reason names; a
    reason naming no funnel stage is counted in an `other` step, never as kept."""
    sources = {r["source_uri"] for r in rows}
    at_source: list[dict] = []
    leaving: dict[str, list[dict]] = defaultdict(list)
    clips: list[dict] = []
    for r in rows:
        if _leaves_at_source(r):
            at_source.append(r)
            continue
        clips.append(r)
        if r["status"] != "kept":
            stage = _stage_of(r["reason"])
            leaving[stage if stage in FUNNEL_STAGES[1:] else "other"].append(r)
    failed = {r["source_uri"] for r in at_source}
    steps = [{"stage": "sources", "in_clips": len(sources), "hours": None, "out": len(sources) - len(failed),
              "rejected": len(failed), "reasons": Counter(_short_reason(r["reason"]) for r in at_source)}]  # fmt: skip
    remaining, hours = len(clips), _hours(clips)
    for stage in [*FUNNEL_STAGES[1:], "other"]:
        gone = leaving.get(stage, [])
        if stage != "shots" and not gone and (stage == "other" or not _stage_ran(stage, rows)):
            continue
        steps.append({"stage": stage, "in_clips": remaining, "hours": hours, "out": remaining - len(gone),
                      "rejected": len(gone), "reasons": Counter(_short_reason(r["reason"]) for r in gone)})  # fmt: skip
        remaining -= len(gone)
        hours = max(0.0, hours - _hours(gone))
    steps.append({"stage": "kept", "in_clips": remaining, "hours": hours, "out": remaining,
                  "rejected": 0, "reasons": Counter()})  # fmt: skip
    return steps


def _stage_ran(stage: str, rows: list[dict]) -> bool:
    column = {"motion": "motion_mean", "text": "text_area", "aesthetic": "aesthetic_min", "caption": "caption",
              "alignment": "clip_sim_min"}.get(stage)  # fmt: skip
    return column is not None and any(r.get(column) is not None for r in rows)


_MEASURED = re.compile(r"(.*?)\s+-?[\d.]+(?:e[-+]?\d+)?(?:\s+[a-z%]+)?\s+([<>]=?)\s+(.*)")


def _short_reason(reason: str | None) -> str:
    """The reason's problem, for grouping: the clip's own value, the file or clip it names and the
    detail in brackets stay in the manifest, so that each problem is one group (and one list of
    thumbnails), not one per length, frame number or file."""
    text = reason or "unknown"
    stage, _, rest = text.partition(":")
    rest = rest.strip()
    measured = _MEASURED.fullmatch(rest)
    if measured:  # "length 0.40 s < min_len_s 1" -> "length < min_len_s 1": the threshold stays
        return f"{stage}: {measured[1]} {measured[2]} {measured[3]}"[:130]
    if rest.startswith("duplicate:"):  # "duplicate: same content as X"
        rest = "duplicate of another source"
    elif rest.startswith("near-duplicate of "):  # dedup: "near-duplicate of CLIP_ID"
        rest = "near-duplicate of a kept clip"
    rest = re.split(r":\s+(?=/|[a-z][a-z0-9+.-]*://)", rest, maxsplit=1)[0]  # "no such file: PATH"
    rest = rest.split(" (", 1)[0]
    rest = re.sub(r"\d+(?:\.\d+)?", "N", rest)  # "decode failed at frame 123" -> "... at frame N"
    return f"{stage}: {rest[:120]}"


def _spread(rows: list[dict], count: int) -> list[dict]:
    """`count` rows evenly spaced over `rows` (all of them when there are no more)."""
    if len(rows) <= count:
        return rows
    return [rows[i * len(rows) // count] for i in range(count)]


def _hours(rows: list[dict]) -> float:
    return sum((r.get("end_s") or 0) - (r.get("start_s") or 0) for r in rows) / 3600.0


def _histogram_png(values: list[float], title: str, threshold_lines: list[tuple[str, float]]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.hist(values, bins=30, color="#4a7bd0")
    for label, value in threshold_lines:
        ax.axvline(value, color="#d04a4a", linestyle="--", label=f"{label} = {value:g}")
    if threshold_lines:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("clips")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_report(out: Path, table: pa.Table, config: CurateConfig, thumbs: Thumbs | None = None) -> Path:
    """`thumbs` gives the thumbnails of the rows asked for (those it has): a mapping, or a function
    of the rows, so that a job with a million clips reads only the few dozen the page shows."""
    out = Path(out)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    rows = table.to_pylist()
    steps = funnel(rows)
    active = defaultdict(list)
    for stage, column, cmp, value in rules(config):
        active[column].append((f"{stage}.{cmp}", value))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>inbetweener curate report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        ".thumbs img{margin:2px;border:1px solid #999}.thumbs figure{display:inline-block;margin:4px;font-size:11px;"
        "max-width:200px}</style></head><body>",
        "<h1>Curate report</h1>",
    ]
    kept = [r for r in rows if r["status"] == "kept"]
    errors = [r for r in rows if r["status"] == "error"]
    parts.append(
        f"<p>{len({r['source_uri'] for r in rows})} sources, {len(rows)} rows, "
        f"<b>{len(kept)} clips kept</b> ({_hours(kept) * 60:.1f} min), "
        f"{len(errors)} {'error' if len(errors) == 1 else 'errors'}. "
        f"Train: {sum(r['split'] == 'train' for r in rows)}, eval: {sum(r['split'] == 'eval' for r in rows)}.</p>"
    )
    skipped = [s for s in ("text", "aesthetic", "caption", "alignment") if not _stage_ran(s, rows)]
    if skipped:
        parts.append(f"<p>Stages that did not run in this job: {', '.join(skipped)}.</p>")

    parts.append("<h2>Funnel</h2><table><tr><th>stage</th><th>clips in</th><th>hours in</th><th>passed</th>"
                 "<th>rejected</th><th>reasons</th></tr>")  # fmt: skip
    for step in steps:
        reasons = "<br>".join(f"{html.escape(k)}: {v}" for k, v in step["reasons"].most_common())
        hours = "" if step["hours"] is None else f"{step['hours']:.3f}"
        parts.append(
            f"<tr><td>{step['stage']}</td><td>{step['in_clips']}</td><td>{hours}</td><td>{step['out']}</td>"
            f"<td>{step['rejected']}</td><td style='text-align:left'>{reasons}</td></tr>"
        )
    parts.append("</table>")

    parts.append("<h2>Scores</h2>")
    for column, _stage in HISTOGRAMS:
        values = [r[column] for r in rows if r.get(column) is not None and math.isfinite(r[column])]
        if not values:
            continue
        png = _histogram_png(values, f"{column} ({len(values)} clips)", active.get(column, []))
        write_bytes_atomic(files / f"hist_{column}.png", png)
        parts.append(f"<img src='report_files/hist_{column}.png' alt='{column}'>")
    timings = Counter(r["timing"] for r in rows if r.get("timing"))
    if timings:
        parts.append(
            "<p>Animation timing: " + ", ".join(f"{k}: {v}" for k, v in timings.most_common()) + "</p>"
        )
    sources = len({r["source_uri"] for r in rows})
    boxed = sorted({r["source_uri"] for r in rows if r.get("content_box") is not None})
    if boxed:
        parts.append(
            f"<p>Black bars: {len(boxed)} of {sources} sources were cut inside their letterbox/pillarbox"
            " bars (the manifest's <code>content_box</code>).</p>"
        )
    variable = {r["source_uri"]: r["fps"] for r in rows if r.get("vfr") and r["status"] != "error"}
    if variable:
        rates = ", ".join(f"{fps:g} fps: {n}" for fps, n in Counter(variable.values()).most_common())
        parts.append(
            f"<p>Variable frame rate: {len(variable)} of {sources} sources were curated on a constant grid"
            f" ({rates}; the manifest's <code>vfr</code>).</p>"
        )
    telecined = {r["source_uri"] for r in rows if r.get("ivtc") and r["status"] != "error"}
    if telecined:
        parts.append(
            f"<p>Telecined film: {len(telecined)} of {sources} sources were decoded back to their film frames"
            " (4 frames of every 5; the manifest's <code>ivtc</code>).</p>"
        )

    by_reason: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] != "kept":
            by_reason[_short_reason(r["reason"])].append(r)
    # the candidates: rows spread over each group, so that its thumbnails come from across the job,
    # not from the first source (some rows, errors, have no thumbnail)
    shown = {
        id(group): _spread(group, THUMBS_PER_GROUP * CANDIDATES) for group in (kept, *by_reason.values())
    }
    thumbs = (thumbs([r for rows in shown.values() for r in rows]) if callable(thumbs) else thumbs) or {}
    parts.append("<h2>Kept clips</h2>")
    with_thumbs = [r for r in shown[id(kept)] if r["clip_id"] in thumbs]
    parts.append(_thumb_block(files, _spread(with_thumbs, THUMBS_PER_GROUP), thumbs))
    parts.append("<h2>Rejected and failed, by reason</h2>")
    for reason, group in sorted(by_reason.items()):
        parts.append(f"<h3>{html.escape(reason)} ({len(group)})</h3>")
        with_thumbs = [r for r in shown[id(group)] if r["clip_id"] in thumbs]
        if with_thumbs:
            parts.append(_thumb_block(files, _spread(with_thumbs, THUMBS_PER_GROUP), thumbs))
        else:
            listed = "".join(f"<li>{html.escape(str(r['source_uri']))}: {html.escape(str(r['reason']))}</li>"
                             for r in _spread(group, THUMBS_PER_GROUP))  # fmt: skip
            parts.append(f"<ul>{listed}</ul>")
    parts.append(
        "<h2>Configuration</h2><pre>"
        + html.escape(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        + "</pre>"
    )
    parts.append("</body></html>")
    path = out / "report.html"
    write_bytes_atomic(path, "\n".join(parts).encode())
    return path


def _thumb_block(files: Path, rows: list[dict], thumbs: dict[str, bytes]) -> str:
    items = []
    for r in rows:
        data = thumbs.get(r["clip_id"])
        if not data:
            continue
        name = f"thumb_{r['clip_id']}.jpg"
        write_bytes_atomic(files / name, data)
        caption = (
            f"{html.escape(Path(str(r['source_uri'])).name)} [{r['start_frame']}, {r['end_frame']})"
            f"<br>motion {r['motion_mean'] if r['motion_mean'] is None else round(r['motion_mean'], 3)}, "
            f"{r.get('timing') or ''}"
        )
        items.append(
            f"<figure><img src='report_files/{name}' width='192'><figcaption>{caption}</figcaption></figure>"
        )
    return "<div class='thumbs'>" + "".join(items) + "</div>" if items else "<p>(none)</p>"
