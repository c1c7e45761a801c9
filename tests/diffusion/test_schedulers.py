"""The numpy schedulers against diffusers' torch schedulers, step by step."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from taskserve.server.tasks.diffusion.schedulers import SchedulerKind, make_scheduler  # noqa: E402

# Stable Diffusion 1.x's scheduler_config.json (a PNDM config; the others take what they know).
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}  # fmt: skip
TORCH = {
    SchedulerKind.DDIM: "DDIMScheduler",
    SchedulerKind.EULER: "EulerDiscreteScheduler",
    SchedulerKind.DPM_SOLVER_PP: "DPMSolverMultistepScheduler",
}
VARIANTS = [
    {},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
]


@pytest.mark.parametrize("kind", list(SchedulerKind))
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_every_step_equals_diffusers(kind: SchedulerKind, variant: int, steps: int) -> None:
    config = {**SD_CONFIG, **VARIANTS[variant]}
    theirs = getattr(diffusers, TORCH[kind]).from_config(config)
    ours = make_scheduler(kind, config)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(variant * 100 + steps)
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32) * float(ours.init_noise_sigma)
    x_ours, x_theirs = sample, torch.from_numpy(sample.copy())
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps, strict=True):
        # Tolerances relative to the sample's magnitude: float32 rounding, nothing more.
        scale = max(1.0, float(np.abs(x_theirs.numpy()).max()))
        scaled = ours.scale_model_input(x_ours, t_ours)
        expected = theirs.scale_model_input(x_theirs, t_theirs).numpy()
        np.testing.assert_allclose(scaled, expected, atol=1e-5 * scale, rtol=0)
        output = rng.standard_normal(sample.shape, dtype=np.float32)
        x_ours = ours.step(output, t_ours, x_ours)
        x_theirs = theirs.step(torch.from_numpy(output), t_theirs, x_theirs).prev_sample
        assert x_ours.dtype == np.float32
        scale = max(1.0, float(np.abs(x_theirs.numpy()).max()))
        np.testing.assert_allclose(x_ours, x_theirs.numpy(), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("kind", list(SchedulerKind))
def test_add_noise_at_a_begin_index_equals_diffusers(kind: SchedulerKind) -> None:
    theirs = getattr(diffusers, TORCH[kind]).from_config(SD_CONFIG)
    ours = make_scheduler(kind, SD_CONFIG)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    start = 4
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(start)
    ours.set_begin_index(start)
    rng = np.random.default_rng(1)
    x, noise = rng.standard_normal((2, 1, 4, 8, 8), dtype=np.float32)
    t = theirs.timesteps[start : start + 1]
    expected = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), t).numpy()
    np.testing.assert_allclose(ours.add_noise(x, noise, ours.timesteps[start]), expected, atol=1e-6)


def test_unsupported_options_are_refused() -> None:
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_scheduler(SchedulerKind.EULER, {**SD_CONFIG, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="solver_order"):
        make_scheduler(SchedulerKind.DPM_SOLVER_PP, {**SD_CONFIG, "solver_order": 3})
