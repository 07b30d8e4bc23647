"""DiffusersTeacher: parametrisation conversions against closed forms, CFG, sampling, loading.

Everything runs on the CPU with tiny random-weight diffusers / transformers models built here;
nothing is downloaded.  The "oracle" networks compute the exact epsilon / v / x0 / flow velocity
of a Gaussian mixture from the (native input, timestep) they are given, so the adapter's output
can be compared with :class:`GaussianMixtureTeacher`'s exact posterior mean.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepdistill.teachers.analytic import GaussianMixtureTeacher
from stepdistill.teachers.diffusion import DiffusersTeacher, TeacherLoadError

VP_KINDS = ("epsilon", "v_prediction", "sample")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than several on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# oracle networks


class GMOracle(ModelMixin, ConfigMixin):
    """Exact network for a Gaussian mixture: given the native input and a (fractional) timestep,
    returns what a perfectly trained epsilon / v / sample / flow model would output.

    VP: sigma(t) = exp(interp(t, 0..N-1, log sigma_i)) with sigma_i from DDPMScheduler's
    alphas_cumprod (computed here independently, in float64).  Flow: t_fm = timestep / N.
    """

    @register_to_config
    def __init__(
        self,
        kind: str = "epsilon",
        in_channels: int = 1,
        sample_size: int = 4,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.gm: GaussianMixtureTeacher | None = None
        self.calls: list[torch.Tensor] = []
        if kind != "flow":
            ac = DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod.double()
            self.log_sigmas = ((1 - ac) / ac).sqrt().log().numpy()

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        b, nd = sample.shape[0], sample.ndim
        t = torch.as_tensor(timestep).double().reshape(-1).expand(b)
        self.calls.append(t.clone())
        x = sample.double()
        cond = None if class_labels is None else {"class_labels": class_labels}

        def ad(v):
            return v.reshape(b, *([1] * (nd - 1)))

        if self.config.kind == "flow":
            tf = (t / self.config.num_train_timesteps).clamp(1e-6, 1 - 1e-6)
            x0 = self.gm.denoise_raw(x / ad(1 - tf), tf / (1 - tf), cond)
            eps = (x - ad(1 - tf) * x0) / ad(tf)
            out = eps - x0
        else:
            sig = np.exp(np.interp(t.numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas))
            sigma = torch.from_numpy(sig)
            abar = 1 / (1 + sigma**2)
            xve = x / ad(abar.sqrt())
            x0 = self.gm.denoise_raw(xve, sigma, cond)
            eps = (xve - x0) / ad(sigma)
            v = ad(abar.sqrt()) * eps - ad((1 - abar).sqrt()) * x0
            out = {"epsilon": eps, "sample": x0, "v_prediction": v}[self.config.kind]
        out = out.to(sample.dtype)
        return (out,) if not return_dict else {"sample": out}


def oracle_teacher(gm: GaussianMixtureTeacher, kind: str, num_classes=None, shift: float = 3.0, **kw):
    net = GMOracle(kind=kind, in_channels=gm.sample_shape[0], sample_size=gm.sample_shape[-1])
    net.gm = gm
    if kind == "flow":
        cfg = FlowMatchEulerDiscreteScheduler(shift=shift).config  # no _class_name, no prediction_type
        return DiffusersTeacher(net, cfg, num_classes=num_classes, **kw)
    cfg = DDPMScheduler(prediction_type=kind, clip_sample=False).config
    return DiffusersTeacher(net, cfg, num_classes=num_classes, **kw)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixtureTeacher.image_shaped(num_modes=3, shape=(1, 4, 4), std=0.3, seed=0)


# ---------------------------------------------------------------------------------------------
# 1. conversions against closed forms


@pytest.mark.parametrize("kind", [*VP_KINDS, "flow"])
def test_denoise_matches_exact_posterior_mean(mixture, kind):
    teacher = oracle_teacher(mixture, kind, num_classes=3)
    assert teacher.prediction_type == kind
    assert teacher.sample_shape == (1, 4, 4)
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 1, 10, 100, 300, 500, 700, 900, 998, 999])
    train = teacher.sigmas[idx]
    between = (teacher.sigmas[idx[:-1]] * teacher.sigmas[idx[:-1] + 1]).sqrt()
    odd = torch.exp(
        torch.empty(6).uniform_(float(teacher.log_sigmas[0]), float(teacher.log_sigmas[-1]), generator=g)
    )
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # 3 = null class (whole mixture)
    cond = {"class_labels": labels}
    for sigma in torch.cat([train, between, odd]):
        x0 = mixture.sample_data(8, g)
        x = mixture.add_noise(x0, sigma, torch.randn(x0.shape, generator=g))
        got = teacher.denoise(x, sigma, cond, guidance_scale=1.0)
        want = mixture.denoise(x, sigma, cond, guidance_scale=1.0)
        scale = 1.0 + float(sigma) * 2e-6  # epsilon->x0 amplifies float32 rounding by 1/sqrt(abar)
        assert torch.allclose(got, want, atol=1e-4 * scale), (
            kind,
            float(sigma),
            float((got - want).abs().max()),
        )
    # per-sample sigmas in one batch
    sig = teacher.sigmas[torch.tensor([5, 50, 200, 400, 600, 800, 950, 999])]
    x = mixture.add_noise(mixture.sample_data(8, g), sig, torch.randn(8, 1, 4, 4, generator=g))
    assert torch.allclose(teacher.denoise(x, sig, cond), mixture.denoise(x, sig, cond), atol=1e-4)


def test_oracle_check_detects_a_wrong_parametrisation(mixture):
    """The closed-form check above is not vacuous: reading v as epsilon is far off."""
    wrong = oracle_teacher(mixture, "v_prediction")
    wrong.prediction_type = "epsilon"
    g = torch.Generator().manual_seed(1)
    x = mixture.add_noise(mixture.sample_data(8, g), 1.0, torch.randn(8, 1, 4, 4, generator=g))
    assert (wrong.denoise(x, 1.0) - mixture.denoise(x, 1.0)).abs().max() > 0.1


@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_conversion_formulas(kind):
    """Explicit formulas: the model sees x*sqrt(abar) at timestep t and x0 is recovered exactly."""
    net = GMOracle(kind=kind)
    teacher = DiffusersTeacher(net, DDPMScheduler(prediction_type=kind).config)
    ac = DDPMScheduler().alphas_cumprod
    assert torch.allclose(teacher.sigmas, ((1 - ac) / ac).sqrt())
    t = torch.tensor([0, 17, 500, 999])
    sigma = teacher.sigmas[t]
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    x = x0 + sigma[:, None, None, None] * eps
    a = ac[t][:, None, None, None]
    x_native = x * teacher.input_scale(sigma)[:, None, None, None]
    assert torch.allclose(x_native, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]
    rec = teacher.output_to_x0(out, x_native, sigma)
    assert torch.allclose(rec, x0, atol=2e-4 * float(1 / ac[999].sqrt()))
    assert torch.allclose(rec[:3], x0[:3], atol=1e-4)


def test_flow_conversion_formulas():
    teacher = DiffusersTeacher(GMOracle(kind="flow"), FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert teacher.prediction_type == "flow" and teacher.flow_shift == 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # training sigmas: the scheduler's (shifted) t converted to sigma = t / (1 - t), ascending
    t_train = sched.sigmas.flip(0).double()  # diffusers keeps them descending
    assert t_train.shape == (1000,) and float(t_train[-1]) == 1.0
    assert torch.allclose(teacher.flow_t[:-1].double(), t_train[:-1], atol=1e-6)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    t64 = 3.0 * u / (1 + 2.0 * u)  # the shift, in float64 (diffusers' float32 t loses sigma near t = 1)
    assert torch.allclose(teacher.sigmas[:-1].double(), (t64 / (1 - t64))[:-1], rtol=1e-5)
    assert teacher.sigma_max == pytest.approx(1e4, rel=1e-3)  # t = 1 is clamped to 1 - 1e-4
    assert teacher.timestep_value(999) == pytest.approx(1000.0)
    assert teacher.timestep_value(0) == pytest.approx(float(sched.timesteps[-1]), rel=1e-5)
    sigma = torch.tensor([0.01, 0.5, 1.0, 30.0])
    x0, eps = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    x = x0 + sigma[:, None, None, None] * eps
    t = (sigma / (1 + sigma))[:, None, None, None]
    x_native = x * teacher.input_scale(sigma)[:, None, None, None]
    assert torch.allclose(x_native, (1 - t) * x0 + t * eps, atol=1e-5)
    assert torch.allclose(teacher._native_timestep(sigma), 1000 * t.flatten())
    assert torch.allclose(teacher.output_to_x0(eps - x0, x_native, sigma), x0, atol=1e-5)
    # the model receives timestep 1000 t for t = sigma / (1 + sigma)
    teacher.model.gm = GaussianMixtureTeacher(torch.zeros(1, 1, 4, 4), 0.5)
    teacher.model.calls.clear()
    teacher.denoise(torch.randn(4, 1, 4, 4), sigma)
    assert torch.allclose(teacher.model.calls[-1].float(), 1000 * t.flatten(), rtol=1e-5)


def test_flow_detection_from_configs():
    for cfg in (
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
        {
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": 2.0,
            "beta_start": 0.0001,
        },
        FlowMatchEulerDiscreteScheduler(shift=2.0),  # a scheduler object
    ):
        teacher = DiffusersTeacher(GMOracle(kind="flow"), cfg)
        assert teacher.prediction_type == "flow"
    assert teacher.flow_shift == 2.0
    assert DiffusersTeacher(GMOracle(), DDPMScheduler().config).prediction_type == "epsilon"
    with pytest.raises(TeacherLoadError, match="prediction_type"):
        DiffusersTeacher(GMOracle(), DDPMScheduler().config, prediction_type="score")


# ---------------------------------------------------------------------------------------------
# 2. noise levels and helpers


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_sigma_to_t(kind):
    teacher = oracle_teacher(GaussianMixtureTeacher(torch.zeros(1, 1, 4, 4), 0.5), kind)
    n = teacher.num_train_timesteps
    assert n == 1000 and torch.all(teacher.sigmas[1:] > teacher.sigmas[:-1])
    idx = torch.arange(n)
    assert torch.equal(teacher.sigma_to_t(teacher.sigmas), idx.float())
    grid = torch.exp(
        torch.linspace(float(teacher.log_sigmas[0]) - 1, float(teacher.log_sigmas[-1]) + 1, 5000)
    )
    t = teacher.sigma_to_t(grid)
    assert torch.all(t[1:] >= t[:-1])  # monotone
    assert t.min() == 0 and t.max() == n - 1  # clamped outside the training range
    mid = (teacher.sigmas[:-1] * teacher.sigmas[1:]).sqrt()  # log-midpoints -> half-integer t
    assert torch.allclose(teacher.sigma_to_t(mid), idx[:-1].float() + 0.5, atol=2e-3)
    assert torch.equal(teacher.sigma_at(torch.tensor([0, 999])), teacher.sigmas[[0, 999]])
    assert teacher.timestep_value(500) == (
        500.0 if kind != "flow" else pytest.approx(float(teacher.flow_t[500]) * 1000)
    )


def test_add_noise_and_noise_to_input():
    vp = oracle_teacher(GaussianMixtureTeacher(torch.zeros(1, 1, 4, 4), 0.5), "epsilon")
    fm = oracle_teacher(GaussianMixtureTeacher(torch.zeros(1, 1, 4, 4), 0.5), "flow")
    x0, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    s = torch.tensor([0.1, 1.0, 10.0])
    sb = s[:, None, None, None]
    assert torch.allclose(vp.add_noise(x0, s, z), x0 + sb * z)
    assert torch.allclose(vp.add_noise(x0, 2.0, z), x0 + 2.0 * z)
    assert torch.allclose(vp.noise_to_input(z, s), z * (1 + sb**2).sqrt())
    assert torch.allclose(fm.noise_to_input(z, s), z * (1 + sb))
    # round trip: the VE point from unit noise is exactly unit noise at the network's input
    assert torch.allclose(vp.noise_to_input(z, s) * vp.input_scale(s)[:, None, None, None], z, atol=1e-6)
    assert torch.allclose(fm.noise_to_input(z, 2.0) * fm.input_scale(torch.tensor(2.0)), z, atol=1e-6)
    p = vp.prior_sample(2000, torch.Generator().manual_seed(0))
    assert p.shape == (2000, 1, 4, 4) and abs(float(p.std()) / vp.sigma_max - 1) < 0.02


# ---------------------------------------------------------------------------------------------
# tiny networks


def _class_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
    ).eval()


def _text_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
    ).eval()


def _tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


MAX_LEN = 16


def _tokenizer(tmp_path):
    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"), model_max_length=MAX_LEN
    )


def _text_encoder(seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=60,
        max_position_embeddings=MAX_LEN,
        bos_token_id=52,
        eos_token_id=53,
        pad_token_id=53,
    )
    return CLIPTextModel(cfg).eval()


def _dit(seed=0):
    torch.manual_seed(seed)
    return Transformer2DModel(
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=10,
        patch_size=2,
        sample_size=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
    ).eval()


def _vp_config(**kw):
    return dict(DDPMScheduler(clip_sample=False, **kw).config)


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return _text_unet(), _text_encoder(), _tokenizer(d), _tiny_vae()


# ---------------------------------------------------------------------------------------------
# 3. classifier-free guidance


def test_cfg_class_unet_matches_two_calls():
    teacher = DiffusersTeacher(_class_unet(), _vp_config(), num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g) * 3
    cond = teacher.encode_conditions(torch.tensor([1, 2, 3, 9]))
    null = teacher.null_condition(4)
    assert torch.equal(null["class_labels"], torch.full((4,), 10))
    with torch.no_grad():
        u = teacher.denoise(x, 3.0, null, guidance_scale=1.0)
        c = teacher.denoise(x, 3.0, cond, guidance_scale=1.0)
        for w in (2.0, 4.5):
            got = teacher.denoise(x, 3.0, cond, guidance_scale=w)
            assert torch.allclose(got, u + w * (c - u), atol=1e-4, rtol=1e-4)
        assert (c - u).abs().max() > 1e-3  # the label does change the output
        # no condition = the null class
        assert torch.allclose(teacher.denoise(x, 3.0), u, atol=1e-5)
        # raw output with CFG (what sample() uses)
        t = torch.full((4,), 500.0)
        xn = x / 3
        un, cn = teacher.native_output(xn, t, null), teacher.native_output(xn, t, cond)
        assert torch.allclose(teacher.native_output(xn, t, cond, 3.0), un + 3.0 * (cn - un), atol=1e-4)
    with pytest.raises(ValueError, match="class labels"):
        teacher.encode_conditions([11])


def test_cfg_exact_with_oracle(mixture):
    teacher = oracle_teacher(mixture, "v_prediction", num_classes=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 4, 4, generator=g)
    cond = teacher.encode_conditions(torch.tensor([0, 1, 2, 0, 1, 2]))
    for w in (1.0, 3.0):
        got = teacher.denoise(x, 0.8, cond, guidance_scale=w)
        assert torch.allclose(got, mixture.denoise(x, 0.8, cond, guidance_scale=w), atol=1e-5)


@pytest.mark.parametrize("null_prompt", ["empty", "zeros"])
def test_cfg_text_unet(text_parts, null_prompt):
    unet, te, tok, _ = text_parts
    teacher = DiffusersTeacher(unet, _vp_config(), text_encoder=te, tokenizer=tok, null_prompt=null_prompt)
    assert teacher.sample_shape == (4, 8, 8)
    cond = teacher.encode_conditions(["a cat", "a dog on a hill"])
    emb = cond["encoder_hidden_states"]
    assert emb.shape == (2, MAX_LEN, 32)
    assert not torch.allclose(emb[0], emb[1])
    null = teacher.null_condition(2)["encoder_hidden_states"]
    with torch.no_grad():
        empty = te(tok([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids)[0]
    if null_prompt == "empty":
        assert torch.allclose(null, empty.expand(2, -1, -1))
        assert empty.abs().max() > 0
    else:
        assert torch.equal(null, torch.zeros(2, MAX_LEN, 32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 2
    with torch.no_grad():
        u = teacher.denoise(x, 2.0, {"encoder_hidden_states": null}, guidance_scale=1.0)
        c = teacher.denoise(x, 2.0, cond, guidance_scale=1.0)
        got = teacher.denoise(x, 2.0, cond, guidance_scale=5.0)
    assert torch.allclose(got, u + 5.0 * (c - u), atol=1e-4, rtol=1e-4)
    assert (c - u).abs().max() > 1e-4


def test_null_condition_like_fills_sdxl_keys(text_parts):
    unet, te, tok, _ = text_parts
    teacher = DiffusersTeacher(unet, _vp_config(), text_encoder=te, tokenizer=tok, null_prompt="zeros")
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    cond = {
        "encoder_hidden_states": torch.randn(2, MAX_LEN, 32),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": time_ids},
    }
    null = teacher.null_condition_like(cond, 2)
    assert torch.equal(null["encoder_hidden_states"], torch.zeros(2, MAX_LEN, 32))
    assert torch.equal(null["added_cond_kwargs"]["text_embeds"], torch.zeros(2, 32))
    assert torch.equal(null["added_cond_kwargs"]["time_ids"], time_ids)


# ---------------------------------------------------------------------------------------------
# 4. multi-step sampling


@pytest.fixture(scope="module")
def gaussian():
    mu = torch.linspace(-0.8, 0.8, 16).reshape(1, 1, 4, 4)
    return GaussianMixtureTeacher(mu, 0.5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
def test_sampling_lands_on_the_gaussian(gaussian, kind):
    """For N(mu, s^2 I) the probability-flow ODE maps unit noise z to mu + s z (up to sigma_max);
    DDIM / flow-Euler with 50 steps, DPM-Solver++ with 20 and Euler with 50 steps get close."""
    teacher = oracle_teacher(gaussian, kind)
    mu, s = gaussian.means.reshape(1, 1, 4, 4), 0.5
    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ode = mu + s * noise
    x = teacher.sample(noise=noise, num_steps=50, sampler="ddim")
    assert float((x - ode).abs().mean()) < 0.04
    assert float((x.mean(0) - mu[0]).abs().max()) < 0.12
    assert 0.45 < float((x - mu).std() / noise.std()) < 0.52
    dpm = teacher.sample(noise=noise, num_steps=20, sampler="dpmsolver++")
    assert float((dpm - ode).abs().mean()) < 0.04
    assert float((dpm - x).abs().mean()) < 0.03
    if kind != "flow":
        eul = teacher.sample(noise=noise, num_steps=50, sampler="euler")
        assert float((eul - x).abs().mean()) < 0.01
    # more steps converge to the exact ODE solution: the conversions are right, not just close
    fine = teacher.sample(noise=noise[:64], num_steps=100, sampler="dpmsolver++")
    assert float((fine - ode[:64]).abs().mean()) < 0.006


def test_sampling_with_class_guidance_oracle(mixture):
    """Conditional samples land on their class's mode; CFG does not break that."""
    teacher = oracle_teacher(mixture, "epsilon", num_classes=3)
    labels = torch.arange(60) % 3
    cond = teacher.encode_conditions(labels)
    for w in (1.0, 2.0):
        x = teacher.sample(
            60,
            cond,
            num_steps=25,
            sampler="dpmsolver++",
            guidance_scale=w,
            generator=torch.Generator().manual_seed(0),
        )
        assert mixture.distance(x, cond)["class_match"] == 1.0
    x = teacher.sample(
        300, None, num_steps=25, sampler="dpmsolver++", generator=torch.Generator().manual_seed(1)
    )
    d = mixture.distance(x)
    assert d["coverage"] == 1.0 and d["mode_dist"] < 1.5


