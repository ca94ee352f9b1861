"""Object-store URLs whose fsspec backend is missing, or whose store cannot be listed: one clear error
naming the URL (and the package that serves it) before any work, in curate, train and the helper itself."""

from __future__ import annotations

import sys
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from manifests.remote import MissingBackendError, check_backend, local_folder, not_a_url
from pipeline.cli import curate_main
from pipeline.config import ConfigError
from pipeline.stages.discover import discover
from training.shards import list_shards
from training.train import main as train_main


@pytest.fixture
def no_s3fs(monkeypatch):
    """fsspec as it is without s3fs installed, whether or not this machine has it."""
    real = fsspec.get_filesystem_class

    def get_filesystem_class(protocol):
        if protocol in ("s3", "s3a"):
            raise ImportError("Install s3fs to access S3")
        return real(protocol)

    monkeypatch.setattr(fsspec, "get_filesystem_class", get_filesystem_class)


class EndpointConnectionError(Exception):
    """What botocore raises offline: not an OSError, so fsspec's listings do not swallow it."""


class UnlistableFS(MemoryFileSystem):
    """A store that cannot be reached, as S3 is from a machine without network."""

    protocol = "unlistable"

    def ls(self, path, detail=True, **kwargs):
        raise EndpointConnectionError(
            'Could not connect to the endpoint URL: "https://bucket.s3.amazonaws.com/"'
        )

    info = ls


@pytest.fixture
def unlistable():
    fsspec.register_implementation("unlistable", UnlistableFS, clobber=True)
    yield "unlistable://bucket/raw/"
    sys.modules["fsspec.registry"]._registry.pop("unlistable", None)  # fsspec.registry is a read-only view


