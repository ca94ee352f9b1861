"""Parameter roles of a ToonCrafter, read from state-dict names (MODEL.md 5.4), and what each stage trains.

| role               | name rule (full ToonCrafter names)                                                   |
|--------------------|--------------------------------------------------------------------------------------|
| temporal_conv      | `model.diffusion_model.` + contains `.temopral_conv.` (the reference's spelling)      |
| temporal_attention | `model.diffusion_model.` + `(input|output)_blocks.N.2.` or `middle_block.2.` followed |
|                    | by norm/proj_in/transformer_blocks/proj_out (the maintainer's regex, DC issue #84)   |
| init_attention     | `model.diffusion_model.init_attn.` (the extra temporal attention the regex misses)   |
| image_kv           | `model.diffusion_model.` + `attn2.to_k_ip` / `attn2.to_v_ip`                          |
| spatial            | every other UNet parameter (ResBlock convs, spatial transformers, samplers, in/out,  |
|                    | time and fs embeddings)                                                              |
| image_proj         | `image_proj_model.` (the Resampler, the image-context projector)                     |
| vae_encoder        | `first_stage_model.encoder.`, `first_stage_model.quant_conv.`                        |
| vae_decoder        | `first_stage_model.decoder.`                                                         |
| vae_post_quant     | `first_stage_model.post_quant_conv.` (unused on the dual-reference decode path)      |
| clip_text          | `cond_stage_model.`                                                                  |
| clip_image         | `embedder.`                                                                          |

Names decide, not module types, so that a role can be checked against any checkpoint's key list; the
tests check the rules against the module types of the model (TemporalConvBlock, TemporalTransformer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

UNET = "model.diffusion_model."
TEMPORAL_ROLES = ("temporal_conv", "temporal_attention", "init_attention")
ROLES = (
    *TEMPORAL_ROLES,
    "image_kv",
    "spatial",
    "image_proj",
    "vae_encoder",
    "vae_decoder",
    "vae_post_quant",
    "clip_text",
    "clip_image",
)
_TEMPORAL_ATTENTION = re.compile(
    r"^((input|output)_blocks\.\d{1,2}|middle_block)\.2\.(norm|proj_in|transformer_blocks|proj_out)"
)

# What each stage trains (the paper's recipe, ARCHITECTURE.md "Training stages"); everything else is frozen.
STAGE_ROLES: dict[str, tuple[str, ...]] = {
    "rectify": ("spatial", "image_kv", "image_proj"),  # image-context projector + spatial layers
    "decoder": ("vae_decoder",),  # the dual-reference decoder
    "sketch": (),  # only the sketch encoder, which is not part of the ToonCrafter
}


def role(name: str) -> str:
    """The role of a full ToonCrafter parameter name (see the module docstring)."""
    if name.startswith(UNET):
        rest = name[len(UNET) :]
        if ".temopral_conv." in rest:
            return "temporal_conv"
        if _TEMPORAL_ATTENTION.match(rest):
            return "temporal_attention"
        if rest.startswith("init_attn."):
            return "init_attention"
        if ".attn2.to_k_ip." in rest or ".attn2.to_v_ip." in rest:
            return "image_kv"
        return "spatial"
    for prefix, r in (
        ("image_proj_model.", "image_proj"),
        ("first_stage_model.encoder.", "vae_encoder"),
        ("first_stage_model.quant_conv.", "vae_encoder"),
        ("first_stage_model.decoder.", "vae_decoder"),
        ("first_stage_model.post_quant_conv.", "vae_post_quant"),
        ("cond_stage_model.", "clip_text"),
        ("embedder.", "clip_image"),
    ):
        if name.startswith(prefix):
            return r
    raise ValueError(f"parameter {name!r} has no role: not a ToonCrafter parameter name")


def set_trainable(model: nn.Module, roles: Iterable[str]) -> dict[str, nn.Parameter]:
    """requires_grad = (role in roles) for every parameter; -> the trainable parameters by name."""
    roles = set(roles)
    unknown = roles - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {list(ROLES)}")
    trainable = {}
    for name, p in model.named_parameters():
        p.requires_grad_(role(name) in roles)
        if p.requires_grad:
            trainable[name] = p
    return trainable


def role_table(
    model: nn.Module, extra: dict[str, nn.Module] | None = None
) -> list[tuple[str, int, int, bool]]:
    """(role, tensors, numel, trainable) per role present, in ROLES order; `extra` adds whole modules
    as roles of their own (e.g. {"sketch_encoder": encoder})."""
    rows: dict[str, list] = {}
    for name, p in model.named_parameters():
        row = rows.setdefault(role(name), [0, 0, set()])
        row[0] += 1
        row[1] += p.numel()
        row[2].add(p.requires_grad)
    for label, module in (extra or {}).items():
        params = list(module.parameters())
        rows[label] = [len(params), sum(p.numel() for p in params), {p.requires_grad for p in params}]
    order = [r for r in ROLES if r in rows] + [r for r in rows if r not in ROLES]
    out = []
    for r in order:
        tensors, numel, flags = rows[r]
        if len(flags) > 1:
            raise RuntimeError(f"role {r} is partly trainable: roles must be trained or frozen as a whole")
        out.append((r, tensors, numel, flags == {True}))
    return out


def format_role_table(rows: list[tuple[str, int, int, bool]]) -> str:
    """The table printed at the start of training."""
    lines = [f"{'role':<20}{'tensors':>9}{'parameters':>16}  trained"]
    for r, tensors, numel, trained in rows:
        lines.append(f"{r:<20}{tensors:>9}{numel:>16,}  {'yes' if trained else 'frozen'}")
    total = sum(n for _, _, n, _ in rows)
    trained = sum(n for _, _, n, t in rows if t)
    lines.append(f"{'total':<20}{sum(t for _, t, _, _ in rows):>9}{total:>16,}  {trained:,} trained")
    return "\n".join(lines)
