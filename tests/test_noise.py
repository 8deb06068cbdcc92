"""Noise levels (SPEC §1): the training grid, snapping, noising, sampling schemes."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from modeling_dina.noise import NoiseGrid, add_noise, sample_noise_levels


def test_snapping_reproduces_spec_values():
    grid = NoiseGrid.from_scheduler_config({"shift": 3.0, "num_train_timesteps": 1000})
    assert len(grid.sigmas) == 1000
    assert grid.sigmas[0].item() == pytest.approx(1.0) and grid.sigmas[-1].item() == pytest.approx(0.003, abs=1e-3)
    sigma, timestep = grid.snap([0.4, 0.5])
    assert sigma[0].item() == pytest.approx(0.40029, abs=1e-5) and timestep[0].item() == pytest.approx(400.29, abs=1e-2)
    assert sigma[1].item() == pytest.approx(0.5) and timestep[1].item() == pytest.approx(500.0)


def test_grid_ignores_inference_schedules():
    config = {"shift": 3.0}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(20)  # a user's inference schedule must not leak into the grid
    grid = NoiseGrid.from_scheduler_config(scheduler.config)
    assert len(grid.sigmas) == 1000


def test_snap_rejects_levels_outside_unit_interval():
    grid = NoiseGrid.from_scheduler_config()
    for bad in (-0.1, 1.2, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            grid.snap(bad)


def test_add_noise_formula():
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)
    out = add_noise(x0, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(out[0], torch.full((1, 2, 2), 0.75 + 0.75)) and torch.allclose(out[1], eps[1])
    with pytest.raises(ValueError, match="shape"):
        add_noise(x0, eps[:1], 0.5)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "beta", "power", "constant"])
def test_sampling_schemes_are_seeded_and_in_range(scheme):
    a = sample_noise_levels(512, scheme, generator=torch.Generator().manual_seed(0), beta_alpha=2.0, beta_beta=5.0)
    b = sample_noise_levels(512, scheme, generator=torch.Generator().manual_seed(0), beta_alpha=2.0, beta_beta=5.0)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_sampling_scheme_shapes():
    g = torch.Generator().manual_seed(0)
    assert sample_noise_levels(4000, "beta", beta_alpha=2.0, beta_beta=5.0, generator=g).mean().item() == pytest.approx(
        2 / 7, abs=0.02
    )
    assert sample_noise_levels(4000, "logit_normal", generator=g).mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.all(sample_noise_levels(3, "constant", constant_noise_level=0.0) == 0)
    with pytest.raises(ValueError, match="unknown"):
        sample_noise_levels(3, "cosine")


def test_power_scheme_by_hand():
    # The authors' `power` scheme: u = r ** p with r ~ U(0, 1), drawn on the generator.
    r = torch.rand(4, generator=torch.Generator().manual_seed(3))
    u = sample_noise_levels(4, "power", power_exponent=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(u, torch.tensor([r[i].item() ** 2 for i in range(4)]))
    # E[r^p] = 1 / (p + 1): exponent 3 puts three quarters of the mass below u = 0.42 (0.42^(1/3) = 0.749).
    g = torch.Generator().manual_seed(0)
    levels = sample_noise_levels(20000, "power", power_exponent=3.0, generator=g)
    assert levels.mean().item() == pytest.approx(0.25, abs=0.01)
    assert (levels < 0.42).float().mean().item() == pytest.approx(0.42 ** (1 / 3), abs=0.01)
    uniform = sample_noise_levels(4, "uniform", generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_noise_levels(4, "power", generator=torch.Generator().manual_seed(3)), uniform)
    with pytest.raises(ValueError, match="power_exponent"):
        sample_noise_levels(3, "power", power_exponent=0.0)
