"""`inbetweener evaluate`: generate from each eval clip's first and last frames and caption, and score.

One run = one method (the model with its sampling settings, or a classical baseline) on the first N
clips of the sources. Its generated clips and per-clip scores are cached on disk, keyed by everything
they depend on, so an interrupted run continues where it stopped and a finished one only re-pools:

    OUT/generated/<run>/<key>.npz    generated frames, uint8 [T, H, W, 3]
    OUT/scores/<run>/<key>.npz       per-frame scores and I3D features of the clip
    OUT/results/<run>-<clips>.json   the numbers, every protocol choice, settings, weight hashes (one
                                     file per run and set of clips; a run of fewer --metrics keeps
                                     the others its earlier run measured, as metrics_carried)
    OUT/results.md                   every run in OUT beside the paper's rows
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.media import DTYPES, InputError, fit_frame, parse_size
from manifests.files import FolderBusy, curate_out_of, folder_lock
from manifests.remote import local_folder, local_input, local_path

log = logging.getLogger("inbetweener.evaluate")

METHODS = {"model": "model", "linear": "linear_blend", "flow": "flow_warp"}

EPILOG = """\
examples:
  inbetweener evaluate out/run1 --out out/eval --limit 50                 # the model, first 50 eval clips
  inbetweener evaluate out/run1/shards/eval --out out/eval --method linear flow model
  inbetweener evaluate out/run1/manifest.parquet --out out/eval --decoder-only
  inbetweener evaluate out/run1 --out out/eval --method linear flow --metrics cpbd   # needs no weights

sources: a curate output folder, its shards/eval folder, shard .tar files (or a quoted glob or
  {000000..000009} pattern of them, or a .txt file listing them), or the clip manifest.
protocol (shared/reference/METRICS.md): 16-frame windows (frames 0..15 of each clip, --stride to skip),
  at 320x512; the model gets frames 0 and 15 and the caption; FVD/KVD from StyleGAN-V's I3D; LPIPS
  (AlexNet, v0.1) over all 16 and the 14 interior frames; CLIP_img/CLIP_txt raw cosines with OpenCLIP
  ViT-H-14; CPBD on 8-bit luma. --decoder-only: VAE encode + dual-reference decode of all 16 frames at
  256x256 (scaled to cover, centre-cropped; posterior mean), PSNR/SSIM/LPIPS.
weights (models dir: --models-dir, $INBETWEENER_MODELS or ~/.cache/inbetweener/models):
  i3d/i3d_torchscript.pt, lpips/alex.pth, lpips/alexnet-owt-7be5be79.pth, and for CLIP either
  clip/ViT-H-14-laion2b_s32b_b79k/open_clip_pytorch_model.bin or, when absent, the CLIP towers inside
  the ToonCrafter checkpoint (tooncrafter/model.ckpt or --checkpoint). `inbetweener interpolate --help`
  says where the ToonCrafter checkpoint comes from.
--metrics: only the named metrics are computed and only their weights are needed (FVD/KVD: I3D; LPIPS:
  the LPIPS files; CLIP_img/CLIP_txt: CLIP; CPBD, PSNR, SSIM: none); the others are blank in the table.
