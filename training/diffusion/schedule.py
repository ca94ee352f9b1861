"""Noise schedule, v-prediction and the training target of ToonCrafter / DynamiCrafter.

Notation (Ho et al. 2020, "DDPM"): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t = prod_{s<=t} (1 - beta_s),
with t = 0..T-1 (index 0 is the first noising step). The reference model registers 13 schedule tensors as
persistent root buffers of its state dict (MODEL.md 1.2); `schedule_buffers` returns exactly those, in float32,
computed the reference's way (float64 first, then one cast), so a strict load of a released checkpoint sees the
same values. The dynamic latent rescale `scale_arr` (MODEL.md 2.5) shrinks clean latents by up to `base_scale`
during training; DDIM undoes it step by step (see ddim.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ScheduleConfig:
    num_timesteps: int = 1000  # T, number of training noise levels
    linear_start: float = 0.00085  # beta_0 of the scaled-linear schedule
    linear_end: float = 0.012  # beta_{T-1} of the scaled-linear schedule (before the zero-SNR rescale)
    zero_terminal_snr: bool = True  # rescale betas so that abar_{T-1} = 0 (Lin et al. 2023, Alg. 1)
    parameterization: str = "v"  # what the network predicts: "v" (ToonCrafter) or "eps"
    v_posterior: float = (
        0.0  # weight of beta_t in the posterior variance (DDPM's sigma_t^2 choice); 0 = beta-tilde
    )
    dynamic_rescale: bool = True  # multiply x0 by scale_arr[t] before noising (and undo it in DDIM)
    base_scale: float = 0.7  # scale_arr value from turning_step on
    turning_step: int = 400  # scale_arr goes linearly from 1.0 to base_scale over this many steps


# The schedule does not depend on network size: the tiny parity fixtures use the full 1000-step schedule too.
SCHEDULE_PRESETS: dict[str, ScheduleConfig] = {
    "tiny": ScheduleConfig(),
    "toon-512": ScheduleConfig(),
}

# Persistent root buffers of the reference LatentVisualDiffusion, in registration order.
SCHEDULE_BUFFER_NAMES: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "scale_arr",
)


def scaled_linear_betas(num_timesteps: int, linear_start: float, linear_end: float) -> Tensor:
    """betas = linspace(sqrt(beta_0), sqrt(beta_end), T)^2 in float64 (the LDM "linear" schedule)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.

    Shift sqrt(abar) so that its last value is 0 and rescale it so that its first value is unchanged.
    """
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def dynamic_rescale_arr(num_timesteps: int, base_scale: float, turning_step: int) -> Tensor:
    """scale_arr = [linspace(1, base_scale, turning_step), base_scale x T], float64, length T + turning_step.

    The reference builds it with numpy; numpy's linspace is kept so the float32 cast matches bit for bit.
    """
    ramp = np.linspace(1.0, base_scale, turning_step)
    return torch.from_numpy(np.concatenate([ramp, np.full(num_timesteps, base_scale)]))


def schedule_float64(cfg: ScheduleConfig) -> dict[str, Tensor]:
    """The float64 intermediates: betas (after the optional rescale), alphas_cumprod, alphas_cumprod_prev."""
    betas = scaled_linear_betas(cfg.num_timesteps, cfg.linear_start, cfg.linear_end)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return {"betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev}


def schedule_buffers(cfg: ScheduleConfig) -> dict[str, Tensor]:
    """The 13 persistent schedule buffers (float32, [T]; scale_arr [T + turning_step]), named as in the reference.

    With v-parameterisation the reference registers `sqrt_recip_alphas_cumprod` and `sqrt_recipm1_alphas_cumprod`
    as zeros (they would be infinite at abar = 0); they are kept as zeros for strict loading. The posterior
    q(x_{t-1} | x_t, x0) terms follow DDPM eq. 7. Without dynamic rescale the reference has no `scale_arr`
    buffer; it is returned anyway (all ones) so samplers need no special case, and callers that save a
    state dict drop it when `cfg.dynamic_rescale` is False.
    """
    f64 = schedule_float64(cfg)
    betas, abar, abar_prev = f64["betas"], f64["alphas_cumprod"], f64["alphas_cumprod_prev"]
    alphas = 1.0 - betas
    post_var = (1 - cfg.v_posterior) * betas * (1.0 - abar_prev) / (1.0 - abar) + cfg.v_posterior * betas
    if cfg.parameterization == "v":
        recip, recipm1 = torch.zeros_like(abar), torch.zeros_like(abar)
    else:
        recip, recipm1 = (1.0 / abar).sqrt(), (1.0 / abar - 1).sqrt()
    if cfg.dynamic_rescale:
        scale_arr = dynamic_rescale_arr(cfg.num_timesteps, cfg.base_scale, cfg.turning_step)
    else:
        scale_arr = torch.ones(cfg.num_timesteps, dtype=torch.float64)
    out64 = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - abar).log(),
        "sqrt_recip_alphas_cumprod": recip,
        "sqrt_recipm1_alphas_cumprod": recipm1,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        "scale_arr": scale_arr,
    }
    return {name: out64[name].to(torch.float32) for name in SCHEDULE_BUFFER_NAMES}


# --- v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D) -------------------


def extract(buffer: Tensor, t: Tensor, ndim: int) -> Tensor:
    """buffer[t] shaped [b, 1, ..., 1] to broadcast over a [b, ...] tensor of `ndim` dims."""
    return buffer.to(t.device)[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, sched: Mapping[str, Tensor]) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    a = extract(sched["sqrt_alphas_cumprod"], t, x0.ndim)
    s = extract(sched["sqrt_one_minus_alphas_cumprod"], t, x0.ndim)
    return a * x0 + s * noise


def v_target(x0: Tensor, noise: Tensor, t: Tensor, sched: Mapping[str, Tensor]) -> Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    a = extract(sched["sqrt_alphas_cumprod"], t, x0.ndim)
    s = extract(sched["sqrt_one_minus_alphas_cumprod"], t, x0.ndim)
    return a * noise - s * x0


def x0_from_v(x_t: Tensor, v: Tensor, t: Tensor, sched: Mapping[str, Tensor]) -> Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    a = extract(sched["sqrt_alphas_cumprod"], t, x_t.ndim)
    s = extract(sched["sqrt_one_minus_alphas_cumprod"], t, x_t.ndim)
    return a * x_t - s * v


def eps_from_v(x_t: Tensor, v: Tensor, t: Tensor, sched: Mapping[str, Tensor]) -> Tensor:
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    a = extract(sched["sqrt_alphas_cumprod"], t, x_t.ndim)
    s = extract(sched["sqrt_one_minus_alphas_cumprod"], t, x_t.ndim)
    return a * v + s * x_t


# --- training ------------------------------------------------------------------------------------------------


def training_pair(
    x0: Tensor, t: Tensor, noise: Tensor, sched: Mapping[str, Tensor], cfg: ScheduleConfig
) -> tuple[Tensor, Tensor]:
    """(network input x_t, regression target) for clean latents x0 [b, ...] at timesteps t [b].

    With dynamic rescale the clean latent is first shrunk to x0 * scale_arr[t] (MODEL.md 2.5); the target is v
    (or eps) of that shrunk latent, as in the reference's LatentDiffusion.forward / p_losses.
    """
    if cfg.dynamic_rescale:
        x0 = x0 * extract(sched["scale_arr"], t, x0.ndim)
    x_t = q_sample(x0, t, noise, sched)
    target = v_target(x0, noise, t, sched) if cfg.parameterization == "v" else noise
    return x_t, target


def diffusion_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MSE averaged over every non-batch dim, then over the batch (logvar = 0, no ELBO term: MODEL.md 2.8)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return per_sample.mean()
