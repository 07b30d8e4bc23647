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
    GeneratorTimestepError,
    make_generator,
    well_posed_timestep,
    x0_gain,
)
from stepdistill.errors import InputError
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
    the student's x0 amplified by at most MAX_X0_GAIN (measured by perturbing the output)."""
    teacher = tiny_teacher(pt, schedule)
    gen = make_generator(teacher, [999])
    t = gen.timesteps[0]
    sigma = teacher.sigmas[t]
    assert x0_gain(teacher, sigma) <= MAX_X0_GAIN + 1e-6
    if pt != "epsilon":
        assert t == 999  # well-posed everywhere: the noisiest timestep, as before
    else:
        assert t == well_posed_timestep(teacher) and t < 999
        assert x0_gain(teacher, teacher.sigmas[t + 1]) > MAX_X0_GAIN  # the noisiest well-posed one
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
    assert measured <= MAX_X0_GAIN * 1.01, f"{pt}/{schedule}: output error amplified {measured:.0f}x at t={t}"


def test_epsilon_gain_is_sigma_and_the_old_refusal_case_now_builds_dmd2():
    teacher = tiny_teacher("epsilon", "linear")
    abar = teacher.alphas_cumprod
    torch.testing.assert_close(x0_gain(teacher, teacher.sigmas), ((1 - abar) / abar).sqrt())
    # threshold of the former refusal: alpha_bar >= 1e-3  <=>  gain <= sqrt(999)
    assert math.isclose(MAX_X0_GAIN, math.sqrt((1 - 1e-3) / 1e-3))
    assert well_posed_timestep(teacher) == int((abar >= 1e-3).nonzero().max()) == 824
    d = build("dmd2", teacher, {})  # the algorithm's default generator_timesteps [999]
    assert d.generator.timesteps == [824]


def test_multi_step_timesteps_are_lowered_and_a_collapse_is_refused():
    teacher = tiny_teacher("epsilon", "squaredcos_cap_v2")
    ok = well_posed_timestep(teacher)
    assert make_generator(teacher, [999, 749, 499, 249]).timesteps == [ok, 749, 499, 249]
    assert make_generator(teacher, [899]).timesteps == [899]  # already well-posed: unchanged
    with pytest.raises(GeneratorTimestepError, match=str(ok)):
        make_generator(teacher, [999, ok])


def test_flow_generator_refuses_the_vp_lcm_boundary_and_starts_from_native_noise():
    teacher = tiny_teacher("flow", None)
    gen = make_generator(teacher, [999])
    assert gen.boundary == "none"
    with pytest.raises(InputError, match="flow"):
        Generator(teacher.trainable_copy(), [999], boundary="lcm")
    z = torch.randn(2, 1, 8, 8)
    # the network sees unit noise z itself: x / (1 + sigma) for flow, not x / sqrt(1 + sigma^2)
    x = gen.start(z)
    torch.testing.assert_close(x * teacher.input_scale(gen.sigma(0)), z)


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
