"""inference/sampler.py pieces that the end-to-end interpolate tests do not reach on a CPU."""

from __future__ import annotations

import pytest
import torch


def test_host_resident_weights_visit_a_device_and_come_back_without_a_copy():
    from torch import nn

    from inference.sampler import HostResident

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(2, 4)
    expected = net(x)

    def tensors():
        return [*net.parameters(), *net.buffers()]

    host = tensors()
    resident = HostResident([net], pin=False)
    with resident.visit(torch.device("meta")):
        assert len(tensors()) == len(host) == 7 and all(t.device.type == "meta" for t in tensors())
        assert net(x.to("meta")).device.type == "meta"
    assert all(a is b for a, b in zip(tensors(), host, strict=True))  # the host tensors: nothing copied back
    assert torch.equal(net(x), expected)
    with pytest.raises(RuntimeError, match="encoder"), resident.visit(torch.device("meta")):
        raise RuntimeError("an encoder failed")
    assert all(a is b for a, b in zip(tensors(), host, strict=True))  # back on the host after an error too


def test_compile_covers_the_unet_and_each_residual_block_of_the_decoder():
    from inference.sampler import InferenceModel
    from training.models.tooncrafter import build_tooncrafter
    from training.models.vae import resnet_blocks

    model = build_tooncrafter("tiny")
    eager = InferenceModel(model, "cpu", torch.float32)
    decoder_blocks = resnet_blocks(model.first_stage_model.decoder)
    assert eager.unet is model.unet and all(b._compiled_call_impl is None for b in decoder_blocks)
    compiled = InferenceModel(model, "cpu", torch.float32, compile=True)  # compiles lazily, on first call
    assert compiled.unet is not model.unet
    assert len(decoder_blocks) >= 4 and all(b._compiled_call_impl is not None for b in decoder_blocks)
    assert all(b._compiled_call_impl is None for b in resnet_blocks(model.first_stage_model.encoder))


def test_clip_towers_can_be_kept_on_the_device_from_a_given_sample_on():
    """keep_clip_on_device: the towers move once and later samples skip the visit (the meta device stands
    in for a GPU)."""
    from inference.sampler import InferenceModel
    from training.models.tooncrafter import build_tooncrafter

    im = InferenceModel(build_tooncrafter("tiny"), "cpu", torch.float32)
    towers = im._towers()
    assert towers, "the tiny preset builds CLIP towers"
    im.device, im.offload_clip = torch.device("meta"), True  # as if placed on a GPU with visiting towers
    im.keep_clip_on_device()
    assert not im.offload_clip
    assert all(p.device.type == "meta" for tower in towers for p in tower.parameters())
    with im.clip_on_device():  # no visit: the towers are already there, and stay
        assert all(p.device.type == "meta" for tower in towers for p in tower.parameters())
    assert all(p.device.type == "meta" for tower in towers for p in tower.parameters())


def test_clip_towers_stay_on_a_large_card_and_visit_a_small_one(monkeypatch):
    """offload_clip=None (interpolate's default): resident on a CUDA card of >= 24 GiB, visiting from host
    memory on a smaller one; never moved on the CPU."""
    from types import SimpleNamespace

    from inference import sampler

    def card(gib):
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib * 2**30)
        )

    card(80)
    assert sampler.offload_clip_by_default(torch.device("cuda", 0)) is False
    card(16)
    assert sampler.offload_clip_by_default(torch.device("cuda", 0)) is True
    card(sampler.CLIP_RESIDENT_MIN_GIB)
    assert sampler.offload_clip_by_default(torch.device("cuda")) is False
    assert sampler.offload_clip_by_default(torch.device("cpu")) is False


def test_clip_placement_flags_exclude_each_other(capsys):
    from inference.interpolate import build_parser

    parser = build_parser()
    assert parser.parse_args(["a.png", "b.png", "--offload-clip"]).offload_clip
    with pytest.raises(SystemExit):
        parser.parse_args(["a.png", "b.png", "--offload-clip", "--keep-clip-on-device"])
    assert "not allowed with" in capsys.readouterr().err


def test_the_step_noise_drawn_in_a_thread_is_the_seeded_stream_after_x_t():
    """sample_latents draws x_T, then all the steps' noise in one go from the same CPU generator (the latter
    in a thread while the first step runs): a run equals sample_ddim given those draws by hand."""
    from inference.sampler import InferenceModel, SamplerSettings, _model_fn, sample_latents
    from training.diffusion.ddim import sample_ddim, uniform_trailing_timesteps
    from training.models.tooncrafter import build_tooncrafter

    im = InferenceModel(build_tooncrafter("tiny"), "cpu", torch.float32)
    settings = SamplerSettings(steps=3, frames=4, cfg=1.0)  # one branch: the denoiser is the model itself
    cfg = im.model.cfg
    c_concat = torch.randn(1, 4, 4, 4, 8)
    context = torch.randn(1, cfg.unet.text_tokens + 4 * cfg.unet.image_tokens_per_frame, cfg.unet.context_dim)
    got = sample_latents(
        im, c_concat, context, context, settings, torch.Generator().manual_seed(7), progress=False
    )

    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(c_concat.shape, generator=g)
    noises = torch.randn((3, *c_concat.shape), generator=g)
    fs = torch.full((1,), settings.fs, dtype=torch.long)
    cond = {"c_concat": c_concat, "c_crossattn": context, "fs": fs, "hint": None, "sketch_mask": None}
    model_fn = _model_fn(im, settings)
    steps = uniform_trailing_timesteps(3, len(im.schedule["alphas_cumprod"]))
    with torch.no_grad():
        want = sample_ddim(
            lambda x, t: model_fn(x, t, cond),
            x_t,
            steps,
            im.schedule,
            eta=1.0,
            dynamic_rescale=True,
            noises=noises,
        )
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_channels_last_unet_samples_the_same_latents():
    """interpolate --channels-last: the UNet's activations stored channels-last change no number of
    a sample (a few DDIM steps with guidance, both branches through the shared-input call)."""
    from inference.sampler import InferenceModel, SamplerSettings, sample_latents
    from training.models.tooncrafter import build_tooncrafter

    latents = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_tooncrafter("tiny")
        with torch.no_grad():
            for p in model.unet.parameters():  # a fresh UNet zeroes its residual branches' last layers
                p.normal_(0.0, 0.05)
        im = InferenceModel(model, "cpu", torch.float32, channels_last=channels_last)
        assert im.channels_last is channels_last and model.unet.channels_last is channels_last
        cfg = model.cfg
        g = torch.Generator().manual_seed(3)
        c_concat = torch.randn(1, 4, 4, 4, 8, generator=g)
        shape = (1, cfg.unet.text_tokens + 4 * cfg.unet.image_tokens_per_frame, cfg.unet.context_dim)
        context, uncond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        settings = SamplerSettings(steps=3, frames=4)
        latents.append(
            sample_latents(
                im, c_concat, context, uncond, settings, torch.Generator().manual_seed(7), progress=False
            )
        )
    assert latents[0].abs().mean() > 0.1
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)