def test_a_missing_backend_names_the_url_the_package_and_the_extra(no_s3fs):
    with pytest.raises(MissingBackendError) as err:
        check_backend("s3://bucket/raw/")
    message = str(err.value)
    assert message.startswith("s3://bucket/raw/: reading s3:// needs fsspec's s3fs backend")
    assert "pip install 'inbetweener[cloud]'" in message and "pip install s3fs" in message
    with pytest.raises(MissingBackendError, match="fsspec knows no nosuch:// protocol"):
        check_backend("nosuch://x")
    check_backend("memory://bucket/a.tar")  # a protocol fsspec serves itself: no error
    assert (
        local_folder("file:///tmp/run") == Path("/tmp/run") and not_a_url("file:///m/x.ckpt") == "/m/x.ckpt"
    )


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path, capsys, monkeypatch):
    """`--out "$OUT"` with OUT unset: Path("") is ".", so curate wrote its OUT into the working folder (and
    `curate ""` curated every video under it), interpolate its frames."""
    from inference.interpolate import main as interpolate_main
    from pipeline.cli import report_main

    monkeypatch.chdir(tmp_path)
    for argv, main in (
        (["x.mp4", "--out", "", "--dry-run"], curate_main),
        (["", "--out", "out", "--dry-run"], curate_main),
        ([" "], report_main),
        (["a.png", "b.png", "--out", "", "--dry-run"], interpolate_main),
        (["a.png", "b.png", "--checkpoint", "", "--dry-run"], interpolate_main),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "is an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_leading_tilde_is_the_home_folder_not_a_folder_named_tilde(tmp_path, monkeypatch, capsys):
    """`--out=~/runs/r1` (bash leaves that `~`) or a quoted `"~/footage"`: curate wrote its OUT into a folder
    named `~` in the working folder, and looked for the footage there."""
    home = tmp_path / "home"
    (home / "footage").mkdir(parents=True)
    (home / "footage" / "ep1.mp4").write_bytes(b"x")
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "work")
    assert local_folder("~/runs/r1") == home / "runs" / "r1" and not_a_url("~/m.ckpt") == f"{home}/m.ckpt"
    assert discover(["~/footage"]) == discover(["~/footage/*.mp4"]) == [str(home / "footage" / "ep1.mp4")]
    assert curate_main(["~/footage", "--out=~/runs/r1", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert f"output: {home / 'runs' / 'r1'} " in said and str(home / "footage" / "ep1.mp4") in said
    assert list((tmp_path / "work").iterdir()) == []


def test_a_list_file_in_a_store_is_read_as_a_local_one_is(tmp_path, capsys):
    """`s3://bucket/lists/batch1.txt` was taken for a video: one error row, `not a readable video container`,
    and none of the footage it names."""
    local = tmp_path / "ep9.mp4"
    local.write_bytes(b"x")
    fs = fsspec.filesystem("memory")
    fs.pipe("/store/raw/a.mp4", b"x")
    fs.pipe("/store/raw/season2/b.mkv", b"x")
    fs.pipe(
        "/store/lists/batch1.txt",
        f"\ufeff# batch 1\n../raw/a.mp4\nmemory:///store/raw/season2/\n{local}\nbatch1.txt\n".encode(),
    )
    fs.pipe("/store/lists/notes.txt", b"check the colours of episode 2\n")
    assert discover(["memory://store/lists/batch1.txt"]) == [
        "memory://store/raw/a.mp4",  # relative to the list's prefix
        "memory:///store/raw/season2/b.mkv",
        str(local),  # a local path, as on a local list
    ]
    assert "batch1.txt: a list that names itself" in capsys.readouterr().err
    unmatched: list[str] = []
    assert discover(["memory://store/lists/notes.txt"], unmatched) == []
    assert (
        unmatched == ["memory://store/lists/notes.txt"] and "not a list of sources" in capsys.readouterr().err
    )


def test_curate_stops_before_any_work_on_a_missing_backend_or_an_unlistable_store(
    no_s3fs, unlistable, tmp_path, capsys
):
    with pytest.raises(ConfigError, match=r"s3://bucket/raw/: reading s3:// needs fsspec's s3fs"):
        discover(["s3://bucket/raw/"])
    with pytest.raises(
        ConfigError, match="unlistable://bucket/raw/: cannot list it: EndpointConnectionError"
    ):
        discover([unlistable])
    out = tmp_path / "out"
    assert curate_main(["s3://bucket/raw/", "--out", str(out), "--skip", "aesthetic,caption,alignment"]) == 2
    assert "inbetweener[cloud]" in capsys.readouterr().err
    assert not (out / ".work" / "sources").exists()


def test_train_stops_with_one_line_on_a_missing_backend_or_an_unlistable_store(
    no_s3fs, unlistable, tmp_path, capsys
):
    with pytest.raises(MissingBackendError):
        list_shards("s3://bucket/shards/{000000..000003}.tar")  # before the braces are expanded
    with pytest.raises(FileNotFoundError, match="unlistable://bucket/raw/: cannot list it"):
        list_shards(unlistable)
    for spec in ("s3://bucket/shards/", unlistable):
        with pytest.raises(SystemExit) as stop:
            train_main(["rectify", "--preset", "tiny", "--data", spec, "--out", str(tmp_path / "run")])
        assert stop.value.code == 2
        assert f"inbetweener train: error: {spec}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["curate", "footage", "--out", "s3://bucket/run"],
        ["select", "s3://bucket/run"],
        ["train", "rectify", "--preset", "tiny", "--data", "shards", "--out", "gs://bucket/run"],
        ["interpolate", "a.png", "b.png", "--out", "s3://bucket/frames"],
        ["evaluate", "out/run", "--out", "s3://bucket/eval"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_output_url_is_refused_by_name_and_nothing_is_written(argv, tmp_path, monkeypatch, capsys):
    """Path() folds s3://bucket/run into a local s3:/bucket/run: the job used to score into it, then crash."""
    import inbetweener_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        inbetweener_cli.main(argv)
    assert stop.value.code == 2
    url = next(a for a in argv if "://" in a)
    assert f"{url} is a URL; outputs go to a local folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "url"),
    [
        (["interpolate", "s3://bucket/a.png", "b.png"], "s3://bucket/a.png"),
        (
            ["interpolate", "a.png", "b.png", "--checkpoint", "s3://bucket/model.ckpt"],
            "s3://bucket/model.ckpt",
        ),
        (
            ["evaluate", "out/run", "--out", "eval", "--models-dir", "gs://bucket/models"],
            "gs://bucket/models",
        ),
        (
            ["train", "rectify", "--data", "shards", "--out", "run", "--init", "s3://b/dc.ckpt"],
            "s3://b/dc.ckpt",
        ),
        (["curate", "footage", "--out", "run", "--models-dir", "s3://bucket/models"], "s3://bucket/models"),
    ],
    ids=["keyframe", "checkpoint", "models-dir", "init", "curate-models-dir"],
)
def test_an_input_file_url_is_refused_by_name(argv, url, tmp_path, monkeypatch, capsys):
    """Files read whole (keyframes, checkpoints, weights) are local: a URL is named as one, not folded by
    Path() into a missing `s3:/bucket/...` file."""
    import inbetweener_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        inbetweener_cli.main(argv)
    assert stop.value.code == 2
    assert f"{url} is a URL; this reads local files" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_url_from_a_config_file_is_named():
    from training.checkpoint import CheckpointError
    from training.checkpoint_files import read_checkpoint

    with pytest.raises(
        CheckpointError, match="s3://bucket/dc.ckpt is a URL; checkpoints are read from local"
    ):
        read_checkpoint("s3://bucket/dc.ckpt")


def test_file_urls_are_decoded_to_the_files_they_name(tmp_path):
    """A file:// URL as Path.as_uri() and file managers write it (spaces, colons and non-ASCII names
    %-escaped, or a `localhost` host) names its file: it was looked for under its escaped name, as a
    missing file."""
    from pipeline.stages.discover import ProbeStage

    video = tmp_path / "épisode 01: pilot.mp4"
    video.write_bytes(b"")
    for url in (video.as_uri(), "file://localhost" + video.as_uri().removeprefix("file://")):
        assert discover([url]) == [str(video)]
        assert ProbeStage().process({"source_uri": url})["reason"] == "probe: zero-byte file"
    assert discover([tmp_path.as_uri()]) == [str(video)]
    # a scheme is the same in any case (RFC 3986): fsspec knew no FILE:// (nor S3://) protocol
    assert discover([tmp_path.as_uri().replace("file://", "FILE://")]) == [str(video)]
    assert local_folder("File:///tmp/run") == Path("/tmp/run")
    fsspec.filesystem("memory").pipe("/cased/a.mp4", b"x")
    assert discover(["MEMORY://cased/"]) == ["memory:///cased/a.mp4"]
    # fsspec writes them unescaped: a name holding `%20` itself (wget's) is that file, where it is the one
    saved = tmp_path / "Episode%2002.mp4"
    saved.write_bytes(b"")
    assert fsspec.filesystem("file").unstrip_protocol(str(saved)) == f"file://{saved}"
    assert discover([f"file://{saved}"]) == [str(saved)]
    assert ProbeStage().process({"source_uri": f"file://{saved}"})["reason"] == "probe: zero-byte file"
    (tmp_path / "Episode 02.mp4").write_bytes(b"")  # both there: the URL is read as RFC 8089 says
    assert discover([f"file://{saved}"]) == [str(tmp_path / "Episode 02.mp4")]
