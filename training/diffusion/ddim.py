"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) for a v-prediction model.

Small functions over (denoiser, x, timesteps): the denoiser is any callable `(x_t [b, ...], t [b]) -> v`; it may
wrap classifier-free guidance (guidance.py) but the sampler does not know. Schedule tensors come from
`schedule.schedule_buffers` (or the model's registered buffers) as a name -> tensor mapping.

Reference behaviour reproduced (MODEL.md 2.6):
* `uniform_trailing` timesteps, e.g. 50 steps -> [19, 39, ..., 999]; abar_prev of the last step is abar[0], not 1;
* sigma_i = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)) (eq. 16);
* dynamic latent rescale: pred_x0 *= scale_arr[tau_{i-1}] / scale_arr[tau_i], undoing the training-time
  shrink x0 * scale_arr[t] one step at a time;
* the sampling parameters are computed in float64 from the float32 abar buffer and cast to float32 per step,
  as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.diffusion.schedule import eps_from_v, x0_from_v

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t [b, ...], t [b] long) -> model output (v)


def uniform_trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """Ascending DDIM timesteps ending at T-1 (Lin et al. 2023, sec. 3.3 "trailing"): round(arange(T, 0, -T/S)) - 1."""
    c = num_train_timesteps / num_steps
    steps = np.flip(np.round(np.arange(num_train_timesteps, 0, -c))).astype(np.int64) - 1
    return torch.from_numpy(steps.copy())


def uniform_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """Ascending DDIM timesteps of the original "uniform" spacing: range(0, T, T // S) + 1."""
    c = num_train_timesteps // num_steps
    return torch.arange(0, num_train_timesteps, c, dtype=torch.int64) + 1


@dataclass(frozen=True)
class DDIMParams:
    """Per-step DDIM coefficients, indexed by the position i in the ASCENDING timesteps (sampling runs i = S-1..0)."""

    timesteps: Tensor  # [S] int64, ascending
    alphas: Tensor  # [S] float32: abar[tau_i]
    alphas_prev: Tensor  # [S] float64: abar[0] then abar[tau_{i-1}]
    sigmas: Tensor  # [S] float64: eq. 16 scaled by eta
    sqrt_one_minus_alphas: Tensor  # [S] float32
    scale: Tensor  # [S] float32: scale_arr[tau_i] (ones without dynamic rescale)
    scale_prev: Tensor  # [S] float32: scale_arr[tau_{i-1}], the first one repeated


def ddim_params(
    timesteps: Tensor, alphas_cumprod: Tensor, eta: float, scale_arr: Tensor | None = None
) -> DDIMParams:
    """DDIM coefficients for ascending `timesteps` from the float32 abar buffer (and scale_arr, if rescaling)."""
    ts = timesteps.cpu().long()
    abar = alphas_cumprod.detach().cpu().float()
    alphas = abar[ts]
    alphas_prev = torch.cat([abar[:1], abar[ts[:-1]]]).double()
    # the reference divides a float64 array by a float32 tensor, which torch evaluates as
    # (float32 reciprocal) * float64; kept so the sigmas match to the last bit
    inv_one_minus = (1 - alphas).reciprocal().double()
    sigmas = eta * ((1 - alphas_prev) * inv_one_minus * (1 - alphas.double() / alphas_prev)).sqrt()
    scale = scale_arr.detach().cpu().float()[ts] if scale_arr is not None else torch.ones(len(ts))
    scale_prev = torch.cat([scale[:1], scale[:-1]])
    sqrt_one_minus = torch.from_numpy(
        np.sqrt((1.0 - alphas).numpy())
    )  # numpy's float32 sqrt, as the reference
    return DDIMParams(ts, alphas, alphas_prev, sigmas, sqrt_one_minus, scale, scale_prev)


