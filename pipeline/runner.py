"""All Ray code of the project: stages onto Ray Data, with their declared resources.

A stage with its own `setup()` (a model to load once) becomes an actor pool; one without becomes
tasks, which Ray Data fuses with their neighbours so that decoded frames never leave the worker
that decoded them. Ray runs locally by default and on a cluster when `--address` or RAY_ADDRESS
names one; the same command serves both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

from pipeline.stages.base import Stage, batch_of, rows_of

HEAVY_COLUMNS = ("analysis", "keyframes", "distinct_idx")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process: `address`, else RAY_ADDRESS, else a local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress (stages, clips/s, ETA)
    ctx.print_on_execution_start = False


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _task_udf(stage: Stage) -> Callable:
    """A plain function for Ray tasks; a stage that emits many rows yields them one by one."""
    if stage.emits_many:

        def run_many(batch):
            for row in stage.process_rows(rows_of(batch)):
                yield batch_of([stage.mark(row)])

        return run_many

    def run(batch):
        return stage(batch)

    return run


class _ActorUDF:
    """An actor holding one stage instance: setup() runs once per actor (a model loads once)."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch):
        return self.stage(batch)


def _drop_heavy(batch):
    return {k: v for k, v in batch.items() if k not in HEAVY_COLUMNS}


def run_stages(items: Sequence[dict], stages: Sequence[Stage], workers: int) -> Iterator[dict]:
    """Stream rows through the stages on Ray Data; yields output rows (heavy columns dropped)."""
    import ray

    ds = ray.data.from_items(list(items), override_num_blocks=max(1, len(items)))
    for stage in stages:
        common = {"batch_format": "numpy", "num_cpus": stage.num_cpus}
        if stage.num_gpus:
            common["num_gpus"] = stage.num_gpus
        if stage.has_setup():
            ds = ds.map_batches(
                _ActorUDF,
                fn_constructor_args=(stage,),
                batch_size=stage.batch_size,
                concurrency=(1, max(1, workers)),
                **common,
            )
        else:
            # tasks: batch_size None keeps each source's block whole, so the chain fuses per source
            ds = ds.map_batches(_task_udf(stage), batch_size=None, concurrency=max(1, workers), **common)
    ds = ds.map_batches(_drop_heavy, batch_size=None, batch_format="numpy", concurrency=max(1, workers))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield from rows_of(batch)


def run_tasks(fn: Callable[[dict], dict], items: Sequence[dict], workers: int) -> Iterator[dict]:
    """Map a function over items as Ray tasks (one item per task), streaming results back."""
    import ray

    def udf(batch):
        return batch_of([fn(row) for row in rows_of(batch)])

    ds = ray.data.from_items(list(items), override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(udf, batch_size=None, batch_format="numpy", concurrency=max(1, workers))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield from rows_of(batch)
