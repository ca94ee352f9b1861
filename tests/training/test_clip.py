"""OpenCLIP towers: open_clip's key names (2.22 layout) with the installed open_clip, and what they output."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from training.models.clip import CLIP_PRESETS, CLIPImageEncoder, CLIPTextEncoder, antialiased_resize


def _reference_layout(shared_reference: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    rows = (shared_reference / "state_dict" / "tooncrafter_512.tsv").read_text().splitlines()[1:]
    layout = {}
    for row in rows:
        key, shape, *_ = row.split("\t")
        if key.startswith(prefix):
            layout[key.removeprefix(prefix)] = tuple(int(n) for n in shape.split(",")) if shape else ()
    return layout


def test_vit_h_14_towers_keep_the_open_clip_2_22_key_names(shared_reference):
    with torch.device("meta"):
        towers = {
            "cond_stage_model.": CLIPTextEncoder(CLIP_PRESETS["toon-512"]),
            "embedder.": CLIPImageEncoder(CLIP_PRESETS["toon-512"]),
        }
    for prefix, tower in towers.items():
        expected = _reference_layout(shared_reference, prefix)
        ours = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
        renamed = sorted(set(expected) ^ set(ours))
        assert not renamed, (
            f"open_clip {open_clip.__version__} names {prefix} tensors differently from the 2.22 layout: "
            f"{renamed[:10]}; training/checkpoint.py must map them"
        )
        assert ours == expected
    counts = {prefix: sum(p.numel() for p in t.parameters()) for prefix, t in towers.items()}
    assert counts == {"cond_stage_model.": 354_032_641, "embedder.": 683_800_065}  # MODEL.md 1.2


def test_text_tokens_come_from_the_penultimate_layer_after_ln_final():
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(CLIP_PRESETS["tiny"]).eval()
    prompts = ["an anime scene", ""]
    with torch.no_grad():
        z = encoder.encode(prompts)
        assert z.shape == (2, 77, 32)
        for p in encoder.model.transformer.resblocks[-1].parameters():
            p.add_(1.0)  # the last block is stored but not run
        assert torch.equal(encoder.encode(prompts), z)
        encoder.model.ln_final.bias.add_(1.0)
        assert not torch.allclose(encoder.encode(prompts), z)


def test_image_tokens_are_all_tokens_before_ln_post():
    torch.manual_seed(0)
    encoder = CLIPImageEncoder(CLIP_PRESETS["tiny"]).eval()
    images = torch.rand(2, 3, 40, 64) * 2 - 1
    with torch.no_grad():
        tokens = encoder(images)
        assert tokens.shape == (2, 1 + (28 // 14) ** 2, 80)
        encoder.model.visual.ln_post.bias.add_(1.0)
        encoder.model.visual.proj.add_(1.0)
        assert torch.equal(encoder(images), tokens)
    assert "mean" not in encoder.state_dict() and "std" not in encoder.state_dict()


def test_preprocessing_squashes_to_the_tower_size_and_normalises():
    encoder = CLIPImageEncoder(CLIP_PRESETS["tiny"])
    grey = torch.zeros(1, 3, 320, 512)  # 0 in [-1, 1] = mid grey, the unconditional image
    x = encoder.preprocess(grey)
    assert x.shape == (1, 3, 28, 28)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand_as(x))


def test_antialiased_resize_blurs_only_when_shrinking():
    x = torch.rand(1, 3, 32, 48)
    up = antialiased_resize(x, (64, 96))
    torch.testing.assert_close(up, F.interpolate(x, size=(64, 96), mode="bicubic", align_corners=True))
    down = antialiased_resize(x, (16, 16))
    plain = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=True)
    assert down.shape == plain.shape and down.std() < plain.std()  # the pre-blur removes aliasing energy
