"""All Ray code of the project: stages onto Ray Data, with their declared resources.

A stage with its own `setup()` (a model to load once) becomes an actor pool; consecutive stages
without one become one function run as a Ray task per source, so that decoded frames never leave
the worker that decoded them, nor even become Ray blocks between stages. Ray runs locally by
default and on a cluster when `--address` or RAY_ADDRESS names one; the same command serves both.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.stages.base import Packed, Stage, batch_of, rows_of

HEAVY_COLUMNS = ("analysis", "keyframes", "distinct_idx", "clip_image_emb")
# A task whose worker process dies (a crash in a decoder, memory exhausted, a lost node) runs at most
# this many times more; then its source is given up and the job goes on (the job makes it an error
# row). Ray Data's default retries such a task for ever: one source that crashes FFmpeg hung the job.
WORKER_RETRIES = 2
CPU_ACTOR_SHARE = 0.1  # CPU slot a model actor reserves on a machine without GPUs
GPU_ACTOR_MIN_CPUS = 0.01  # the least CPU share a GPU actor reserves (see actor_plan)

# Ray Data 2.60's scheduling loop, in the driver, has two waits that idle the workers of a CPU job
# (ray-project/ray#42377 and #45934, both open):
#  - each step blocks in `ray.wait` for *all* running tasks, up to 0.1 s, before it dispatches the
#    next one: with N tasks running, a worker whose task ends sits idle until the others end or the
#    0.1 s pass (with 1 task the wait returns at once, so 1 worker never pays it). On 2 workers with
#    0.4 s tasks that was 0.12 s idle after every task. `_FirstReadyWait` makes that wait return as
#    soon as one task is ready (with every other one ready by then), so the loop wakes when there is
#    something to dispatch and otherwise keeps Ray's 0.1 s heartbeat.
#  - the global CPU budget comes from Ray Data's autoscaling coordinator, asked asynchronously and
#    re-read at most once a second; it is zero until the first answer, so every execution began
#    with one task at a time for ~1 s. `_ask_again_while_zero` re-reads it at every step until the
#    first non-zero answer, then once a second as Ray does.
# Both patch Ray Data's internals in the driver (where the executor runs); a test checks that this
# Ray still has what they patch, and `_tune_scheduling` warns if it does not.


class _FirstReadyWait:
    """The `ray` module as Ray Data's scheduling loop sees it, but with a `wait` that, asked for all
    of several waitables, returns once one of them is ready, together with every other one ready by
    then (the loop handles a partial answer already: it gets one whenever its timeout passes).

    A waitable that was ready at the previous call and still is (a finished task whose metadata the
    loop is still fetching, or whose output backpressure leaves unread) must not wake every call, or
    the loop would spin: while there is one, the wait for the others times out after
    `FIRST_BACKOFF_S`, doubling at each call up to the loop's own timeout (Ray's behaviour)."""

    FIRST_BACKOFF_S = 0.005

    def __init__(self, ray_module):
        self._ray = ray_module
        self._state = threading.local()  # per executor thread: (ids ready last call, backoff)

    def __getattr__(self, name: str):
        return getattr(self._ray, name)

    def wait(self, waitables, *, num_returns: int = 1, timeout=None, fetch_local: bool = True):
        wait = self._ray.wait
        if num_returns <= 1 or num_returns < len(waitables):
            return wait(waitables, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local)
        ready_before, backoff = getattr(self._state, "last", (set(), self.FIRST_BACKOFF_S))
        others = [w for w in waitables if id(w) not in ready_before]
        if len(others) == len(waitables):
            first_timeout, backoff = timeout, self.FIRST_BACKOFF_S
        else:
            first_timeout = backoff if timeout is None else min(backoff, timeout)
            backoff = min(2 * backoff, timeout or 0.1)
        if others:
            wait(others, num_returns=1, timeout=first_timeout, fetch_local=fetch_local)
        ready, rest = wait(waitables, num_returns=len(waitables), timeout=0, fetch_local=fetch_local)
        self._state.last = ({id(w) for w in ready}, backoff)
        return ready, rest


def _ask_again_while_zero(get_global_limits):
    @functools.wraps(get_global_limits)
    def wrapper(self):
        limits = get_global_limits(self)
        if not limits.cpu and not limits.gpu:  # no answer from the coordinator yet: ask next step
            self._global_limits_last_update_time = 0
        return limits

    wrapper.inbetweener_patch = True
    return wrapper


def _missing_internals() -> list[str]:
    """What the patches below rely on and this Ray lacks (nothing, for the Ray we pin)."""
    import inspect

    from ray.data._internal.execution import resource_manager, streaming_executor_state

    missing = []
    completed = getattr(streaming_executor_state, "process_completed_tasks", None)
    if completed is None or "ray" not in completed.__globals__:
        missing.append("streaming_executor_state.process_completed_tasks calling ray.wait")
    limits = getattr(resource_manager.ResourceManager, "get_global_limits", None)
    if limits is None or "_global_limits_last_update_time" not in inspect.unwrap(limits).__code__.co_names:
        missing.append("ResourceManager.get_global_limits reading _global_limits_last_update_time")
    return missing


def _tune_scheduling() -> None:
    from ray.data._internal.execution import resource_manager, streaming_executor_state

    missing = _missing_internals()
    if missing:  # another Ray: patching would change nothing, or break it, so say so and leave it
        warnings.warn(
            f"Ray Data has changed ({'; '.join(missing)}): the curate job's workers may idle"
            " between tasks (see _tune_scheduling in pipeline/runner.py)",
            stacklevel=2,
        )
        return
    if not isinstance(streaming_executor_state.ray, _FirstReadyWait):
        streaming_executor_state.ray = _FirstReadyWait(streaming_executor_state.ray)
    manager = resource_manager.ResourceManager
    if not getattr(manager.get_global_limits, "inbetweener_patch", False):
        manager.get_global_limits = _ask_again_while_zero(manager.get_global_limits)


def init_ray(
    address: str | None = None, num_cpus: int | None = None, object_store_bytes: int | None = None
) -> None:
    """Start (or join) Ray once per process: `address`, else RAY_ADDRESS, else a local instance (with
    `num_cpus` and an object store of `object_store_bytes`; a cluster's are set by its `ray start`)."""
    import ray

    _tune_scheduling()
    if ray.is_initialized():
        return
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None  # a list file's "\r" too
    if address and address.startswith("ray://"):
        from pipeline.config import ConfigError

        raise ConfigError(
            f"--address {address}: Ray Client (ray://) cannot run Ray Data's streaming jobs (it fails inside"
            " Ray Data); run the job on a node of the cluster with --address auto (or its HOST:6379), or"
            " submit it there with `ray job submit`"
        )
    if address and address not in ("auto", "local") and not _looks_like_host_port(address):
        from pipeline.config import ConfigError

        raise ConfigError(
            f"--address {address!r}: give HOST:PORT (the head's GCS, e.g. 10.0.0.5:6379), auto or local"
        )
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.WARNING}
    if address and address != "local":
        kwargs["address"] = address
    else:  # a new local instance, even beside a cluster `ray start` left running (ray.init() would join it)
        address = None
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        if object_store_bytes:
            kwargs["object_store_memory"] = object_store_bytes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    problem = probe_gcs(address) if address else None
    if problem:
        from pipeline.config import ConfigError

        raise ConfigError(_cannot_connect(address, problem))
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        if not address:
            raise
        from pipeline.config import ConfigError

        raise ConfigError(_cannot_connect(address, exc)) from None
    ctx = ray.data.DataContext.get_current()
    # a source whose worker dies on every attempt is left out (the job makes it an error row), not the
    # job; an exception in a stage never gets here: it fails its row (_through, _ActorUDF)
    ctx.max_errored_blocks = -1
    ctx.enable_progress_bars = False  # the job prints its own progress (stages, clips/s, ETA)
    ctx.print_on_execution_start = False
    # rows travel as pickled Python objects on purpose (see ROW below): say so, instead of Ray
    # warning once per job that Arrow could not convert them
    ctx.enable_fallback_to_arrow_object_ext_type = True
    # Ray Data's console notes repeat the job's own progress lines (its ray-data.log keeps them all)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    # A job with fewer sources (or model batches) than workers is normal: not worth a warning
    warnings.filterwarnings(
        "ignore", message="The maximum number of concurrent tasks for", category=UserWarning
    )
    # Ray 2.60 deprecates the remote arguments map_batches passes on (for removal in 2.64) but names
    # none for retries: WORKER_RETRIES still goes that way (Ray is pinned; its test fails on a Ray
    # that drops them), and its users need not read the deprecation note every job
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)