resume: rerun the same command; clips already generated and scored are not redone (ETA on the bar).
"""


def _source(text: str) -> Path | str:
    """A local source as a Path (a `file://` URL is its local path); another URL kept as given (Path would
    fold s3://b into s3:/b), to be refused by name."""
    text = local_path(text)
    return text if "://" in text else Path(text)


def _comma_list(text: str) -> list[str]:
    """One command-line word -> its comma-separated items (`--metrics cpbd,psnr` as `--metrics cpbd psnr`)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inbetweener evaluate",
        description="FVD, KVD, LPIPS, CLIP_img, CLIP_txt, CPBD (and PSNR/SSIM) of in-betweening on the eval split.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", type=_source, help="curate output, shard folder/files, or manifest")
    p.add_argument("--out", type=local_folder, required=True, help="results folder (also the cache)")
    p.add_argument(
        "--method",
        nargs="+",
        type=_comma_list,
        metavar="METHOD",
        help=f"what generates ({' '.join(sorted(METHODS))}; default model); spaces or commas between them",
    )
    p.add_argument("--decoder-only", action="store_true", help="VAE reconstruction PSNR/SSIM/LPIPS instead")
    p.add_argument(
        "--metrics",
        nargs="+",
        type=_comma_list,
        metavar="METRIC",
        help="compute only these (fvd kvd lpips clip_img clip_txt cpbd psnr ssim; --decoder-only: psnr ssim lpips);"
        " only their weights are needed. Default: all",
    )
    p.add_argument(
        "--limit", type=int, help="the first N clips that can be evaluated (skipped ones do not count)"
    )
    p.add_argument("--split", default="eval", help="split to read from a curate output or manifest (eval)")
    p.add_argument("--frames", type=int, default=16, help="frames per window (16)")
    p.add_argument("--stride", type=int, default=1, help="take every n-th frame of the clip (1)")
    p.add_argument("--size", default="320x512", help="evaluation frame HxW (320x512)")
    p.add_argument("--decoder-size", type=int, default=256, help="--decoder-only square side (256)")
    p.add_argument(
        "--checkpoint", type=local_input, help="model weights (default: MODELS/tooncrafter/model.ckpt)"
    )
    p.add_argument(
        "--models-dir",
        type=local_input,
        help="models dir (default: $INBETWEENER_MODELS or ~/.cache/inbetweener/models)",
    )
    p.add_argument("--preset", choices=("toon-512", "tiny"), help="model preset if the file does not say")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    p.add_argument("--guidance-rescale", type=float, default=0.7, help="guidance rescale phi (0.7)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1.0)")
    p.add_argument("--fs", type=int, default=10, help="frame-stride condition (10)")
    p.add_argument("--seed", type=int, default=123, help="base seed; each clip's seed also hashes its key")
    p.add_argument("--single-decode", action="store_true", help="skip the reference's second decode")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet and the VAE decoder's blocks"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    from manifests.files import atomic_path

    with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):  # a damaged cache file is redone
        return None


class _Lazy:
    """A value built on first use (the model and the extractors are loaded only when a clip needs them)."""

    def __init__(self, build: Callable[[], Any]):
        self._build, self._value, self.built = build, None, False

    def __call__(self) -> Any:
        if not self.built:
            self._value, self.built = self._build(), True
        return self._value


def _clip_seed(seed: int, key: str) -> int:
    return (seed + zlib.crc32(key.encode())) % 2**31


@dataclass
class _Window:
    """A clip long enough for its window. The frames are decoded again at the clip's turn (`frames`): a
    16-frame 320x512 window is 7.9 MB, so a 1,000-clip split held decoded would take 7.9 GB; the encoded
    clips take a few hundred MB."""

    key: str
    caption: str
    clip: Any  # inference.eval_data.EvalClip

    @property
    def cache_name(self) -> str:
        """Its cache files' name: the key, a digest of the clip's bytes (a re-curated split keeps its clip
        ids but not their pixels; scores of the old clips must not be taken for the new) and one of its
        caption (the model's prompt and CLIP_txt's text: a re-captioned split keeps the clips' bytes)."""
        caption = hashlib.sha256(self.caption.encode()).hexdigest()[:8]
        return f"{self.key}.{self.clip.content}.{caption}"

    def frames(self, args: argparse.Namespace, size: tuple[int, int]) -> np.ndarray:
        """The [T, H, W, 3] ground-truth window at `size`."""
        from inference.eval_data import clip_window

        window = clip_window(self.clip.frames(_window_span(args)), args.frames, args.stride)
        if window.shape[1:3] != size:
            window = np.stack([fit_frame(f, size) for f in window])
        return window


def _window_span(args: argparse.Namespace) -> int:
    """Frames a clip's window reaches (its first frame to its last)."""
    return (args.frames - 1) * args.stride + 1


def _windows(args: argparse.Namespace) -> tuple[list[_Window], list[dict]]:
    """(clips, skipped), in source order: every clip is decoded once here to tell whether it yields a window
    (too short, undecodable or unreadable clips are skipped with their reason), and its frames let go.
    A clip given twice (a curate output and its shards folder, overlapping shard globs) is evaluated once:
    counted twice it would double N and weigh FVD/KVD towards itself. --limit counts the clips
    evaluated, not those skipped on the way."""
    from inference.eval_data import clip_window, iter_clips

    clips, skipped = [], []
    seen: dict[str, str] = {}  # KEY.CONTENT (id and bytes) -> the shard it was first read from
    for clip in iter_clips(args.sources, args.split):
        if args.limit is not None and len(clips) >= args.limit:
            break
        name = f"{clip.key}.{clip.content}"
        if name in seen:
            skipped.append({"key": clip.key, "reason": f"given twice: already evaluated from {seen[name]}"})
            continue
        try:
            frames = clip.frames(_window_span(args))  # a whole episode of another tool: its window only
        except InputError as exc:  # a corrupt clip is reported in the results, not a crashed evaluation
            skipped.append({"key": clip.key, "reason": str(exc)})
            continue
        if clip_window(frames, args.frames, args.stride) is None:
            skipped.append(
                {"key": clip.key, "reason": f"shorter than {args.frames} frames at stride {args.stride}"}
            )
            continue
        clips.append(_Window(clip.key, clip.caption, clip))
        seen[name] = clip.shard
    return clips, skipped


def run(args: argparse.Namespace, extractors=None) -> int:
    import torch

    from inference.baselines import DIS_MIN_SIDE
    from inference.eval_scores import (
        DECODER_METRICS,
        GENERATION_METRICS,
        clip_sets,
        extractors_for,
        load_extractors,
        markdown_table,
        missing_weights,
        pool_decoder_scores,
        pool_scores,
        score_clip,
        score_reconstruction,
        with_earlier_metrics,
    )
    from inference.sampler import InferenceModel, SamplerSettings, device_and_dtype
    from inference.weights import TOONCRAFTER_FILE, file_sha256, find_weights, load_tooncrafter
    from manifests.files import write_json_atomic
    from manifests.weights import WeightsError
    from training.metrics import protocol_record

    if args.frames < 2 or args.stride < 1 or (args.limit is not None and args.limit < 1):
        raise InputError("--frames must be >= 2, --stride >= 1, --limit >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder for the results")
    not_folder = next((p for p in args.out.parents if p.exists() and not p.is_dir()), None)
    if not_folder is not None:  # a traceback at the first clip's cache file, after its work
        raise InputError(f"--out {args.out}: {not_folder} is a file, not a folder")
    if not args.out.exists() and args.out.suffix.lower() in (".md", ".json", ".csv", ".html", ".txt"):
        raise InputError(  # it made a folder named results.md, the results inside it
            f"--out {args.out} names a file: --out is the folder that gets results.md and results/"
            f" (e.g. --out {args.out.parent})"
        )
    size = (args.decoder_size, args.decoder_size) if args.decoder_only else parse_size(args.size)
    if min(size) <= 0:
        raise InputError(f"the evaluation frame {size[0]}x{size[1]} must have positive sides")
    if args.decoder_only and args.method is not None:  # it ran the decoder alone, the methods unsaid
        raise InputError("--decoder-only scores the checkpoint's VAE: it takes no --method (run those apart)")
    given = args.method if args.method is not None else [["model"]]
    methods = ["decoder"] if args.decoder_only else list(dict.fromkeys(m for ms in given for m in ms))
    unknown = [] if args.decoder_only else [m for m in methods if m not in METHODS]
    if unknown or not methods:  # an empty word (`--method "$M"`) ran nothing and exited 0
        raise InputError(f"--method: {unknown or 'none given'} not among {' '.join(sorted(METHODS))}")
    needs_model = args.decoder_only or "model" in methods
    known = DECODER_METRICS if args.decoder_only else GENERATION_METRICS
    metrics = list(dict.fromkeys(m for ms in args.metrics for m in ms) if args.metrics else known)
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:  # an empty word generated every clip, scored nothing, replaced the results
        mode = "--decoder-only" if args.decoder_only else "a generation run"
        given = unknown or "none given"
        raise InputError(f"--metrics: {given} not among the metrics of {mode}: {' '.join(known)}")
    needs = extractors_for(metrics)
    device, dtype = device_and_dtype(args.device, args.dtype)
    hash_cache = args.out / ".sha256.json"
    if "ssim" in metrics and min(size) < SSIM_WINDOW:
        raise InputError(
            f"SSIM's {SSIM_WINDOW}-tap window needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, not"
            f" {size[0]}x{size[1]}"
        )
    if {"fvd", "kvd"} & set(metrics) and args.frames < I3D_MIN_FRAMES:  # torch's error came after a clip
        raise InputError(
            f"FVD and KVD's I3D needs windows of at least {I3D_MIN_FRAMES} frames, not {args.frames} (its"
            " temporal strides leave less than its last 2-frame pooling); leave fvd and kvd out of --metrics"
        )
    if "flow" in methods and min(size) < DIS_MIN_SIDE:
        raise InputError(
            f"--method flow: its DIS flow needs frames of at least {DIS_MIN_SIDE}x{DIS_MIN_SIDE}, not"
            f" {size[0]}x{size[1]}"
        )
    if "lpips" in metrics and min(size) < LPIPS_MIN_SIDE:  # torch's error came after the first clip's work
        raise InputError(
            f"LPIPS's AlexNet needs frames of at least {LPIPS_MIN_SIDE}x{LPIPS_MIN_SIDE}, not {size[0]}x{size[1]}"
            " (or leave lpips out of --metrics)"
        )

    # Every input is checked before the device works: checkpoint, metric weights, clips.
    checkpoint = None
    if needs_model or (extractors is None and "clip" in needs):
        try:
            checkpoint = find_weights(args.checkpoint, TOONCRAFTER_FILE, args.models_dir)
        except InputError as exc:
            if needs_model:  # the baselines only use it for CLIP, when the CLIP file is absent
                # the metric weights are named with it: one run tells all (its CLIP towers serve CLIP)
                missing = [] if extractors is not None else missing_weights(needs, args.models_dir, True)
                if missing:
                    raise InputError(
                        f"{exc}\nand {len(missing)} metric weight file(s) missing or damaged:\n"
                        + "\n".join(missing)
                    ) from None
                raise
    if needs_model:
        _check_model_size(size, checkpoint, args)
    if extractors is None:  # every missing weight file at once, before the clips are decoded (minutes)
        missing = missing_weights(needs, args.models_dir, clip_fallback=checkpoint is not None)
        if missing:
            hint = ""
            if checkpoint is None and any("clip/" in m for m in missing):
                hint = (
                    f"\nfor CLIP, the ToonCrafter checkpoint at {TOONCRAFTER_FILE.relpath} in the models dir (or"
                    " --checkpoint) serves instead: its CLIP towers"
                )
            raise InputError(
                f"{len(missing)} weight file(s) missing or damaged:\n" + "\n".join(missing) + hint
            )

    def loaded():
        m = load_tooncrafter(checkpoint, args.preset)
        _check_model_size(size, checkpoint, args, m.cfg)  # the config its weights say
        return m

    model = _Lazy(loaded)
    placed = _Lazy(lambda: InferenceModel(model(), device, dtype, compile=args.compile))
    clips, skipped = _windows(args)
    for s in skipped[:3]:
        print(f"skipped {s['key']}: {s['reason']}", file=sys.stderr)
    if len(skipped) > 3:
        print(f"... {len(skipped) - 3} more skipped (the results JSON lists them all)", file=sys.stderr)
    if not clips:
        sources = [str(s) for s in args.sources]
        if not skipped:
            raise InputError(
                f"no clips in {sources} (for a curate output or manifest: in split {args.split!r})"
            )
        reasons = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:5])
        raise InputError(f"no usable clips in {sources} ({len(skipped)} skipped: {reasons})")
    if len(clips) < 2 and {"fvd", "kvd"} & set(metrics):  # said before the work, not only as a blank after
        print("note: FVD and KVD compare sets of clips; of 1 clip they are left blank", file=sys.stderr)
    if extractors is None:
        clip_model = None
        if checkpoint is not None:

            def clip_model():
                from inference.eval_scores import TowerCLIP

                m = model()  # copies: the sampler moves its own towers between the CPU and the device
                return TowerCLIP(copy.deepcopy(m.cond_stage_model), copy.deepcopy(m.embedder)).float()

        try:
            extractors = load_extractors(
                needs, args.models_dir, device, clip_model, lambda p: file_sha256(p, hash_cache)
            )
        except WeightsError as exc:  # present but truncated or another file
            raise InputError(str(exc)) from exc
        except FileNotFoundError as exc:
            hint = ""
            if clip_model is None and "clip" in needs and "clip/" in str(exc):
                hint = (
                    f"; or put the ToonCrafter checkpoint at {TOONCRAFTER_FILE.relpath} in the models dir (or"
                    " pass --checkpoint): its CLIP towers serve instead"
                )
            raise InputError(str(exc).rstrip() + hint) from exc
        if _clip_towers(extractors):
            # the towers are this file's weights: its hash keys the cached CLIP scores (a baseline's cache
            # is otherwise blind to the checkpoint, and another file's CLIP scores were served)
            extractors.record["clip"]["sha256"] = file_sha256(checkpoint, hash_cache)

    settings = SamplerSettings(
        steps=args.steps,
        cfg=args.cfg,
        guidance_rescale=args.guidance_rescale,
        eta=args.eta,
        fs=args.fs,
        frames=args.frames,
        reference_decode=not args.single_decode,
    )
    try:
        settings.check()
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    ckpt_ident = None
    if checkpoint is not None:
        stat = checkpoint.stat()
        ckpt_ident = [str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns]
    data = {
        "sources": [str(s) for s in args.sources],
        "sources_resolved": [str(Path(s).resolve()) for s in args.sources],
        "split": args.split,
        "frames": args.frames,
        "stride": args.stride,
        "size": list(size),
        "window": f"frames 0, {args.stride}, ..., {(args.frames - 1) * args.stride} of each clip, scaled to cover "
        f"{size[0]}x{size[1]} and centre-cropped when the clip has another size",
        "keys_sha256": _digest(sorted(c.key for c in clips), 64),  # the same clips in any order: one set
        "clips_sha256": _digest(sorted(c.cache_name for c in clips), 64),  # and the same bytes
        "skipped": skipped,
    }
    overlap = None
    if needs_model and checkpoint is not None:  # were these clips in the checkpoint's training data?
        from inference.eval_data import training_overlap

        overlap = training_overlap(checkpoint, [w.clip for w in clips])
        if overlap["checked"] and (overlap["near_duplicates"] or overlap["shared_sources"]):
            print(
                f"warning: {overlap['near_duplicates']} of {len(clips)} eval clips are the same as or"
                f" near-duplicates of clips this checkpoint trained on, and {overlap['shared_sources']} of"
                f" their sources are in its training data ({overlap['index']}): its scores are not held-out",
                file=sys.stderr,
            )
    score_id = _digest([extractors.record, sorted(metrics), _scoring_code()])
    from tqdm import tqdm

    # the methods of the checkpoint first: a file that does not load stops the run before the baselines
    # have spent their time (the table is built from every result file, in its own order)
    for method in sorted(methods, key=lambda m: m not in ("model", "decoder")):
        start = time.perf_counter()
        if method == "decoder":
            gen_id = {
                "method": "decoder",
                "checkpoint": ckpt_ident,
                "size": size,
                "frames": args.frames,
                "dtype": str(dtype),
                "device": device.type,  # other kernels, other frames: a CPU run's were reused, the JSON said cuda
            }
        elif method == "model":
            gen_id = {
                "method": "model",
                "checkpoint": ckpt_ident,
                "settings": asdict(settings),
                "seed": args.seed,
                "dtype": str(dtype),
                "device": device.type,  # and another generator: other noise for the same seed
            }
        else:
            gen_id = {"method": METHODS[method], "frames": args.frames}
        run_name = f"{METHODS.get(method, method)}-{_digest([gen_id, data['size'], args.stride])}"
        gen_dir, score_dir = args.out / "generated" / run_name, args.out / "scores" / f"{run_name}-{score_id}"
        generated = cached = 0
        records = []
        bar = tqdm(clips, desc=f"{method}", unit="clip", disable=args.quiet, dynamic_ncols=True)
        for clip in bar:
            key, caption = clip.key, clip.caption
            record = _load_npz(score_dir / f"{clip.cache_name}.npz")
            if record is None:
                gt = clip.frames(args, size)
                if method == "decoder":
                    record = score_reconstruction(_reconstruct(placed(), gt, key), gt, extractors, metrics)
                    generated += 1
                else:
                    cache = gen_dir / f"{clip.cache_name}.npz"
                    stored = _load_npz(cache)
                    if stored is None:
                        gen = _generate(
                            method, gt, key, caption, placed, settings, _clip_seed(args.seed, key)
                        )
                        _save_npz(cache, frames=gen)
                        generated += 1
                    else:
                        gen, cached = stored["frames"], cached + 1
                    record = score_clip(gen, gt, caption, extractors, metrics)
                _save_npz(score_dir / f"{clip.cache_name}.npz", **record)
            else:
                cached += 1
            records.append(record)
        bar.close()
        pooled = pool_decoder_scores(records) if method == "decoder" else pool_scores(records)
        weights: dict[str, Any] = dict(extractors.record)
        if checkpoint is not None and (method in ("model", "decoder") or _clip_towers(extractors)):
            weights["checkpoint"] = {"file": str(checkpoint), "sha256": file_sha256(checkpoint, hash_cache)}
        # one file per run and set of clips: a --limit 5 try after the 1K run is a row of its own
        result_path = args.out / "results" / f"{run_name}-{data['clips_sha256'][:8]}.json"
        decoder = _decoder_kind(model, checkpoint) if method == "decoder" else None
        label = {"model": "ToonCrafter (ours)", "decoder": f"VAE decoder, {decoder} (ours)"}.get(
            method, METHODS.get(method, method)
        )
        result = {
            "kind": "decoder" if method == "decoder" else "generation",
            "method": METHODS.get(method, method),
            "label": label,
            "run": run_name,
            "metrics": pooled,
            "metrics_computed": metrics,
            "data": data,
            "generation": gen_id,
            "protocol": protocol_record(args.frames, size, args.stride),
            "weights": weights,
            "training_overlap": overlap if method in ("model", "decoder") else None,
            "device": str(device),
            "timing": {
                "seconds": round(time.perf_counter() - start, 2),
                "generated": generated,
                "cached": cached,
            },
            "code_version": _code_version(),
            "scoring_code": _scoring_code(),  # what a later run of fewer --metrics may carry over
            "file": result_path.name,
        }
        if method == "decoder":
            result["decoder"] = decoder
            result["protocol"]["decoder"] = (
                "all frames VAE-encoded (posterior mean), decoded together (a dual-reference decoder with the"
                " first and last frames' features; no second decode), uint8, PSNR/SSIM/LPIPS per frame"
            )
        earlier = _load_result(result_path)
        if earlier is not None:
            result = with_earlier_metrics(result, earlier)
            pooled = result["metrics"]
        write_json_atomic(result_path, json_safe(result))
        print(f"{label}: {_summary(pooled, method == 'decoder')} -> {result_path}")
        if pooled.get("fvd") is not None and pooled.get("fvd_note"):
            print(f"note: {pooled['fvd_note']}", file=sys.stderr)
        if pooled.get("clip_txt_clips", pooled["n_clips"]) < pooled["n_clips"]:
            print(
                f"note: CLIP_txt is over the {pooled['clip_txt_clips']} of {pooled['n_clips']} clips that have a"
                " caption (a split curated with --skip caption has none)",
                file=sys.stderr,
            )
    results = []
    for path in sorted((args.out / "results").glob("*.json")):
        found = _load_result(path)
        if found is None:  # was a traceback after every clip's work, and no table
            print(
                f"warning: {path}: not a result of evaluate (damaged or another file); not in the table",
                file=sys.stderr,
            )
            continue
        results.append(found)
    table = markdown_table(results)
    from manifests.files import write_bytes_atomic

    write_bytes_atomic(args.out / "results.md", table.encode())
    print(f"table: {args.out / 'results.md'}")
    sets = clip_sets(results)
    if sets:
        print(
            f"note: {args.out} holds runs on {len(sets)} different sets of clips (another eval"
            " split, --limit or source); the table marks them: compare only rows of one set",
            file=sys.stderr,
        )
    if device.type == "cuda" and placed.built:
        log.info("peak GPU memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
    return 0


SSIM_WINDOW = 11  # taps of SSIM's Gaussian window (training/metrics/frames.py)
I3D_MIN_FRAMES = 9  # StyleGAN-V's I3D halves time three times before a 2-frame average pool
LPIPS_MIN_SIDE = 31  # AlexNet's 11x11/4 conv and two 3x3/2 max-pools leave no pixel of a smaller side


def _check_model_size(size: tuple[int, int], checkpoint, args: argparse.Namespace, cfg=None) -> None:
    """The frame size against the model's size step (it failed in the sampler, after the model had loaded
    and the clips were decoded). Before loading, the config is known from a safetensors header, or from
    --preset; a pickled checkpoint (`.ckpt`) without --preset is checked once loaded (`cfg`), since
    load_tooncrafter reads its preset from its weights."""
    from training.checkpoint import CheckpointError
    from training.checkpoint_files import header_config
    from training.models.tooncrafter import size_step, tooncrafter_config

    if cfg is None:
        try:
            cfg = header_config(checkpoint) if checkpoint else None
        except CheckpointError as exc:
            raise InputError(str(exc)) from exc
        if cfg is None and args.preset:
            cfg = tooncrafter_config(args.preset)
        if cfg is None:
            return
    step = 2 ** (len(cfg.vae.ch_mult) - 1) if args.decoder_only else size_step(cfg)
    if size[0] % step or size[1] % step:
        flag = "--decoder-size" if args.decoder_only else "--size"
        raise InputError(
            f"{flag}: the frame {size[0]}x{size[1]} must have sides that are multiples of {step} for this model"
        )


def _clip_towers(extractors) -> bool:
    """Whether CLIP runs on the interpolation checkpoint's towers (the CLIP file's record is not told by
    the word "checkpoint": a models dir under /data/checkpoints/ has it in its path)."""
    from inference.eval_scores import CLIP_TOWERS

    clip = extractors.record.get("clip")
    return isinstance(clip, dict) and clip.get("model") == CLIP_TOWERS


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None: JSON has no NaN or Infinity (Python writes them; JavaScript's
    JSON.parse and strict parsers refuse the file, jq turns them into null)."""
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _finite_uint8(video, key: str, dtype) -> np.ndarray:
    """A generated clip [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]; InputError when it holds NaN or inf
    (nothing of the clip is cached)."""
    from inference.media import to_uint8_frames

    try:
        return to_uint8_frames(video, key, dtype)
    except InputError as exc:
        raise InputError(f"{exc} (nothing of this clip was cached)") from None


def _generate(
    method: str, gt: np.ndarray, key: str, caption: str, placed: _Lazy, settings, seed: int
) -> np.ndarray:
    from inference.baselines import BASELINES

    if method != "model":
        return BASELINES[METHODS[method]](gt[0], gt[-1], len(gt))
    from inference.media import to_model_range
    from inference.sampler import interpolate

    im = placed()
    video = interpolate(
        im, to_model_range(gt[0]), to_model_range(gt[-1]), caption, settings, seed, progress=False
    )
    return _finite_uint8(video[0], key, im.dtype)


def _decoder_kind(model: _Lazy, checkpoint: Path) -> str:
    """Which VAE decoder the checkpoint has, "dual-reference" (ToonCrafter's) or "plain" (DynamiCrafter's):
    the rows of both were one label, "VAE decoder (ours)", in the table that compares them. From the model
    when this run loaded it, else from the file's config or key names (nothing loaded)."""
    from training.checkpoint import detect_config
    from training.checkpoint_files import read_layout

    if model.built:
        cfg = model().cfg
    else:
        ckpt = read_layout(checkpoint)
        cfg = ckpt.config or detect_config(ckpt.state_dict)
    if cfg is None:
        return "custom"
    return "dual-reference" if cfg.dual_ref_decoder else "plain"


def _reconstruct(im, gt: np.ndarray, key: str) -> np.ndarray:
    """Encode every frame (posterior mean), decode them together with the first/last frames' features."""
    import torch

    from inference.media import to_model_range
    from inference.sampler import precision

    vae = im.vae
    with torch.no_grad():
        video = to_model_range(gt).permute(1, 0, 2, 3)[None].to(im.device)  # [1, 3, T, H, W]
        posterior, refs = vae.encode_video(video)
        z = vae.config.scale_factor * posterior.mode()
        with precision(im.device, im.dtype):
            rec = vae.decode_video(
                z, refs if vae.config.dual_ref else None, clip_length=z.shape[2], frame_chunk=4
            )
    return _finite_uint8(rec[0].float().cpu(), key, im.dtype)


def _summary(m: dict, decoder: bool) -> str:
    """One line of the pooled numbers; a metric the run did not compute is left out."""
    shown = (
        [("PSNR", "psnr", 2), ("SSIM", "ssim", 4), ("LPIPS", "lpips", 4)]
        if decoder
        else [
            ("FVD", "fvd", 2),
            ("LPIPS", "lpips", 4),
            ("CLIP_img", "clip_img", 4),
            ("CLIP_txt", "clip_txt", 4),
            ("CPBD", "cpbd", 4),
            ("PSNR interior", "psnr", 2),
            ("SSIM interior", "ssim", 4),
        ]
    )
    parts = [f"N={m['n_clips']}"]
    for label, key, digits in shown:
        value = m.get(key)
        if isinstance(value, dict):
            value = value.get("interior" if label.endswith("interior") else "all")
        if value is not None:
            parts.append(f"{label} {value:.{digits}f}")
        elif key == "fvd" and m.get("fvd_note") == "needs at least 2 clips":
            parts.append("FVD -")
    return " ".join(parts)


def _load_result(path: Path) -> dict[str, Any] | None:
    """A results JSON as this command writes it; None when there is none, or it is damaged or another file
    (this run's replaces it; the table leaves it out)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("kind") not in ("generation", "decoder"):
        return None
    if not isinstance(result.get("metrics"), dict) or not isinstance(result.get("data"), dict):
        return None
    return result if all(k in result for k in ("label", "run")) and "n_clips" in result["metrics"] else None


# The code that turns a clip into its cached per-clip scores: edited, the cached scores are redone
# (a fixed CPBD or SSIM was served from the cache of the old code). Pooling (FVD, KVD) runs every time.
SCORING_MODULES = (
    "inference.eval_data",  # the ground-truth window
    "inference.eval_scores",
    "inference.media",  # its resize and crop (fit_frame)
    "training.features",
    "training.metrics.cpbd",
    "training.metrics.frames",
    "training.metrics.lpips",
    "training.metrics.preprocess",
    "training.models.clip",  # CLIP on the checkpoint's towers
    "training.shard_samples",  # a clip's decoding (decode_clip)
    "training.shards",  # a shard's members grouped into clips (iter_tar_samples)
)


def _scoring_code() -> str:
    import importlib

    digest = hashlib.sha256()
    for name in SCORING_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


def _code_version() -> str:
    try:
        from training.checkpoint import code_version

        return code_version()
    except ImportError:
        return "unknown"


def main(argv: list[str] | None = None, *, extractors=None) -> int:
    """`extractors` (inference.eval_scores.Extractors) replaces the metric networks, e.g. in tests."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        with contextlib.ExitStack() as held:  # a curate OUT read for hours: select must not swap it meanwhile
            for out in dict.fromkeys(filter(None, map(curate_out_of, args.sources))):
                try:
                    held.enter_context(folder_lock(out, "inbetweener evaluate", shared=True))
                except FolderBusy as exc:
                    raise InputError(str(exc)) from None
            return run(args, extractors)
    except InputError as exc:
        print(f"inbetweener evaluate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
