"""Atomic file visibility, with the standard library alone.

A file becomes visible only when complete: it is written to a temporary name in the same folder,
then renamed, so a reader never sees half a file, even after `kill -9`. This module needs nothing
beyond Python (no pyarrow), so that the torch-only GPU machine can use it too (the benches' compile
caches).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def default_file_mode() -> int:
    """The permissions a new file gets here: 0666 less the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. The file gets
    the permissions any new file gets (0666 less the umask): mkstemp's private 0600 would have made
    manifests, exported models and outputs unreadable to the rest of a team sharing the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # after the writer, which may have replaced the file (safetensors writes its own, private too)
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path | str, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


def curate_out_of(path: Path | str) -> Path | None:
    """The curate OUT folder a local input belongs to (the folder, its manifest.parquet, its shards or a
    split's folder), or None (a URL, plain shards): the folder whose lock guards what is read."""
    from manifests.remote import local_path

    text = local_path(str(path))  # file:///runs%201/out is /runs 1/out
    if "://" in text:
        return None
    path = Path(text)
    for candidate in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        if (candidate / "manifest.parquet").is_file() and (candidate / "shards").is_dir():
            return candidate
    return None


def _holders(fd: int) -> str:
    """Who the lock file says holds the lock: the writer's line, or the readers' lines of processes still
    running (a reader that ended leaves its line; the next writer clears them)."""
    import re

    lines = os.pread(fd, 1 << 16, 0).decode(errors="replace").splitlines()
    alive = []
    for line in dict.fromkeys(x.strip() for x in lines if x.strip()):
        pid = re.search(r"\(pid (\d+)\)", line)
        try:
            if pid:
                os.kill(int(pid[1]), 0)
        except ProcessLookupError:
            continue
        except PermissionError:  # another user's process: alive
            pass
        alive.append(line)
    return ", ".join(alive) or "another process"


# The lock descriptors this process holds. A forked child (a DataLoader worker) shares each one's open file,
# and an flock lasts until every descriptor of it is closed: a worker left behind by a killed run held the
# run's folder for seconds, and the run's immediate --resume was refused as "being written". The child
# closes its copies at once (the parent's lock stays).
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


@contextmanager
def folder_lock(folder: Path | str, what: str, shared: bool = False) -> Iterator[None]:
    """Hold `folder/.lock` (an `flock`) for the block. Writers (curate, select, a training run on its own
    folder) hold it exclusively, so that two jobs never write one folder at once; readers that must see
    one version of it for hours (train and evaluate on a curate OUT) hold it `shared`: a writer then
    stops instead of replacing the shards under them, and a reader stops while a writer runs. The kernel
    lets go when the process ends, even by `kill -9`, so a lock is never stale. The file records the
    holders (`what` and the process id) for the others' messages. A reader of a folder it cannot write
    (a read-only dataset, nobody can change it) goes on without the lock."""
    import errno
    import fcntl

    folder = Path(folder)
    if not shared:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | (os.O_APPEND if shared else 0), 0o666)
    except OSError as exc:
        if not shared or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield
        return
    holding = False
    _HELD.add(fd)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _holders(fd)
            if shared:
                raise FolderBusy(f"{folder} is being written by {holders}; wait for it to end") from None
            if " reads it" in holders:
                raise FolderBusy(
                    f"{folder} is being read by {holders.replace(' reads it', '')}, which would see its shards"
                    " replaced mid-run; wait for it to end, or work on a copy of the folder"
                ) from None
            raise FolderBusy(
                f"{folder} is being written by {holders}; wait for it to end, or use another folder"
            ) from None
        except OSError as exc:  # a filesystem without locks (some NFS and Lustre mounts): go on, and say so
            import warnings

            warnings.warn(
                f"{folder}: its filesystem has no file locks ({exc.strerror}); make sure no other job"
                f" {'writes it meanwhile' if shared else 'writes it'}",
                stacklevel=3,
            )
        else:
            try:  # who holds it, for the others' messages; a full disk costs only that (the lock is held)
                if shared:
                    os.write(fd, f"{what} (pid {os.getpid()}) reads it\n".encode())
                else:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{what} (pid {os.getpid()})\n".encode(), 0)
                    holding = True
            except OSError:
                pass
        yield
    finally:
        if holding:  # a writer leaves the file empty for the readers' lines (kill -9: its pid is gone)
            os.ftruncate(fd, 0)
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def make_writable_folder(path: Path | str) -> str | None:
    """Make the output folder `path` (with its parents) and write a file in it once: None when that
    works, else why not, as "cannot write there (Read-only file system)" (said before any work)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None
