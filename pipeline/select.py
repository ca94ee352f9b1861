"""Thresholds applied from the manifest's scores: score once, filter many times.

`decide` recomputes every row's status and reason from its scores and the current thresholds.
Errors and structural rejections (a shot too short to be a clip) keep theirs: no threshold can
bring them back. A write error is the exception: the scores decide again, and the clip is written
again if it is kept. The first failing rule, in stage order (cheapest first), names the reason.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa

from pipeline.config import CurateConfig

STRUCTURAL_STAGES = ("probe:", "shots:")
# Errors that say nothing of the clip's content: its scores decide again and the step is tried again
# (a clip whose source was missing when it was to be written is written once the source is back).
RETRIED_ERRORS = ("write:",)


def rules(config: CurateConfig) -> list[tuple[str, str, str, float]]:
    """(stage, column, comparison, threshold) for every active threshold, in stage order."""
    out = []
    if config.motion.min is not None:
        out.append(("motion", "motion_mean", "min", config.motion.min))
    if config.motion.max is not None:
        out.append(("motion", "motion_mean", "max", config.motion.max))
    if config.text.enabled and config.text.max is not None:
        out.append(("text", "text_area", "max", config.text.max))
    if config.aesthetic.enabled and config.aesthetic.min is not None:
        out.append(("aesthetic", "aesthetic_min", "min", config.aesthetic.min))
    if config.alignment.enabled and config.alignment.min is not None:
        out.append(("alignment", "clip_sim_min", "min", config.alignment.min))
    return out


def thresholds_json(config: CurateConfig) -> str:
    return json.dumps({f"{stage}.{cmp}": value for stage, _, cmp, value in rules(config)}, sort_keys=True)


def decide_row(row: dict, active: list[tuple[str, str, str, float]]) -> tuple[str, str | None]:
    reason = row.get("reason") or ""
    if row.get("status") == "error" and not reason.startswith(RETRIED_ERRORS):
        return "error", row.get("reason")
    if row.get("status") == "rejected" and reason.startswith(STRUCTURAL_STAGES):
        return "rejected", reason
    for stage, column, cmp, threshold in active:
        value = row.get(column)
        if value is None:
            # the stage did not run (skipped: the report says so) or had nothing to score (a clip
            # without a caption has no alignment); a column lost from the file is refused on reading
            continue
        if not math.isfinite(value):  # NaN compares false both ways: it would pass
            return "rejected", f"{stage}: {column} is {value}, not a score; curate again to rescore it"
        if cmp == "min" and value < threshold:
            return "rejected", f"{stage}: {column} {value:.4g} < {stage}.min {threshold:g}"
        if cmp == "max" and value > threshold:
            return "rejected", f"{stage}: {column} {value:.4g} > {stage}.max {threshold:g}"
    return "kept", None


def decide(table: pa.Table, config: CurateConfig) -> pa.Table:
    """Recompute status, reason, thresholds and (for rejects) split for every row."""
    active = rules(config)
    rows = table.to_pylist()
    statuses, reasons = [], []
    for row in rows:
        status, reason = decide_row(row, active)
        statuses.append(status)
        reasons.append(reason)
    frozen = thresholds_json(config)
    table = table.set_column(
        table.schema.get_field_index("status"), "status", pa.array(statuses, pa.string())
    )
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    table = table.set_column(
        table.schema.get_field_index("thresholds"), "thresholds", pa.array([frozen] * len(rows), pa.string())
    )
    return table
