"""`inbetweener models`: list what each job's stages need in the models directory (present, missing or
broken, with sizes and sha256), check it, and download the curate stages' weights where the machine is online
(the only place anything is fetched). The registry and the checks are pipeline/models.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from manifests.files import default_file_mode
from manifests.remote import not_a_url
from manifests.weights import WeightsError, quick_problem
from pipeline.models import (
    DEFAULT_DIR,
    ENV_VAR,
    JOBS,
    WeightFile,
    check_file,
    check_weights,
    default_stages,
    file_sha256,
    ppocr_det_model,
    resolve_models_dir,
)

# --------------------------------------------------------------------------- downloading


def _download_url(url: str, dest: Path, member: str | None, timeout: float = 60) -> None:
    import urllib.request
    import zipfile

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "download"
        with urllib.request.urlopen(url, timeout=timeout) as response, open(raw, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 22)
        if member:
            with zipfile.ZipFile(raw) as archive:
                archive.extract(member, tmp)
            raw = Path(tmp) / member
        os.replace(raw, dest)


def _download_hf_file(repo: str, filename: str, dest: Path) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            got = hf_hub_download(repo, filename, local_dir=tmp)
        except EntryNotFoundError:
            if filename != "open_clip_model.safetensors":
                raise
            # older open_clip repos hold only the pickled file: convert it to the safetensors we load
            import torch
            from safetensors.torch import save_file

            pickled = hf_hub_download(repo, "open_clip_pytorch_model.bin", local_dir=tmp)
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            got = str(Path(tmp) / filename)
            save_file({k: v.contiguous() for k, v in state.items()}, got)  # (safetensors writes it 0600)
        os.chmod(got, default_file_mode())
        os.replace(got, dest)


def _check_reachable(host: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, on a machine without network (proxies are trusted as they are)."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise WeightsError(f"cannot reach {host} ({exc}): this machine seems to be offline") from exc


def download(wf: WeightFile, models_dir: Path) -> None:
    """Fetch one WeightFile into the models directory (atomically); hashes checked where stated."""
    from urllib.parse import urlparse

    _check_reachable("huggingface.co" if wf.hf_repo else urlparse(wf.url or "https://github.com").hostname)
    dest = models_dir / wf.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    if wf.kind == "hf-snapshot":
        from huggingface_hub import snapshot_download

        if not wf.hf_repo:
            raise WeightsError(f"{dest}: a local folder, nothing to download")
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
        snapshot_download(wf.hf_repo, local_dir=dest, allow_patterns=patterns)
    elif wf.hf_repo:
        _download_hf_file(wf.hf_repo, wf.hf_file, dest)
    elif wf.url:
        _download_url(wf.url, dest, wf.url_member)
    else:
        raise WeightsError(f"{dest}: no known source; place the file there yourself")
    problems = check_file(wf, models_dir, verify_hashes=True)
    if problems:
        raise WeightsError("; ".join(problems))


# --------------------------------------------------------------------------- the command line


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _list(stages: list, root: Path, hashes: bool, everything: bool = True) -> int:
    for job, names in JOBS.items():
        print(f"job {job}")
        for stage in stages:
            if stage.name not in names:
                continue
            files = stage.weight_files()
            if stage.name == "text" and (det := ppocr_det_model()) is not None:
                print(f"  {'text':<10} [embedded] {det}  present  {_human(det.stat().st_size)}")
            if not files:
                print(f"  {stage.name:<10} (no files needed with backend {getattr(stage, 'backend', '?')})")
            for wf in files:
                path = root / wf.path
                if not path.exists():
                    state = "missing (optional)" if wf.optional else "MISSING"
                    print(f"  {stage.name:<10} {wf.path}  {state}  <- {wf.source()}")
                    continue
                problems = check_file(wf, root)
                state = "present" if not problems else "BROKEN: " + "; ".join(problems)
                digest = f"  sha256 {file_sha256(path, root)}" if hashes else ""
                print(f"  {stage.name:<10} {wf.path}  {state}  {_human(_size(path))}{digest}")
    if everything:
        _list_other_jobs(root)
    return 0


def other_jobs_files() -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
    """The weights of the jobs after curation, by job: (accepted paths under the models dir, the first
    being the published name; what it is for; where it is published). Their loaders name a missing file
    and its source when a run needs it; `inbetweener models` lists them all in one place."""
    from inference.weights import ALTERNATIVES, SKETCH_FILE, TOONCRAFTER_FILE
    from training.features import CLIP_FILE, I3D_FILE, LPIPS_FILES
    from training.stages.sketch import ANIME2SKETCH_FILES, ANIME2SKETCH_SOURCE

    def spec(wf, what: str | None = None):
        return ((wf.relpath, *ALTERNATIVES.get(wf, ())), what or wf.what, wf.source)

    return {
        "interpolate": [
            spec(TOONCRAFTER_FILE, "ToonCrafter (UNet, VAE, CLIP towers); or pass --checkpoint"),
            spec(SKETCH_FILE, "the sketch encoder, for --sketch; or pass --sketch-checkpoint"),
        ],
        "evaluate": [
            spec(TOONCRAFTER_FILE, "ToonCrafter, for --method model and --decoder-only"),
            spec(I3D_FILE),
            spec(CLIP_FILE, "OpenCLIP ViT-H-14 for CLIP_img/CLIP_txt (else ToonCrafter's own towers)"),
            *(spec(wf) for wf in LPIPS_FILES["alex"]),
        ],
        "train": [
            *(spec(wf, f"{wf.what}, for the decoder stage's LPIPS loss") for wf in LPIPS_FILES["vgg"]),
            *(spec(wf, f"{wf.what}, for the decoder stage's eval LPIPS") for wf in LPIPS_FILES["alex"]),
            (
                ANIME2SKETCH_FILES,
                "Anime2Sketch, the sketch stage's extractor (else XDoG)",
                ANIME2SKETCH_SOURCE,
            ),
        ],
    }


def _list_other_jobs(root: Path) -> None:
    try:
        jobs = other_jobs_files()
    except ImportError as exc:  # a pipeline-only install: the other jobs' code needs the training extra
        print(f"jobs interpolate, evaluate, train: not listed ({exc}; install the training extra)")
        return
    for job, files in jobs.items():
        print(f"job {job}")
        for paths, what, source in files:
            found = next((root / p for p in paths if (root / p).exists()), None)
            if found is None:
                print(f"  {paths[0]}  missing  ({what})  <- {source}")
            elif problem := quick_problem(found):
                print(f"  {found.relative_to(root)}  BROKEN: {problem}  ({what})  <- {source}")
            else:
                print(f"  {found.relative_to(root)}  present  {_human(_size(found))}  ({what})")
    print(
        "job train: the DynamiCrafter-interp checkpoint it starts from is passed with --init (not looked up"
        " here). The files above are fetched by hand: `download` fetches the curate stages' only."
    )


def _download(stages: list, root: Path) -> int:
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # tests and CI: say so at once instead of timing out
        print(
            "inbetweener models download: offline mode (HF_HUB_OFFLINE=1); unset it on a machine that is "
            "online, or copy the files listed by `inbetweener models list` into the models directory",
            file=sys.stderr,
        )
        return 1
    failed = 0
    for stage in stages:
        for wf in stage.weight_files():
            path = root / wf.path
            if path.exists() and not check_file(wf, root):
                print(f"{stage.name}: {wf.path} present")
                continue
            print(f"{stage.name}: fetching {wf.path} from {wf.source()} ...", flush=True)
            try:
                download(wf, root)
                print(f"{stage.name}: {wf.path} ok ({_human(_size(path))})")
            except Exception as exc:  # offline, 404, bad file: say which and go on with the next
                failed += 1
                print(
                    f"{stage.name}: cannot download {wf.path}: {type(exc).__name__}: {exc}\n"
                    f"  fetch {wf.source()} on a machine that is online and copy it to {path}",
                    file=sys.stderr,
                )
    return 1 if failed else 0


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inbetweener models",
        description="List the weights every job needs (curate, interpolate, evaluate, train); check and download"
        " the curate stages' weights. Nothing else downloads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""examples:
  inbetweener models                         list every file: present / missing, size, sha256
  inbetweener models list --no-hashes        the same without hashing (sha256s are cached once computed)
  inbetweener models check                   exit 1 when a file is missing or broken
  inbetweener models download aesthetic      fetch what the aesthetic stage needs

models directory: --models-dir, else ${ENV_VAR}, else {DEFAULT_DIR}""",
    )
    p.add_argument(
        "--models-dir", type=not_a_url, help=f"the models directory (default: ${ENV_VAR} or {DEFAULT_DIR})"
    )
    p.add_argument("action", nargs="?", default="list", choices=("list", "check", "download"))
    p.add_argument("stages", nargs="*", help="stages (default: all): text aesthetic caption alignment")
    p.add_argument(
        "--no-hashes", dest="hashes", action="store_false", help="list: skip the sha256 of present files"
    )
    args = p.parse_intermixed_args(argv)  # `list --no-hashes text`: options between the positionals
    root = resolve_models_dir(args.models_dir)
    if root.exists() and not root.is_dir():  # every file would read as "missing"
        print(f"inbetweener models: {root} is a file, not a models folder", file=sys.stderr)
        return 2
    names = args.stages or [n for names in JOBS.values() for n in names]
    try:
        stages = default_stages(names, root)
    except ValueError as exc:
        print(f"inbetweener models: {exc}", file=sys.stderr)
        return 2
    source = "--models-dir" if args.models_dir else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "default")
    print(f"models directory: {root} ({source})")
    if args.action == "download":
        return _download(stages, root)
    if args.action == "check":
        problems = check_weights(stages, root, verify_hashes=True)
        for problem in problems:
            print(problem, file=sys.stderr)
        print("all weights present and valid" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    return _list(stages, root, args.hashes, everything=not args.stages)
