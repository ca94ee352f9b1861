"""`inbetweener bench curate`: decoding throughput vs the CPU stages, 1 and 2 workers, peak memory.

Everything is measured in the same run on the same generated footage, because this machine is
shared and noisy: the numbers that matter are the ratios.
  decode      PyAV decode of every frame to RGB arrays at native size, as Ray tasks (one per source)
  score       the curate job's CPU stages (probe, shots, timing, motion, dedup) on the same sources
  score+write the whole CPU job: scoring, re-encoding kept clips, shards, manifest, report
              (the model stages are off: they are measured on a GPU by pipeline/bench_models_gpu.py)
Peak memory is the largest sum of RSS over this process and all its descendants (Ray's workers),
sampled every 100 ms, measured for N and 2N sources to show that the job streams. The same process
tree gives the cores Ray's own processes (this driver, raylet, GCS, agents) keep busy while scoring:
on a machine with as many cores as workers, that load comes out of the workers' share.
With --repeat R, every measurement is taken R times, interleaved, and the fastest counts (the usual
defence against a noisy machine: noise only ever slows a run down). A control decodes the same
sources in one and in two plain processes, interleaved with the rest, so a scaling figure can be read
against what the machine allows at that moment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path


class PeakMemory:
    """Largest RSS sum over this process tree while the block runs, and the CPU seconds its processes
    used: `cpu_s["workers"]` for Ray's worker processes, `cpu_s["ray"]` for everything else (this
    driver, raylet, GCS and Ray's other helpers), whose load competes with the workers for cores.

    Listing a process tree reads every process of the machine, so the tree is listed once a second
    and its members' RSS read every `interval` (sampling the whole tree every 50 ms cost ~9% of a
    core, which a 2-worker measurement on 2 cores would pay for)."""

    def __init__(self, interval: float = 0.1, relist: float = 1.0):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.relist = relist
        self.peak = 0
        self.cpu_s = {"workers": 0.0, "ray": 0.0}
        self._stop = threading.Event()

    def _tree(self, fallback: list) -> list:
        """This process and its descendants (Ray's processes); `fallback` if the listing fails."""
        me = self.psutil.Process()
        with contextlib.suppress(self.psutil.Error):
            return [me, *me.children(recursive=True)]
        return fallback

    def _cpu_by_process(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc in self._tree([]):
            with contextlib.suppress(self.psutil.Error):
                name = proc.name()  # workers: ray::IDLE, ray::MapBatches(...); not ray::DashboardAgent
                kind = "workers" if name.startswith("ray::") and "Agent" not in name else "ray"
                times = proc.cpu_times()
                out[proc.pid] = (kind, times.user + times.system)
        return out

    def _sample(self) -> None:
        procs, listed = [self.psutil.Process()], 0.0
        while not self._stop.is_set():
            if time.monotonic() - listed >= self.relist:
                procs = self._tree(procs)
                listed = time.monotonic()
            total = 0
            for proc in procs:
                with contextlib.suppress(self.psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._cpu_start = self._cpu_by_process()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for pid, (kind, seconds) in self._cpu_by_process().items():
            self.cpu_s[kind] += seconds - self._cpu_start.get(pid, (kind, 0.0))[1]


def make_footage(root: Path, sources: int, size: tuple[int, int], episodes: int = 1) -> list[str]:
    """`sources` generated videos; with episodes > 1, each chains that many episodes into one longer
    source (real footage is minutes long: per-source costs then weigh less than with 9 s sources)."""
    from pipeline import samples

    if episodes > 1:
        names = sorted(samples.EPISODES)
        root.mkdir(parents=True, exist_ok=True)
        uris = []
        for i in range(sources):
            frames = (
                frame
                for k in range(episodes)
                for shot in samples.EPISODES[names[k % len(names)]]
                for frame in samples.shot_frames(shot, i * episodes + k, size, 24)
            )
            path = root / f"source_{i:03d}.mp4"
            samples.write_video(path, frames, 24, size)
            uris.append(str(path))
        return uris
    uris = []
    seed = 0
    while len(uris) < sources:
        folder = root / f"seed{seed}"
        samples.generate_footage(folder, seed=seed, size=size)
        for name in ("episode_01.mp4", "episode_02.mp4"):
            if len(uris) < sources:
                uris.append(str(folder / name))
        seed += 1
    return uris


def _decode_all(job: dict) -> dict:
    from pipeline.video import open_container, video_stream

    frames = 0
    with open_container(job["source_uri"]) as container:
        stream = video_stream(container)
        stream.codec_context.thread_count = 1  # one decoder thread per worker: Ray runs one worker per core
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            frames += 1
    return {"frames": frames}


class PlainProcesses:
    """The control: the same decoding in 1 and in 2 plain processes (multiprocessing, no Ray), in the
    same run as the Ray measurements. What two processes gain over one is what the machine allows;
    what Ray's workers gain beyond that ratio is Ray's own cost."""

    def __init__(self):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # started before Ray: no Ray state inherited
        self.pools = {1: context.Pool(1), 2: context.Pool(2)}

    def decode(self, uris: list[str], processes: int) -> float:
        jobs = [{"source_uri": u} for u in uris]
        start = time.perf_counter()
        self.pools[processes].map(_decode_all, jobs, chunksize=1)
        return time.perf_counter() - start

    def close(self) -> None:
        for pool in self.pools.values():
            pool.terminate()


def bench_decode(uris: list[str], workers: int) -> tuple[float, int]:
    from pipeline.runner import run_tasks

    start = time.perf_counter()
    frames = sum(r["frames"] for r in run_tasks(_decode_all, [{"source_uri": u} for u in uris], workers))
    return time.perf_counter() - start, frames


def bench_job(uris: list[str], workers: int, out: Path, score_only: bool) -> tuple[float, int, float]:
    """-> (seconds, peak RSS bytes, cores Ray's own processes used on average, the driver included)."""
    from pipeline.config import CurateConfig
    from pipeline.job import CurateJob

    config = CurateConfig()
    for stage in ("text", "aesthetic", "caption", "alignment"):  # the CPU half only: no model stages
        getattr(config, stage).enabled = False
    config.run.workers = workers
    config.run.progress = False
    job = CurateJob(uris, out, config)
    with PeakMemory() as memory:
        start = time.perf_counter()
        if score_only:
            job._check_state()
            job._score(uris)
        else:
            job.run()
        seconds = time.perf_counter() - start
    _check_scored(out)
    return seconds, memory.peak, memory.cpu_s["ray"] / seconds


def _check_scored(out: Path) -> None:
    """A source that failed would make its stages look free: the bench refuses to report then."""
    import pyarrow.parquet as pq

    parts = [p for p in (out / ".work" / "sources").glob("*.parquet") if not p.name.startswith(".")]
    rows = [
        r for p in parts for r in pq.read_table(p, columns=["source_uri", "status", "reason"]).to_pylist()
    ]
    errors = [r for r in rows if r["status"] == "error"]
    if errors or not rows:
        detail = f"{errors[0]['source_uri']}: {errors[0]['reason']}" if errors else "no rows"
        raise RuntimeError(f"bench footage did not score cleanly ({len(errors)} errors; {detail})")


def run_curate_bench(
    sources: int,
    size: tuple[int, int],
    workers_list: list[int],
    repeat: int = 1,
    episodes: int = 1,
    with_job: bool = True,
) -> dict:
    from pipeline.runner import init_ray, shutdown_ray

    root = Path(tempfile.mkdtemp(prefix="inbetweener-bench-"))
    control = None
    try:
        uris = make_footage(root / "footage", sources * 2, size, episodes)
        control = PlainProcesses() if len(workers_list) >= 2 else None
        if control:  # warm up: process start-up and imports are not part of any number
            control.decode(uris[:1], 1)
            control.decode(uris[:2], 2)
        init_ray(num_cpus=max(workers_list))
        bench_decode(uris[:1], 1)  # warm the workers up: Ray start-up is not part of any number
        results: dict = {
            "sources": sources,
            "episodes_per_source": episodes,
            "frame_size": list(size),
            "repeat": repeat,
            "workers": {},
        }
        runs: dict[int, list[tuple]] = {w: [] for w in workers_list}  # (decode s, score s, job s, MBs, cores)
        plain: dict[int, list[float]] = {1: [], 2: []}  # the control's decode seconds
        for attempt in range(repeat):
            if control:
                for processes in (1, 2):
                    plain[processes].append(control.decode(uris[:sources], processes))
            for workers in workers_list:
                d_s, frames = bench_decode(uris[:sources], workers)
                out = root / f"run{attempt}"
                s_s, s_mem, s_ray = bench_job(
                    uris[:sources], workers, out / f"score{workers}", score_only=True
                )
                j_s, j_mem, _ = (
                    bench_job(uris[:sources], workers, out / f"job{workers}", score_only=False)
                    if with_job
                    else (float("nan"), 0, 0.0)
                )
                shutil.rmtree(out, ignore_errors=True)
                runs[workers].append((d_s, s_s, j_s, s_mem, j_mem, s_ray))
        best = {}  # per column: the fastest time and the largest peak over the repeats
        for workers, rows in runs.items():
            d_s, s_s, j_s = (min(col) for col in list(zip(*rows))[:3])
            s_mem, j_mem = (max(col) for col in list(zip(*rows))[3:5])
            s_ray = min(rows, key=lambda row: row[1])[5]  # that of the fastest score run
            best[workers] = (d_s, s_s, j_s, s_mem, j_mem, s_ray, frames)
        for workers, (d_s, s_s, j_s, s_mem, j_mem, s_ray, frames) in best.items():
            results["workers"][workers] = {
                "frames": frames,
                "decode_fps": frames / d_s,
                "score_fps": frames / s_s,
                "job_fps": frames / j_s,
                "score_over_decode": (frames / s_s) / (frames / d_s),
                "job_over_decode": (frames / j_s) / (frames / d_s),
                "score_peak_mb": s_mem / 2**20,
                "job_peak_mb": j_mem / 2**20,
                "score_ray_cores": s_ray,
            }
            if not with_job:
                results["workers"][workers].update(job_fps=None, job_over_decode=None, job_peak_mb=None)
        _, mem_2n, _ = bench_job(uris, workers_list[-1], root / "double", score_only=True)
        results["peak_mb_N"] = results["workers"][workers_list[-1]]["score_peak_mb"]
        results["peak_mb_2N"] = mem_2n / 2**20
        if len(workers_list) >= 2:
            one, two = results["workers"][workers_list[0]], results["workers"][workers_list[-1]]
            results["score_scaling"] = two["score_fps"] / one["score_fps"]
            results["decode_scaling"] = two["decode_fps"] / one["decode_fps"]
        if control:
            results["plain_decode_scaling"] = min(plain[1]) / min(plain[2])
            results["plain_decode_fps"] = {p: frames / min(plain[p]) for p in (1, 2)}
        shutdown_ray()
        return results
    finally:
        if control:
            control.close()
        shutil.rmtree(root, ignore_errors=True)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def format_results(r: dict) -> str:
    lines = [
        f"curate bench: {r['sources']} sources of {r['episodes_per_source']} episode(s),"
        f" {r['frame_size'][0]}x{r['frame_size'][1]},"
        f" best of {r['repeat']}",
        "workers  frames  decode fps  score fps  score/decode  job fps  job/decode  score peak MB  job peak MB",
    ]
    for w, v in r["workers"].items():
        lines.append(
            f"{w:>7}  {v['frames']:>6}  {v['decode_fps']:>10.0f}  {v['score_fps']:>9.0f}  {v['score_over_decode']:>12.2f}"
            f"  {_num(v['job_fps'], 7, 0)}  {_num(v['job_over_decode'], 10, 2)}  {v['score_peak_mb']:>13.0f}"
            f"  {_num(v['job_peak_mb'], 11, 0)}"
        )
    if "score_scaling" in r:
        low, high = min(r["workers"]), max(r["workers"])
        lines.append(
            f"{high} workers / {low} worker{'s' if low > 1 else ''}: score {r['score_scaling']:.2f}x,"
            f" decode {r['decode_scaling']:.2f}x;"
            f" the same decoding in plain processes (no Ray): 2 / 1 = {r['plain_decode_scaling']:.2f}x"
        )
    cores = ", ".join(f"{w} worker(s) {v['score_ray_cores']:.2f}" for w, v in r["workers"].items())
    lines.append(f"cores Ray's own processes (driver, raylet, GCS, ...) kept busy while scoring: {cores}")
    lines.append(
        f"peak memory, scoring N={r['sources']} vs 2N sources: {r['peak_mb_N']:.0f} MB vs {r['peak_mb_2N']:.0f} MB"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the near-duplicate search


def python_banded_pairs(fingerprints: dict[str, list[int]], max_distance: int) -> list[tuple[str, str, int]]:
    """The pure-Python banded search manifests.split used before it was vectorised (2026-11-29): the
    same bands and the same result, compared pair by pair in every bucket. The split benchmark's baseline."""
    from collections import defaultdict

    from manifests.split import HASH_BITS, fingerprint_distance

    def bands(fp: list[int], count: int) -> list[int]:
        bits = 0
        for value in fp:
            bits = (bits << HASH_BITS) | int(value)
        total = HASH_BITS * len(fp)
        edges = [round(i * total / count) for i in range(count + 1)]
        return [(bits >> (total - hi)) & ((1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]

    usable = {k: v for k, v in fingerprints.items() if v}
    by_length: dict[int, list[str]] = defaultdict(list)
    for key, fp in usable.items():
        by_length[len(fp)].append(key)
    pairs: dict[tuple[str, str], int] = {}
    for length, keys in by_length.items():
        count = min(max_distance + 1, HASH_BITS * length)
        buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key in sorted(keys):
            for band, value in enumerate(bands(usable[key], count)):
                buckets[(band, value)].append(key)
        for members in buckets.values():
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    if (a, b) not in pairs:
                        d = fingerprint_distance(usable[a], usable[b])
                        if d <= max_distance:
                            pairs[(a, b)] = d
    return sorted((a, b, d) for (a, b), d in pairs.items())


def synthetic_fingerprints(clips: int, flat: float, seed: int = 0) -> dict[str, list[int]]:
    """Fingerprints (first, middle, last keyframe pHashes) shaped like a cartoon corpus: random ones, 2%
    near copies of 50 repeated openings (a few bits flipped), and a share `flat` of clips whose first
    keyframe is a flat picture (a black or plain frame: pHash 0)."""
    import random

    rng = random.Random(seed)
    openings = [[rng.getrandbits(64) for _ in range(3)] for _ in range(50)]
    out = {}
    for i in range(clips):
        r = rng.random()
        if r < 0.02:
            fp = [h ^ (1 << rng.randrange(64)) for h in rng.choice(openings)]
        else:
            fp = [rng.getrandbits(64) for _ in range(3)]
            if r < 0.02 + flat:
                fp[0] = 0
        out[f"c{i:07d}"] = fp
    return out


def run_split_bench(sizes: list[int], flat: float, max_distance: int, baseline_max: int) -> list[dict]:
    from manifests.split import near_duplicate_pairs

    rows = []
    for n in sizes:
        fps = synthetic_fingerprints(n, flat)
        t = time.perf_counter()
        pairs = near_duplicate_pairs(fps, max_distance)
        row = {"clips": n, "flat": flat, "pairs": len(pairs), "numpy_s": time.perf_counter() - t}
        if n <= baseline_max:
            t = time.perf_counter()
            same = python_banded_pairs(fps, max_distance) == pairs
            row.update(python_s=time.perf_counter() - t, same=same)
        rows.append(row)
        print(_split_row(row), flush=True)
    return rows


def _split_row(r: dict) -> str:
    base = (
        f"python {r['python_s']:8.2f} s  speed-up {r['python_s'] / max(r['numpy_s'], 1e-9):6.1f}x  "
        f"same pairs: {r['same']}"
        if "python_s" in r
        else "python (not run: --baseline-max)"
    )
    return f"{r['clips']:>8} clips, {r['flat']:.0%} flat first frames: {r['pairs']:>7} pairs, numpy {r['numpy_s']:7.2f} s  {base}"


# --------------------------------------------------------------------------- the job's final steps


def list_funnel(rows: list[dict]) -> list[tuple[str, int, int]]:
    """The report's funnel as it was before 2026-11-29 (and its result): each stage kept a list of the
    remaining rows and found the rejected ones by list membership, so every stage compared every
    remaining row with a list of rows. (stage, clips in, rejected) per stage. The finalize benchmark's
    baseline; the rows here have no duplicate sources, which it counted as kept."""
    from pipeline.report import FUNNEL_STAGES, _stage_of, _stage_ran

    failed_at = ("probe", "shots")
    remaining = [r for r in rows if r["status"] != "error" or _stage_of(r["reason"]) not in failed_at]
    out_steps = []
    for stage in FUNNEL_STAGES[1:]:
        out = [r for r in remaining if not (r["status"] != "kept" and _stage_of(r["reason"]) == stage)]
        gone = [r for r in remaining if r not in out] if len(out) != len(remaining) else []
        if stage != "shots" and not gone and not _stage_ran(stage, rows):
            continue
        out_steps.append((stage, len(remaining), len(gone)))
        remaining = out
    return [*out_steps, ("kept", len(remaining), 0)]


def synthetic_manifest(clips: int, sources: int, seed: int = 0, series_episodes: int = 26) -> list[dict]:
    """Manifest rows shaped like a cartoon job's before `decide`: `sources` episodes of equal length in
    series of `series_episodes`, each episode opening on its series' 10-shot opening (near copies: a
    few pHash bits differ; half the shots carry credits, which the text filter rejects), a few sources
    that fail to open, 4% of clips too short, 5% starting on a flat frame, and scores that the default
    thresholds reject about 13% of (static shots, title cards)."""
    import random

    rng = random.Random(seed)
    rows, per = [], max(1, clips // sources)
    openings: dict[int, list[list[int]]] = {}
    for s in range(sources):
        uri = f"/footage/episode_{s:05d}.mp4"
        if s % 500 == 7:
            rows.append({"clip_id": f"e{s:05d}", "source_id": f"src{s:05d}", "source_uri": uri,
                         "status": "error", "reason": "probe: not a video (no video stream)", "split": "none"})  # fmt: skip
            continue
        opening = openings.setdefault(
            s // series_episodes, [[rng.getrandbits(64) for _ in range(3)] for _ in range(10)]
        )
        for i in range(per):
            start = 48 * i
            row = {"clip_id": f"s{s:05d}c{i:05d}", "source_id": f"src{s:05d}", "source_uri": uri,
                   "start_frame": start, "end_frame": start + 40, "start_s": start / 24, "end_s": (start + 40) / 24,
                   "fps": 24.0, "status": None, "reason": None, "split": "none",
                   "phash": [rng.getrandbits(64) for _ in range(3)],
                   "motion_mean": rng.lognormvariate(-1.5, 1.2),
                   "text_area": rng.uniform(0.1, 0.5) if rng.random() < 0.03 else rng.random() * 0.02,
                   "held_ratio": rng.random(), "timing": "twos"}  # fmt: skip
            if i < len(opening):
                row["phash"] = [h ^ (1 << rng.randrange(64)) for h in opening[i]]
                row["text_area"] = 0.08 if i % 2 else 0.0
            elif rng.random() < 0.05:
                row["phash"][0] = 0
            if rng.random() < 0.04:
                row.update(status="rejected", reason="shots: length 0.40 s < min_len_s 1", phash=None)
            rows.append(row)
    return rows


def run_finalize_bench(sizes: list[int], sources: int, baseline_max: int, dedup: bool = False) -> list[dict]:
    """Each of the curate job's final steps on a synthetic manifest (encoding and shards aside: they
    are I/O, one pass over the kept clips), and the funnel against its list-membership form."""
    import pyarrow as pa

    from manifests.schema import CLIP_SCHEMA
    from manifests.split import cross_split_pairs
    from pipeline.config import CurateConfig
    from pipeline.job import CurateJob
    from pipeline.report import funnel, write_report
    from pipeline.select import decide

    results = []
    for n in sizes:
        config = CurateConfig()
        config.run.progress, config.split.dedup = False, dedup
        table = pa.Table.from_pylist(synthetic_manifest(n, sources), schema=CLIP_SCHEMA)
        with tempfile.TemporaryDirectory() as tmp:
            job = CurateJob([], Path(tmp), config)
            row: dict = {"rows": table.num_rows, "sources": sources}
            steps = [
                ("duplicates", job._drop_duplicate_sources),
                ("decide", lambda t, c=config: decide(t, c)),
                ("split", job._split),
            ]
            for name, step in steps:
                t = time.perf_counter()
                table = step(table)
                row[f"{name}_s"] = time.perf_counter() - t
            rows = table.to_pylist()
            t = time.perf_counter()
            steps_now = funnel(rows)
            row["funnel_s"] = time.perf_counter() - t
            t = time.perf_counter()
            write_report(Path(tmp), table, config, thumbs={})
            row["report_s"] = time.perf_counter() - t
            t = time.perf_counter()
            leaks = cross_split_pairs([r for r in rows if r["split"] != "none"], config.split.max_distance)
            row.update(leak_check_s=time.perf_counter() - t, leaks=len(leaks))
            row["kept"] = steps_now[-1]["out"]
            row["dedup_rejected"] = sum((r["reason"] or "").startswith("dedup:") for r in rows)
            row["eval"] = sum(r["split"] == "eval" for r in rows)
            if table.num_rows <= baseline_max:
                t = time.perf_counter()
                before = list_funnel(rows)
                row["list_funnel_s"] = time.perf_counter() - t
                now = [(s["stage"], s["in_clips"], s["rejected"]) for s in steps_now[1:]]
                row["same_funnel"] = before == now
        results.append(row)
        print(_finalize_row(row), flush=True)
    return results


def _finalize_row(r: dict) -> str:
    steps = "  ".join(
        f"{name} {r[name + '_s']:.2f} s"
        for name in ("duplicates", "decide", "split", "funnel", "report", "leak_check")
    )
    dedup = f" (dedup rejected {r['dedup_rejected']})" if r["dedup_rejected"] else ""
    line = f"{r['rows']:>8} rows, {r['sources']} sources, {r['kept']} kept{dedup}, eval {r['eval']}, leaks {r['leaks']}: {steps}"
    if "list_funnel_s" in r:
        line += (
            f"\n{'':>8} funnel as lists {r['list_funnel_s']:.2f} s: "
            f"{r['list_funnel_s'] / max(r['funnel_s'], 1e-9):.0f}x slower, same counts: {r['same_funnel']}"
        )
    return line


def long_source(path: Path, minutes: float, mbps: float, size: tuple[int, int] = (640, 360)) -> Path:
    """An episode-length H.264 source at about `mbps` (noise cycled over 48 frames: x264 spends the
    bits), so that hashing and demuxing it cost what a real episode's bytes and packets cost."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    w, h = size
    frames = [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(48)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = int(mbps * 1e6)
        stream.options = {
            "preset": "ultrafast",
            "x264-params": f"vbv-maxrate={int(mbps * 1000)}:vbv-bufsize=2000",
        }
        for i in range(int(minutes * 60 * 24)):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frames[i % 48], format="rgb24")))
        out.mux(stream.encode(None))
    return path


def run_probe_bench(minutes: float, mbps: float, repeat: int) -> dict:
    """The probe stage on one long source: its hash, its frame-rate check over every packet (this
    code) against the first 240 packets (the check before it, the baseline), and a decode of every
    frame (which the shots stage does anyway), best of `repeat`, interleaved."""
    import hashlib

    import av

    from pipeline.stages.discover import ProbeStage
    from pipeline.video import probe, video_stream

    def window() -> None:  # the former check: the first 240 packets' timestamps
        with av.open(uri) as container:
            stream = video_stream(container)
            for n, _packet in enumerate(container.demux(stream)):
                if n >= 240:
                    break

    def sha256() -> None:
        with open(uri, "rb") as handle:
            hashlib.file_digest(handle, "sha256")

    def stage() -> None:
        ProbeStage().process({"source_uri": uri})

    def decode() -> None:
        with av.open(uri) as container:
            stream = video_stream(container)
            stream.codec_context.thread_count = 1
            for _ in container.decode(stream):
                pass

    with tempfile.TemporaryDirectory() as tmp:
        uri = str(long_source(Path(tmp) / "episode.mp4", minutes, mbps))
        size_mb = Path(uri).stat().st_size / 1e6
        sha256()  # the file in the page cache, as the probe stage finds it after hashing
        timings = {name: [] for name in ("hash", "window", "probe_all", "stage", "decode")}
        for _ in range(repeat):
            for name, fn in (("hash", sha256), ("window", window), ("probe_all", lambda: probe(uri)),
                             ("stage", stage), ("decode", decode)):  # fmt: skip
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
        best = {name: min(values) for name, values in timings.items()}
    packets = int(minutes * 60 * 24)
    result = {"minutes": minutes, "size_mb": round(size_mb, 1), "packets": packets, **best}
    print(f"source: {minutes:g} min, {packets} packets, {size_mb:.0f} MB (640x360 H.264)")
    for name in timings:
        print(f"  {name:10s} {best[name]:8.3f} s")
    print(
        f"frame-rate check over every packet: {best['probe_all'] / best['hash']:.2f}x the hash, "
        f"{best['probe_all'] / best['stage']:.0%} of the probe stage, "
        f"{best['probe_all'] / best['decode']:.1%} of one decode of every frame"
    )
    return result


def _number(kind: type, low: float, high: float | None = None, above: bool = False):
    """argparse type: a finite `kind` number >= low (> low with `above`), and <= high when given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        too_low = value <= low if above else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


LONG_SOURCE_RAW_MBPS = 640 * 360 * 1.5 * 8 * 24 / 1e6  # yuv420p at 24 fps: x264 spends no more on noise


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the option types cannot say alone; refused before minutes of measuring, not after."""
    if args.what == "curate" and (args.width % 2 or args.height % 2):
        p.error(f"--width and --height must be even (yuv420p), got {args.width}x{args.height}")
    if args.what == "probe":
        if args.minutes * 60 * 24 < 1:
            p.error(f"--minutes {args.minutes:g} is less than one frame at 24 fps (1/1440 minute)")
        tmp = tempfile.gettempdir()
        need = args.minutes * 60 * min(args.mbps, LONG_SOURCE_RAW_MBPS) / 8 * 1e6
        free = shutil.disk_usage(tmp).free
        if need > 0.9 * free:
            p.error(
                f"--minutes {args.minutes:g} at --mbps {args.mbps:g} is a source of about {need / 1e9:.1f} GB;"
                f" {tmp} has {free / 1e9:.1f} GB free (TMPDIR chooses the folder)"
            )
    if args.json is not None:
        folder = args.json.parent
        if args.json.is_dir():
            p.error(f"--json {args.json} is a folder; give a file name")
        if not folder.is_dir():
            p.error(f"--json {args.json}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (args.json.exists() and not os.access(args.json, os.W_OK)):
            p.error(f"--json {args.json}: not writable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inbetweener bench",
        description="Benchmarks that print ratios against a baseline measured in the same run.",
        epilog="examples:\n  inbetweener bench curate --sources 8 --workers 1 2\n"
        "  inbetweener bench split --clips 20000 40000 271000 --flat 0.05\n"
        "  inbetweener bench finalize --rows 20000 271000 1000000\n"
        "  inbetweener bench probe --minutes 22 --mbps 2.5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curate", help="decoding vs the curate job's CPU stages")
    c.add_argument(
        "--sources",
        type=_number(int, 1),
        default=8,
        help="sources per measurement (the memory check uses 2x)",
    )
    c.add_argument("--width", type=_number(int, 64), default=640, help="frame width (even, >= 64)")
    c.add_argument("--height", type=_number(int, 64), default=384, help="frame height (even, >= 64)")
    c.add_argument("--workers", type=_number(int, 1), nargs="+", default=[1, 2])
    c.add_argument(
        "--repeat",
        type=_number(int, 1),
        default=1,
        help="take every measurement N times, interleaved; keep the best",
    )
    c.add_argument(
        "--episodes",
        type=_number(int, 1),
        default=1,
        help="generated episodes (~9 s each) chained into each source",
    )
    c.add_argument(
        "--no-job", action="store_true", help="skip the whole-job measurement (re-encoding dominates it)"
    )
    c.add_argument("--json", type=Path, help="also write the results here")
    sp = sub.add_parser(
        "split",
        help="the near-duplicate search of the split and the leak check, against its pure-Python form",
    )
    sp.add_argument("--clips", type=_number(int, 1), nargs="+", default=[20000, 40000, 271000])
    sp.add_argument(
        "--flat", type=_number(float, 0, 1), default=0.05, help="share of clips whose first keyframe is flat"
    )
    sp.add_argument("--max-distance", type=_number(int, 0), default=12)
    sp.add_argument(
        "--baseline-max",
        type=_number(int, 0),
        default=40000,
        help="run the pure-Python baseline up to this many clips",
    )
    sp.add_argument("--json", type=Path, help="also write the results here")
    pr = sub.add_parser("probe", help="the probe stage's frame-rate check over every packet of an episode")
    pr.add_argument(
        "--minutes", type=_number(float, 0, above=True), default=22.0, help="length of the generated source"
    )
    pr.add_argument(
        "--mbps",
        type=_number(float, 0, 1000, above=True),
        default=2.5,
        help="its bit rate (a 1080p web episode: 2-5; at most 1000)",
    )
    pr.add_argument("--repeat", type=_number(int, 1), default=3)
    pr.add_argument("--json", type=Path, help="also write the results here")
    f = sub.add_parser("finalize", help="the curate job's final steps (decide, split, report) at scale")
    f.add_argument("--rows", type=_number(int, 1), nargs="+", default=[20000, 271000, 1000000])
    f.add_argument("--sources", type=int, default=2000, help="episodes the rows come from")
    f.add_argument(
        "--baseline-max",
        type=_number(int, 0),
        default=20000,
        help="run the list-membership funnel up to this many rows",
    )
    f.add_argument(
        "--dedup", action="store_true", help="split.dedup=true: one clip of each near-duplicate group"
    )
    f.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    _check_args({"curate": c, "split": sp, "probe": pr, "finalize": f}[args.what], args)
    if args.what == "probe":
        result = run_probe_bench(args.minutes, args.mbps, args.repeat)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    if args.what == "finalize":
        if args.sources < 1 or min(args.rows) < args.sources:
            f.error(f"finalize needs --sources >= 1 and every --rows >= --sources ({args.sources})")
        rows = run_finalize_bench(args.rows, args.sources, args.baseline_max, args.dedup)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0 if all(r.get("same_funnel", True) and not r["leaks"] for r in rows) else 1
    if args.what == "split":
        rows = run_split_bench(args.clips, args.flat, args.max_distance, args.baseline_max)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0 if all(r.get("same", True) for r in rows) else 1
    results = run_curate_bench(
        args.sources,
        (args.width, args.height),
        sorted(set(args.workers)),
        args.repeat,
        args.episodes,
        not args.no_job,
    )
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