GCS_PROBE_TIMEOUT_S = 10.0


def _looks_like_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit())


def is_cluster(address: str | None) -> bool:
    """Whether the job runs on a cluster (its workers on other machines, with their own files and
    FFmpeg): an address other than `local`, given or in RAY_ADDRESS."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    return bool(address) and address != "local"


def probe_gcs(address: str, timeout: float = GCS_PROBE_TIMEOUT_S) -> str | None:
    """Why nothing answers at a cluster's `host:port` (GCS) address, or None when something does, or when
    the address is not one (`auto`, `ray://...`). ray.init keeps retrying an unreachable GCS, printing a
    timeout every 40 s (still retrying after 5 minutes here): a mistyped address would hang the job."""
    if "://" in address or address in ("auto", "local"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} within {timeout:g} s: {exc.strerror or exc}"


def _cannot_connect(address: str, exc: Exception | str) -> str:
    # Ray 2.59+ starts clusters with token authentication on, and a driver given an explicit
    # address does not send the token unless told to: Ray then reports only a failed connection
    auth = (
        "RAY_AUTH_MODE is token here: check that the token is the cluster's"
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        else "if the cluster uses token authentication (`ray start` turns it on by default and says"
        " so), set RAY_AUTH_MODE=token"
    )
    return (
        f"cannot connect to the Ray cluster at {address} ({exc}). Check the address (`ray status`"
        f" on the head node prints it); {auth} (the token comes from RAY_AUTH_TOKEN,"
        " RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# Rows travel through Ray as one opaque column: stages add columns as they go, rows of one batch
# may lack some (an error row has no scores), and Ray would otherwise infer a column's type per
# block and fail to merge blocks where it is null in one and a string in another.
ROW = "row"


def _unwrap(ray_batch) -> list[dict]:
    return [packed.value for packed in ray_batch[ROW]]


def _wrap(rows: list[dict]) -> dict:
    column = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        column[i] = Packed(row)
    return {ROW: column}


def _threads_as_declared(num_cpus: float) -> None:
    """Keep a task within the CPUs it declared. Ray sets OMP_NUM_THREADS for its workers, but
    OpenCV's own thread pool ignores it and spreads resizes and optical flow over every core of
    the machine: one task then borrows its neighbours' cores and N tasks oversubscribe the node."""
    import cv2

    threads = max(1, round(num_cpus))
    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)


