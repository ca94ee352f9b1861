"""Object-store URLs (s3://, gs://, https://, memory://, ...) through fsspec, with a missing backend named.

fsspec ships the protocols' names, not their implementations: s3:// needs s3fs, gs:// gcsfs, https://
aiohttp. Without one, fsspec raises a bare ImportError deep inside a listing or an open; here it becomes a
`MissingBackendError` that names the URL, the package and the extra that installs it
(`pip install 'inbetweener[cloud]'`), raised before any work starts. fsspec is imported only when a URL
is used, so local runs never need it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CLOUD_EXTRA = "pip install 'inbetweener[cloud]'"
BACKENDS = {  # protocol -> the package that implements it for fsspec (those the cloud extra installs)
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
}


class MissingBackendError(ValueError):
    """A URL whose protocol's fsspec implementation is not installed (or is unknown to fsspec)."""


def lower_scheme(uri: str) -> str:
    """A URL with its scheme in lower case (RFC 3986: `FILE:///x`, `S3://bucket` are `file:///x`,
    `s3://bucket`; fsspec knew no `FILE` or `S3` protocol); anything else as given."""
    scheme, sep, rest = uri.partition("://")
    if (
        sep
        and scheme
        and not scheme.islower()
        and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()
    ):
        return f"{scheme.lower()}://{rest}"
    return uri


def local_path(uri: str) -> str:
    """A `file://` URL is its local path, its %-escapes decoded and a `localhost` host dropped (RFC 8089:
    `Path.as_uri()` and file managers write `file:///ep%2001.mp4` for `/ep 01.mp4`), or its name as it is
    written where only that file exists; anything else is returned as given."""
    uri = lower_scheme(uri)
    if not uri.startswith("file://"):
        return uri
    from urllib.parse import unquote

    path = uri.removeprefix("file://")
    if path.lower().startswith("localhost/"):
        path = path[len("localhost") :]
    # not urlsplit: a name with a bare `#` or `?` is a path, not a fragment or a query
    decoded = unquote(path, errors="surrogateescape")
    # fsspec writes file:// URLs unescaped (`LocalFileSystem.unstrip_protocol`): a name that holds `%20`
    # itself (as wget saves `Episode%2001.mp4`) is that file, when its decoded name is none
    if decoded != path and not os.path.lexists(decoded) and os.path.lexists(path):
        return path
    return decoded


def expand_home(text: str) -> str:
    """A leading `~` (`~/footage`, `~user/footage`) is the home folder, as the shell makes it of an unquoted
    word: quoted, or as `--out=~/run` (bash leaves that `~`), it was a folder named `~` in the working
    folder, which curate wrote its OUT under (and a later `rm -r ~...` to clean it up is a disaster)."""
    return os.path.expanduser(text) if text.startswith("~") else text


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def check_backend(url: str) -> None:
    """Raise `MissingBackendError` naming the URL and the package when fsspec cannot serve its protocol.
    Nothing is contacted: this only imports the protocol's filesystem class."""
    import fsspec

    protocol = protocol_of(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package = BACKENDS.get(protocol)
        fix = f"{CLOUD_EXTRA} (or `pip install {package}`)" if package else "install fsspec's backend for it"
        raise MissingBackendError(
            f"{url}: reading {protocol}:// needs fsspec's {package or protocol} backend, which is not"
            f" installed: {fix}. fsspec said: {exc}"
        ) from exc
    except ValueError as exc:  # "Protocol not known"
        raise MissingBackendError(f"{url}: fsspec knows no {protocol}:// protocol ({exc})") from exc


def no_empty_path(text: str) -> str:
    """argparse check of a path argument: an empty one (a script's unset variable: `--out "$OUT"`) is
    refused. Path("") is the working folder, so curate wrote its OUT there, interpolate its frames, and
    curate searched it for footage."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is an empty path (an unset variable in a script?); give the path (. for this folder)"
        )
    return text


def not_a_url(text: str) -> str:
    """argparse type of the input files and folders read whole (keyframes, checkpoints, the models dir): a
    URL is refused by name, instead of being folded by Path() into a missing local `s3:/...` file. A
    `file://` URL is its local path; a leading `~` the home folder (`expand_home`)."""
    no_empty_path(text)
    text = expand_home(local_path(text))
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text} is a URL; this reads local files: download it (or mount the bucket) and give its path"
        )
    return text


def local_input(text: str) -> Path:
    """`not_a_url` as a Path."""
    return Path(not_a_url(text))


def local_folder(text: str) -> Path:
    """argparse type of the output folders (`--out`, select's and report's OUT): a local path. A URL is
    refused by name: Path() would fold s3://bucket/run into a local folder `s3:/bucket/run`, and the job
    would write there. A `file://` URL is its local path; a leading `~` the home folder (`expand_home`)."""
    no_empty_path(text)
    text = expand_home(local_path(text))
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text} is a URL; outputs go to a local folder (or a bucket mounted as one): give its path, and"
            " copy the results to the store afterwards (e.g. `aws s3 sync`, `gcloud storage rsync`)"
        )
    return Path(text)
