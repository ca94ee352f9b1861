"""The stage interface: parameters + `setup()` + a call on a columnar batch, with declared resources.

A batch is a dict of equal-length columns (lists or numpy arrays). Ray's runner (pipeline.runner)
maps a stage with its own `setup()` onto an actor pool and a stage without one onto tasks; tests
call stages directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

Batch = dict[str, Any]


class Stage:
    """Base of every stage. Subclasses are dataclasses whose fields are the stage's parameters."""

    name: ClassVar[str] = "stage"
    num_cpus: ClassVar[float] = 1.0  # CPUs one worker of this stage needs
    num_gpus: ClassVar[float] = 0.0  # (fractional) GPUs one worker needs
    batch_size: ClassVar[int] = 1  # rows per call
    emits_many: ClassVar[bool] = False  # True when one input row becomes many output rows
    # The heavy columns (frames, embeddings: pipeline.runner.HEAVY_COLUMNS) this stage reads. On Ray,
    # rows travel to a stage without the heavy columns that neither it nor any later stage reads.
    reads: ClassVar[tuple[str, ...]] = ()

    def setup(self) -> None:
        """Load what the stage needs once per worker (a model, a detector). Default: nothing."""

    def __call__(self, batch: Batch) -> Batch:
        return batch_of([self.mark(row) for row in self.process_rows(rows_of(batch))])

    def mark(self, row: dict) -> dict:
        """Record in `stages_run` that this stage scored the row (skipped stages stay absent)."""
        if row.get("row_kind") == "clip" and row.get("status") != "error":
            row["stages_run"] = [*(row.get("stages_run") or []), self.name]
        return row

    def process_rows(self, rows: list[dict]) -> Iterator[dict]:
        for row in rows:
            yield self.process(row)

    def process(self, row: dict) -> dict:  # pragma: no cover - subclasses implement
        raise NotImplementedError

    @classmethod
    def has_setup(cls) -> bool:
        return cls.setup is not Stage.setup


class Packed:
    """Carries an array (or a list of arrays) through Ray as one opaque Python object.

    Ray Data turns ndarray columns into its tensor extension types, which mis-slice stacks of
    different shapes when blocks are combined; a wrapped value is pickled as-is instead.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (Packed, (self.value,))


def _pack(value):
    if isinstance(value, np.ndarray) or (
        isinstance(value, list) and value and isinstance(value[0], np.ndarray)
    ):
        return Packed(value)
    return value


def _unpack(value):
    if isinstance(value, Packed):
        return value.value
    if isinstance(value, np.ndarray):  # Ray's rendering of a list column (real arrays travel Packed)
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows_of(batch: Batch) -> list[dict]:
    """Columnar batch -> list of row dicts (numpy scalars become Python scalars)."""
    if not batch:
        return []
    names = list(batch)
    length = len(batch[names[0]])
    rows = []
    for i in range(length):
        rows.append({name: _unpack(batch[name][i]) for name in names})
    return rows


def batch_of(rows: list[dict]) -> Batch:
    """List of row dicts -> columnar batch of numpy arrays (object arrays for ragged values)."""
    if not rows:
        return {}
    names: list[str] = []
    for row in rows:
        for name in row:
            if name not in names:
                names.append(name)
    out: Batch = {}
    for name in names:
        values = [row.get(name) for row in rows]
        column = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            column[i] = _pack(value)
        out[name] = column
    return out
