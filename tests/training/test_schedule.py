"""Noise schedule: the reference's 13 buffers and DDIM-50 parameters, v-prediction identities, training target."""

from __future__ import annotations

import torch

from training.diffusion.ddim import ddim_params, uniform_timesteps, uniform_trailing_timesteps
from training.diffusion.schedule import (
    SCHEDULE_BUFFER_NAMES,
    SCHEDULE_PRESETS,
    ScheduleConfig,
    diffusion_loss,
    eps_from_v,
    q_sample,
    schedule_buffers,
    schedule_float64,
    training_pair,
    v_target,
    x0_from_v,
)

REL = 1e-6  # parity/README.md: float schedule buffers within 1e-6 relative


def _assert_close_rel(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    assert ours.shape == theirs.shape, name
    assert ours.dtype == theirs.dtype, name
    err = (ours.double() - theirs.double()).abs()
    assert bool((err <= REL * theirs.double().abs() + 1e-30).all()), f"{name}: max abs err {err.max():.3g}"


def test_config_values_are_the_fixture_config(parity):
    spec, *_ = parity("schedule")
    cv = spec["config_values"]
    cfg = SCHEDULE_PRESETS["toon-512"]
    assert (cfg.linear_start, cfg.linear_end, cfg.num_timesteps) == (
        cv["linear_start"],
        cv["linear_end"],
        cv["timesteps"],
    )
    assert (
        cfg.zero_terminal_snr == cv["rescale_betas_zero_snr"]
        and cfg.parameterization == cv["parameterization"]
    )
    assert cfg.dynamic_rescale == cv["use_dynamic_rescale"] and cfg.base_scale == cv["base_scale"]
    assert cfg.turning_step == 400


def test_the_13_buffers_match_the_reference(parity):
    _, _, _, outputs = parity("schedule")
    buffers = schedule_buffers(ScheduleConfig())
    assert tuple(buffers) == SCHEDULE_BUFFER_NAMES and len(buffers) == 13
    for name, value in buffers.items():
        _assert_close_rel(value, outputs[name], name)
    assert buffers["alphas_cumprod"][-1] == 0 and buffers["betas"][-1] == 1  # zero terminal SNR
    assert buffers["scale_arr"].shape == (1400,)


def test_float64_intermediates_match_the_reference(parity):
    _, _, _, outputs = parity("schedule")
    f64 = schedule_float64(ScheduleConfig())
    for name in ("betas", "alphas_cumprod"):
        torch.testing.assert_close(f64[name], outputs[f"float64.{name}"], rtol=1e-12, atol=1e-15)


def test_ddim50_trailing_parameters_match_the_reference(parity):
    _, _, _, outputs = parity("schedule")
    buffers = schedule_buffers(ScheduleConfig())
    ts = uniform_trailing_timesteps(50)
    assert torch.equal(ts, outputs["ddim50_trailing.timesteps"])  # [19, 39, ..., 999]
    params = ddim_params(ts, buffers["alphas_cumprod"], eta=1.0, scale_arr=buffers["scale_arr"])
    prefix = "ddim50_trailing_eta1.ddim_"
    pairs = {
        "alphas": params.alphas,
        "alphas_prev": params.alphas_prev,
        "sigmas": params.sigmas,
        "sqrt_one_minus_alphas": params.sqrt_one_minus_alphas,
        "scale_arr": params.scale,
        "scale_arr_prev": params.scale_prev,
    }
    for name, value in pairs.items():
        _assert_close_rel(value, outputs[prefix + name], name)


def test_timestep_spacings():
    assert uniform_trailing_timesteps(5).tolist() == [199, 399, 599, 799, 999]
    assert uniform_timesteps(50)[:3].tolist() == [1, 21, 41] and uniform_timesteps(50)[-1] == 981


def test_v_prediction_identities():
    sched = schedule_buffers(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = q_sample(x0, t, eps, sched)
    v = v_target(x0, eps, t, sched)
    torch.testing.assert_close(x0_from_v(x_t, v, t, sched), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_from_v(x_t, v, t, sched), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(v[2], -x0[2])  # abar = 0 at t = 999: x_t is pure noise and v = -x0


def test_training_pair_shrinks_x0_by_scale_arr():
    cfg = ScheduleConfig()
    sched = schedule_buffers(cfg)
    x0, eps = torch.ones(2, 4, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2)
    t = torch.tensor([0, 900])
    x_t, target = training_pair(x0, t, eps, sched, cfg)
    scale = torch.tensor([1.0, 0.7])
    expected_x0 = scale.view(2, 1, 1, 1, 1) * x0
    torch.testing.assert_close(x_t, q_sample(expected_x0, t, eps, sched))
    torch.testing.assert_close(target, v_target(expected_x0, eps, t, sched))
    no_rescale = ScheduleConfig(dynamic_rescale=False)
    x_t2, _ = training_pair(x0, t, eps, schedule_buffers(no_rescale), no_rescale)
    torch.testing.assert_close(x_t2, q_sample(x0, t, eps, sched))
    assert diffusion_loss(target, target) == 0
