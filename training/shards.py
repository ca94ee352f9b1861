"""Where the training shards are and how they are read: a spec -> shard names -> a byte stream -> samples.

A shard is a plain tar of samples `KEY.mp4` (the clip), `KEY.json` (its manifest row), `KEY.txt` (its
caption, may be empty); `.tar.gz` shards are read too. Its members are grouped into samples by key as
webdataset groups them (`iter_tar_samples`); what a sample holds is read by `training.shard_samples`, and
the resumable stream over the samples is `training.data`. Shards are named by a folder (a curate `OUT`,
`OUT/shards/train`, or any folder of `.tar`/`.tar.gz` files), a glob, a `{000000..000099}` brace
pattern, a list file (`.txt`: one shard per line), `pipe:COMMAND` (the command writes the tar to stdout,
webdataset's convention), or any fsspec URL (`s3://`, `gs://`, `https://`, `file://`; a URL ending in
`/` lists its shards).

Also here: the setup errors said before any model is built (`check_shards`: missing shards, the held-out
eval split, URLs none of which opens), what a data position is a position in (`shards_digest`), the record
of the clips a run trains on (`write_train_index`), and `write_shard`, the curate layout for tests and
benchmarks.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from manifests.remote import local_path
from manifests.tar import EndCheckedTarInfo


class DataError(RuntimeError):
    """The shards give no training data at all (every shard unreadable, no usable clip): a setup error
    the trainer reports in one line, not a bad sample to skip."""


def _expand_braces(pattern: str) -> list[str]:
    """`a{000..002}b` -> [a000b, a001b, a002b] (zero padding kept), `{0..8..4}` with a step, `{a..c}` letters,
    `{x,y}` alternatives (as the shell and webdataset's braceexpand); nested left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    if ".." in body:
        found = re.fullmatch(r"(\d+|[a-zA-Z])\.\.(\d+|[a-zA-Z])(?:\.\.(\d+))?", body)
        lo, hi, step = found.groups() if found else ("", "", "0")
        numeric = lo.isdigit() and hi.isdigit()
        if not found or int(step or 1) == 0 or (not numeric and (lo.isdigit() or hi.isdigit())):
            raise ValueError(
                f"{pattern}: {{{body}}} is not a range: write {{000000..000099}} (a step: {{0..98..2}}, letters:"
                " {a..f})"
            )
        first, last = (int(lo), int(hi)) if numeric else (ord(lo), ord(hi))
        step = int(step or 1) if first <= last else -int(step or 1)
        # zero padding as bash pads: to the longer end's width when either end has a leading zero
        padded = numeric and any(len(end) > 1 and end.startswith("0") for end in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        values = range(first, last + (1 if step > 0 else -1), step)
        options = [str(v).zfill(width) if numeric else chr(v) for v in values]
    else:
        options = body.split(",")
    return [out for option in options for out in _expand_braces(head + option + tail)]


def is_url(spec: str) -> bool:
    """Whether a shard spec names a stream (fsspec URL or pipe:COMMAND) rather than a local path."""
    return "://" in spec or spec.startswith("pipe:")


def is_tar_name(path: str) -> bool:
    """Whether a local shard's name says tar (plain or gzipped), as webdataset reads them."""
    return path.endswith((".tar", ".tar.gz", ".tgz"))


TRAIN_INDEX = "train_index.parquet"  # in a run folder: the clips it trained on (evaluate checks against it)


def write_train_index(shards: list[str], path: Path) -> int | None:
    """Record which clips a run trains on: clip_id, source_id and the keyframe hashes of every clip in
    `shards`, from the index curate writes beside each shard (NNNNNN.parquet), joined with what `path`
    already holds (a resumed run). Returns the clips recorded; None, writing nothing, when a shard has no
    index beside it (a URL, shards from elsewhere): `evaluate` then cannot check its clips against them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.files import atomic_path

    siblings = [Path(re.sub(r"\.(tar|tar\.gz|tgz)$", "", s) + ".parquet") for s in shards]  # gzipped too
    if not siblings or any(is_url(s) for s in shards) or not all(p.is_file() for p in siblings):
        return None
    columns = ["clip_id", "source_id", "phash"]
    try:
        tables = [pq.read_table(p, columns=columns) for p in siblings]
        if path.is_file():
            tables.append(pq.read_table(path, columns=columns))
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):  # not curate's index, or damaged: no record
        return None
    keep = sorted({cid: i for i, cid in enumerate(table["clip_id"].to_pylist())}.values())
    table = table.take(keep)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows


def split_dirs(spec: str) -> tuple[str, str]:
    """(train, eval) shard specs for `--data`: a curate OUT folder (or its manifest.parquet, as interpolate
    and evaluate take it) gives OUT/shards/{train,eval}. A `file://` URL is its local path."""
    spec = local_path(spec)
    path = Path(spec)
    if not is_url(spec) and path.suffix == ".parquet" and path.is_file():
        if not (path.parent / "shards" / "train").is_dir():
            raise FileNotFoundError(
                f"{spec} is a manifest without OUT/shards/train beside it: give the shards"
            )
        path = path.parent
    if not is_url(spec) and (path / "shards" / "train").is_dir():  # no eval folder: copied without it
        held_out = path / "shards" / "eval"
        return str(path / "shards" / "train"), str(held_out) if held_out.is_dir() else ""
    if not is_url(spec) and path.name == "train" and (path.parent / "eval").is_dir():
        return spec, str(path.parent / "eval")
    # the eval split beside its train split, or copied alone with the OUT's layout (OUT/shards/eval)
    curate_eval = path.parent.name == "shards" and (path.parent.parent / "manifest.parquet").is_file()
    if not is_url(spec) and path.name == "eval" and ((path.parent / "train").is_dir() or curate_eval):
        raise ValueError(
            f"{spec} is the held-out eval split of a curate output: training on it would leak it into the"
            f" model. Give the curate OUT folder or {path.parent / 'train'} (the eval split is then used for"
            " evaluation only)"
        )
    return spec, ""


def list_shards(spec: str) -> list[str]:
    """Shard URLs/paths named by `spec` (see the module docstring), in a stable order."""
    if not spec:
        return []
    spec = local_path(spec)  # a local path: listed as one (fsspec's file:// lists no folder)
    if spec.startswith("pipe:"):
        return _expand_braces(spec)
    if "://" in spec:
        import fsspec

        from manifests.remote import check_backend

        check_backend(spec)  # a missing s3fs/gcsfs/aiohttp: a ValueError naming it, before any work
        if "{" in spec:
            return _expand_braces(spec)
        protocol = spec.split("://", 1)[0]
        if "*" in spec or spec.endswith("/"):
            try:
                fs, _, paths = fsspec.get_fs_token_paths(spec)
                pattern = paths[0].rstrip("/") + ("/*" if spec.endswith("/") else "")
                found = sorted(fs.glob(pattern))
                if spec.endswith("/"):  # its shards, plain or gzipped
                    found = [p for p in found if is_tar_name(p)]
                return [f"{protocol}://{p}" for p in found]
            except Exception as exc:  # offline, denied, no such bucket: one line naming the URL
                raise FileNotFoundError(f"{spec}: cannot list it: {type(exc).__name__}: {exc}") from exc
        return [spec]
    if "{" in spec:
        return _expand_braces(spec)
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    path = Path(spec)
    if path.is_dir():  # its shards, plain or gzipped (a hidden name is a file being written)
        return [str(p) for p in sorted(path.iterdir()) if is_tar_name(p.name) and not p.name.startswith(".")]
    if path.suffix in (".txt", ".lst", ".list") and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        named = [line for line in lines if line and not line.startswith("#")]
        # a relative entry is relative to the list file's folder (as a playlist's), where it is there
        return [
            n if is_url(n) or os.path.isabs(n) or not (path.parent / n).exists() else str(path.parent / n)
            for n in named
        ]
    if path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"no shards at {spec!r}: not a folder, a file, a glob, a pattern or a URL")


def held_out_shards(shards: list[str]) -> list[str]:
    """The shards of a curate job's held-out eval split among `shards` (OUT/shards/eval/*.tar, however they
    were named: a glob over both splits, a list file, the file itself): training on them leaks the eval
    split into the model."""
    out = []
    for s in shards:
        if is_url(s):
            if "/shards/eval/" in s:
                out.append(s)
            continue
        folder = Path(s).resolve().parent
        if folder.name == "eval" and folder.parent.name == "shards" and (folder.parent / "train").is_dir():
            out.append(s)
    return out


def check_shards(shards: list[str]) -> None:
    """Setup errors, said before any model is built (ValueError): local shards named that do not exist (a
    typo in a pattern or list file, an incomplete copy: training on what is left would go unnoticed), eval
    shards of a curate output, and fsspec URLs none of which can be opened (offline, no credentials: the
    first few are tried, so one bad shard is still only skipped)."""
    missing = [s for s in shards if not is_url(s) and not os.path.exists(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{len(missing)} of {len(shards)} shards do not exist: {missing[0]}{more}; fix the pattern or"
            " list, or leave them out"
        )
    leaked = held_out_shards(shards)
    if leaked:
        more = f" (and {len(leaked) - 1} more)" if len(leaked) > 1 else ""
        raise ValueError(
            f"{leaked[0]}{more} is in the held-out eval split of a curate output: training on it would leak"
            " it into the model. Give the curate OUT folder or its shards/train (the eval split is then used"
            " for evaluation only)"
        )
    # not pipe: commands, even of URLs: a probe would run one to its end
    urls = [s for s in shards if "://" in s and not s.startswith("pipe:")][:3]
    errors = []
    for url in urls:
        try:
            with open_shard(url) as stream:
                stream.read(512)
            return
        except DataError:
            raise
        except Exception as exc:  # fsspec backends raise their own types (botocore's NoCredentialsError)
            errors.append(f"{type(exc).__name__}: {exc}")
    if errors:
        raise ValueError(
            f"cannot read the shards: {urls[0]}: {errors[0]}"
            + (f" (and the next {len(errors) - 1} as well)" if len(errors) > 1 else "")
            + "; check the network and the credentials"
        )


def shards_digest(shards: list[str]) -> str:
    """What a data position is a position in: the shards' names in order, with local files' sizes (a moved
    folder keeps its digest; a curate rerun that adds or rewrites shards changes it)."""
    import hashlib

    h = hashlib.sha256()
    for s in shards:
        size = os.path.getsize(s) if not is_url(s) and os.path.isfile(s) else -1
        h.update(f"{s.rstrip('/').rsplit('/', 1)[-1]}\t{size}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[Any]:
    """A readable binary stream of one shard: local file, `pipe:COMMAND`, or fsspec URL."""
    if url.startswith("pipe:"):
        # stderr to a file, not a pipe: a chatty command (wget's progress) would fill a pipe no one reads
        # while stdout is read, and both sides would wait for ever
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=errors)
            try:
                yield proc.stdout
                while proc.stdout.read(
                    1 << 20
                ):  # to the end (tar stops at its end marker): the command exits
                    pass
                status = proc.wait()
                if status:  # its stream may still have parsed: a failed download is not a whole shard
                    errors.seek(max(0, errors.seek(0, 2) - 300))
                    said = errors.read().decode(errors="replace").strip()
                    raise OSError(
                        f"{url}: the command exited with status {status}" + (f": {said}" if said else "")
                    )
            finally:
                proc.stdout.close()
                proc.kill()
                proc.wait()
    elif "://" in url:
        import fsspec

        from manifests.remote import MissingBackendError, check_backend

        try:
            check_backend(url)
        except MissingBackendError as exc:  # a setup error, not a bad shard: stop
            raise DataError(f"{exc}; or stream it with pipe:, e.g. 'pipe:curl -sL {url}'") from exc
        opened = fsspec.open(url, "rb")
        with opened as f:
            yield f
    else:
        with open(url, "rb") as f:
            yield f


def iter_tar_samples(stream: Any) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar read as a stream: {"__key__": key, ext: bytes, ...}.

    Members are grouped by key (the path up to the first dot of the file name), as webdataset does;
    a sample ends where the key changes, or where an extension comes again (the same key twice in a row,
    a tar appended to: two samples, not one whose first clip is lost). Errors of a truncated or garbled tar propagate (a tar cut at a
    member boundary included); the sample being read when one comes is not yielded.
    """
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=EndCheckedTarInfo) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, name = os.path.split(member.name)
            if "." not in name or name.startswith("."):
                continue
            stem, ext = name.split(".", 1)
            key = f"{folder}/{stem}" if folder else stem
            data = tar.extractfile(member).read()
            if current is not None and (current["__key__"] != key or ext.lower() in current):
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = data
    if current is not None:
        yield current


def write_shard(path: Path, samples: list[dict[str, Any]]) -> Path:
    """A shard in the curate job's layout from {"key", "mp4": bytes, "meta": manifest row, "caption"} dicts:
    a plain tar of KEY.mp4, KEY.json and KEY.txt (for tests and benchmarks; the curate job writes its own)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            members = (
                ("mp4", s["mp4"]),
                ("json", json.dumps(s["meta"]).encode()),
                ("txt", s["caption"].encode()),
            )
            for ext, data in members:
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
