"""`inbetweener convert IN OUT.safetensors`: any supported checkpoint -> safetensors with its config embedded.

The input is checked strictly against the model (training/checkpoint.py), so the output always loads with
`load_model(OUT)` and no preset. Without `--preset` and without a config in the file, the preset is found
from the file's key layout.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

EPILOG = """examples:
  inbetweener convert model.ckpt tooncrafter_512.safetensors --dtype fp16
  inbetweener convert dynamicrafter_512_interp.ckpt dc.safetensors --preset toon-512
  inbetweener convert dynamicrafter_512_interp.ckpt toon_init.safetensors --init-dual-ref   # decoder-stage start

The released ToonCrafter model.ckpt is a Lightning file that may pickle Python objects besides the weights:
convert it once where you trust it, and use the .safetensors from then on.
"""


def main(argv: list[str] | None = None) -> int:
    import logging

    import torch

    from training.checkpoint import (
        CheckpointError,
        detect_config,
        model_from_checkpoint,
        preset_name,
        resolve_config,
        save_safetensors,
    )
    from training.checkpoint_files import read_checkpoint
    from training.models.tooncrafter import TOONCRAFTER_PRESETS

    parser = argparse.ArgumentParser(
        prog="inbetweener convert",
        description="Write a checkpoint (.ckpt, DeepSpeed, .pt, .safetensors) as safetensors with its config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="checkpoint to read")
    parser.add_argument("output", type=Path, help="safetensors file to write")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast the parameters (default: keep the file's)"
    )
    parser.add_argument(
        "--preset", choices=sorted(TOONCRAFTER_PRESETS), help="model preset (default: detect)"
    )
    parser.add_argument(
        "--init-dual-ref",
        action="store_true",
        help="for a plain-decoder (DynamiCrafter) file: write ToonCrafter's dual-reference decoder, its added "
        "layers initialised so that it decodes as the plain decoder",
    )
    parser.add_argument("--no-pickle", action="store_true", help="refuse files that pickle Python objects")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.output.suffix != ".safetensors":
        parser.error(f"output must end in .safetensors: {args.output}")
    if args.output.is_dir():  # checked before a 10 GB file is read
        parser.error(
            f"output {args.output} is a folder; give the file to write (e.g. {args.output / 'model.safetensors'})"
        )
    not_folder = next((p for p in args.output.parents if p.exists() and not p.is_dir()), None)
    if not_folder is not None:  # said after the input was read, as "File exists"
        parser.error(f"output {args.output}: {not_folder} is a file, not a folder")
    try:
        ckpt = read_checkpoint(args.input, allow_pickle=not args.no_pickle)
        if ckpt.config is not None:
            cfg = resolve_config(ckpt, args.preset)  # a --preset it contradicts is refused, not dropped
        else:
            cfg = detect_config(ckpt.state_dict, [args.preset] if args.preset else None)
            if cfg is None:  # no preset matches: load it anyway to report what differs
                cfg = resolve_config(ckpt, args.preset or "toon-512")
        if args.init_dual_ref:
            cfg = replace(cfg, dual_ref_decoder=True)
        model = model_from_checkpoint(ckpt, cfg, dtype=None)
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        save_safetensors(model, args.output, dtype=dtype, metadata={"inbetweener.source": args.input.name})
    except CheckpointError as exc:  # a file that is not this model's: refused input, as every command's
        print(f"inbetweener convert: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output's folder not writable, the disk full
        print(f"inbetweener convert: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    decoder = "dual-reference" if cfg.dual_ref_decoder else "plain (DynamiCrafter)"
    size = args.output.stat().st_size
    print(
        f"wrote {args.output}: {len(model.state_dict())} tensors, preset {preset_name(cfg) or '(custom)'}, "
        f"{decoder} decoder, parameters {args.dtype or 'as in the input'}, {size / 1e9:.2f} GB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
