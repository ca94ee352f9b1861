"""`inbetweener describe PRESET`: parameter counts per part of a model preset (built on the meta device)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """example:
  inbetweener describe toon-512                   # the released ToonCrafter layout, 2,625,430,449 numbers
  inbetweener describe toon-512 --plain-decoder   # DynamiCrafter-512-interp (plain SD decoder)
  inbetweener describe tiny --json
"""

UNET_GROUP_LABELS = {
    "temporal_conv": "temporal convs (temopral_conv)",
    "temporal_attention": "temporal transformers",
    "init_attention": "init_attn",
    "image_kv": "image cross-attn K/V (to_k_ip, to_v_ip)",
    "spatial": "spatial (everything else)",
}


def count_parts(preset: str, plain_decoder: bool = False) -> list[tuple[str, str, int]]:
    """(key, label, numel) rows: the model's parts, the UNet's groups, the schedule buffers, the total."""
    import torch

    from training.models.tooncrafter import build_tooncrafter

    with torch.device("meta"):
        model = build_tooncrafter(preset, dual_ref_decoder=not plain_decoder)

    def numel(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    unet = model.unet
    params = dict(unet.named_parameters())
    vae = model.first_stage_model
    decoder = "plain" if plain_decoder else "dual-reference"
    rows = [("unet", "model.diffusion_model (UNet3D)", numel(unet))]
    rows += [
        (f"unet.{group}", f"  {UNET_GROUP_LABELS[group]}", sum(params[n].numel() for n in names))
        for group, names in unet.parameter_groups().items()
    ]
    rows += [
        ("vae.encoder", "first_stage_model.encoder", numel(vae.encoder)),
        ("vae.decoder", f"first_stage_model.decoder ({decoder})", numel(vae.decoder)),
        ("vae.quant_conv", "first_stage_model.quant_conv", numel(vae.quant_conv)),
        ("vae.post_quant_conv", "first_stage_model.post_quant_conv", numel(vae.post_quant_conv)),
        ("text_tower", "cond_stage_model (OpenCLIP text tower)", numel(model.cond_stage_model)),
        ("image_tower", "embedder (OpenCLIP image tower)", numel(model.embedder)),
        ("resampler", "image_proj_model (Resampler)", numel(model.image_proj_model)),
        ("schedule_buffers", "schedule buffers", sum(b.numel() for b in model.buffers(recurse=False))),
        ("total", "total (state dict)", sum(t.numel() for t in model.state_dict().values())),
    ]
    from training.models.sketch import SKETCH_ENCODER_PRESETS, SketchEncoder

    with torch.device("meta"):
        sketch = SketchEncoder(SKETCH_ENCODER_PRESETS[preset])
    rows.append(("sketch_encoder", "sketch encoder (ControlNet; a separate checkpoint)", numel(sketch)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from training.models.tooncrafter import TOONCRAFTER_PRESETS

    parser = argparse.ArgumentParser(
        prog="inbetweener describe",
        description="Print the parameter count of every part of a model preset (nothing is allocated).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("preset", choices=sorted(TOONCRAFTER_PRESETS), help="model preset")
    parser.add_argument(
        "--plain-decoder",
        action="store_true",
        help="DynamiCrafter's plain decoder instead of the dual-reference one",
    )
    parser.add_argument("--json", action="store_true", help="print {part: count} as JSON")
    args = parser.parse_args(argv)

    rows = count_parts(args.preset, args.plain_decoder)
    if args.json:
        print(json.dumps({key: n for key, _, n in rows}, indent=1))
        return 0
    width = max(len(label) for _, label, _ in rows)
    print(f"ToonCrafter preset {args.preset}")
    for _, label, n in rows:
        print(f"{label:<{width}}  {n:>15,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
