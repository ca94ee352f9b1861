"""The steps of a curate run that do the work (`StepsMixin`, a part of `CurateJob`).

Scoring: the stages run over the sources not scored yet (Ray), and each source's rows are saved as its
part once all of them have come; sources lost with a model actor that died are tried once more, one
batch per actor, and a source whose task failed every attempt becomes one error row (`GIVEN_UP`). After
decide: byte-identical sources are reduced to one, kept clips not in the clip cache are encoded (Ray),
kept clips are split into train and eval by whole near-duplicate groups (and sources), keeping what
earlier splits put in train out of eval (OUT/split_history.parquet, split.sticky, split.history_from),
and the train and eval shards are written, then swapped in together. `Progress` prints the progress
lines of the two Ray passes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.files import write_json_atomic
from manifests.io import ManifestError, manifest_config, read_split_history, write_split_history
from manifests.schema import CLIP_SCHEMA, SOURCE_COLUMNS
from pipeline.config import ConfigError, SplitConfig
from pipeline.job_resume import source_stamp, uri_key
from pipeline.stages.discover import error_fields
from pipeline.stages.write import EncodeSource, save_clip, staging_dir, swap_in, write_shards

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


class StepsMixin:
    """The steps of `CurateJob` that do the work: score, drop duplicate sources, encode, split, shards."""

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
        self._stamps = {uri: stamp for uri in pending if (stamp := source_stamp(uri)) is not None}
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
