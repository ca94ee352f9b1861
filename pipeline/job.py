"""The curate job: discover -> score (Ray) -> decide -> encode (Ray) -> split -> shards, manifest, report.

This module holds `CurateJob`'s entry points and what shapes a run before any work: `run` (its lock on
OUT, its checks, and the no-op when the job already finished with the same inputs and config), `plan`
(`curate --dry-run`), `finalize` (decide -> encode -> split -> shards -> manifest -> report, which
`select` runs too), the pre-flight checks of the weights and the encoder, the stages built from the
config, and `JobResult`. The class is put together from two more modules: `pipeline.job_resume` (what
OUT/.work records so that the same command after a crash continues where it stopped, and what a rerun
does again) and `pipeline.job_steps` (the steps that do the work: scoring, encoding, the split, the
shards).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from manifests.files import FolderBusy, folder_lock, write_json_atomic
from manifests.io import ManifestError, manifest_config, read_manifest, write_manifest
from pipeline.config import MODEL_STAGES, THRESHOLD_KEYS, ConfigError, CurateConfig
from pipeline.job_resume import ResumeMixin, _scoring_change, clip_cache_name, uri_key
from pipeline.job_steps import SPLIT_HISTORY, StepsMixin
from pipeline.select import decide
from pipeline.stages.dedup import DedupStage
from pipeline.stages.discover import ProbeStage, discover
from pipeline.stages.motion import MotionStage
from pipeline.stages.shots import ShotsStage
from pipeline.stages.timing import TimingStage
from pipeline.video import is_local, local_path


@dataclass
class JobResult:
    out: Path
    manifest: Path
    report: Path | None
    sources: int
    failed_sources: int
    clips: int
    kept: int
    noop: bool = False
    counts: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"sources: {self.sources} ({self.failed_sources} failed)",
            f"candidate clips: {self.clips}, kept: {self.kept}",
            f"manifest: {self.manifest}",
            f"shards:   {self.out / 'shards' / 'train'}  and  {self.out / 'shards' / 'eval'}",
        ]
        if self.report:
            lines.append(f"report:   {self.report}")
        return "\n".join(lines)


class CurateJob(ResumeMixin, StepsMixin):
    """One curate job of `inputs` into `out`: its entry points here, its OUT/.work bookkeeping in
    `pipeline.job_resume`, the steps that do the work in `pipeline.job_steps`."""

    def __init__(
        self,
        inputs: list[str],
        out: Path | str,
        config: CurateConfig,
        restart: bool = False,
        limit: int | None = None,
    ):
        self.inputs = list(inputs)
        self.limit = limit  # only the first N sources found (a trial run on a large input)
        self.out = Path(out)
        self.config = config
        self.work = self.out / ".work"
        self.parts = self.work / "sources"
        self.clips = self.work / "clips" / clip_cache_name(config.write)
        self.restart = restart
        self._encodes_given_up = False  # a source's encode task died on every attempt (see _encode)
        self._scored_now: set[str] = set()  # sources this run scored (hashed moments before they are encoded)
        self.log = config.run.progress

    # ------------------------------------------------------------------ entry points
    def run(self) -> JobResult:
        if not self.inputs:
            raise ConfigError("no inputs given")
        sources = self._sources()
        if not sources:
            raise ConfigError(f"no video files found in {self.inputs}")
        for item in self._unmatched:
            self._say(f"{item}: no video file there (an empty folder, a pattern that matches none): left out")
        from pipeline.runner import is_cluster

        if is_cluster(self.config.run.address):  # a cluster that cannot be joined: said before OUT is made
            self._init_ray()
        try:  # an output folder that cannot be written stops the job before any work
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {self.out} cannot be written: {exc.strerror or exc}") from None
        with self.lock("inbetweener curate"):
            return self._run(sources)

    @contextmanager
    def lock(self, what: str):
        """Only one job (curate or select) writes OUT at a time: a second one stops before any work."""
        locked = False
        try:
            with folder_lock(self.out, what):
                locked = True
                yield
        except FolderBusy as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            if locked:  # the work inside failed: its own message
                raise
            # a read-only OUT: nothing was done yet, so there is nothing to continue from
            raise ConfigError(
                f"{self.out} cannot be written ({exc.strerror or exc}); nothing was done"
            ) from None

    def _run(self, sources: list[str]) -> JobResult:
        self._check_state()
        self.check_weights()
        self._check_same_weights()  # after: a broken file is named as broken, not as other weights
        self.check_encoder()
        self._history_from()  # split histories that cannot be read stop the job before any work
        if self.config.split.sticky:
            try:
                self._history_of(self.out)
            except ManifestError as exc:  # the only record of this OUT's split (no split_history.parquet)
                raise ConfigError(
                    f"{exc}; it holds this OUT's earlier split, which a rerun keeps (split.sticky): restore it,"
                    " or --set split.sticky=false to draw the split afresh"
                ) from None
        done_key = self._done_key(sources)
        done_file = self.work / "done.json"
        manifest = self.out / "manifest.parquet"
        changed = self._thresholds_changed()
        back = self._back_again(sources)
        replaced = self._changed_since_scored(sources)
        if (
            done_file.exists()
            and manifest.exists()
            and json.loads(done_file.read_text()).get("key") == done_key
            and not changed  # `select` rewrote the manifest since: decided again
            and not back  # a source that was not there is now: scored and written
            and not replaced  # a file replaced under the same name: scored again
        ):
            try:
                table = read_manifest(manifest)
                manifest_config(manifest)  # select and report read it too
            except ManifestError as exc:  # cut short by a copy, overwritten: written again, as when deleted
                self._say(f"{exc}; it is written again from the scored sources, with this run's settings")
            else:
                result = self._result(table, noop=True)
                self._say("nothing to do: this job already finished with the same inputs and config")
                return result
        self._say_leaving(sources)
        self._say_thresholds_changed(changed)
        self._rescore_back_again(back)
        self._rescore_changed(replaced)
        given_up = self._score(sources)
        table = self._load_parts(sources)
        result = self.finalize(table)
        if not given_up and not self._encodes_given_up:  # a rerun tries them again: not a no-op
            write_json_atomic(done_file, {"key": done_key, "sources": len(sources)})
        return result

    def _sources(self) -> list[str]:
        self._unmatched: list[str] = []
        sources = discover(self.inputs, self._unmatched)
        return sources[: self.limit] if self.limit else sources

    def plan(self) -> str:
        """What `run` would do, without doing or writing anything (`curate --dry-run`): the sources
        found, the work already in OUT, the stages and their weights, the thresholds."""
        if not self.inputs:
            raise ConfigError("no inputs given")
        sources = self._sources()
        if not sources:
            raise ConfigError(f"no video files found in {self.inputs}")  # as run says it
        self.check_encoder()
        self._history_from()  # as run checks them before any work
        existing = next(p for p in (self.out, *self.out.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            why = "Not a directory" if not existing.is_dir() else "Permission denied"
            if existing.is_dir() and os.statvfs(existing).f_flag & os.ST_RDONLY:  # as the run says it
                why = "Read-only file system"
            raise ConfigError(f"--out {self.out} cannot be written: {why}")
        lines = [f"sources: {len(sources)}"]
        local = [u for u in sources if is_local(u) and os.path.isfile(local_path(u))]
        if local:
            size = sum(os.path.getsize(local_path(u)) for u in local)
            amount = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MB"
            lines[0] += f" ({len(local)} local files, {amount})"
        missing = [u for u in sources if is_local(u) and not os.path.exists(local_path(u))]
        lines += [f"  {u}" for u in sources[:5]] + (
            [f"  ... and {len(sources) - 5} more"] if len(sources) > 5 else []
        )
        if missing:
            lines.append(f"missing paths (each will be an error row): {len(missing)}")
        if self._unmatched:
            lines.append(f"no video file in (left out): {', '.join(self._unmatched)}")
        leaving, kept, held_out = self._leaving(sources)
        if leaving:
            lines.append(
                f"leaving: {len(leaving)} source(s) of the earlier manifest are not among the inputs"
                f" (e.g. {leaving[0]}); their {kept} kept clips ({held_out} in eval) would leave it"
            )
        state_file = self.work / "state.json"
        if self.restart and self.work.exists():
            lines.append(f"{self.work}: would be discarded (--restart)")
        elif state_file.exists():
            saved, current = json.loads(state_file.read_text())["scoring"], self._scoring_fingerprint()
            done = sum((self.parts / f"{uri_key(u)}.parquet").exists() for u in sources)
            lines.append(
                f"{self.out}: {done} of {len(sources)} sources already scored"
                if saved == current or not self._has_scored_work()
                else f"{self.out}: holds work scored with {_scoring_change(saved, current)}: "
                "run would stop (use --restart)"
            )
            done_file = self.work / "done.json"
            finished = done_file.exists() and json.loads(done_file.read_text()).get("key")
            # what run scores or decides again, though its inputs and config are the same (nothing written)
            replaced = self._changed_since_scored(sources, refresh=False) if saved == current else []
            back = self._back_again(sources) if saved == current else []
            again = self._thresholds_changed() if saved == current else []
            if replaced:
                lines.append(
                    f"replaced: {len(replaced)} source(s) changed since they were scored (e.g. {replaced[0]}):"
                    " would be scored again"
                )
            if back:
                lines.append(
                    f"back: {len(back)} source(s) the manifest has as error rows (missing then, or replaced since"
                    " they were scored) are there now: would be scored again"
                )
            if again:
                lines.append(
                    f"settings changed since the manifest was written ({', '.join(k for k, _, _ in again)}):"
                    " would decide and write again"
                )
            if saved == current and finished == self._done_key(sources) and not (replaced or back or again):
                lines[-1] += "; finished with these inputs and this config: run would be a no-op"
        stages = [type(stage).__name__.removesuffix("Stage").lower() for stage in self.stages()]
        lines.append("stages: " + " -> ".join(stages) + " -> write")
        skipped = [name for name in MODEL_STAGES if not getattr(self.config, name).enabled]
        if skipped:
            lines.append("skipped (--skip): " + ", ".join(skipped))
        from pipeline.models import check_weights

        problems = check_weights(self.model_stages())
        lines.append("weights: all present" if not problems else "weights: run would stop:")
        lines += [f"  {p}" for p in problems]
        thresholds = {
            f"{section}.{key}": getattr(getattr(self.config, section), key)
            for section, key in sorted(THRESHOLD_KEYS)
            if section in ("motion", *MODEL_STAGES)
            and getattr(getattr(self.config, section), "enabled", True)
        }
        lines.append("thresholds: " + ", ".join(f"{k}={v}" for k, v in thresholds.items()))
        c = self.config.split
        lines.append(
            f"split: {c.eval_size} eval clips (at most {c.max_eval_fraction:.0%} of the kept ones), in whole"
            f" {'sources and ' if c.by_source else ''}near-duplicate groups (pHash distance <= {c.max_distance});"
            f" {'one clip of each group kept (split.dedup)' if c.dedup else 'every copy kept (split.dedup=false)'}"
        )
        if (self.out / SPLIT_HISTORY).exists() or (self.out / "manifest.parquet").exists():
            lines[-1] += (
                "; keeps this OUT's earlier train out of eval (split.sticky)"
                if c.sticky
                else "; drawn afresh (split.sticky=false)"
            )
        if c.history_from:
            lines[-1] += f"; keeps the train of {c.history_from} out of eval (split.history_from)"
        from pipeline.runner import is_cluster

        given = self.config.run.address
        address = (given or os.environ.get("RAY_ADDRESS") or "").strip()
        lines.append(
            f"ray: the cluster at {address} (not contacted by a dry run; the models dir must be the same path"
            " on its nodes)"
            if is_cluster(given)
            else "ray: a local instance"
        )
        lines.append(f"output: {self.out} (manifest.parquet, shards/train, shards/eval, report.html)")
        return "\n".join(lines)

    def finalize(self, table: pa.Table, sources_required: bool = False) -> JobResult:
        """decide -> encode what is missing -> split -> shards -> manifest -> report.

        `sources_required` (select): a kept clip that is not in the clip cache and whose source is not
        there (moved, deleted) stops everything before the manifest and the shards change, instead of
        becoming an error row and leaving the shards."""
        from pipeline.report import write_report

        self._history_from()  # a split.history_from that cannot be used stops before any work
        self._adopt_clip_cache()
        table = self._drop_duplicate_sources(table)
        table = decide(table, self.config)
        table = self._encode(table, sources_required)
        table = self._split(table)
        table = self._write_shards(table)
        manifest = self.out / "manifest.parquet"
        write_manifest(table, manifest, self.config.to_dict())
        try:
            report = write_report(self.out, table, self.config, thumbs=self.thumbs_of)
        except Exception as exc:  # the manifest and shards are written: the page is not worth losing them
            print(  # said under --quiet too: the job's summary has no report line then
                f"warning: the manifest and shards are written, but report.html could not be rebuilt"
                f" ({type(exc).__name__}: {exc}); `inbetweener report {self.out}` tries again",
                file=sys.stderr,
            )
            return self._result(table, report_failed=True)
        return self._result(table, report=report)

    # ------------------------------------------------------------------ stages and checks
    def model_stages(self) -> list:
        """The enabled model stages, built from their config sections (threshold and switch removed)."""
        import dataclasses

        from pipeline.models import resolve_models_dir

        stages = []
        for name in MODEL_STAGES:
            section = getattr(self.config, name)
            if not section.enabled:
                continue
            cls = type(section).__mro__[1]  # the stage class the section extends
            params = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
            if "models_dir" in params:  # as the driver resolved and checked it: a cluster's workers have
                # another working directory and environment (INBETWEENER_MODELS, a relative --models-dir)
                params["models_dir"] = str(resolve_models_dir(params["models_dir"]).absolute())
            stages.append(cls(**params))
        return stages

    def check_encoder(self) -> None:
        """Encode two blank frames with the write settings: an encoder this FFmpeg lacks, or one that
        cannot open here (h264_nvenc without an NVIDIA GPU), stops the job before any work; found in
        the write step, it failed every kept clip, as a worker crash."""
        import numpy as np

        from pipeline.runner import is_cluster
        from pipeline.video_encode import encode_clip

        if is_cluster(self.config.run.address):
            return  # a cluster's workers encode with their own FFmpeg: a clip theirs cannot is its error row
        w = self.config.write
        blank = np.zeros((w.height, w.width, 3), np.uint8)
        try:
            encode_clip([blank, blank], w.fps or 24.0, w.codec, w.crf, w.preset)
        except Exception as exc:
            raise ConfigError(
                f"write.codec={w.codec} cannot encode here ({type(exc).__name__}: {exc}); libx264, the"
                " default, can"
            ) from None

    def check_weights(self) -> None:
        """Stop before any work when an enabled stage's weights are missing or wrong."""
        from pipeline.models import check_weights

        stages = self.model_stages()
        problems = check_weights(stages)
        if problems:
            from pipeline.models import resolve_models_dir

            lines = "\n  ".join(problems)
            root = resolve_models_dir(getattr(stages[0], "models_dir", None)) if stages else None
            where = f" --models-dir {root}" if root is not None else ""
            raise ConfigError(
                f"model weights are missing or wrong:\n  {lines}\n"
                f"fetch them (inbetweener models{where} download STAGE), or skip the stage explicitly (--skip STAGE)"
            )

    def stages(self) -> list:
        c = self.config
        return [
            ProbeStage(**c.probe.__dict__),
            ShotsStage(**c.shots.__dict__),
            TimingStage(**c.timing.__dict__),
            MotionStage(
                flow_width=c.motion.flow_width,
                flow_height=c.motion.flow_height,
                max_pairs=c.motion.max_pairs,
                preset=c.motion.preset,
            ),
            DedupStage(),
            *self.model_stages(),
        ]

    def _init_ray(self) -> None:
        """A local Ray gets one CPU slot per worker, plus room for the model actors' token shares."""
        import os

        from pipeline.runner import init_ray

        workers = self.config.run.workers or os.cpu_count() or 1
        store = self.config.run.object_store_gib
        init_ray(
            self.config.run.address, num_cpus=workers + 1, object_store_bytes=store and int(store * 2**30)
        )

    def _workers(self) -> int:
        import ray

        if self.config.run.workers:
            return self.config.run.workers
        return max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)

    # ------------------------------------------------------------------ helpers
    def _result(
        self, table: pa.Table, report: Path | None = None, noop: bool = False, report_failed: bool = False
    ) -> JobResult:
        rows = table.select(
            ["source_uri", "status", "row_kind"]
            if "row_kind" in table.column_names
            else ["source_uri", "status"]
        ).to_pylist()
        sources = {r["source_uri"] for r in rows}
        failed = {r["source_uri"] for r in rows if r["status"] == "error"}
        kept = sum(r["status"] == "kept" for r in rows)
        clips = sum(1 for r in rows if r["status"] != "error")
        report_path = report or ((self.out / "report.html") if (self.out / "report.html").exists() else None)
        report_path = None if report_failed else report_path  # the page there is an earlier run's
        return JobResult(
            self.out, self.out / "manifest.parquet", report_path, len(sources), len(failed), clips, kept, noop
        )

    def _say(self, text: str) -> None:
        if self.log:
            print(text, file=sys.stderr, flush=True)
