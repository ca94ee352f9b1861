"""VAE: reference parity (encode, reference features, the app's decodes), key layout of the released checkpoints,
chunked decoding, and the dual-reference decoder started from a plain decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from einops import rearrange

from training.models.vae import (
    VAE_PRESETS,
    AutoencoderKL,
    LatentPosterior,
    VAEConfig,
    dropped_frame_indices,
    replace_middle_frames,
    vae_config_from_reference,
)

TOL = 1e-4  # parity/README.md: single forward passes in float32


@pytest.fixture(scope="module")
def reference_vae(parity):
    spec, state_dict, inputs, outputs = parity("vae")
    model = AutoencoderKL(vae_config_from_reference(spec["constructor_kwargs"])).eval()
    model.load_state_dict(state_dict, strict=True)
    return model, inputs, outputs


def _max_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return float((ours - theirs).abs().max())


def test_config_from_reference_kwargs_is_the_tiny_preset(parity):
    spec, *_ = parity("vae")
    cfg = vae_config_from_reference(spec["constructor_kwargs"])
    assert cfg == VAE_PRESETS["tiny"]
    assert spec["scale_factor"] == cfg.scale_factor
    assert not vae_config_from_reference(spec["constructor_kwargs"], dual_ref=False).dual_ref


@torch.no_grad()
def test_encode_matches_the_reference(reference_vae):
    model, inputs, outputs = reference_vae
    video = inputs["video"]  # [1, 3, 6, 32, 32]
    posterior, hidden = model.encode(rearrange(video, "b c t h w -> (b t) c h w"), return_hidden_states=True)
    assert _max_err(posterior.moments, outputs["enc_moments"]) < TOL
    assert _max_err(posterior.mean, outputs["enc_mean"]) < TOL
    assert _max_err(posterior.logvar, outputs["enc_logvar"]) < TOL
    assert len(hidden) == 5

    video_posterior, refs = model.encode_video(video)
    assert _max_err(model.config.scale_factor * video_posterior.mean, outputs["z_mean_scaled"]) < TOL
    assert len(refs) == 5
    for i, ref in enumerate(refs):
        assert _max_err(ref, outputs[f"ref_context.{i}"]) < TOL, f"ref_context.{i}"


@torch.no_grad()
def test_channels_last_encoder_matches_the_reference_with_every_conv_reading_nhwc(parity):
    """set_channels_last on the VAE: the encoder's activations are stored channels-last (every
    convolution reads them so), the moments are the reference's and come out plain contiguous."""
    from torch import nn

    from training.models.layout import set_channels_last

    spec, state_dict, inputs, outputs = parity("vae")
    model = AutoencoderKL(vae_config_from_reference(spec["constructor_kwargs"])).eval()
    model.load_state_dict(state_dict, strict=True)
    set_channels_last(model)
    layouts = []
    for m in model.encoder.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(
                lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last))
            )
    frames = rearrange(inputs["video"], "b c t h w -> (b t) c h w")
    posterior = model.encode(frames)
    assert layouts and all(layouts)
    assert posterior.moments.is_contiguous() and _max_err(posterior.moments, outputs["enc_moments"]) < TOL


@torch.no_grad()
def test_decode_paths_match_the_reference(reference_vae):
    model, inputs, outputs = reference_vae
    refs = [outputs[f"ref_context.{i}"] for i in range(5)]
    z = inputs["z"]  # diffusion-space latents [1, 4, 6, 4, 4]
    t = z.shape[2]
    full = model.decode_video(z, refs)
    assert _max_err(full, outputs["dec_full"]) < TOL
    dropped = model.decode_video(z[:, :, dropped_frame_indices(t)], refs)
    assert _max_err(dropped, outputs["dec_dropped"]) < TOL
    assert _max_err(replace_middle_frames(full, dropped), outputs["dec_final"]) < TOL
    assert _max_err(model.decode_inbetween(z, refs), outputs["dec_final"]) < TOL
    assert _max_err(model.decode_video(z, None), outputs["dec_no_ref"]) < TOL

    # the reference-shaped call: frames as batch items, unscaled latents, timesteps = frames per clip
    flat = rearrange(z, "b c t h w -> (b t) c h w") / model.config.scale_factor
    dec = rearrange(model.decode(flat, refs, timesteps=t), "(b t) c h w -> b c t h w", t=t)
    assert _max_err(dec, outputs["dec_full"]) < TOL


def test_post_quant_conv_is_skipped_on_the_dual_reference_path(reference_vae):
    model, inputs, _ = reference_vae
    z = rearrange(inputs["z"], "b c t h w -> (b t) c h w")
    with torch.no_grad():
        direct = model.decoder(z, None, timesteps=6)
        assert torch.equal(model.decode(z, timesteps=6), direct)
        assert not torch.allclose(
            model.decode(z, timesteps=6), model.decoder(model.post_quant_conv(z), None, 6)
        )