def _failed(stage: Stage, row: dict, exc: Exception) -> dict:
    """The row a stage failed on (a bug, or an input no one foresaw), as an error row naming the
    error: a clip keeps its identity, a source becomes its source-level error row. The traceback goes
    to the worker's log (Ray forwards it to the driver's console)."""
    from pipeline.stages.discover import error_fields

    logging.getLogger(__name__).exception("%s failed on %s", stage.name, row.get("source_uri"))
    reason = f"{stage.name}: {type(exc).__name__}: {str(exc).strip()[:300]}"
    if row.get("row_kind") == "clip":
        return {**row, "status": "error", "reason": reason}
    return {**row, **error_fields(row, reason), "row_kind": "error"}


def _through(stage: Stage, rows: Iterator[dict]) -> Iterator[dict]:
    """One task stage over a stream of rows, one row at a time (what Ray gave it, one block per row).
    An exception fails the row it happened on, not the source's task (nor the job)."""
    for row in rows:
        emitted = 0
        try:
            if stage.emits_many:
                for out in stage.process_rows([row]):
                    emitted += out.get("row_kind") != "source_end"
                    yield stage.mark(out)
            else:
                yield from rows_of(stage(batch_of([row])))
        except Exception as exc:  # noqa: BLE001 - the row becomes an error row with the error's name
            yield _failed(stage, row, exc)
            if stage.emits_many:  # the source's clips cut so far stand; the job counts them and this
                yield {
                    "row_kind": "source_end",
                    "source_uri": row["source_uri"],
                    "clips_emitted": emitted + 1,
                }


