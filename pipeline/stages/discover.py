"""discover + probe: list inputs, hash their content, read container facts.

Unreadable, truncated, zero-length, audio-only, HDR10 (PQ) or absurd inputs become rows with
`status=error` and a reason; the job goes on. A variable-frame-rate source (screen and phone recordings, GIFs, anime
released with a 29.97 fps opening in a 23.976 fps episode) is curated on a constant grid
(`video.frame_intervals` chooses its rate; `vfr`: every stage decodes the same grid); telecined film is decoded
back to its film frames (`ivtc`).
"""

from __future__ import annotations

import glob
import os
import posixpath
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from manifests.keys import clip_id, source_id_from_stream
from manifests.remote import expand_home, local_path, lower_scheme
from pipeline.stages.base import Stage
from pipeline.video import (
    VIDEO_EXTENSIONS,
    SourceError,
    detect_borders,
    grid_rate,
    is_local,
    open_binary,
    probe,
)
from pipeline.video_decode import detect_telecine

LIST_EXTENSIONS = (".txt", ".lst", ".list")
# SMPTE ST 2084 (FFmpeg's AVCOL_TRC_SMPTE2084). HLG (18) passes: it is made to look right on SDR displays
PQ_TRANSFER = 16


def discover(inputs: list[str], unmatched: list[str] | None = None) -> list[str]:
    """Expand inputs (files, folders, globs, list files, object-store URIs/prefixes) to source URIs.

    A path that does not exist stays in the list: it becomes an error row, it is never dropped. A folder,
    glob or list file that names no video is added to `unmatched` (the job says so). Local paths are
    absolute, so that a rerun or `select` from another working directory finds the same sources.
    Order is deterministic (sorted within each input, inputs in the order given, duplicates once).
    A folder's hidden entries (a name starting with "."), and everything under a hidden folder, are
    not sources: macOS's `._clip.mp4` resource forks, `.Trash`, `.git`. Named explicitly, they are.
    Folders are walked into symbolic links to folders (once each; never a link to the folder itself or one
    above it). A local glob takes the videos it matches unless it names an extension (`*.y4m`); a path
    that exists is taken as it is even when its name has glob characters (`[1080p]`).
    A file name that is not valid UTF-8 (a Latin-1 name from an old archive) stops the job before any
    work, naming it: the manifest stores text.
    """
    found: list[str] = []
    for item in inputs:
        expanded = _expand(item)
        if not expanded and unmatched is not None:
            unmatched.append(item)
        found.extend(expanded)
    undecodable = [u for u in found if not _utf8(u)]
    if undecodable:
        from pipeline.config import ConfigError

        shown = ", ".join(_printable(u) for u in undecodable[:3])
        raise ConfigError(
            f"{len(undecodable)} input file name(s) are not valid UTF-8 ({shown}): the manifest stores names as"
            " text; rename them (e.g. `convmv -f latin1 -t utf8 -r --notest FOLDER`)"
        )
    seen: set[str] = set()
    unique = []
    for uri in found:
        if uri not in seen:
            seen.add(uri)
            unique.append(uri)
    return unique


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name, kept by Python as surrogates
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _expand(item: str, reading: frozenset[str] = frozenset()) -> list[str]:
    item = lower_scheme(item)
    if not is_local(item):
        return _expand_remote(item, reading)
    path = Path(os.path.abspath(expand_home(local_path(item))))
    # a path that exists is itself, brackets and all (`[Group] Show - 01 [1080p].mkv` matched nothing)
    if glob.has_magic(str(path)) and not os.path.lexists(path):
        return _glob_local(path)
    if path.is_dir():
        return _walk(path)
    if path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
        return _list_file(path, reading)
    return [str(path)]


def _walk(root: Path, seen: set[str] | None = None, within: str | None = None) -> list[str]:
    """The videos below a folder, not hidden, following links to folders once each (by their real path),
    but never a link to the folder itself or one above it (`up -> ..`, a link to `/`: the walk would leave
    the input, or take the whole disk). A broken link to a video (a disk not mounted, git-annex content not
    fetched) is kept: its error row says so. `seen`: real paths of folders walked already (shared by the
    walks of one glob's folders); `within`: a folder (real path) whose walks these are, never walked
    again through a link, nor any folder above it."""
    out, seen = [], set() if seen is None else seen
    top = os.path.realpath(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        above = folder != str(root) and any(
            os.path.commonpath([real, t]) == real for t in (top, within) if t is not None
        )
        if real in seen or above:  # a link back to a folder walked already, or out of the input
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(folder, f) for f in files if not f.startswith(".") and _is_video(f)]
    return sorted(p for p in out if _file_or_broken_link(p))