@dataclass(frozen=True)
class StepCoefficients:
    """ddim_step's per-step scalars, [S] each, indexed like DDIMParams: computed on the CPU in float32 as the
    reference computes them per step, then moved to the sampling device once. A CPU scalar copied to a GPU
    inside the loop makes the host wait for the device every step (a copy from pageable memory synchronises),
    so the next step's launches could not overlap the current step's kernels."""

    x0_scale: Tensor  # scale_arr[tau_{i-1}] / scale_arr[tau_i]: the dynamic rescale (1 when off)
    sqrt_alpha_prev: Tensor  # sqrt(abar_prev)
    dir_coef: Tensor  # sqrt(1 - abar_prev - sigma^2)
    sigma: Tensor
    noisy: tuple[bool, ...]  # sigma > 0, known on the host


def step_coefficients(params: DDIMParams, device: torch.device | str, dtype: torch.dtype) -> StepCoefficients:
    a_prev = params.alphas_prev.to(torch.float32)
    sigma = params.sigmas.to(torch.float32)
    # clamp: with eta = 1 and abar_t = 0 the direction term is 1 - a - (1 - a) = +-1 ulp
    dir_coef = (1.0 - a_prev - sigma**2).clamp(min=0).sqrt()
    x0_scale = params.scale_prev / params.scale
    return StepCoefficients(
        *(v.to(device, dtype) for v in (x0_scale, a_prev.sqrt(), dir_coef, sigma)),
        noisy=tuple(bool(v > 0) for v in sigma),
    )


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    t: Tensor,
    i: int,
    params: DDIMParams,
    sched: Mapping[str, Tensor],
    noise: Tensor | None = None,
    coef: StepCoefficients | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update from x_{tau_i} with the network's v prediction -> (x_{tau_{i-1}}, pred_x0).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (Song et al. eq. 12).
    `coef`: step_coefficients(params, x.device, x.dtype), computed once per sampling run.
    """
    coef = coef or step_coefficients(params, x.device, x.dtype)
    eps = eps_from_v(x, model_output, t, sched)
    pred_x0 = x0_from_v(x, model_output, t, sched) * coef.x0_scale[i]
    x_prev = coef.sqrt_alpha_prev[i] * pred_x0 + coef.dir_coef[i] * eps
    if noise is not None and coef.noisy[i]:
        x_prev = x_prev + coef.sigma[i] * noise
    return x_prev, pred_x0


@dataclass
class StepInfo:
    """What the progress callback receives after each step."""

    i: int  # step number in sampling order, 0..S-1
    total: int  # S
    t: int  # the timestep just denoised
    x_prev: Tensor  # latent after the step
    pred_x0: Tensor  # the (rescaled) clean-latent estimate of this step


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    sched: Mapping[str, Tensor],
    *,
    eta: float = 1.0,
    dynamic_rescale: bool = True,
    noises: Sequence[Tensor] | Tensor | Future | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run DDIM from x = x_T over ascending `timesteps` (sampled from the last to the first) and return x_0.

    noises: optional per-step Gaussian draws in sampling order ([S, *x.shape] or a sequence of S tensors),
    e.g. to replay a reference run, or a Future of the [S, *x.shape] tensor (still being drawn elsewhere;
    waited for once the first step's network call is launched); otherwise, when eta > 0, they are drawn
    with `generator` (on x's device).
    dynamic_rescale: undo the training-time x0 shrink with sched["scale_arr"] (ignored when the mapping has none).
    """
    params = ddim_params(
        timesteps, sched["alphas_cumprod"], eta, sched.get("scale_arr") if dynamic_rescale else None
    )
    total = len(params.timesteps)
    coef = step_coefficients(params, x.device, x.dtype)
    if isinstance(noises, Tensor):
        noises = noises.to(x)  # once, not a host-device copy per step
    for step, i in enumerate(reversed(range(total))):
        t_int = int(params.timesteps[i])
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        model_output = denoiser(x, t)
        if isinstance(noises, Future):
            noises = noises.result().to(x, non_blocking=True)  # once; a pinned source does not block
        noise = None
        if eta > 0:
            if noises is not None:
                noise = noises[step].to(x)
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, pred_x0 = ddim_step(x, model_output, t, i, params, sched, noise, coef)
        if callback is not None:
            callback(StepInfo(step, total, t_int, x, pred_x0))
    return x
