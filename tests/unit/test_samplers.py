"""AI Horde sampler names -> diffusers schedulers (models/samplers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.samplers import SAMPLER_NAMES, SAMPLERS, LMSScheduler, make_scheduler

# diffusers' schedulers trip numpy 2's __array__/__array_wrap__ deprecations on every step.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

HORDE_SAMPLERS = {
    "k_lms", "k_heun", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "k_dpm_fast",
    "k_dpm_adaptive", "k_dpmpp_2s_a", "k_dpmpp_2m", "dpmsolver", "k_dpmpp_sde", "DDIM", "lcm",
}
# SD 1.5's own scheduler config (as in its model repo), with a non-default setting to carry.
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
    "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@pytest.mark.timeout(30)
def test_every_horde_sampler_is_mapped():
    assert set(SAMPLER_NAMES) == HORDE_SAMPLERS
    assert isinstance(SAMPLER_NAMES, tuple)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(HORDE_SAMPLERS))
@pytest.mark.parametrize("karras", [False, True])
def test_scheduler_keeps_the_models_noise_schedule(name, karras):
    sched = make_scheduler(name, karras, SD_CONFIG)
    assert isinstance(sched, SAMPLERS[name].cls)
    assert sched.config.beta_start == 0.00085 and sched.config.beta_end == 0.012
    assert sched.config.beta_schedule == "scaled_linear"
    if SAMPLERS[name].karras:
        assert sched.config.use_karras_sigmas is karras
    else:  # no Karras option on this scheduler: the flag is dropped, not an error
        assert "use_karras_sigmas" not in sched.config
    for key, value in SAMPLERS[name].kwargs.items():
        assert sched.config[key] == value
    sched.set_timesteps(10)
    assert len(sched.timesteps) >= 10


@pytest.mark.timeout(30)
def test_karras_changes_the_sigmas():
    plain = make_scheduler("k_euler", False, SD_CONFIG)
    karras = make_scheduler("k_euler", True, SD_CONFIG)
    plain.set_timesteps(20)
    karras.set_timesteps(20)
    assert not torch.allclose(plain.sigmas, karras.sigmas)


@pytest.mark.timeout(30)
def test_settings_of_one_sampler_do_not_reach_the_next():
    dpm = make_scheduler("k_dpmpp_sde", True, SD_CONFIG)
    again = make_scheduler("k_dpmpp_2m", False, dpm.config)
    assert again.config.algorithm_type == "dpmsolver++" and again.config.use_karras_sigmas is False


@pytest.mark.timeout(30)
def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("k_nonexistent", False, SD_CONFIG)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("karras", [False, True])
def test_lms_coefficients_match_numerical_integration(karras):
    # diffusers' LMSDiscreteScheduler integrates the Lagrange basis numerically (scipy quad);
    # ours integrates the polynomial exactly. Check against a fine trapezoid rule.
    sched = make_scheduler("k_lms", karras, SD_CONFIG)
    assert isinstance(sched, LMSScheduler)
    sched.set_timesteps(12)
    s = sched.sigmas.double().numpy()
    for i in (0, 1, 2, 5, 11):
        order = min(i + 1, 4)
        for j in range(order):
            tau = np.linspace(s[i], s[i + 1], 20001)
            basis = np.ones_like(tau)
            for k in range(order):
                if k != j:
                    basis *= (tau - s[i - k]) / (s[i - j] - s[i - k])
            expected = np.trapezoid(basis, tau)
            assert sched._coeff(order, i, j) == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.timeout(30)
def test_lms_with_one_step_is_euler():
    # With one derivative LMS is Euler's method: the first step must match EulerDiscrete's.
    lms = make_scheduler("k_lms", False, SD_CONFIG)
    euler = make_scheduler("k_euler", False, SD_CONFIG)
    for s in (lms, euler):
        s.set_timesteps(10)
    sample, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = lms.timesteps[0]
    a = lms.step(eps, t, lms.scale_model_input(sample, t)).prev_sample
    b = euler.step(eps, t, euler.scale_model_input(sample, t)).prev_sample
    torch.testing.assert_close(a, b)


@pytest.mark.timeout(120)
def test_every_sampler_runs_a_pipeline_with_per_seed_generators():
    from models.tiny import build_tiny_sd15

    pipe = build_tiny_sd15()
    pipe.set_progress_bar_config(disable=True)

    def run(name, seeds):
        pipe.scheduler = make_scheduler(name, True, SD_CONFIG)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe("a cat", num_inference_steps=4, height=64, width=64, generator=gens,
                    num_images_per_prompt=len(seeds), output_type="np").images

    for name in SAMPLER_NAMES:
        both, second = run(name, [1, 2]), run(name, [2])
        assert np.isfinite(both).all(), name
        # Stochastic samplers too: image i's noise comes only from generator i.
        assert np.abs(both[1] - second[0]).max() < 1e-4, name
        assert np.abs(both[0] - both[1]).max() > 1e-3, name
