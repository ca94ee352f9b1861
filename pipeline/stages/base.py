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

    def setup(self) -> None:
        """Load what the stage needs once per worker (a model, a detector). Default: nothing."""

    def __call__(self, batch: Batch) -> Batch:
        return batch_of(list(self.process_rows(rows_of(batch))))

    def process_rows(self, rows: list[dict]) -> Iterator[dict]:
        for row in rows:
            yield self.process(row)

    def process(self, row: dict) -> dict:  # pragma: no cover - subclasses implement
        raise NotImplementedError

    @classmethod
    def has_setup(cls) -> bool:
        return cls.setup is not Stage.setup


def rows_of(batch: Batch) -> list[dict]:
    """Columnar batch -> list of row dicts (numpy scalars become Python scalars)."""
    if not batch:
        return []
    names = list(batch)
    length = len(batch[names[0]])
    rows = []
    for i in range(length):
        row = {}
        for name in names:
            value = batch[name][i]
            if isinstance(value, np.generic):
                value = value.item()
            row[name] = value
        rows.append(row)
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
            column[i] = value
        out[name] = column
    return out
