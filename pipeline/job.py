"""The curate job: discover -> score (Ray) -> decide -> encode (Ray) -> split -> shards, manifest, report.

Finished work is recorded under OUT/.work so that the same command after a crash (even kill -9)
continues where it stopped:
  .work/sources/<uri hash>.parquet   the scored rows of one finished source (written atomically)
  .work/clips/<encoding>/<clip_id>.mp4  an encoded clip (written atomically), in a folder per set of
                                     write settings (clip_cache_name): other settings, other clips
  .work/state.json                   the scoring config the work was done with
  .work/done.json                    what the last finished run produced (a rerun is then a no-op)
  .work/given_up.json                sources whose worker died on every attempt (a rerun tries again)
The final steps (shards, manifest, report) are rebuilt from these files and are deterministic, given
OUT/split_history.parquet: what earlier splits of this OUT put in train and eval (split.sticky).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.files import FolderBusy, atomic_path, folder_lock, write_json_atomic
from manifests.io import (
    ManifestError,
    manifest_config,
    read_manifest,
    read_split_history,
    write_manifest,
    write_split_history,
)
from manifests.schema import CLIP_SCHEMA, SOURCE_COLUMNS, conform
from pipeline.config import (
    MODEL_STAGES,
    RUNTIME_KEYS,
    SCORING_SECTIONS,
    SELECT_KEYS,
    THRESHOLD_KEYS,
    ConfigError,
    CurateConfig,
    SplitConfig,
)
from pipeline.select import decide
from pipeline.stages.dedup import DedupStage
from pipeline.stages.discover import ProbeStage, discover, error_fields
from pipeline.stages.motion import MotionStage
from pipeline.stages.shots import ShotsStage
from pipeline.stages.timing import TimingStage
from pipeline.stages.write import EncodeSource, save_clip, says_changed, staging_dir, swap_in, write_shards
from pipeline.video import is_local, local_path, says_missing, source_exists

WORK_SCHEMA = CLIP_SCHEMA.append(pa.field("thumb", pa.binary()))
SPLIT_HISTORY = "split_history.parquet"  # what was in train and eval (split.sticky)
STICKY_KEYS = ("seed", "by_source", "max_distance", "dedup")  # another value: another split


class Progress:
    """A line per update: stage, done/total, rate, ETA. Lines for a log, not a terminal: at most one
    every `interval` seconds (a job of thousands of sources would print thousands), and always the
    first and the last."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True, interval: float = 10.0):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.interval = interval
        self.done = 0
        self.items = 0
        self.start = time.monotonic()
        self.printed: float | None = None

    def update(self, done: int = 1, items: int = 0) -> None:
        self.done += done
        self.items += items
        if not self.enabled:
            return
        now = time.monotonic()
        if self.printed is not None and now - self.printed < self.interval and self.done < self.total:
            return
        self.printed = now
        elapsed = max(1e-6, now - self.start)
        rate = self.items / elapsed
        eta = (self.total - self.done) * elapsed / max(1, self.done)
        print(
            f"[{self.label}] {self.done}/{self.total} {self.unit}, {self.items} clip{'' if self.items == 1 else 's'}, "
            f"{rate:.1f} clips/s, ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )


# what a source (or a source's clips) whose Ray task failed every attempt becomes
GIVEN_UP = (
    "the worker processing it died on every attempt (a crash in FFmpeg or a model, or memory exhausted: "
    "Ray's worker logs, under /tmp/ray/session_latest/logs, say which); a rerun tries it again"
)


def _scoring_change(saved: dict, current: dict) -> str:
    """What differs between the scoring settings finished work was scored with and the current ones, in
    words for the message that refuses to mix them."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    added = sorted(
        f"{section}.{key}"
        for section, values in current.items()
        for key in values
        if section in saved and key not in saved[section]
    )
    if added:  # scored by an earlier version, which lacked these settings (and what they do)
        return f"an earlier version of inbetweener, without {', '.join(added)}"
    return f"a different config ({', '.join(changed)})"


ENCODE_KEYS = (
    "width",
    "height",
    "fps",
    "codec",
    "crf",
    "preset",
)  # the write.* settings a clip's bytes depend on


def clip_cache_name(write) -> str:
    """The clip cache's folder for a set of write settings, e.g. `512x320-srcfps-libx264-crf18-1a2b3c4d`: a
    clip encoded with other settings is another clip (a rerun with write.width=256 reused the 512x320 ones
    while the manifest said 256x160)."""
    settings = {k: getattr(write, k) for k in ENCODE_KEYS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    fps = "srcfps" if write.fps is None else f"{write.fps:g}fps"
    return f"{write.width}x{write.height}-{fps}-{write.codec}-crf{write.crf}-{digest}"


def _absolute(uri: str | None) -> str | None:
    """A local source as an absolute path (as discover names it now); another URI as it is."""
    return os.path.abspath(uri) if uri and is_local(uri) else uri


def uri_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:20]


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


class CurateJob:
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
        if (
            done_file.exists()
            and manifest.exists()
            and json.loads(done_file.read_text()).get("key") == done_key
            and not changed  # `select` rewrote the manifest since: decided again
            and not back  # a source that was not there is now: scored and written
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
        given_up = self._score(sources)
        table = self._load_parts(sources)
        result = self.finalize(table)
        if not given_up and not self._encodes_given_up:  # a rerun tries them again: not a no-op
            write_json_atomic(done_file, {"key": done_key, "sources": len(sources)})
        return result

    def _back_again(self, sources: list[str]) -> dict[str, bool]:
        """Sources among `sources` that this OUT's manifest has as not there (error rows saying `no such file`,
        `no such object`, ...: a disk not mounted, footage moved away or deleted mid-job, a store out of reach)
        and that are there now, or as replaced since they were scored (`write: ... changed since it was
        scored`): {uri: replaced}. The rerun of a finished job was a no-op that kept them error rows for
        good, unless --restart scored everything again."""
        manifest = self.out / "manifest.parquet"
        if not manifest.is_file():
            return {}
        try:
            rows = pq.read_table(manifest, columns=["source_uri", "status", "reason"]).to_pylist()
        except (pa.ArrowInvalid, OSError, KeyError):
            return {}
        current = set(sources)
        back: dict[str, bool] = {}
        for r in rows:
            uri = _absolute(r["source_uri"])
            if r["status"] != "error" or uri not in current:
                continue
            if says_changed(r["reason"]):
                back[uri] = True
            elif says_missing(r["reason"]):
                back.setdefault(uri, False)
        return {uri: back[uri] for uri in sorted(back) if source_exists(uri)}

    def _rescore_back_again(self, back: dict[str, bool]) -> None:
        """Sources that were not there when they were to be scored (their part is error rows only), and those
        replaced since they were scored, are scored again; those missing only when their clips were to be
        written keep their scores, and their kept clips, not in the clip cache, are encoded."""
        if not back:
            return
        for uri, was_replaced in back.items():
            part = self.parts / f"{uri_key(uri)}.parquet"
            try:
                statuses = pq.read_table(part, columns=["status"]).column("status").to_pylist()
            except (pa.ArrowInvalid, OSError, KeyError):
                continue
            if was_replaced or all(status == "error" for status in statuses):
                part.unlink(missing_ok=True)
        missing = [uri for uri, was_replaced in back.items() if not was_replaced]
        replaced = [uri for uri, was_replaced in back.items() if was_replaced]
        if missing:
            self._say(
                f"{len(missing)} source(s) that were not there when {self.out / 'manifest.parquet'} was written"
                f" are there now (e.g. {missing[0]}): curated this time"
            )
        if replaced:
            self._say(
                f"{len(replaced)} source(s) replaced since they were scored (e.g. {replaced[0]}): scored again"
            )

    def _leaving(self, sources: list[str]) -> tuple[list[str], int, int]:
        """Sources of this OUT's manifest that are not among `sources` (an input left out, a file deleted,
        --limit): (their URIs, their kept clips, of which in eval); the new manifest and shards drop them."""
        manifest = self.out / "manifest.parquet"
        if not manifest.is_file():
            return [], 0, 0
        try:
            rows = pq.read_table(manifest, columns=["source_uri", "status", "split"]).to_pylist()
        except (pa.ArrowInvalid, OSError, KeyError):
            return [], 0, 0
        current = set(sources)
        gone = [r for r in rows if _absolute(r["source_uri"]) not in current]
        uris = sorted({r["source_uri"] for r in gone})
        kept = [r for r in gone if r["status"] == "kept"]
        return uris, len(kept), sum(r["split"] == "eval" for r in kept)

    def _say_leaving(self, sources: list[str]) -> None:
        uris, kept, held_out = self._leaving(sources)
        if uris:
            self._say(
                f"{len(uris)} source(s) of {self.out / 'manifest.parquet'} are not among the inputs this time"
                f" (e.g. {uris[0]}): their {kept} kept clips ({held_out} in eval) leave the manifest and the"
                " shards; give them again to keep them"
            )

    def _say_thresholds_changed(self, changed: list[tuple[str, Any, Any]]) -> None:
        """A rerun applies the thresholds it is given (defaults included): say which differ from those the
        manifest was written with, by an earlier curate or by `select` (`_thresholds_changed`), so that they
        are not lost unsaid."""
        manifest = self.out / "manifest.parquet"
        if changed:
            listed = ", ".join(f"{k} {then} there, {now} now" for k, then, now in changed)
            keep = " ".join(f"--set {k}={then}" for k, then, _ in changed)
            self._say(
                f"settings differ from those {manifest} was written with ({listed}); this run applies"
                f" the new ones: {keep} keeps the earlier"
            )

    def _thresholds_changed(self) -> list[tuple[str, Any, Any]]:
        """(section.key, in the manifest, in this run's config) of each setting `select` rewrites (the
        thresholds, the split's, the shard size) that differs; split.history_from, a path, by the file it
        names (a relative path given again is the same)."""
        manifest = self.out / "manifest.parquet"
        if not manifest.is_file():
            return []
        try:
            written = manifest_config(manifest)
        except ManifestError:
            return []
        changed = []

        def named(value: Any) -> Any:
            return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) else value

        for section, key in sorted(SELECT_KEYS):
            then = written.get(section, {}).get(key)
            now = getattr(getattr(self.config, section), key)
            if key == "history_from":
                then, now = named(then), named(now)
            if then is not None and then != now and getattr(getattr(self.config, section), "enabled", True):
                changed.append((f"{section}.{key}", then, now))
        return changed

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
            if saved == current and finished == self._done_key(sources):
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

    # ------------------------------------------------------------------ steps
    def _check_state(self) -> None:
        """Finished work is only reused when it was scored with the same scoring config."""
        state_file = self.work / "state.json"
        current = self._scoring_fingerprint()
        if self.restart and self.work.exists():
            import shutil

            shutil.rmtree(self.work)
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        saved = state.get("scoring")
        if saved is not None and saved != current and self._has_scored_work():
            raise ConfigError(
                f"{self.out} holds work scored with {_scoring_change(saved, current)}; "
                "use another --out, or --restart to discard it and score again"
            )
        if saved != current:  # new, or a run that stopped before scoring anything (missing weights)
            write_json_atomic(state_file, {**state, "scoring": current})

    def _check_same_weights(self) -> None:
        """Finished work is only reused when its stages' weight files are the ones it was scored with."""
        state_file = self.work / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        before = state.get("weights")
        weights = self._weights_fingerprint(before or {})
        if before is not None and self._has_scored_work():  # a file replaced under the same name
            changed = [
                f"{stage}: {name} (sha256 {old['sha256'][:12]}..., now {weights[stage][name]['sha256'][:12]}...)"
                for stage, files in before.items()
                for name, old in files.items()
                if isinstance(old, dict)
                and name in weights.get(stage, {})
                and weights[stage][name]["sha256"] != old.get("sha256")
            ]
            if changed:
                raise ConfigError(
                    f"{self.out} holds work scored with other weights: {'; '.join(changed[:3])}; one threshold"
                    " would filter scores of two models: use another --out, or --restart to score again"
                )
        if before != weights:
            write_json_atomic(state_file, {**state, "weights": weights})

    def _weights_fingerprint(self, before: dict) -> dict[str, dict[str, dict]]:
        """{stage: {file: {stamp, sha256}}} of each enabled model stage's weight files that are there. A file
        whose stamp (sizes and mtimes) is the one recorded keeps its recorded sha256: a rerun hashes nothing
        (a read-only models dir keeps no hash cache, and BLIP-2 is 15 GB); a changed one is hashed."""
        from pipeline.models import file_sha256, file_stamp, resolve_models_dir

        out: dict[str, dict[str, dict]] = {}
        for stage in self.model_stages():
            root = resolve_models_dir(getattr(stage, "models_dir", None))
            for wf in stage.weight_files():
                path = root / wf.path
                if not path.exists():
                    continue
                try:
                    stamp = file_stamp(path)
                    known = before.get(stage.name, {}).get(str(wf.path))
                    if isinstance(known, dict) and known.get("stamp") == stamp:
                        sha = known["sha256"]
                    else:
                        sha = file_sha256(path, root)
                except OSError:
                    continue  # unreadable: check_weights names it
                out.setdefault(stage.name, {})[str(wf.path)] = {"stamp": stamp, "sha256": sha}
        return out

    def _check_text_backend(self) -> None:
        """text.backend=auto scores with CRAFT when its weights are in the models dir, else with PP-OCR: the
        setting reads the same when the weights appear (or --models-dir changes), but new sources would be
        scored by another detector than the work already in OUT, and one text.max would filter both."""
        if not self.config.text.enabled or not self._has_scored_work():
            return
        current = self.config.text.resolved_backend()
        for part in sorted(self.parts.glob("[!.]*.parquet")):
            if "text_backend" not in pq.read_schema(part).names:
                continue
            used = {b for b in pq.read_table(part, columns=["text_backend"])["text_backend"].to_pylist() if b}
            if used and current not in used:
                raise ConfigError(
                    f"{self.out} holds work whose text stage scored with {sorted(used)[0]}; with the weights now"
                    f" found it would score new sources with {current}, and one text.max would filter both:"
                    f" --set text.backend={sorted(used)[0]} to go on as before, or --restart to score everything"
                    f" with {current}"
                )
            if used:
                return

    def _has_scored_work(self) -> bool:
        """Whether any source was scored into OUT/.work (a half-written part does not count)."""
        return self.parts.is_dir() and any(not p.name.startswith(".") for p in self.parts.glob("*.parquet"))

    def _scoring_fingerprint(self) -> dict:
        """The settings scores depend on: not thresholds, not how stages run (device, batch size)."""
        data = {s: getattr(self.config, s).__dict__ for s in SCORING_SECTIONS}
        for section in ("motion", *MODEL_STAGES):
            values = getattr(self.config, section).__dict__
            data[section] = {
                k: v
                for k, v in values.items()
                if (section, k) not in THRESHOLD_KEYS and k not in RUNTIME_KEYS
            }
        return json.loads(json.dumps(data, sort_keys=True, default=str))

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

    def _done_key(self, sources: list[str]) -> str:
        # how the job runs (workers, address, progress) does not change what it produces
        config = {k: v for k, v in self.config.to_dict().items() if k != "run"}
        blob = json.dumps({"sources": sources, "config": config}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

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

    def _score(self, sources: list[str]) -> list[str]:
        """Score the sources without a part in OUT/.work; returns those given up (runner.WORKER_RETRIES):
        their parts are error rows for this run's manifest, and the next run scores them again."""
        from pipeline.runner import run_stages

        for stale in self.parts.glob(".*"):  # a temporary file a killed run left half-written
            stale.unlink(missing_ok=True)
        given_up_file = self.work / "given_up.json"
        if given_up_file.exists():  # an out-of-memory or a lost node is worth another try
            for uri in json.loads(given_up_file.read_text()):
                (self.parts / f"{uri_key(uri)}.parquet").unlink(missing_ok=True)
            given_up_file.unlink()
        self._adopt_relative_parts(sources)
        pending = [uri for uri in sources if not (self.parts / f"{uri_key(uri)}.parquet").exists()]
        if not pending:
            self._say(f"all {len(sources)} sources already scored: deciding and writing again")
        elif len(pending) < len(sources):
            self._say(f"resuming: {len(sources) - len(pending)} of {len(sources)} sources already scored")
        if not pending:
            return []
        self._check_text_backend()  # new sources must be scored as the finished ones were
        self._init_ray()
        workers = self._workers()
        progress = Progress("score", len(pending), "sources", self.log)
        stages = self.stages()
        self._scored_now.update(pending)
        self._score_pass(run_stages([{"source_uri": u} for u in pending], stages, workers), progress)
        given_up = [uri for uri in pending if not (self.parts / f"{uri_key(uri)}.parquet").exists()]
        if given_up and any(stage.has_setup() for stage in stages):
            # a model actor's death takes down the batches queued on it: sources beside a crashing
            # one may have been given up with it; tried again with one batch per actor at a time
            self._say(
                f"{len(given_up)} source(s) lost with a worker that died: trying them once more, one clip per model call"
            )
            isolated = run_stages([{"source_uri": u} for u in given_up], stages, workers, isolate=True)
            self._score_pass(isolated, progress)
            given_up = [uri for uri in given_up if not (self.parts / f"{uri_key(uri)}.parquet").exists()]
        # a source whose task failed every attempt (runner.WORKER_RETRIES) left no part: its clips seen
        # so far are dropped and it is one error row, so that the job ends and a rerun does not hang on it
        for uri in given_up:
            row = {"source_uri": uri}
            self._save_part(uri, [{**row, **error_fields(row, f"score: {GIVEN_UP}")}])
            progress.update(1, 0)
        if given_up:
            write_json_atomic(given_up_file, given_up)
        return given_up

    def _score_pass(self, rows: Iterator[dict], progress: Progress) -> None:
        """Save each source's part once all of its rows have come (its `source_end` row says how many)."""
        open_rows: dict[str, list[dict]] = {}
        expected: dict[str, int] = {}
        try:
            for row in rows:
                uri = row["source_uri"]
                if row.get("row_kind") == "source_end":
                    expected[uri] = int(row["clips_emitted"])
                else:
                    open_rows.setdefault(uri, []).append(row)
                if uri in expected and len(open_rows.get(uri, [])) >= expected[uri]:
                    done = open_rows.pop(uri, [])
                    self._save_part(uri, done)
                    expected.pop(uri)
                    progress.update(1, sum(r.get("status") != "error" for r in done))
        except Exception as exc:
            from pipeline.runner import stage_load_error

            message = stage_load_error(exc)
            if message is None:
                raise
            raise ConfigError(
                f"{message}; `inbetweener models check` looks at the weights; the sources scored so far are kept"
            ) from None

    def _adopt_relative_parts(self, sources: list[str]) -> None:
        """Sources are named by absolute paths now; an earlier version named them as typed (relative to the
        working directory then). A part saved under a source's path relative to this working directory is
        that source's: it is renamed to its absolute path, and its rows say that path, instead of scoring
        the source again."""
        for uri in sources:
            new = self.parts / f"{uri_key(uri)}.parquet"
            if new.exists() or not is_local(uri):
                continue
            relative = os.path.relpath(uri)
            for typed in dict.fromkeys((relative, f"./{relative}")):
                old = self.parts / f"{uri_key(typed)}.parquet"
                if not old.exists():
                    continue
                table = pq.read_table(old)
                uris = pa.array([uri] * table.num_rows, table.schema.field("source_uri").type)
                table = table.set_column(table.schema.get_field_index("source_uri"), "source_uri", uris)
                with atomic_path(new, suffix=".parquet") as tmp:
                    pq.write_table(table, tmp)
                old.unlink()
                break

    def _init_ray(self) -> None:
        """A local Ray gets one CPU slot per worker, plus room for the model actors' token shares."""
        import os

        from pipeline.runner import init_ray

        workers = self.config.run.workers or os.cpu_count() or 1
        init_ray(self.config.run.address, num_cpus=workers + 1)

    def _workers(self) -> int:
        import ray

        if self.config.run.workers:
            return self.config.run.workers
        return max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)

    def _save_part(self, uri: str, rows: list[dict]) -> None:
        floats = {f.name for f in WORK_SCHEMA if pa.types.is_floating(f.type)}
        names = set(WORK_SCHEMA.names)

        def value(k, v):
            # Ray fills a column missing from some rows with NaN; only float columns may hold NaN
            if isinstance(v, float) and v != v and k not in floats:
                return None
            return v

        clean = [{k: value(k, v) for k, v in row.items() if k in names} for row in rows]
        for row in clean:
            row.setdefault("split", "none")
        table = pa.Table.from_pylist(clean, schema=WORK_SCHEMA)
        with atomic_path(self.parts / f"{uri_key(uri)}.parquet", suffix=".parquet") as tmp:
            pq.write_table(table, tmp)

    def _load_parts(self, sources: list[str]) -> pa.Table:
        tables = []
        for uri in sources:  # without the thumbnails: a million clips hold GBs of them
            path = self.parts / f"{uri_key(uri)}.parquet"
            columns = [name for name in pq.read_schema(path).names if name != "thumb"]
            tables.append(conform(pq.read_table(path, columns=columns)))
        return pa.concat_tables(tables)

    def thumbs_of(self, rows: list[dict]) -> dict[str, bytes]:
        """The thumbnails the shots stage saved for these rows (read from their sources' parts only)."""
        import pyarrow.compute as pc

        wanted: dict[str, set[str]] = {}
        for row in rows:
            wanted.setdefault(row["source_uri"], set()).add(row["clip_id"])
        thumbs: dict[str, bytes] = {}
        for uri, ids in wanted.items():
            part = self.parts / f"{uri_key(uri)}.parquet"
            if not part.exists():
                continue
            try:
                t = pq.read_table(part, columns=["clip_id", "thumb"])
            except (pa.ArrowException, OSError) as exc:  # a damaged part costs its thumbnails, not the report
                self._say(f"warning: report: the thumbnails of {uri} are not shown ({part}: {exc})")
                continue
            t = t.filter(pc.is_in(t["clip_id"], pa.array(sorted(ids), pa.string())))
            for cid, data in zip(t["clip_id"].to_pylist(), t["thumb"].to_pylist()):
                if data:
                    thumbs[cid] = data
        return thumbs

    def _drop_duplicate_sources(self, table: pa.Table) -> pa.Table:
        """Byte-identical files under several names: the first (by URI) is curated, each other one
        becomes a single rejected row naming it, so clip ids stay unique and nothing is lost. Their error
        rows stay errors (two empty downloads, the same broken file twice): each but the first (by URI)
        takes an id of its content and its URI, as its content's id was the first's."""
        from manifests.keys import clip_id as make_clip_id

        rows = table.to_pylist()
        source_of: dict[str, str] = {}
        for r in rows:
            source_of.setdefault(r["source_uri"], r["source_id"])
        first: dict[str, str] = {}
        for uri in sorted({r["source_uri"] for r in rows if r["status"] != "error" or r["start_frame"] != 0}):
            first.setdefault(source_of[uri], uri)
        owner: dict[str, str] = {}  # an error row's clip id -> the first URI (sorted) whose row has it
        errors = {
            (r["source_uri"], r["clip_id"]) for r in rows if r["status"] == "error" and not r["num_frames"]
        }
        for uri, cid in sorted(errors):
            owner.setdefault(cid, uri)
        out, marked, renamed = [], set(), False
        for row in rows:
            original = first.get(row["source_id"], row["source_uri"])
            # the file itself failed (no clip of it): its one row; a copy's clip errors are its duplicate row
            whole_source = row["status"] == "error" and not row["num_frames"]
            if whole_source and owner[row["clip_id"]] != row["source_uri"]:
                renamed = True
                row = {**row, "clip_id": make_clip_id(f"{row['source_id']}:{row['source_uri']}", -1, -1)}
            if original == row["source_uri"] or whole_source:
                out.append(row)
            elif row["source_uri"] not in marked:
                marked.add(row["source_uri"])
                out.append({
                    **{k: row[k] for k in SOURCE_COLUMNS},
                    "clip_id": make_clip_id("dup-" + row["source_uri"], 0, 0),
                    "start_frame": 0, "end_frame": 0, "num_frames": 0,
                    "status": "rejected", "split": "none",
                    "reason": f"probe: duplicate: same content as {original}",
                })  # fmt: skip
        return pa.Table.from_pylist(out, schema=CLIP_SCHEMA) if marked or renamed else table

    def _encode(self, table: pa.Table, sources_required: bool = False) -> pa.Table:
        """Encode kept clips that are not in the clip cache yet (one Ray task per source)."""
        from pipeline.runner import run_tasks

        rows = table.to_pylist()
        self._recover_from_shards(rows)
        jobs: dict[str, dict] = {}
        for row in rows:
            if row["status"] == "kept" and not (self.clips / f"{row['clip_id']}.mp4").exists():
                job = jobs.setdefault(
                    row["source_uri"],
                    {
                        "source_uri": row["source_uri"],
                        # checked against the file before it is encoded when it was scored by an earlier
                        # run (select; a curate rerun or resume: maybe replaced since); this run hashed
                        # it moments ago, and one more read of every source is not worth it there
                        "source_id": None if row["source_uri"] in self._scored_now else row["source_id"],
                        "fps": row["fps"],
                        "vfr": row["vfr"],
                        "ivtc": row["ivtc"],
                        "content_box": row["content_box"],
                        "clips": [],
                    },
                )
                job["clips"].append({k: row[k] for k in ("clip_id", "start_frame", "end_frame")})
        if jobs:
            self._init_ray()
            w = self.config.write
            encoder = EncodeSource(w.width, w.height, w.fps, w.codec, w.crf, w.preset)
            progress = Progress("write", len(jobs), "sources", self.log)
            failures: dict[str, str] = {}
            missing: dict[str, str] = {}
            # a source whose task failed every attempt returns nothing: its clips are errors
            failures.update(
                {c["clip_id"]: f"write: {GIVEN_UP}" for job in jobs.values() for c in job["clips"]}
            )
            given_up = set(jobs)
            for result in run_tasks(encoder, list(jobs.values()), self._workers()):
                given_up.discard(result["source_uri"])
                for clip in jobs[result["source_uri"]]["clips"]:
                    failures.pop(clip["clip_id"], None)
                for cid, data in result["encoded"].items():
                    save_clip(self.clips, cid, data)
                failures.update(result["errors"])
                if result.get("missing"):
                    missing[result["source_uri"]] = result["missing"]
                progress.update(1, len(result["encoded"]))
            if missing and sources_required:
                clips = sum(len(jobs[uri]["clips"]) for uri in missing)
                uri, why = next(iter(sorted(missing.items())))
                raise ConfigError(
                    f"{clips} kept clip{'' if clips == 1 else 's'} of {len(missing)} source{'' if len(missing) == 1 else 's'}"
                    f" are not in the clip cache ({self.clips}) and their sources are not there (e.g. {why});"
                    " nothing was changed: restore the sources (or the cache) and run select again"
                )
            self._encodes_given_up = bool(given_up)  # their clips are tried again by a rerun
            if failures:
                for row in rows:
                    if row["clip_id"] in failures:
                        row.update(status="error", reason=failures[row["clip_id"]])
                table = pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
        return table

    def _recover_from_shards(self, rows: list[dict]) -> None:
        """Clips missing from the clip cache that this OUT's shards hold (the manifest's `shard` and `key`:
        select's rows, also those its thresholds now reject, for a later select) are taken from there: an
        OUT copied without its hidden .work (`cp -r OUT/*`), or with .work deleted to save its copy of every
        clip, was encoded again from every source, and where the footage was not at hand select stopped,
        though the shards held every clip. The shards
        were written with the manifest's write settings, which select keeps; a curate run's rows (from
        its scored parts) have no shard. A shard that cannot be read gives what it can; the rest is
        encoded from the sources."""
        import tarfile

        wanted: dict[str, dict[str, str]] = {}  # shard -> {member name: clip id}
        for row in rows:
            shard, key = row.get("shard"), row.get("key")
            if (
                shard  # kept or not now: the shards are about to be replaced, and the cache keeps every clip
                and key
                and ".." not in Path(shard).parts
                and not (self.clips / f"{row['clip_id']}.mp4").exists()
            ):
                wanted.setdefault(shard, {})[f"{key}.mp4"] = row["clip_id"]
        recovered = 0
        for shard, members in sorted(wanted.items()):
            try:
                tar = tarfile.open(self.out / "shards" / shard)  # noqa: SIM115 (closed by the with below)
            except (tarfile.TarError, OSError):  # gone (deleted, another selection's name), or damaged
                continue
            with tar:
                while members:
                    try:
                        member = tar.next()
                        if member is None:
                            break
                        clip_id = members.pop(member.name, None) if member.isfile() else None
                        data = tar.extractfile(member).read() if clip_id else None
                    except (tarfile.TarError, OSError, EOFError):  # cut short: what came before is kept
                        break
                    if data:
                        save_clip(self.clips, clip_id, data)
                        recovered += 1
        if recovered:
            self._say(
                f"write: {recovered} clip{'' if recovered == 1 else 's'} not in the clip cache taken from this"
                " OUT's shards (not encoded again)"
            )

    def _adopt_clip_cache(self) -> None:
        """Clips an earlier version kept directly in .work/clips (for every write setting alike) move to the
        folder of the settings this OUT's manifest was written with; and when kept clips exist only for
        other write settings, say that they are encoded again."""
        root = self.work / "clips"
        loose = sorted(root.glob("*.mp4")) if root.is_dir() else []
        if loose:
            from pipeline.config import WriteConfig

            try:
                written = manifest_config(self.out / "manifest.parquet").get("write", {})
            except (ManifestError, OSError):  # none (the first run stopped before it), or unreadable
                written = {}
            settings = WriteConfig(
                **{k: v for k, v in written.items() if k in WriteConfig.__dataclass_fields__}
            )
            folder = root / clip_cache_name(settings if written else self.config.write)
            folder.mkdir(parents=True, exist_ok=True)
            for clip in loose:
                os.replace(clip, folder / clip.name)
        others = [d.name for d in root.iterdir() if d.is_dir() and d != self.clips] if root.is_dir() else []
        if others and not (self.clips.is_dir() and any(self.clips.glob("*.mp4"))):
            self._say(
                f"write: the clip cache holds clips encoded with other write settings ({', '.join(sorted(others))});"
                f" kept clips are encoded again as {self.clips.name} (the others stay, for those settings)"
            )

    def _split(self, table: pa.Table) -> pa.Table:
        """Near-duplicate groups over every scored clip; kept clips split train/eval by whole
        components (group, and by default source), deterministically; all others get `none`."""
        from manifests.split import PreviousSplit, assign_split

        c = self.config.split
        rows = table.to_pylist()
        hashed = [r for r in rows if r["phash"]]
        groups = assign_split(hashed, eval_size=0, max_distance=c.max_distance).group_of
        kept = sorted(
            (r for r in rows if r["status"] == "kept"), key=lambda r: (r["source_uri"], r["start_frame"] or 0)
        )  # dedup keeps a group's first clip in this order
        previous = self._previous_split()
        result = assign_split(
            kept, c.eval_size, c.max_distance, c.by_source, c.max_eval_fraction, c.seed, c.dedup, previous
        )
        now = PreviousSplit.of(
            (r["clip_id"], r["source_id"], result.split_of[r["clip_id"]])
            for r in kept
            if r["clip_id"] in result.split_of
        )
        history = previous.then(now) if previous else now
        write_split_history(history, self.out / SPLIT_HISTORY, self._split_settings())
        if result.previous_eval_to_train:
            self._say(
                f"split: {result.previous_eval_to_train} clips of the previous eval went to train (eval shrank, or"
                " their source or near-duplicate group now also holds clips that were in train)"
            )
        for row in rows:
            row["group_id"] = groups.get(row["clip_id"])
            row["split"] = result.split_of.get(row["clip_id"], "none") if row["status"] == "kept" else "none"
            if row["clip_id"] in result.duplicate_of:
                row.update(
                    status="rejected",
                    reason=f"dedup: near-duplicate of {result.duplicate_of[row['clip_id']]}",
                )
        if result.eval_size < c.eval_size:
            self._say_short_eval(result, len(kept) - len(result.duplicate_of), sticky=previous is not None)
        return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)

    def _split_settings(self) -> dict:
        return {k: getattr(self.config.split, k) for k in STICKY_KEYS}

    def _settings_changed(self, settings: dict) -> list[tuple[str, object, object]]:
        """(key, then, now) of the split settings an earlier split was drawn with that differ now."""
        return [(k, settings.get(k), v) for k, v in self._split_settings().items() if settings.get(k) != v]

    def _previous_split(self):
        """What earlier splits put in train and eval: this OUT's, when the split is sticky and was drawn with
        the same settings (else None, saying why), joined by split.history_from's."""
        own = self._history_of(self.out) if self.config.split.sticky else None
        if not self.config.split.sticky and self._had_a_split():
            self._say(
                "split: drawn afresh (split.sticky=false); clips that were in train may now be in eval, so"
                " evaluate models trained on the earlier shards on the earlier eval"
            )
        if own is not None:
            previous, settings = own
            changed = [f"split.{k} {was} -> {now}" for k, was, now in self._settings_changed(settings)]
            if changed:
                self._say(
                    f"split: drawn afresh ({', '.join(changed)}); clips that were in train may now be in eval,"
                    " so evaluate models trained on the earlier shards on the earlier eval"
                )
                own = None
        other = self._history_from()
        if own is None:
            return other
        return previous.then(other) if other else previous

    def _had_a_split(self) -> bool:
        """Whether this OUT has an earlier split to say goodbye to (one whose record cannot be read had)."""
        try:
            return self._history_of(self.out) is not None
        except ManifestError:
            return True

    @staticmethod
    def _history_of(folder: Path):
        """(PreviousSplit, the split settings it was drawn with) of a curate OUT: its split_history.parquet,
        or for an OUT written before that file existed, its manifest; None for a folder with neither."""
        from manifests.split import PreviousSplit

        history, manifest = folder / SPLIT_HISTORY, folder / "manifest.parquet"
        if history.is_file():
            try:
                return read_split_history(history)
            except ManifestError as exc:
                raise ConfigError(str(exc)) from None
        if not manifest.is_file():
            return None
        written = manifest_config(manifest).get("split", {})  # a key added since: its default then
        settings = {k: written.get(k, getattr(SplitConfig(), k)) for k in STICKY_KEYS}
        columns = ["clip_id", "source_id", "split"]
        try:
            missing = [c for c in columns if c not in pq.read_schema(manifest).names]
            table = None if missing else pq.read_table(manifest, columns=columns).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{manifest}: not a readable Parquet manifest ({exc})") from exc
        if missing:
            raise ManifestError(f"{manifest}: no {', '.join(missing)} column (every manifest has it)")
        assigned = (
            (r["clip_id"], r["source_id"], r["split"]) for r in table if r["split"] in ("train", "eval")
        )
        return PreviousSplit.of(assigned), settings

    def _history_from(self):
        """The split of the OUT named by split.history_from (ConfigError when it cannot be used), read
        once per job: it is checked before any work and used again by the split."""
        if not hasattr(self, "_other_split"):
            self._other_split = self._read_history_from()
        return self._other_split

    def _read_history_from(self):
        source = self.config.split.history_from
        if not source:
            return None
        path = Path(source)
        try:
            found = (
                self._history_of(path)
                if path.is_dir()
                else read_split_history(path)
                if path.is_file()
                else None
            )
        except (ManifestError, OSError) as exc:
            raise ConfigError(f"split.history_from: {exc}") from None
        if found is None:
            raise ConfigError(
                f"split.history_from: {path} is neither a curate OUT (its {SPLIT_HISTORY} or manifest.parquet)"
                f" nor a {SPLIT_HISTORY}"
            )
        other, settings = found
        changed = [f"{k} {was} there, {now} here" for k, was, now in self._settings_changed(settings)]
        if changed:
            raise ConfigError(
                f"split.history_from: {path} was drawn with other split settings ({', '.join(changed)}); use the"
                " same ones, or leave split.history_from out to draw afresh"
            )
        return other

    def _say_short_eval(self, result, kept: int, sticky: bool = False) -> None:
        c = self.config.split
        units = "sources" if c.by_source else "near-duplicate groups"
        clips = f"{result.eval_size} clip{'' if result.eval_size == 1 else 's'} (asked {c.eval_size}"
        if result.target < c.eval_size and not (sticky and result.eval_size < result.target):
            why = f"a small job gives eval at most {c.max_eval_fraction:.0%} of its {kept} kept clips"
            self._say(f"eval split: {clips}; {why}, in whole {units})")
            return
        if sticky:
            self._say(
                f"eval split: {clips}; what was in train stays out of eval, and too few {units} are new to"
                " either side to fill it: split.sticky=false draws the split afresh, then evaluate earlier"
                " models on the earlier eval)"
            )
            return
        self._say(f"eval split: {clips}; no set of whole {units} adds up to exactly {c.eval_size})")
        if result.largest_unit > c.eval_size and not c.dedup:
            self._say(
                f"  near-duplicate clips join {units} into units of up to {result.largest_unit} clips (an opening"
                " repeated in every episode joins a series' episodes); --set split.dedup=true keeps one clip"
                " of each near-duplicate group"
            )

    def _write_shards(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        order = sorted(range(len(rows)), key=lambda i: (rows[i]["source_uri"], rows[i]["start_frame"] or 0))
        by_id = {}
        splits = ("train", "eval")
        try:
            for split in splits:  # both are complete before either replaces the old one: no mixed versions
                chosen = [rows[i] for i in order if rows[i]["split"] == split]
                written = write_shards(
                    chosen, self.clips, self.out / "shards" / split, split, self.config.write.shard_bytes
                )
                by_id.update({r["clip_id"]: r for r in written})
        except BaseException:  # a full disk: the half-built shards would keep it full (report then failed)
            import shutil

            for split in splits:
                shutil.rmtree(staging_dir(self.out / "shards" / split), ignore_errors=True)
            raise
        for split in splits:
            swap_in(self.out / "shards" / split)
        final = []
        for row in rows:
            row = by_id.get(row["clip_id"], row)
            if row["clip_id"] not in by_id:
                row = {**row, "shard": None, "key": None}
            final.append(row)
        final.sort(key=lambda r: (r["source_uri"] or "", r["start_frame"] or 0, r["clip_id"]))
        return pa.Table.from_pylist(final, schema=CLIP_SCHEMA)

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
