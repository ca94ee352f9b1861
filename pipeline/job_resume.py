"""What a curate job records under OUT/.work, and how a resume or a rerun uses it (`ResumeMixin`).

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

This module holds the names of those files (`uri_key`, `clip_cache_name`), the scored parts' writing and
reading, the checks that finished work is reused only when it was scored with the same config and the
same weights, the key a finished run is recognised by, what a rerun does again (sources back or
replaced since, sources that leave the manifest, thresholds that differ), and the adoption of work an
earlier version laid out otherwise (sources named by relative paths, one clip cache for every write
setting, clips held only in the shards).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.files import atomic_path, write_json_atomic
from manifests.io import ManifestError, manifest_config
from manifests.schema import CLIP_SCHEMA, conform
from pipeline.config import (
    MODEL_STAGES,
    RUNTIME_KEYS,
    SCORING_SECTIONS,
    SELECT_KEYS,
    THRESHOLD_KEYS,
    ConfigError,
)
from pipeline.stages.write import save_clip, says_changed
from pipeline.video import is_local, says_missing, source_exists

WORK_SCHEMA = CLIP_SCHEMA.append(pa.field("thumb", pa.binary()))


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


STAMP_KEY = b"inbetweener.source_stamp"  # a part's Parquet metadata: its local source's size and mtime then


def source_stamp(uri: str) -> str | None:
    """`size:mtime_ns` of a local source (None for a store's object, or a file not there): a part saved with
    one is scored again when its file no longer has it (replaced under the same name)."""
    if not is_local(uri):
        return None
    try:
        st = os.stat(uri)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _content_id(uri: str) -> str | None:
    """The content id of a local source now (None: it cannot be read)."""
    from manifests.keys import source_id_from_stream

    try:
        with open(uri, "rb") as handle:
            return source_id_from_stream(handle)
    except OSError:
        return None


def _part_source_id(part: Path) -> str | None:
    """The content id a part's rows were scored from (None: none recorded, e.g. a source that failed)."""
    try:
        ids = pq.read_table(part, columns=["source_id"]).column("source_id").to_pylist()
    except (pa.ArrowException, OSError, KeyError):
        return None
    return next((i for i in ids if i), None)


class ResumeMixin:
    """The OUT/.work bookkeeping of `CurateJob`: resuming, rerunning, adopting earlier work."""

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

    def _done_key(self, sources: list[str]) -> str:
        # how the job runs (workers, address, progress) does not change what it produces
        config = {k: v for k, v in self.config.to_dict().items() if k != "run"}
        blob = json.dumps({"sources": sources, "config": config}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

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

    def _changed_since_scored(self, sources: list[str], refresh: bool = True) -> list[str]:
        """Local sources replaced under the same name since they were scored: their part records another size
        or mtime than the file has now, and the file's content id is not the part's. Their finished job's
        rerun was a no-op, and a rerun for other reasons wrote their old clips from the clip cache, both
        keeping the old file's scores and frames. A file only touched (copied without its times, synced)
        keeps its scores: with `refresh`, its part takes the file's size and mtime now (said)."""
        changed, touched = [], []
        for uri in sources:
            part = self.parts / f"{uri_key(uri)}.parquet"
            if not is_local(uri) or not part.is_file():
                continue
            try:
                then = (pq.read_schema(part).metadata or {}).get(STAMP_KEY)
            except (pa.ArrowException, OSError):
                continue
            now = source_stamp(uri)
            if then is None or now is None or then.decode() == now:
                continue
            content = _content_id(uri)  # a hash costs far less than scoring again
            if content is not None and content == _part_source_id(part):
                touched.append(uri)
                if refresh:
                    table = pq.read_table(part)
                    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STAMP_KEY: now})
                    with atomic_path(part, suffix=".parquet") as tmp:
                        pq.write_table(table, tmp)
            else:
                changed.append(uri)
        if touched and refresh:
            self._say(
                f"{len(touched)} source(s) have another modification time but the same content as when they"
                f" were scored (e.g. {touched[0]}): their scores are kept"
            )
        return changed

    def _rescore_changed(self, changed: list[str]) -> None:
        for uri in changed:
            (self.parts / f"{uri_key(uri)}.parquet").unlink(missing_ok=True)
        if changed:
            self._say(
                f"{len(changed)} source(s) changed since they were scored (another size or modification time,"
                f" and other content; e.g. {changed[0]}): scored again"
            )

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
        stamp = getattr(self, "_stamps", {}).get(uri)  # taken before it was scored: a later change is seen
        if stamp is not None:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), STAMP_KEY: stamp})
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
