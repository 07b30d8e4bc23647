"""The plumbing shared by the algorithms (``algorithms/common.py``, ``Distiller`` helpers, ``build``)."""

from __future__ import annotations

import pytest
import torch
from support import fast_build

from stepdistill.algorithms import build
from stepdistill.algorithms.base import Distiller
from stepdistill.algorithms.common import (
    GeneratorTimestepError,
    batch_size_of,
    draw_conditions,
    generate_cached,
    make_generator,
)
from stepdistill.teachers.analytic import GaussianMixtureTeacher


def test_surrogate_gradient_is_intended_per_pixel_gradient():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    Distiller.surrogate_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_epsilon_teacher_lowers_ill_posed_generator_timestep():
    """[999] (alpha_bar < 1e-3) was refused for epsilon teachers; it is now lowered to the noisiest
    timestep with sigma <= 2 (issue #14, tests/test_transfer.py), refused only when that breaks the order."""
    from diffusers import DDPMScheduler

    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.teachers.training import UNetSpec, build_unet

    unet = build_unet(UNetSpec(block_out_channels=[8, 16], norm_num_groups=4))
    cfg = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon").config)
    t = DiffusersTeacher(unet, cfg, num_classes=10)
    assert make_generator(t, [999]).timesteps == [701]  # cosine: sigma_701 <= 2
    with pytest.raises(GeneratorTimestepError, match="701"):
        make_generator(t, [999, 749])
    assert make_generator(t, [899]).timesteps == [899]
    cfg["prediction_type"] = "v_prediction"
    assert make_generator(DiffusersTeacher(unet, cfg, num_classes=10), [999]).timesteps == [999]


def test_unknown_algorithm_param_is_rejected(teacher):
    from stepdistill.config import ConfigError

    with pytest.raises(ConfigError, match="update_ratoi"):
        build("dmd2", teacher, {"update_ratoi": 3})
    with pytest.raises(ConfigError, match="unknown algorithm"):
        build("nope", teacher, {})


# ---------------------------------------------------------------------------------------------
# per-step plumbing: batch_size_of, draw_conditions, generate_cached


def test_batch_size_of_prefers_explicit_then_conditions_then_data():
    assert batch_size_of({"batch_size": 3, "raw_cond": [1, 2], "real": torch.zeros(5, 2)}) == 3
    assert batch_size_of({"batch_size": None, "raw_cond": [1, 2], "real": torch.zeros(5, 2)}) == 2
    assert batch_size_of({"raw_cond": None, "real": torch.zeros(5, 2)}) == 5
    with pytest.raises(ValueError, match="neither a batch_size"):
        batch_size_of({"raw_cond": None, "real": None})


def test_draw_conditions_encodes_given_or_draws_from_the_teacher(teacher):
    raw = torch.tensor([3, 1, 4])
    given = draw_conditions(teacher, {"raw_cond": raw}, 3)
    assert torch.equal(given["class_labels"], raw)
    torch.manual_seed(11)
    drawn = draw_conditions(teacher, {"batch_size": 6}, 6)
    torch.manual_seed(11)
    assert torch.equal(drawn["class_labels"], teacher.random_raw_conditions(6))
    unconditional = GaussianMixtureTeacher.ring(4, conditional=False)
    assert draw_conditions(unconditional, {"batch_size": 6}, 6) is None


def test_generate_cached_draws_conditions_then_noise_and_reuses_the_sample(teacher):
    gen = fast_build("dmd2", teacher).generator
    batch = {"batch_size": 5}
    cache: dict = {}
    torch.manual_seed(3)
    x, cond = generate_cached(teacher, gen, batch, cache, grad=True)
    assert x.requires_grad and not cache["x"].requires_grad and cache["cond"] is cond
    torch.manual_seed(3)  # the documented draw order: conditions, then unit noise
    raw = teacher.random_raw_conditions(5)
    z = torch.randn((5, *gen.sample_shape))
    with torch.no_grad():
        ref = gen(z, teacher.encode_conditions(raw))
    assert torch.equal(cond["class_labels"], raw)
    torch.testing.assert_close(x.detach(), ref)
    state = torch.get_rng_state()
    x2, cond2 = generate_cached(teacher, gen, batch, cache, grad=False)  # the critic phase: reused
    assert x2 is cache["x"] and cond2 is cond and torch.equal(torch.get_rng_state(), state)
    calls = []
    x3, _ = generate_cached(teacher, gen, batch, {}, grad=False, rollout=lambda z, c: calls.append(1) or z)
    assert calls and not x3.requires_grad and x3.shape == (5, *gen.sample_shape)


def test_dm_timestep_range_is_the_papers_20_to_980():
    """DMD2 / SwiftBrush draw DM timesteps with randint(20, 981): indices 20..980 of 1000 (was 20..979)."""
    from types import SimpleNamespace

    from stepdistill.algorithms.common import frac_to_index

    t = SimpleNamespace(num_train_timesteps=1000)
    assert (frac_to_index(t, 0.02), frac_to_index(t, 0.98), frac_to_index(t, 1.0)) == (20, 980, 999)
