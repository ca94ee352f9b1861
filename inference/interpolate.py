"""`inbetweener interpolate`: keyframes + prompt (+ sketches) -> in-between frames as mp4, gif and PNGs.

Every input is checked (keyframes readable and of one aspect ratio, sketches, checkpoint present and of the right
model, output formats writable) before anything is moved to the GPU; a batch's files by their headers, all
rows at once, its pixels read at each row's turn. The inputs become jobs in inference/interpolate_jobs.py;
sampling is inference/sampler.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from inference.interpolate_jobs import (
    BATCH_STATUS,
    Job,
    build_jobs,
    prepare_frames,
    warn_far_from_training,
    warn_long_prompts,
    warn_upscaled,
)
from inference.media import (
    DTYPES,
    OUTPUT_FORMATS,
    InputError,
    check_size,
    check_writable_folder,
    frame_size,
    mp4_available,
    parse_size,
)
from manifests.files import FolderBusy, curate_out_of, folder_lock
from manifests.remote import local_folder, local_input, not_a_url
from training.models.tooncrafter import size_step, tooncrafter_config

log = logging.getLogger("inbetweener.interpolate")


EPILOG = """\
examples:
  inbetweener interpolate start.png end.png --prompt "an anime scene" --out out/walk
  inbetweener interpolate a.png b.png c.png --prompt "a man walking" --out out/chain   # 2 segments, 31 frames
  inbetweener interpolate a.png b.png --sketch sketches/ --out out/sketched   # sketches/07.png guides frame 7
  inbetweener interpolate --batch pairs.csv --out out/batch                    # one output folder per row
  inbetweener interpolate --batch pairs.csv --out out/batch --dry-run          # check the rows, load nothing

weights (nothing is downloaded for you):
  The released ToonCrafter `model.ckpt` (10.5 GB, Hugging Face repo Doubiiu/ToonCrafter):
      hf download Doubiiu/ToonCrafter model.ckpt --local-dir $INBETWEENER_MODELS/tooncrafter
  It is looked for at MODELS/tooncrafter/model.ckpt (or model.safetensors), MODELS being --models-dir,
  else $INBETWEENER_MODELS, else ~/.cache/inbetweener/models; or pass --checkpoint PATH (a .ckpt, a
  DeepSpeed/.pt file or a safetensors file of `inbetweener convert`/`train`). With --sketch, also
  `sketch_encoder.ckpt` (1.46 GB, same repo) at MODELS/tooncrafter/ or --sketch-checkpoint PATH.

