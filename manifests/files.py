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
from contextlib import contextmanager
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


@contextmanager
def folder_lock(folder: Path | str, what: str) -> Iterator[None]:
    """Hold `folder/.lock` (an exclusive `flock`) for the block, so that two jobs never write one
    output folder at once; the kernel lets go when the process ends, even by `kill -9`, so a lock is
    never stale. The file records who holds it: `what` and the process id, for the other's message."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise FolderBusy(
                f"{folder} is being written by {holder}; wait for it to end, or use another folder"
            ) from None
        except OSError as exc:  # a filesystem without locks (some NFS and Lustre mounts): go on, and say so
            import warnings

            warnings.warn(
                f"{folder}: its filesystem has no file locks ({exc.strerror}); make sure no other job writes it",
                stacklevel=3,
            )
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