def test_sampling_is_deterministic_for_a_generator(gaussian):
    teacher = oracle_teacher(gaussian, "epsilon")
    for sampler in ("ddim", "ddpm", "euler_a"):  # the last two draw noise at every step
        a = teacher.sample(8, num_steps=10, sampler=sampler, generator=torch.Generator().manual_seed(3))
        b = teacher.sample(8, num_steps=10, sampler=sampler, generator=torch.Generator().manual_seed(3))
        c = teacher.sample(8, num_steps=10, sampler=sampler, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sampler_choices(gaussian):
    vp, fm = oracle_teacher(gaussian, "epsilon"), oracle_teacher(gaussian, "flow")
    assert type(vp.make_scheduler("euler")).__name__ == "EulerDiscreteScheduler"
    assert vp.make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert vp.make_scheduler("ddim").config.prediction_type == "epsilon"
    assert type(fm.make_scheduler("ddim")).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert fm.make_scheduler("flow_euler").config.shift == 3.0
    assert fm.make_scheduler("dpmsolver++").config.prediction_type == "flow_prediction"
    with pytest.raises(ValueError, match="flow"):
        vp.make_scheduler("flow_euler")
    with pytest.raises(ValueError, match="flow"):
        fm.make_scheduler("ddpm")
    with pytest.raises(ValueError, match="unknown sampler"):
        vp.make_scheduler("nope")
    x = vp.sample(
        4, num_steps=6, sampler="heun", generator=torch.Generator().manual_seed(0)
    )  # no generator arg
    assert torch.isfinite(x).all()
    # Euler: float timesteps reach the network unrounded, and init_noise_sigma scales the start
    vp.model.calls.clear()
    vp.sample(
        2,
        num_steps=7,
        sampler="euler",
        generator=torch.Generator().manual_seed(0),
        scheduler_overrides={"timestep_spacing": "linspace"},
    )
    ts = torch.stack([c[0] for c in vp.model.calls])
    assert float(ts[0]) == pytest.approx(999.0) and (ts != ts.round()).any()


def test_sampling_tiny_class_unet_with_cfg():
    teacher = DiffusersTeacher(_class_unet(), _vp_config(), num_classes=10, guidance_scale=3.0)
    cond = teacher.encode_conditions(torch.tensor([0, 5, 9]))
    g = torch.Generator().manual_seed(0)
    a = teacher.sample(3, cond, num_steps=4, sampler="ddim", generator=g)
    b = teacher.sample(3, cond, num_steps=4, sampler="ddim", generator=torch.Generator().manual_seed(0))
    plain = teacher.sample(
        3, cond, num_steps=4, sampler="ddim", guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    # the same loop written out by hand
    sched = teacher.make_scheduler("ddim")
    sched.set_timesteps(4)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = teacher.model
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.float().expand(3)
            u = unet(x, tt, class_labels=torch.full((3,), 10)).sample
            c = unet(x, tt, class_labels=cond["class_labels"]).sample
            out = sched.step(u + 3.0 * (c - u), t, x)
            x = out.prev_sample
    assert torch.allclose(a, out.pred_original_sample, atol=1e-4)


def test_sampling_tiny_text_unet(text_parts):
    unet, te, tok, vae = text_parts
    teacher = DiffusersTeacher(unet, _vp_config(), text_encoder=te, tokenizer=tok, vae=vae)
    cond = teacher.encode_conditions(["a cat", "a dog"])
    for sampler in ("ddim", "dpmsolver++", "euler"):
        x = teacher.sample(
            2,
            cond,
            num_steps=3,
            sampler=sampler,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
        )
        assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    img = teacher.decode(x)
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()


def test_tiny_dit_class_labels_and_learned_sigma():
    dit = _dit()
    teacher = DiffusersTeacher(dit, _vp_config(), num_classes=10)
    assert teacher.sample_shape == (4, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 5
    labels = torch.tensor([3, 7])
    sigma = teacher.sigmas[600]
    with torch.no_grad():
        got = teacher.denoise(x, sigma, {"class_labels": labels})
        a = teacher.alphas_cumprod[600]
        xn = x * a.sqrt()
        raw = dit(xn, timestep=torch.full((2,), 600.0), class_labels=labels, return_dict=False)[0]
        assert raw.shape[1] == 8
        want = (xn - (1 - a).sqrt() * raw[:, :4]) / a.sqrt()
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-3)
    s = teacher.sample(
        2,
        {"class_labels": labels},
        num_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert s.shape == (2, 4, 8, 8) and torch.isfinite(s).all()


def test_sampling_tiny_flow_unet():
    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    teacher = DiffusersTeacher(net, FlowMatchEulerDiscreteScheduler(shift=2.0).config)
    assert teacher.prediction_type == "flow"
    for sampler in ("flow_euler", "dpmsolver++"):
        x = teacher.sample(2, num_steps=4, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    # flow Euler with a velocity network is x0 = x_1 - sum dt v: check the first step by hand
    sched = teacher.make_scheduler("flow_euler")
    sched.set_timesteps(1)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = net(z, sched.timesteps[0].expand(2)).sample
    one = teacher.sample(noise=z, num_steps=1, sampler="flow_euler")
    assert torch.allclose(one, z - float(sched.sigmas[0]) * v, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. loading pipeline folders


@pytest.fixture(scope="module")
def class_pipeline_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=_class_unet(), scheduler=DDPMScheduler(clip_sample=False)).save_pretrained(d)
    index = json.loads((d / "model_index.json").read_text())
    index["num_classes"] = 10
    (d / "model_index.json").write_text(json.dumps(index))
    return d


@pytest.fixture(scope="module")
def sd_pipeline_dir(tmp_path_factory, text_parts):
    unet, te, tok, vae = text_parts
    d = tmp_path_factory.mktemp("sd") / "pipe"
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(d)
    return d


def test_from_pretrained_class_conditional(class_pipeline_dir):
    teacher = DiffusersTeacher.from_pretrained(class_pipeline_dir, guidance_scale=2.0)
    assert teacher.num_classes == 10 and teacher.prediction_type == "epsilon"
    assert teacher.sample_shape == (1, 8, 8) and teacher.guidance_scale == 2.0
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    direct = DiffusersTeacher(_class_unet(), _vp_config(), num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    cond = teacher.encode_conditions([1, 2])
    with torch.no_grad():
        assert torch.allclose(
            teacher.denoise(x, 0.7, cond), direct.denoise(x, 0.7, cond, guidance_scale=2.0), atol=1e-5
        )
    x = teacher.sample(2, cond, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8)


def test_from_pretrained_stable_diffusion(sd_pipeline_dir, text_parts):
    teacher = DiffusersTeacher.from_pretrained(sd_pipeline_dir)
    assert teacher.prediction_type == "v_prediction" and teacher.null_prompt == "empty"
    assert teacher.text_encoder is not None and teacher.vae is not None and teacher.num_classes is None
    assert teacher.sample_shape == (4, 8, 8)
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.allclose(teacher.alphas_cumprod, ac)
    cond = teacher.encode_conditions(["a prompt"])
    _, te, tok, vae = text_parts
    with torch.no_grad():
        ids = tok(["a prompt"], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids
        assert torch.allclose(cond["encoder_hidden_states"], te(ids)[0], atol=1e-5)
    x = teacher.sample(1, cond, num_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    img = teacher.decode(x)
    assert img.shape == (1, 3, 16, 16)
    with torch.no_grad():
        want = vae.decode(x / vae.config.scaling_factor).sample
    assert torch.allclose(img, want, atol=1e-5)
    lat = teacher.encode(img.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 8, 8)
    # decode is differentiable w.r.t. the latents (pixel-space losses), while the VAE stays frozen
    z = x.clone().requires_grad_(True)
    teacher.decode(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.vae.parameters())


def test_from_pretrained_dit_and_flow_folders(tmp_path):
    """A DiT folder is class-conditional without a num_classes entry; a FlowMatch scheduler
    folder makes a flow teacher (its config file names the class only in model_index.json)."""
    d = tmp_path / "dit"
    _dit().save_pretrained(d / "transformer")
    DDIMScheduler(clip_sample=False).save_pretrained(d / "scheduler")
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", "Transformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": [None, None],
    }
    (d / "model_index.json").write_text(json.dumps(index))
    teacher = DiffusersTeacher.from_pretrained(d)
    assert teacher.num_classes == 10 and teacher.vae is None and teacher.sample_shape == (4, 8, 8)
    x = teacher.sample(2, teacher.encode_conditions([0, 9]), num_steps=2, guidance_scale=1.5)
    assert x.shape == (2, 4, 8, 8)

    f = tmp_path / "flow"
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(f / "unet")
    FlowMatchEulerDiscreteScheduler(shift=2.0).save_pretrained(f / "scheduler")
    index = {
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (f / "model_index.json").write_text(json.dumps(index))
    teacher = DiffusersTeacher.from_pretrained(f)
    assert teacher.prediction_type == "flow" and teacher.flow_shift == 2.0 and teacher.num_classes is None
    assert torch.isfinite(teacher.sample(2, num_steps=2, sampler="ddim")).all()


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_from_pretrained_errors(class_pipeline_dir, tmp_path):
    with pytest.raises(TeacherLoadError, match="model_index.json") as e:
        DiffusersTeacher.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)

    d = _copy_dir(class_pipeline_dir, tmp_path / "nosched")
    shutil.rmtree(d / "scheduler")
    with pytest.raises(TeacherLoadError, match="scheduler") as e:
        DiffusersTeacher.from_pretrained(d)
    assert str(d) in str(e.value)

    d = _copy_dir(class_pipeline_dir, tmp_path / "badindex")
    (d / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DModel"],')
    with pytest.raises(TeacherLoadError, match="not valid JSON") as e:
        DiffusersTeacher.from_pretrained(d)
    assert str(d / "model_index.json") in str(e.value)

    d = _copy_dir(class_pipeline_dir, tmp_path / "badsched")
    (d / "scheduler" / "scheduler_config.json").write_text("{nope")
    with pytest.raises(TeacherLoadError, match="not valid JSON") as e:
        DiffusersTeacher.from_pretrained(d)
    assert str(d / "scheduler") in str(e.value)

    d = _copy_dir(class_pipeline_dir, tmp_path / "nounet")
    shutil.rmtree(d / "unet")
    with pytest.raises(TeacherLoadError, match="unet") as e:
        DiffusersTeacher.from_pretrained(d)
    assert str(d) in str(e.value)

    d = _copy_dir(class_pipeline_dir, tmp_path / "badweights")
    for f in (d / "unet").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(TeacherLoadError, match="unet") as e:
        DiffusersTeacher.from_pretrained(d)
    assert str(d) in str(e.value)

    d = _copy_dir(class_pipeline_dir, tmp_path / "nodenoiser")
    (d / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(TeacherLoadError, match="no 'unet' or 'transformer'"):
        DiffusersTeacher.from_pretrained(d)

    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(TeacherLoadError, match="not a diffusers pipeline folder"):
        DiffusersTeacher.from_pretrained(f)


# ---------------------------------------------------------------------------------------------
# 6. trainable copy


def test_trainable_copy(sd_pipeline_dir):
    teacher = DiffusersTeacher.from_pretrained(sd_pipeline_dir)
    student = teacher.trainable_copy()
    params = list(student.parameters())
    unet_params = list(teacher.model.parameters())
    assert len(params) == len(unet_params)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in unet_params)
    assert all(p.requires_grad for p in params) and student.model.training
    assert not {p.data_ptr() for p in params} & {p.data_ptr() for p in teacher.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.text_encoder is None and student.vae is None  # shared, outside the module tree
    assert student.sample_shape == teacher.sample_shape and student.prediction_type == "v_prediction"

    cond = teacher.encode_conditions(["a prompt"])
    assert torch.allclose(
        student.encode_conditions(["a prompt"])["encoder_hidden_states"], cond["encoder_hidden_states"]
    )
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = teacher.denoise(x, 1.5, cond, guidance_scale=2.0)
        assert torch.allclose(student.denoise(x, 1.5, cond, guidance_scale=2.0), ref, atol=1e-6)
    assert torch.allclose(student.decode(x), teacher.decode(x))

    # a gradient step moves the copy and leaves the teacher alone
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss = student.denoise(x, 1.5, cond).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(student.denoise(x, 1.5, cond, guidance_scale=2.0), ref, atol=1e-4)
        assert torch.equal(teacher.denoise(x, 1.5, cond, guidance_scale=2.0), ref)
    assert all(p.grad is None for p in teacher.parameters())


def test_trainable_copy_of_directly_built_teacher_keeps_guidance():
    teacher = DiffusersTeacher(_class_unet(), _vp_config(), num_classes=10, guidance_scale=2.5)
    student = teacher.trainable_copy()
    assert student.guidance_scale == 2.5 and student.num_classes == 10
    assert student.sigmas.device == teacher.sigmas.device
    x = torch.randn(2, 1, 8, 8)
    cond = teacher.encode_conditions([0, 1])
    with torch.no_grad():
        assert torch.allclose(student.denoise(x, 0.5, cond), teacher.denoise(x, 0.5, cond), atol=1e-6)


def test_half_precision_model_is_called_in_its_dtype(mixture):
    teacher = DiffusersTeacher(_class_unet().to(torch.bfloat16), _vp_config(), num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = teacher.denoise(x, 1.0, teacher.encode_conditions([1, 2]), guidance_scale=2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    student = teacher.trainable_copy()
    assert next(student.parameters()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_handling_cuda():
    teacher = DiffusersTeacher(_class_unet(), _vp_config(), num_classes=10, guidance_scale=2.0).to("cuda")
    cond = teacher.encode_conditions([1, 2])
    assert cond["class_labels"].device.type == "cuda"
    x = torch.randn(2, 1, 8, 8, device="cuda")
    assert teacher.denoise(x, 0.5, cond).device.type == "cuda"
    # a CPU generator still works (noise drawn on the CPU, moved to the teacher's device)
    s = teacher.sample(2, cond, num_steps=3, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert s.device.type == "cuda"
    student = teacher.trainable_copy()
    assert student.sigmas.device.type == "cuda" and next(student.parameters()).device.type == "cuda"


def test_unsupported_families_get_one_line_messages(class_pipeline_dir, tmp_path):
    """A folder of another family is refused before any weights load, naming what is supported."""
    cases = {
        "kandinsky": {"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "text_encoder_2": None},
        "pixart": {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
                   "text_encoder": ["transformers", "T5EncoderModel"]},
        "pixart_old": {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "Transformer2DModel"],
                       "text_encoder": ["transformers", "T5EncoderModel"]},
        "sana": {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]},
    }
    for name, index in cases.items():
        d = _copy_dir(class_pipeline_dir, tmp_path / name)
        sub = "transformer" if "transformer" in index else "unet"
        (d / sub).mkdir(exist_ok=True)
        index = {**index, "scheduler": ["diffusers", "DDPMScheduler"]}
        (d / "model_index.json").write_text(json.dumps(index))
        if name == "kandinsky":
            # a UNet2DConditionModel with an added embedding other than SDXL's is refused after its config loads
            torch.manual_seed(0)
            shutil.rmtree(d / "unet")
            UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
                addition_embed_type="text", encoder_hid_dim=32,
            ).save_pretrained(d / "unet")
        with pytest.raises(TeacherLoadError, match="supported: UNet2DModel.*FluxTransformer2DModel") as e:
            DiffusersTeacher.from_pretrained(d)
        msg = str(e.value)
        assert "\n" not in msg and str(d) in msg, msg