def _file_or_broken_link(path) -> bool:
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def _list_file(path: Path, reading: frozenset[str] = frozenset()) -> list[str]:
    """The entries of a list file (one per line, `#` comments; relative to its folder; a BOM ignored). A
    .txt whose lines name nothing that could be a source (notes beside the videos, caught by a shell's
    `*`) is not a list: it is left out, and said. `reading`: the lists being read (real paths); a list
    naming itself (`ls > list.txt` does) or one of them is read once."""
    real = os.path.realpath(path)
    if real in reading:
        print(f"{path}: a list that names itself (or a list naming it): read once", file=sys.stderr)
        return []
    entries = _list_entries(path.read_bytes())
    resolved = [e if "://" in e or os.path.isabs(e) else str(path.parent / e) for e in entries]
    if _notes(path, entries, [e for e in resolved if os.path.exists(e)]):
        return []
    out = []
    for entry in resolved:
        out.extend(_expand(entry, reading | {real}))
    return out


def _list_entries(data: bytes) -> list[str]:
    """A list file's entries: its lines, `#` comments and blank lines left out, a BOM ignored."""
    # surrogateescape: a Latin-1 name in the list keeps its bytes, and discover names it as not UTF-8
    text = data.decode("utf-8-sig", errors="surrogateescape")
    # `~/footage/ep1.mp4`: the shell expands it on a command line, not in a file
    return [
        os.path.expanduser(line.strip())
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _notes(name, entries: list[str], there: list[str]) -> bool:
    """Whether a .txt's lines name nothing that could be a source (notes, not a list): said."""
    # a path (a folder on a disk not mounted yet is one too) or a video name; prose is neither
    plausible = [e for e in entries if "://" in e or "/" in e or os.sep in e or _is_video(e)] + there
    if entries and not plausible:
        print(
            f"{name}: no line names a video, folder or URL: not a list of sources, left out", file=sys.stderr
        )
        return True
    return False


def _remote_list(uri: str, data: bytes, reading: frozenset[str]) -> list[str]:
    """A list file in a store (`s3://bucket/lists/batch1.txt`), read as a local one is: an entry is a URL, a
    local absolute path, or relative to the list's prefix. It was taken for a video, an error row."""
    if uri in reading:
        print(f"{uri}: a list that names itself (or a list naming it): read once", file=sys.stderr)
        return []
    entries = _list_entries(data)
    scheme, rest = uri.split("://", 1)
    folder = posixpath.dirname(rest)
    resolved = [
        e if "://" in e or os.path.isabs(e) else f"{scheme}://{posixpath.normpath(posixpath.join(folder, e))}"
        for e in entries
    ]
    if _notes(uri, entries, []):
        return []
    out = []
    for entry in resolved:
        out.extend(_expand(entry, reading | {uri}))
    return out


def _glob_local(pattern: Path) -> list[str]:
    """The video files a local glob matches (`in/*` leaves out the .srt and .jpg beside the videos, as a
    folder input does), and the videos in the folders it matches (`footage/season*`, quoted or from a list
    file, gave nothing: the shell hands those folders over, and a folder is searched). `**` does not follow
    links to folders (the standard library's glob does, and a link to a parent folder made it search
    forever); as with the shell, a hidden name matches only a pattern part that starts with "." itself."""
    parts = pattern.parts
    # the leading folders that exist as named are the root, brackets and all: a folder "[Group] Show"
    # is itself, not a character class (as a path that exists is, `discover`)
    known = 0
    while known < len(parts) - 1 and Path(*parts[: known + 1]).is_dir():
        known += 1
    first = next((i for i in range(known, len(parts)) if glob.has_magic(parts[i])), known)
    root, rest = Path(*parts[:first]) if first else Path("."), parts[first:]
    dotted = any(part.startswith(".") for part in rest)
    # `in/*` or `ep*`: the videos among what matches; `*.y4m` names its extension: what it matches
    suffix = Path(rest[-1]).suffix
    named = bool(suffix) and not glob.has_magic(suffix)
    out: list[str] = []
    walked: set[str] = set()  # each folder once, whichever matched folders lead to it
    within = os.path.realpath(root)
    for p in sorted(root.glob(str(Path(*rest)))):
        if not dotted and _hidden(p.relative_to(root).parts):
            continue
        if p.is_dir():
            out += _walk(p, walked, within)
        elif _file_or_broken_link(p) and (named or _is_video(p.name)):
            out.append(str(p))
    return sorted(set(out))


def _is_video(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _hidden(parts) -> bool:
    """True when a path below a listed folder has a hidden component (file or folder)."""
    return any(part.startswith(".") for part in parts)


def _expand_remote(uri: str, reading: frozenset[str] = frozenset()) -> list[str]:
    """Object-store URIs through fsspec: a prefix lists its videos, a glob is expanded, a list file is read.

    A protocol without its fsspec backend, or a store that cannot be listed (offline, no credentials),
    stops the job before any work with a ConfigError naming the URI."""
    import fsspec

    from manifests.remote import MissingBackendError, check_backend
    from pipeline.config import ConfigError

    try:
        check_backend(uri)
        fs, target = fsspec.core.url_to_fs(uri)
        protocol = uri.split("://", 1)[0]
        # an object whose key has glob characters (`[Group] Show 01.mkv`, `what?.mp4`) is itself; an http
        # URL's `?` is its query
        if glob.has_magic(target) and protocol not in ("http", "https") and not fs.exists(target):
            # the objects it matches, and the videos under the prefixes it matches (`s3://b/season*`: they
            # were sources, each an error row)
            # (a hidden name, `._a.mp4` or `.trash/`, only where the pattern names it, as a local glob)
            found: set[str] = set()
            parts = target.rstrip("/").split("/")
            first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            dotted = any(part.startswith(".") for part in parts[first:])
            # `in/*`: the videos among what matches (the .srt and .txt beside them were sources, each an
            # error row); `*.y4m` names its extension: what it matches (as `_glob_local`)
            suffix = posixpath.splitext(parts[-1])[1]
            named = bool(suffix) and not glob.has_magic(suffix)
            for path, info in fs.glob(target, detail=True).items():
                if not dotted and _hidden(path.rstrip("/").split("/")[first:]):
                    continue
                if info.get("type") == "directory":
                    found.update(_remote_videos(fs, path))
                elif named or _is_video(path):
                    found.add(path)
            return sorted(f"{protocol}://{p}" for p in found)
        if fs.isdir(target):
            return sorted(f"{protocol}://{p}" for p in _remote_videos(fs, target))
        listed = None
        if os.path.splitext(target)[1].lower() in LIST_EXTENSIONS and fs.isfile(target):
            listed = fs.cat_file(target)
    except MissingBackendError as exc:
        raise ConfigError(str(exc)) from exc
    except (
        Exception
    ) as exc:  # the store's own error (offline, denied, no such bucket): one line, no traceback
        raise ConfigError(f"{uri}: cannot list it: {type(exc).__name__}: {exc}") from exc
    return [uri] if listed is None else _remote_list(uri, listed, reading)


def _remote_videos(fs, target: str) -> list[str]:
    """The videos below a prefix of an fsspec store, not hidden."""
    root = target.rstrip("/") + "/"
    return [
        p
        for p in fs.find(target)
        if _is_video(p) and not _hidden(p[len(root) :].split("/") if p.startswith(root) else [p])
    ]


@dataclass
class ProbeStage(Stage):
    """Hash the source's bytes and read its container facts; refuse what the job cannot use."""

    max_width: int = 4096
    max_height: int = 4096
    min_width: int = 64
    min_height: int = 48
    max_duration_s: float = 6 * 3600.0
    vfr_tolerance: float = 0.05
    vfr_fps: float | None = None
    ivtc: bool = True
    hash_chunk_bytes: int = 1 << 20
    crop_borders: bool = True
    border_luma: int = 12

    name = "probe"

    def process(self, row: dict) -> dict:
        uri = row["source_uri"]
        out = dict(row)
        try:
            with open_binary(uri) as handle:
                out["source_id"] = source_id_from_stream(handle, self.hash_chunk_bytes)
                size = handle.tell()
            if size == 0:
                raise SourceError("zero-byte file")
            info = probe(uri, max_pixels=self.max_width * self.max_height)
            out.update(
                codec=info.codec,
                width=info.width,
                height=info.height,
                fps=info.fps,
                num_frames=info.num_frames,
            )
            out["duration_s"] = info.duration_s
            if info.width <= 0 or info.height <= 0:
                raise SourceError("video stream has no frame size")
            if info.width > self.max_width or info.height > self.max_height:
                raise SourceError(
                    f"frame size {info.width}x{info.height} exceeds probe.max_width x probe.max_height "
                    f"= {self.max_width}x{self.max_height}"
                )
            if info.width < self.min_width or info.height < self.min_height:
                raise SourceError(
                    f"frame size {info.width}x{info.height} is under probe.min_width x probe.min_height "
                    f"= {self.min_width}x{self.min_height} (a thumbnail? its clips would be upscaled blur)"
                )
            if info.fps <= 0:
                raise SourceError("video stream has no frame rate")
            if info.num_frames <= 0 and info.duration_s <= 0:
                raise SourceError("video stream has no frames")
            if info.duration_s > self.max_duration_s:
                raise SourceError(
                    f"duration {info.duration_s:.0f} s exceeds probe.max_duration_s = {self.max_duration_s:.0f}"
                )
            if info.transfer == PQ_TRANSFER:
                raise SourceError(
                    "HDR video (PQ transfer, HDR10): its frames would be read without tone mapping, dim and "
                    "washed out; convert it to SDR first (e.g. ffmpeg -vf zscale=t=linear:npl=100,"
                    "tonemap=hable,zscale=t=bt709:m=bt709:p=bt709:r=tv,format=yuv420p)"
                )
            out["vfr"] = info.vfr_spread > self.vfr_tolerance and info.nominal_rate is not None
            # one grid over both sides of a jump back would drop what follows it
            if out["vfr"] and info.breaks:
                raise SourceError(
                    f"variable frame rate with {info.breaks} break(s) in its timestamps (jumps back: recordings "
                    "joined): its frames cannot be put on one grid; remux it with fresh timestamps or split it "
                    "at the breaks"
                )
            out["ivtc"] = not out["vfr"] and self.ivtc and self._telecined(uri, info.fps)
            # frame numbers count the retimed frames: every stage decodes them (video.source_retime)
            if out["vfr"]:
                out["fps"] = float(grid_rate(self.vfr_fps) if self.vfr_fps else info.nominal_rate)
            elif out["ivtc"]:
                out["fps"] = float(grid_rate(info.fps) * Fraction(4, 5))
            if out["vfr"] or out["ivtc"]:
                out["num_frames"] = max(1, round(info.duration_s * out["fps"]))
            out["content_box"] = self._content_box(uri)
            out["status"] = None
            out["reason"] = None
        except SourceError as exc:
            out.update(error_fields(out, f"probe: {exc}"))
        return out

    @staticmethod
    def _telecined(uri: str, fps: float) -> bool:
        """Whether an interlaced source at 29.97 or 30 fps is telecined film (`detect_telecine`); a source
        the detector cannot read is decoded as it is (the shots stage reports what is wrong with it)."""
        if not 29.9 <= fps <= 30.05:
            return False
        try:
            return bool(detect_telecine(uri))
        except Exception:  # noqa: BLE001 - a damaged source is the shots stage's to report
            return False

    def _content_box(self, uri: str) -> list[int] | None:
        """The picture inside black bars, or None; a source the detector cannot read is left whole
        (the shots stage, which decodes every frame, reports what is wrong with it)."""
        if not self.crop_borders:
            return None
        try:
            box = detect_borders(uri, dark=self.border_luma)
        except (SourceError, OSError, ValueError):
            return None
        return list(box) if box else None


def error_fields(row: dict, reason: str) -> dict:
    """The fields of a failed source's row: one row per source, never dropped."""
    sid = row.get("source_id") or ("uri-" + clip_id(row["source_uri"], 0, 0))
    return {
        "source_id": sid,
        "clip_id": clip_id(sid, -1, -1),
        "status": "error",
        "reason": reason,
        "split": "none",
        "start_frame": 0,
        "end_frame": 0,
        "num_frames": 0,
    }
