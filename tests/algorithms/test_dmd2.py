"""DMD2: the distribution-matching gradient, the TTUR / warm-up / regression schedule, multi-step
backward simulation and the GAN head."""

from __future__ import annotations

import pytest
import torch
from support import Exact, fast_build, make_batch

from stepdistill.algorithms.base import Distiller


def test_dmd_gradient_vanishes_when_critic_equals_teacher(teacher):
    d = fast_build("dmd2", teacher)
    d.critic = Exact(teacher)
    torch.manual_seed(0)
    cache: dict = {}
    d.generator.zero_grad(set_to_none=True)
    out = d.loss(make_batch(teacher), 0, "generator", cache)
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in d.generator.parameters())


def test_dmd_gradient_is_normalised_score_difference(teacher, monkeypatch):
    """g = (x_fake - x_real) / mean|x - x_real|, injected with the 0.5*mean surrogate."""
    d = fast_build("dmd2", teacher)
    captured = {}
    orig = Distiller.surrogate_loss

    def spy(x, grad):
        captured["x"], captured["g"] = x.detach().clone(), grad.clone()
        return orig(x, grad)

    monkeypatch.setattr(Distiller, "surrogate_loss", staticmethod(spy))
    torch.manual_seed(5)
    d.loss(make_batch(teacher), 0, "generator", {})
    # recompute with the same noise draws
    torch.manual_seed(5)
    batch = make_batch(teacher)
    cond = teacher.encode_conditions(batch["raw_cond"])
    z = torch.randn((32, 2))
    with torch.no_grad():
        x = d.generator(z, cond)
        idx = torch.randint(d.min_step, d.max_step + 1, (32,))
        sigma = teacher.sigmas[idx]
        xt = x + sigma[:, None] * torch.randn_like(x)
        real = teacher.denoise(xt, sigma, cond)
        fake = d.critic.denoise(xt, sigma, cond, guidance_scale=1.0)
        g = (fake - real) / (x - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(captured["x"], x)
    torch.testing.assert_close(captured["g"], g, rtol=1e-4, atol=1e-6)


def test_dmd2_ttur_phases(teacher):
    d = fast_build("dmd2", teacher, update_ratio=5, critic_warmup_steps=3)
    phases = [d.phase(s) for s in range(14)]
    assert phases[:3] == [["critic"]] * 3
    assert phases[3] == ["generator", "critic"]
    assert phases[4:8] == [["critic"]] * 4
    assert phases[8] == ["generator", "critic"]


def test_dmd2_regression_stage_then_dmd(teacher):
    d = fast_build("dmd2", teacher, regression_steps=2, regression_pairs=64, regression_sampler_steps=4,
                   regression_shard_size=16)
    assert d._regression is None  # nothing made at construction
    rows = d.regression_pairs().store.rows(list(range(64)))
    assert rows["noise"].shape == (64, 2) and rows["x0"].shape == (64, 2) and d.regression_pairs().store.num_shards == 4
    assert d.phase(0) == ["generator"] and d.phase(1) == ["generator"]
    out = d.loss(make_batch(teacher), 0, "generator", {})
    assert "regression" in out.logs
    assert "dm" in d.loss(make_batch(teacher), 2, "generator", {}).logs


def test_dmd2_multistep_backward_simulation(teacher):
    d = fast_build("dmd2", teacher, generator_timesteps=[999, 749, 499, 249])
    assert d.generator.num_steps == 4
    out = d.loss(make_batch(teacher), 7, "generator", {})
    assert torch.isfinite(out.loss)


def test_dmd2_gan_head_on_bottleneck(teacher):
    d = fast_build("dmd2", teacher, gan_weight_g=0.01)
    assert "gan_head" in d.critic_group
    out_c = d.loss(make_batch(teacher), 1, "critic", {})
    assert {"gan_d", "d_real", "d_fake"} <= set(out_c.logs)
    out_g = d.loss(make_batch(teacher), 0, "generator", {})
    assert "gan_g" in out_g.logs


def test_gan_needs_real_data(teacher):
    d = fast_build("dmd2", teacher, gan_weight_g=0.01)
    batch = make_batch(teacher)
    batch["real"] = None
    with pytest.raises(ValueError, match="real data"):
        d.loss(batch, 1, "critic", {})