def test_posterior_clamps_logvar_and_samples_with_cpu_noise():
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    moments[:, 4:] *= 40  # some logvars beyond [-30, 20]
    posterior = LatentPosterior(moments)
    assert posterior.logvar.min() >= -30 and posterior.logvar.max() <= 20
    assert torch.equal(posterior.mode(), moments[:, :4])
    sample = posterior.sample(generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample, posterior.mean + posterior.std * noise)


def test_middle_frame_replacement_indices():
    assert dropped_frame_indices(16) == [0, *range(2, 14), 15]
    full = torch.arange(16.0).view(1, 1, 16, 1, 1)
    dropped = 100 + full[:, :, dropped_frame_indices(16)]
    out = replace_middle_frames(full, dropped).flatten().tolist()
    assert out[7:9] == [107.0, 108.0]  # frames 7 and 8: the same latents, decoded among other neighbours
    assert out[:7] == list(range(7)) and out[9:] == list(range(9, 16))


@torch.no_grad()
def test_frame_chunks_give_the_full_result(reference_vae):
    model, inputs, outputs = reference_vae
    refs = [outputs[f"ref_context.{i}"] for i in range(5)]
    z = inputs["z"]
    full = model.decode_video(z, refs)
    for chunk in (1, 4):
        torch.testing.assert_close(model.decode_video(z, refs, frame_chunk=chunk), full, atol=1e-5, rtol=0)
    flat = rearrange(inputs["video"], "b c t h w -> (b t) c h w")
    posterior, hidden = model.encode(flat, return_hidden_states=True)
    posterior2, hidden2 = model.encode(flat, return_hidden_states=True, frame_chunk=4)
    torch.testing.assert_close(posterior2.moments, posterior.moments, atol=1e-5, rtol=0)
    for a, b in zip(hidden, hidden2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_clip_length_splits_frames_into_independent_clips(reference_vae):
    model, inputs, outputs = reference_vae
    refs = [outputs[f"ref_context.{i}"] for i in range(5)]
    z = inputs["z"]
    split = model.decode_video(z, refs, clip_length=3)
    halves = torch.cat([model.decode_video(z[:, :, :3], refs), model.decode_video(z[:, :, 3:], refs)], dim=2)
    torch.testing.assert_close(split, halves, atol=1e-6, rtol=0)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim < 2 else p[0].numel() ** -0.5))


@torch.no_grad()
def test_dual_ref_decoder_initialised_from_a_plain_one_decodes_like_it():
    cfg = VAE_PRESETS["tiny"]
    plain = AutoencoderKL(VAEConfig(**{**cfg.__dict__, "dual_ref": False})).eval()
    _randomise(plain, 1)
    dual = AutoencoderKL(cfg).eval()
    _randomise(dual, 2)  # whatever the added layers held before, the init must switch them off
    added = dual.init_dual_ref_from_plain(plain.state_dict())
    assert added and all(
        ".time_stack." in k or k.endswith(".mix_factor") or ".time_mix_conv." in k or ".attn_refinement." in k
        for k in added
    )
    assert all(k.startswith("decoder.") for k in added)

    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, 5, 32, 32, generator=g)
    _, refs = dual.encode_video(video)  # encoder weights are the plain ones: real features, not zeros
    z = torch.randn(10, 4, 4, 4, generator=g)
    expected = plain.decoder(z)
    torch.testing.assert_close(dual.decoder(z, refs, timesteps=5), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(dual.decoder(z, None, timesteps=5), expected, atol=1e-6, rtol=0)
    # decode() differs from the plain one only by the reference's post_quant_conv skip ...
    torch.testing.assert_close(
        dual.decode(plain.post_quant_conv(z), refs, timesteps=5), plain.decode(z), atol=1e-6, rtol=0
    )
    # ... which video_post_quant_conv turns off
    dual_pq = AutoencoderKL(VAEConfig(**{**cfg.__dict__, "video_post_quant_conv": True})).eval()
    dual_pq.init_dual_ref_from_plain(plain.state_dict())
    torch.testing.assert_close(dual_pq.decode(z, refs, timesteps=5), plain.decode(z), atol=1e-6, rtol=0)
    # the temporal branch still receives gradients: mix_factor leaves it half on (sigmoid(0) = 0.5)
    assert all(float(m) == 0.0 for n, m in dual.named_parameters() if n.endswith("mix_factor"))


def _reference_keys(path: Path) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        if key.startswith("first_stage_model."):
            keys[key.removeprefix("first_stage_model.")] = tuple(int(s) for s in shape.split(",") if s)
    return keys


@pytest.mark.parametrize(
    ("tsv", "dual_ref"), [("tooncrafter_512.tsv", True), ("dynamicrafter_512_interp.tsv", False)]
)
def test_toon512_keys_and_shapes_equal_the_released_checkpoints(shared_reference, tsv, dual_ref):
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig(**{**VAE_PRESETS["toon-512"].__dict__, "dual_ref": dual_ref}))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _reference_keys(shared_reference / "state_dict" / tsv)
