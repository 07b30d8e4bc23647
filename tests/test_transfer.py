"""Issue #14 part 3: a default preset (generator at [999]) on teachers of every parametrisation and
schedule -- the generator's conditioning timestep is chosen by how well-posed the teacher's x0
conversion is there, not by index, and the boundary condition uses the adapter's own input scale.

Tiny UNet2DModel teachers (random weights): the properties tested are of the conversion, not of
what the network learned."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.algorithms import build
from stepdistill.algorithms.common import (
    MAX_X0_GAIN,
    WELL_CONDITIONED_X0_GAIN,
    GeneratorTimestepError,
    make_generator,
    well_posed_timestep,
    x0_gain,
)
from stepdistill.students import Generator
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.teachers.training import UNetSpec, build_unet

#: (prediction_type, beta schedule) of the teachers issue #14 names; flow: FlowMatchEuler, shift 1
CASES = [
    ("v_prediction", "squaredcos_cap_v2"),
    ("epsilon", "linear"),
    ("epsilon", "scaled_linear"),
    ("epsilon", "squaredcos_cap_v2"),
    ("sample", "squaredcos_cap_v2"),
    ("v_prediction", "linear"),
    ("flow", None),
]


def tiny_teacher(pt: str, schedule: str | None) -> DiffusersTeacher:
    torch.manual_seed(0)
    unet = build_unet(UNetSpec(block_out_channels=[8, 16], norm_num_groups=4))
    if pt == "flow":
        cfg = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).config)
        cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    else:
        cfg = dict(DDPMScheduler(beta_schedule=schedule, prediction_type=pt, clip_sample=False).config)
    t = DiffusersTeacher(unet, cfg, num_classes=10)
    assert t.prediction_type == pt
    return t


class OutputShift(torch.nn.Module):
    """The network with ``delta`` added to its output: how far x0 moves per unit output error."""

    def __init__(self, net, delta: float):
        super().__init__()
        self.net, self.delta = net, delta
        self.config = net.config

    def forward(self, *args, **kwargs):
        out = self.net(*args, **kwargs)
        return (out[0] + self.delta,)


@pytest.mark.parametrize("pt,schedule", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_default_generator_is_built_and_its_x0_is_well_posed(pt, schedule):
    """make_generator(teacher, [999]) -- every digits / t2i preset's default -- builds for every
    parametrisation (epsilon teachers were refused) and an error of the network output reaches
    the student's x0 amplified by at most WELL_CONDITIONED_X0_GAIN (measured by perturbing the
    output) -- the v-prediction / sample / flow conversions have gain <= 1 at every t."""
    teacher = tiny_teacher(pt, schedule)
    gen = make_generator(teacher, [999])
    t = gen.timesteps[0]
    sigma = teacher.sigmas[t]
    assert x0_gain(teacher, sigma) <= WELL_CONDITIONED_X0_GAIN + 1e-6
    if pt != "epsilon":
        assert t == 999  # well-posed everywhere: the noisiest timestep, as before
    else:
        assert t == well_posed_timestep(teacher) and t < 999
        assert x0_gain(teacher, teacher.sigmas[t + 1]) > WELL_CONDITIONED_X0_GAIN  # the noisiest such one
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = teacher.encode_conditions(torch.arange(4))
    with torch.no_grad():
        x0 = gen(z, cond)
        assert torch.isfinite(x0).all()
        delta = 1e-2
        net = gen.denoiser.model
        gen.denoiser.model = OutputShift(net, delta)
        x0_shift = gen(z, cond)
        gen.denoiser.model = net
    measured = float((x0_shift - x0).abs().max()) / delta
    assert measured <= WELL_CONDITIONED_X0_GAIN * 1.01, f"{pt}/{schedule}: output error amplified {measured:.0f}x at t={t}"


def test_epsilon_gain_is_sigma_and_the_old_refusal_case_now_builds_dmd2():
    teacher = tiny_teacher("epsilon", "linear")
    abar = teacher.alphas_cumprod
    torch.testing.assert_close(x0_gain(teacher, teacher.sigmas), ((1 - abar) / abar).sqrt())
    # ill-posed above the former refusal threshold (alpha_bar < 1e-3  <=>  gain > sqrt(999)); lowered
    # to the noisiest timestep with sigma <= 2 (alpha_bar >= 0.2)
    assert math.isclose(MAX_X0_GAIN, math.sqrt((1 - 1e-3) / 1e-3))
    assert well_posed_timestep(teacher) == int((abar >= 0.2).nonzero().max()) == 395
    d = build("dmd2", teacher, {})  # the algorithm's default generator_timesteps [999]
    assert d.generator.timesteps == [395]


def test_sd_like_epsilon_request_between_the_bounds_is_kept():
    """SD 1.5's schedule (scaled-linear 0.00085..0.012): t = 999 has gain 14.6 <= MAX_X0_GAIN, the
    DMD2 paper's choice -- kept (the t2i / sd15 presets are unchanged)."""
    torch.manual_seed(0)
    unet = build_unet(UNetSpec(block_out_channels=[8, 16], norm_num_groups=4))
    cfg = dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="epsilon").config)
    teacher = DiffusersTeacher(unet, cfg, num_classes=10)
    assert 14 < float(x0_gain(teacher, teacher.sigmas[999])) < MAX_X0_GAIN
    assert make_generator(teacher, [999]).timesteps == [999]
    assert make_generator(teacher, [999, 749, 499, 249]).timesteps == [999, 749, 499, 249]