frame geometry (the reference: resize the short side to 320, centre-crop 320x512):
  The short side goes to --short-side (320), the long side to the multiple of 64 nearest to the
  keyframes' aspect; each keyframe is scaled to cover that frame and centre-cropped (only the rounding
  residue is cut). 16:10 keyframes (e.g. 512x320) give exactly the reference's 320x512; 16:9 gives 320x576;
  portrait keyframes give portrait output. Outputs are written at that frame size, i.e. at the keyframes'
  aspect. --size 320x512 forces the reference's box; keyframes narrower than it are scaled to cover
  (the reference pads them with black bars). Keyframes must share one aspect ratio; their sizes may
  differ (each is scaled to the frame, which the first keyframe's aspect sets).

defaults reproduce the reference (run.sh / the Gradio app):
  --steps 50 (uniform_trailing DDIM) --eta 1.0 --cfg 7.5 --guidance-rescale 0.7 --fs 10 --frames 16,
  text + first-keyframe CLIP context, unconditional branch = empty text + zero image, mp4 at 8 fps.
  Precision: bf16 on a GPU (the reference: fp16 autocast over fp32 weights), fp32 on the CPU.

reference quirks (MODEL.md 3.6):
  reproduced: post_quant_conv skipped before the dual-reference decoder; the output's first and last
  frames are the decoder's reconstructions of the keyframes, not pasted copies; frames 7 and 8 come
  from a second decode without latents 1 and 14 (--single-decode skips that decode). Not reproduced:
  the reference encodes 8 copies of each keyframe (the same latents; only the RNG stream differs);
  its noise comes from the global CUDA RNG, here from one seeded CPU generator (same clip on any device);
  the two guidance branches run as one UNet call of batch 2 (same math; 10.6 -> 8.8 s eager on an H200).
  --frames other than 16 changes the image context (the model is trained on 16; quality drops).

chains (--keyframes A B C ... or more than two positionals): segment k goes from keyframe k to k+1 with
  seed + k; the frame two segments share is written once (from the earlier segment). Sketch indices are
  global frame numbers over the whole chain.

batch files (--batch): CSV/TSV with a header, or JSON lines, one output folder per row under --out.
  Columns: start, end (or keyframes: paths separated by ';'), prompt, name, seed, sketch (items as for
  --sketch, separated by ';'; --sketch itself is refused with --batch); relative paths are relative to
  the batch file. A clip manifest
  (manifest.parquet) works too: each kept clip of --split becomes a row (its first and last frames,
  its caption as the prompt, its key as the name). Every row's files are checked first (headers only:
  thousands of rows take moments) and all unusable rows are listed at once, with nothing run; each row's
  pictures are read at its turn, so memory does not grow with the batch. A row whose file fails to
  decode then (e.g. a truncated JPEG) is reported and skipped, the others are written, and the exit
  code is 1; --skip-existing reruns only the rows without output. OUT/batch.json lists every row with
  its status (done, error with the reason, pending).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inbetweener interpolate",
        description="Generate the in-between frames of two (or more) keyframes with ToonCrafter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="*", type=not_a_url, metavar="KEYFRAME", help="START END [MORE ...] keyframe images"
    )
    p.add_argument(
        "--keyframes",
        nargs="+",
        type=not_a_url,
        metavar="IMAGE",
        help="keyframes to chain (instead of positionals)",
    )
    p.add_argument(
        "--batch",
        type=local_input,
        metavar="FILE",
        help="CSV/TSV/JSONL list, clip manifest or a curate OUT folder: one output per row (clip)",
    )
    p.add_argument("--split", default="eval", help="split of a manifest given to --batch (default: eval)")
    p.add_argument("--prompt", default="", help="text prompt, e.g. 'an anime scene' (default: empty)")
    p.add_argument(
        "--sketch",
        nargs="+",
        metavar="DIR|FILE|I=FILE",
        help="sketches of some frames: a folder of pictures named by frame index (07.png, frame_07.png),"
        " a picture named so, or I=FILE for frame I (over a chain: global frame numbers)",
    )
    p.add_argument(
        "--out", type=local_folder, default=Path("out/interpolate"), help="output folder (out/interpolate)"
    )
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    p.add_argument("--guidance-rescale", type=float, default=0.7, help="guidance rescale phi (0.7)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1.0)")
    p.add_argument(
        "--fs", type=int, default=10, help="frame-stride condition, 5-30; smaller = more motion (10)"
    )
    p.add_argument("--seed", type=int, default=123, help="random seed (123, as run.sh)")
    p.add_argument("--frames", type=int, default=16, help="frames per segment, keyframes included (16)")
    p.add_argument("--sketch-scale", type=float, default=0.6, help="weight of the sketch residuals (0.6)")
    p.add_argument(
        "--sketch-blank-frames",
        action="store_true",
        help="run frames without a sketch through the sketch encoder as blank pages (the reference) "
        "instead of leaving them unguided",
    )
    p.add_argument(
        "--checkpoint", type=local_input, help="model weights (default: MODELS/tooncrafter/model.ckpt)"
    )
    p.add_argument(
        "--sketch-checkpoint",
        type=local_input,
        help="sketch encoder (default: MODELS/tooncrafter/sketch_encoder.ckpt)",
    )
    p.add_argument(
        "--models-dir",
        type=local_input,
        help="models dir (default: $INBETWEENER_MODELS or ~/.cache/inbetweener/models)",
    )
    p.add_argument(
        "--preset",
        choices=("toon-512", "tiny"),
        help="model preset when the file carries no config and its layout is unknown",
    )
    p.add_argument("--short-side", type=int, default=320, help="short side of the generated frames (320)")
    p.add_argument("--size", help="force the frame to HxW (e.g. 320x512, the reference's)")
    p.add_argument(
        "--fps", type=float, default=8.0, help="frame rate of the mp4 and gif (8, as the reference)"
    )
    p.add_argument("--formats", default="mp4,gif,png", help="outputs to write, from mp4,gif,png (all)")
    p.add_argument(
        "--single-decode", action="store_true", help="skip the reference's second decode of the middle frames"
    )
    p.add_argument("--decode-chunk", type=int, default=4, help="frames per VAE decoder chunk; 0 = all (4)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="precision (default: bf16 on a GPU, fp32 on the CPU)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and the VAE decoder's blocks (pays off from the 2nd sample)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="keep the UNet's activations channels-last (with --compile on a GPU; the same numbers)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each UNet call as one CUDA graph (GPU only; 1-3%% faster a call, the same numbers: BENCHMARKS.md)",
    )
    clip = p.add_mutually_exclusive_group()
    clip.add_argument(
        "--keep-clip-on-device",
        action="store_true",
        help="keep the CLIP towers (~2 GB) on the GPU between clips (the default on cards of >= 24 GiB)",
    )
    clip.add_argument(
        "--offload-clip",
        action="store_true",
        help="keep the CLIP towers in host memory, visiting the GPU for each clip (the default on smaller cards)",
    )
    p.add_argument(
        "--skip-existing", action="store_true", help="batch: skip rows whose output folder is complete"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every input, say what would be written, and stop before loading the model",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# --- running ---------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace):
    from inference.sampler import SamplerSettings

    settings = SamplerSettings(
        steps=args.steps,
        cfg=args.cfg,
        guidance_rescale=args.guidance_rescale,
        eta=args.eta,
        fs=args.fs,
        frames=args.frames,
        reference_decode=not args.single_decode,
        decode_chunk=None if args.decode_chunk == 0 else args.decode_chunk,
        sketch_scale=args.sketch_scale,
        sketch_blank_frames=args.sketch_blank_frames,
    )
    try:
        settings.check()
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return settings


def _formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
    if unknown or not formats:
        raise InputError(f"--formats takes a comma list from {','.join(OUTPUT_FORMATS)}, got {text!r}")
    if "mp4" in formats and not mp4_available():
        raise InputError("writing mp4 needs PyAV (`pip install av`); or leave it out: --formats gif,png")
    return formats


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    formats = _formats(args.formats)
    if not 0 < args.fps <= 1000:
        raise InputError(f"--fps must be in (0, 1000], got {args.fps:g}")
    if args.short_side <= 0:
        raise InputError(f"--short-side must be positive, got {args.short_side}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder for the outputs")
    check_writable_folder(args.out, create=False)
    size = parse_size(args.size) if args.size else None
    jobs = build_jobs(args)
    every_job = jobs
    if args.skip_existing:
        jobs = [j for j in jobs if not (args.out / j.name / "meta.json").is_file()]
        if not jobs:
            print("nothing to do: every output exists")
            return 0
    blocked = [str(args.out / j.name) for j in jobs if j.name and (args.out / j.name).is_file()]
    if blocked:  # a row's folder would fail after its sampling, with a traceback that ended the batch
        more = f" and {len(blocked) - 5} more" if len(blocked) > 5 else ""
        raise InputError(
            f"{', '.join(blocked[:5])}{more}: a file where a row writes its output folder; move it aside or"
            " give the row another `name`"
        )
    from inference.sampler import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype)

    from inference.weights import (
        SKETCH_FILE,
        TOONCRAFTER_FILE,
        find_weights,
        load_sketch_encoder,
        load_tooncrafter,
    )

    checkpoint = find_weights(args.checkpoint, TOONCRAFTER_FILE, args.models_dir)
    needs_sketch = any(j.sketch_files for j in jobs)
    if args.sketch_checkpoint and not needs_sketch:
        log.warning("--sketch-checkpoint given but no frame has a sketch: the sketch encoder is not used")
    sketch_path = find_weights(args.sketch_checkpoint, SKETCH_FILE, args.models_dir) if needs_sketch else None
    warn_long_prompts(jobs)
    if args.dry_run:
        return _dry_run(args, every_job, jobs, settings, formats, checkpoint, sketch_path, device, dtype)
    check_writable_folder(args.out, create=True)
    model = load_tooncrafter(checkpoint, args.preset)
    from training.checkpoint import preset_name

    preset = preset_name(model.cfg)
    multiple = size_step(model.cfg)
    if size is not None:
        check_size(size, multiple)
    sketch_encoder = load_sketch_encoder(sketch_path, preset) if sketch_path else None

    # Everything is checked: from here on the device works.
    import torch

    from inference.media import to_uint8_frames, write_outputs
    from inference.sampler import InferenceModel, interpolate_chain
    from manifests.files import write_json_atomic

    im = InferenceModel(
        model,
        device,
        dtype,
        compile=args.compile,
        sketch_encoder=sketch_encoder,
        offload_clip=True if args.offload_clip else False if args.keep_clip_on_device else None,
        cuda_graph=args.cuda_graph,
        channels_last=args.channels_last,
    )
    from tqdm import tqdm

    rows = tqdm(jobs, desc="clips", unit="clip", disable=args.quiet or len(jobs) == 1)
    failed: dict[str, str] = {}  # row name -> why it was not interpolated
    for job in rows:
        start = time.perf_counter()
        try:
            keyframes, hints, target = prepare_frames(job, size, args.short_side, multiple)
        except InputError as exc:
            # A row whose files changed or fail to decode past their header: reported, and the batch goes on.
            failed[job.name] = str(exc)
            rows.write(f"{job.name}: not interpolated: {exc}", file=sys.stderr)
            continue
        video = interpolate_chain(
            im, keyframes, job.prompt, settings, job.seed, hints, progress=not args.quiet
        )
        frames = to_uint8_frames(
            video, job.name, im.dtype
        )  # NaN: InputError, the run stops (every row would)
        out_dir = args.out / job.name
        inputs = [*job.labels, *job.sketch_labels.values()]  # a user's drawings in the folder stay
        try:  # a full disk: every row after it would fail too, each after its sampling
            written = write_outputs(frames, out_dir, args.fps, formats, keep=inputs)
            meta = {
                "keyframes": job.labels,
                "sketches": {str(k): v for k, v in sorted(job.sketch_labels.items())},
                "prompt": job.prompt,
                "seed": job.seed,
                "frames": int(frames.shape[0]),
                "size": {"height": target[0], "width": target[1]},
                "fps": args.fps,
                "settings": asdict(settings),
                "checkpoint": str(checkpoint),
                "sketch_checkpoint": str(sketch_path) if sketch_path else None,
                "preset": preset,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "compile": args.compile,
                "cuda_graph": im.cuda_graph,
                "channels_last": im.channels_last,
                "clip_towers": "host" if im.offload_clip else "device",
                "seconds": round(time.perf_counter() - start, 3),
                "outputs": {
                    k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in written.items()
                },
            }
            write_json_atomic(out_dir / "meta.json", meta)
        except OSError as exc:
            failed[job.name] = f"cannot write {exc.filename or out_dir}: {exc.strerror or exc}"
            rows.write(
                f"{job.name or out_dir}: not written: {failed[job.name]}; the run stops", file=sys.stderr
            )
            break
        parts = [str(written[k]) for k in ("mp4", "gif") if k in written]
        if "png" in written:
            parts.append(f"{out_dir / 'frames'}/0000..{len(frames) - 1:04d}.png")
        message = (
            f"{len(frames)} frames {target[1]}x{target[0]} in {meta['seconds']:.1f}s -> {', '.join(parts)}"
        )
        if len(jobs) > 1 and not args.quiet:
            rows.write(message)  # above the batch's progress bar
        else:
            print(message)
    if device.type == "cuda":
        log.info("peak GPU memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
    if args.batch is not None:
        try:
            write_batch_status(args.out, every_job, failed)
        except OSError as exc:  # the disk that stopped the run: its rows are said above
            print(f"inbetweener interpolate: cannot write {args.out / BATCH_STATUS}: {exc.strerror or exc}",
                  file=sys.stderr)  # fmt: skip
    if failed:
        print(
            f"inbetweener interpolate: {len(failed)} of {len(jobs)} rows not interpolated (listed above); "
            "after fixing them, the same command with --skip-existing runs only those",
            file=sys.stderr,
        )
        return 1
    return 0


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _dry_run(args, every_job, jobs, settings, formats, checkpoint, sketch_path, device, dtype) -> int:
    """What a run would do, from the checks already made; nothing is loaded or written."""
    from collections import Counter

    done = len(every_job) - len(jobs)
    existing = sum((args.out / j.name / "meta.json").is_file() for j in jobs)
    line = f"rows: {len(every_job)}"
    if done:
        line += f", {done} with complete output skipped (--skip-existing)"
    elif existing:
        line += f", {existing} with complete output that would be redone (--skip-existing skips them)"
    print(line)
    frames = Counter((len(j.labels) - 1) * (settings.frames - 1) + 1 for j in jobs)
    print("frames per row: " + ", ".join(f"{n} ({_rows(k)})" for n, k in sorted(frames.items())))
    if all(j.size is not None for j in jobs):  # found by the checks; a manifest's clips have theirs
        sizes = Counter(j.size for j in jobs)
        print("keyframe sizes: " + ", ".join(f"{w}x{h} ({_rows(k)})" for (h, w), k in sorted(sizes.items())))
        cfg = _header_config(checkpoint) or tooncrafter_config(args.preset or "toon-512")
        multiple = size_step(cfg)
        if args.size:
            check_size(parse_size(args.size), multiple)
        frames = Counter(
            parse_size(args.size) if args.size else frame_size(*j.size, args.short_side, multiple)
            for j in jobs
        )
        for size in frames:
            warn_far_from_training(size)
        for job in jobs:
            target = parse_size(args.size) if args.size else frame_size(*job.size, args.short_side, multiple)
            if warn_upscaled(job.size, target, job.name if len(jobs) > 1 else ""):
                break  # once: a batch of thumbnails is told by its first
        print(
            f"frame sizes (sides multiples of {multiple}): "
            + ", ".join(f"{w}x{h} ({_rows(k)})" for (h, w), k in sorted(frames.items()))
        )
    else:
        print("keyframe sizes: the clips' (decoded at each row's turn)")
    print(
        f"checkpoint: {checkpoint} (found and whole; its weights are loaded and checked only by a real run)"
    )
    print(f"sketch encoder: {sketch_path}" if sketch_path else "sketch encoder: not needed")
    sketched = [j for j in jobs if j.sketch_files]
    if len(jobs) == 1 and sketched:
        print(f"sketched frames: {', '.join(f'{i} ({p})' for i, p in sorted(jobs[0].sketch_files.items()))}")
    elif sketched:
        print(f"sketched frames: in {_rows(len(sketched))}")
    where = f"{args.out}/NAME/" if args.batch is not None else f"{args.out}/"
    print(
        f"outputs: {where} {', '.join(formats)} + meta.json; device {device}, {str(dtype).removeprefix('torch.')}"
    )
    later = (
        " (a batch's pictures are decoded by a real run, at each row's turn)"
        if args.batch is not None
        else ""
    )
    print(f"dry run: nothing was loaded or written{later}")
    return 0


def _header_config(checkpoint: Path):
    from training.checkpoint import CheckpointError
    from training.checkpoint_files import header_config

    try:
        return header_config(checkpoint)
    except CheckpointError as exc:
        raise InputError(str(exc)) from exc


def write_batch_status(out: Path, jobs: list[Job], failed: dict[str, str]) -> Path:
    """OUT/batch.json: every row of the batch with its status ("done": its output folder is complete, from
    this run or an earlier one; "error", with the reason; "pending": not reached), for scripts to read."""
    from manifests.files import write_json_atomic

    def status(job: Job) -> dict:
        if job.name in failed:
            return {"status": "error", "reason": failed[job.name]}
        return {"status": "done" if (out / job.name / "meta.json").is_file() else "pending"}

    rows = [{"name": j.name, "keyframes": j.labels, **status(j)} for j in jobs]
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "error", "pending")}
    path = out / BATCH_STATUS
    write_json_atomic(path, {"rows": rows, **counts})
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        with contextlib.ExitStack() as held:  # --batch OUT/manifest.parquet reads the eval shards row by row
            out = curate_out_of(args.batch) if args.batch else None
            if out is not None:
                try:
                    held.enter_context(folder_lock(out, "inbetweener interpolate --batch", shared=True))
                except FolderBusy as exc:
                    raise InputError(str(exc)) from None
            return run(args)
    except InputError as exc:
        print(f"inbetweener interpolate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