def _chain_udf(stages: Sequence[Stage], drop: tuple[str, ...], num_cpus: float) -> Callable:
    """Consecutive task stages as one Ray Data function: rows go from stage to stage as Python
    objects. As separate operators, even fused into one task, Ray turned every stage's output into
    a block, pickling the frames each clip carries only to unpickle them for the next stage in the
    same worker: 17% of a worker's time on the bench footage. Rows leave one by one (a source's
    clips stream out as they are cut), without the heavy columns in `drop`; OpenCV gets the
    `num_cpus` threads the task holds."""

    def run(ray_batch):
        _threads_as_declared(num_cpus)
        rows: Iterator[dict] = iter(_unwrap(ray_batch))
        for stage in stages:
            rows = _through(stage, rows)
        for row in rows:
            yield _wrap([{k: v for k, v in row.items() if k not in drop}])

    return run


class StageLoadError(RuntimeError):
    """A stage's setup (its model loading) failed in a worker: the job stops with this one line."""


def stage_load_error(exc: BaseException) -> str | None:
    """The StageLoadError message inside an exception Ray raised on the driver (wrapped, re-raised with the
    worker's traceback as text), if any."""
    import re

    seen, first = set(), exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StageLoadError):
            return str(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__
    found = re.search(r"StageLoadError: (.+)", str(first))  # an actor's death carries it as text
    return found.group(1).strip() if found else None


class _ActorUDF:
    """An actor holding one stage instance: setup() runs once per actor (a model loads once).
    Its rows leave without the heavy columns in `drop`."""

    def __init__(self, stage: Stage, drop: tuple[str, ...]):
        self.stage = stage
        self.drop = drop
        try:
            self.stage.setup()
        except Exception as exc:  # a model that will not load fails every row: one line, not 300 of Ray's
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StageLoadError(
                f"{stage.name}: its model did not load ({type(exc).__name__}: {first[:300]})"
            ) from None

    def __call__(self, ray_batch):
        rows = _unwrap(ray_batch)
        try:
            out = rows_of(self.stage(batch_of(rows)))
        except Exception:  # noqa: BLE001 - one clip (or the batch's size: GPU memory) fails, not the batch
            out = []
            for row in rows:
                try:
                    out += rows_of(self.stage(batch_of([row])))
                except Exception as exc:  # noqa: BLE001 - an error row naming the error
                    out.append(_failed(self.stage, row, exc))
        return _wrap([{k: v for k, v in row.items() if k not in self.drop} for row in out])


def _tasks(workers: int):
    """At most `workers` tasks of a chain at once."""
    import ray

    return ray.data.TaskPoolStrategy(size=max(1, workers))


def _groups(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Each model stage alone; each run of consecutive task stages together (one Ray operator)."""
    groups: list[list[Stage]] = []
    for stage in stages:
        if stage.has_setup() or not groups or groups[-1][0].has_setup():
            groups.append([stage])
        else:
            groups[-1].append(stage)
    return groups


@dataclass(frozen=True)
class Pool:
    """A model stage's actor pool: how many actors, and the GPU and CPU shares each one reserves."""

    actors: int
    gpus: float
    cpus: float


def _down(share: float) -> float:
    """A resource share rounded down to Ray's precision (1/10,000): shares that add up to a whole
    must not add up to a little more."""
    return math.floor(share * 10_000 + 1e-6) / 10_000


def actor_plan(stages: Sequence[Stage], gpus: float, cpus: float, workers: int) -> dict[int, Pool]:
    """The actor pool of each model stage (by its index in `stages`), sized so that every pool's
    actors and the `workers` CPU tasks can all hold their resources at once.

    Ray Data starts an actor pool's actors when the job starts and keeps them to its end. If the pools
    together ask for more than the cluster has, the last ones' actors wait for resources that the
    first never give back; the rows wait for them, and the job hangs without an error
    (ray-project/ray#44687 is that case with CPUs). Sized as "each stage gets every GPU" (4 actors of
    0.25 per card for each of text, aesthetic and alignment, 2 of 0.5 for caption), the default job
    asked for 4 GPUs per GPU, and its 14 actors per card for a CPU each.

    GPUs: split between the stages that ask for a share, in proportion to their declared shares (a
    stage that declares more, like caption's 0.5, gets more; `--set caption.num_gpus=1` gives it
    more still). Each gets as many actors of its declared share as fit in its slice (at least one),
    or, when its share alone is more than the slice, one actor of the whole slice. A share is a
    reservation, not a limit: an actor's kernels use whatever GPU time the others leave.
    CPUs: the `workers` decoding tasks keep theirs. The GPU actors split what is left over (at most
    their declared `num_cpus` each), as a CPU-only actor always does with its token share: an
    actor's host work needs a core only while it prepares a batch. On the job's local Ray (a CPU per
    worker, plus one) that one CPU is split between the actors."""
    plan: dict[int, Pool] = {}
    models = [i for i, s in enumerate(stages) if s.has_setup()]
    on_gpu = [i for i in models if gpus and stages[i].num_gpus > 0]
    declared = sum(stages[i].num_gpus for i in on_gpu)
    for i in on_gpu:
        budget = gpus * stages[i].num_gpus / declared
        share = min(stages[i].num_gpus, budget)
        if share > 1:  # Ray takes whole GPUs above one
            share = float(int(share))
        plan[i] = Pool(max(1, int(budget / share + 1e-9)), _down(share), 0.0)
    spare = max(0.0, cpus - workers) / max(1, sum(plan[i].actors for i in on_gpu))
    for i in on_gpu:
        cpu = min(stages[i].num_cpus, max(GPU_ACTOR_MIN_CPUS, spare))
        plan[i] = dataclasses.replace(plan[i], cpus=_down(cpu))
    for i in models:
        plan.setdefault(i, Pool(1, 0.0, CPU_ACTOR_SHARE))  # on the CPU: one actor, a token CPU share
    return plan


def check_room(cpus: float, plan: dict[int, Pool], groups: list[list[Stage]]) -> None:
    """ConfigError when the model actors' reserved CPU shares leave no room for one decoding task: the
    actors hold theirs for the whole job, so the tasks would wait forever, silently (a 1-CPU cluster)."""
    held = sum(pool.actors * pool.cpus for pool in plan.values())
    task = max((max(s.num_cpus for s in g) for g in groups if not g[0].has_setup()), default=0.0)
    if task and cpus + 1e-9 < held + task:
        from pipeline.config import ConfigError

        raise ConfigError(
            f"the Ray cluster has {cpus:g} CPU(s): the model stages' actors hold {held:g} for the whole job and"
            f" a decoding task needs {task:g}, so no task could ever start; give the cluster more CPUs"
            " (`ray start --num-cpus N` on a node)"
        )


def run_stages(
    items: Sequence[dict], stages: Sequence[Stage], workers: int, isolate: bool = False
) -> Iterator[dict]:
    """Stream rows through the stages on Ray Data; yields output rows (heavy columns dropped).

    A model actor's batch holds clips of several sources, and more batches wait on the actor while it
    computes: a clip that kills it takes them all down, and each such death spends one of their retries
    too, so a source beside a crashing one can be given up with it. `isolate` hands each actor one block
    (one source's clips: a task's output) at a time, its clips one by one (slow: no batching on the GPU),
    for a second try of the given-up sources."""
    import ray

    ds = ray.data.from_items(
        [{ROW: Packed(dict(item))} for item in items], override_num_blocks=max(1, len(items))
    )
    resources = ray.cluster_resources()
    plan = actor_plan(stages, resources.get("GPU", 0), resources.get("CPU", 1), workers)
    pools = {id(stages[i]): pool for i, pool in plan.items()}
    groups = _groups(stages)
    check_room(resources.get("CPU", 0), plan, groups)
    for i, group in enumerate(groups):
        stage = group[0]
        # rows leave a group without the heavy columns no later stage reads (all of them at the end):
        # a clip's analysis frames are megabytes that no model actor needs to receive
        later = {name for g in groups[i + 1 :] for s in g for name in s.reads}
        drop = tuple(name for name in HEAVY_COLUMNS if name not in later)
        if stage.has_setup():
            # a model stage: an actor pool sized by actor_plan; on a machine without GPU it runs on
            # the CPU as a single actor (its device setting picks the CPU there) with a token CPU
            # share: an actor holds its slot for the whole job, and a full CPU each would starve the
            # CPU stages (and deadlock a small machine). Ray Data would fuse the CPU task chain into
            # the actors (all decoding inside the few actors) if the two asked for the same
            # resources: the actors' GPU share, or their token CPU share, keeps them apart
            # (tests/pipeline/test_runner.py checks it).
            pool = pools[id(stage)]
            shares = {"num_cpus": pool.cpus} | ({"num_gpus": pool.gpus} if pool.gpus else {})
            ds = ds.map_batches(
                _ActorUDF,
                fn_constructor_args=(stage, drop),
                # isolate: batches of 1, so a call never holds rows of two blocks (a block holds one source's
                # rows: one task's output); not None, which Ray refuses beside a GPU request
                batch_size=1 if isolate else stage.batch_size,
                compute=ray.data.ActorPoolStrategy(
                    size=pool.actors, max_tasks_in_flight_per_actor=1 if isolate else None
                ),
                batch_format="numpy",
                max_task_retries=WORKER_RETRIES,  # a batch that kills its actor: as for tasks
                **shares,
            )
        else:
            # tasks: batch_size None keeps each source's block whole (one source per task)
            num_cpus = max(s.num_cpus for s in group)
            ds = ds.map_batches(
                _chain_udf(group, drop, num_cpus),
                batch_size=None,
                batch_format="numpy",
                num_cpus=num_cpus,
                compute=_tasks(workers),
                max_retries=WORKER_RETRIES,
            )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield from _unwrap(batch)


def run_tasks(fn: Callable[[dict], dict], items: Sequence[dict], workers: int) -> Iterator[dict]:
    """Map a function over items as Ray tasks (one item per task), streaming results back."""
    import ray

    def udf(ray_batch):
        return _wrap([fn(row) for row in _unwrap(ray_batch)])

    ds = ray.data.from_items(
        [{ROW: Packed(dict(item))} for item in items], override_num_blocks=max(1, len(items))
    )
    ds = ds.map_batches(
        udf, batch_size=None, batch_format="numpy", compute=_tasks(workers), max_retries=WORKER_RETRIES
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield from _unwrap(batch)