def test_multi_step_timesteps_are_lowered_and_a_collapse_is_refused():
    teacher = tiny_teacher("epsilon", "squaredcos_cap_v2")
    ok = well_posed_timestep(teacher)
    assert ok == 701  # cosine: sigma_701 <= 2 < sigma_702
    assert make_generator(teacher, [999, 599, 399, 199]).timesteps == [ok, 599, 399, 199]
    assert make_generator(teacher, [899]).timesteps == [899]  # gain 6.4: not ill-posed, unchanged
    with pytest.raises(GeneratorTimestepError, match=str(ok)):
        make_generator(teacher, [999, 749, 499, 249])  # 701 would precede 749


def test_flow_generator_boundary_mixes_the_flow_input_not_the_vp_one():
    """make_generator gives a flow student no boundary condition; a Generator built with the default
    'lcm' boundary mixes c_skip with the network's flow input x / (1 + sigma) (it mixed the VP input
    x / sqrt(1 + sigma^2) in: a difference of ~c_skip * sigma * x, 2.5e-6 x at index 0)."""
    teacher = tiny_teacher("flow", None)
    assert make_generator(teacher, [999]).boundary == "none"
    gen = Generator(teacher.trainable_copy(), [999])
    assert gen.boundary == "lcm"
    from stepdistill.students import lcm_boundary_scalings

    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = teacher.sigmas[:1].expand(4)
    x = z * (1 + sigma[0])
    with torch.no_grad():
        d = gen.denoiser.denoise(x, sigma, None, guidance_scale=1.0).double()
        got = gen.denoise_at(x, torch.zeros(4, dtype=torch.long), None).double()
    c_skip, c_out = lcm_boundary_scalings(torch.tensor(teacher.timestep_value(0), dtype=torch.float64))
    flow_in = x.double() / (1 + sigma[0].double())
    vp_in = x.double() / (1 + sigma[0].double() ** 2).sqrt()
    torch.testing.assert_close(got, c_out * d + c_skip * flow_in, rtol=0, atol=2e-7)
    assert float((c_skip * (flow_in - vp_in)).abs().max()) > 1e-6  # the VP input would fail the check above


def test_lcm_boundary_mixes_the_adapters_own_network_input():
    """c_skip multiplies the network's input (diffusers LCMScheduler: the VP sample), computed by the
    adapter, so a VP generator's x0 is c_out * D + c_skip * x_vp exactly."""
    teacher = tiny_teacher("v_prediction", "squaredcos_cap_v2")
    gen = make_generator(teacher, [499])
    z = torch.randn(2, 1, 8, 8)
    x = gen.start(z)
    idx = torch.full((2,), 499)
    with torch.no_grad():
        d = gen.denoiser.denoise(x, gen.sigma(0).expand(2), None, guidance_scale=1.0)
        from stepdistill.students import lcm_boundary_scalings

        c_skip, c_out = lcm_boundary_scalings(torch.tensor(499.0))
        torch.testing.assert_close(gen.denoise_at(x, idx, None), c_out * d + c_skip * z)


def test_flow_critic_weight_is_the_flow_matching_loss():
    """denoising_weight('flow') * ||x0_hat - x0||^2 equals the velocity loss ||v_hat - v||^2 the flow
    teacher was trained with (it was weight 1: the x0 MSE, ~1/sigma^2 heavier at high noise)."""
    from stepdistill.algorithms.common import denoising_weight

    teacher = tiny_teacher("flow", None)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 8, 8, generator=g)
    eps = torch.randn(5, 1, 8, 8, generator=g)
    sigma = teacher.sigmas[torch.tensor([0, 100, 500, 900, 999])]
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        x0_hat = teacher.denoise(x, sigma, None)
        x_fm = x * teacher.input_scale(sigma).view(-1, 1, 1, 1)
        t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
        v_hat = (x_fm - x0_hat) / t  # the network's velocity output, from x0 = x_t - t v
    v_loss = (v_hat - (eps - x0)).pow(2).flatten(1).mean(1)
    x0_loss = (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(denoising_weight(sigma, "flow") * x0_loss, v_loss, rtol=1e-3, atol=1e-5)


def test_sample_teacher_critic_gets_a_low_noise_weighting():
    """Sample-prediction teachers' critics are weighted like v-prediction (their native weight 1 left
    the critic under-trained at low noise: 2.9x vs 1.6x the teacher's FID on digits); the others keep
    their own loss."""
    from stepdistill.algorithms.common import default_weighting

    assert default_weighting(tiny_teacher("sample", "squaredcos_cap_v2")) == "v_prediction"
    assert default_weighting(tiny_teacher("epsilon", "linear")) == "epsilon"
    assert default_weighting(tiny_teacher("v_prediction", "squaredcos_cap_v2")) == "v_prediction"
    assert default_weighting(tiny_teacher("flow", None)) == "flow"
    assert build("dmd2", tiny_teacher("sample", "squaredcos_cap_v2"), {}).weighting == "v_prediction"
