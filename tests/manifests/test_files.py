"""Atomic writes (manifests/files.py): complete or absent, and readable as any new file is."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from manifests.files import atomic_path, folder_lock, write_json_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path, umask_022):
    """Manifests, exported models and interpolate's outputs are shared by a team: 0644 under umask 022
    (mkstemp alone left them 0600, readable by their owner only)."""
    from inference.media import write_gif, write_mp4, write_pngs
    from training.checkpoint import save_safetensors
    from training.models.tooncrafter import build_tooncrafter

    write_json_atomic(tmp_path / "manifest.json", {"rows": 1})
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    written = [
        tmp_path / "manifest.json",
        *write_pngs(frames, tmp_path / "frames"),
        write_gif(frames, tmp_path / "clip.gif", 8.0),
        write_mp4(frames, tmp_path / "clip.mp4", 8.0),
        save_safetensors(build_tooncrafter("tiny"), tmp_path / "model.safetensors"),
    ]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: 0o644 for p in written}
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_lock_is_exclusive_and_tolerates_a_filesystem_without_locks(tmp_path, monkeypatch):
    import errno
    import fcntl

    from manifests.files import FolderBusy, folder_lock

    with (
        folder_lock(tmp_path / "out", "job one"),
        pytest.raises(FolderBusy, match=r"out is being written by job one \(pid \d+\)"),
        folder_lock(tmp_path / "out", "job two"),
    ):
        pass
    with folder_lock(tmp_path / "out", "job two"):  # released with the block
        pass

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with (
        pytest.warns(UserWarning, match="its filesystem has no file locks"),
        folder_lock(tmp_path / "nfs", "job"),  # goes on: the job is not refused on such a mount
    ):
        pass


def test_readers_share_a_folder_lock_and_a_writer_waits_for_them(tmp_path):
    """train and evaluate read a curate OUT for hours: select would swap its shards under them. They hold
    the lock shared; a writer then stops, naming them, and a reader stops while a writer runs."""
    from manifests.files import FolderBusy, folder_lock

    out = tmp_path / "out"
    out.mkdir()
    with (
        folder_lock(out, "inbetweener train rectify", shared=True),
        folder_lock(out, "inbetweener evaluate", shared=True),
    ):
        with pytest.raises(FolderBusy) as busy, folder_lock(out, "inbetweener select"):
            pass
        assert str(busy.value) == (
            f"{out} is being read by inbetweener train rectify (pid {os.getpid()}), inbetweener evaluate (pid"
            f" {os.getpid()}), which would see its shards replaced mid-run; wait for it to end, or work on a"
            " copy of the folder"
        )
    with folder_lock(out, "inbetweener select"):
        assert (
            out / ".lock"
        ).read_text() == f"inbetweener select (pid {os.getpid()})\n"  # readers' lines gone
        with (
            pytest.raises(FolderBusy, match=r"out is being written by inbetweener select \(pid \d+\); wait"),
            folder_lock(out, "inbetweener train rectify", shared=True),
        ):
            pass
    assert (out / ".lock").read_text() == ""  # a writer leaves no line behind


def test_a_reader_of_a_folder_it_cannot_write_goes_on_without_the_lock(tmp_path, monkeypatch):
    import errno

    from manifests.files import folder_lock

    real_open = os.open

    def read_only(path, flags, *mode):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, "open", read_only)
    with folder_lock(tmp_path, "inbetweener train rectify", shared=True):  # a shared, read-only dataset
        pass
    with pytest.raises(PermissionError), folder_lock(tmp_path, "inbetweener select"):  # a writer cannot
        pass


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    """A DataLoader worker (a fork) left behind by a killed training run kept the run's folder locked
    for seconds, and an immediate --resume was refused as 'being written by another process'."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    with folder_lock(tmp_path, "inbetweener train"):
        child = ctx.Process(target=time.sleep, args=(30,))
        child.start()
    from manifests.files import FolderBusy

    try:
        deadline = time.monotonic() + 10  # the child closes its copy as soon as it runs, not at its end
        while True:
            try:
                with folder_lock(tmp_path, "inbetweener train --resume"):
                    assert child.is_alive()
                break
            except FolderBusy:
                assert time.monotonic() < deadline, "the forked child kept the lock"
                time.sleep(0.05)
    finally:
        child.kill()
        child.join()


def test_the_curate_out_of_a_file_url_is_found_as_its_path_is(tmp_path):
    """train and evaluate take the shared lock of the curate OUT they read; given as a file:// URL with
    %-escapes (`Path.as_uri()` writes them for a space), the OUT was not found and no lock was taken."""
    from manifests.files import curate_out_of

    out = tmp_path / "runs 1" / "out"
    (out / "shards" / "train").mkdir(parents=True)
    (out / "manifest.parquet").write_bytes(b"PAR1")
    assert curate_out_of(out.as_uri()) == out == curate_out_of(str(out / "shards" / "train"))
    assert curate_out_of((out / "shards").as_uri().replace("file://", "file://localhost")) == out
    assert curate_out_of("s3://bucket/out") is None
