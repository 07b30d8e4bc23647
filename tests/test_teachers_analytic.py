"""The analytic Gaussian-mixture teacher: its denoiser is the exact posterior mean E[x0 | x]."""

from __future__ import annotations

import math

import pytest
import torch

from stepdistill.teachers.analytic import GaussianMixtureTeacher, MLPDenoiser, karras_sigmas


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than several on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mixture_1d() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(
        torch.tensor([[-1.0], [0.5], [2.0]]), torch.tensor([0.3, 0.2, 0.4]), torch.tensor([0.2, 0.5, 0.3])
    )


def _score(teacher: GaussianMixtureTeacher, x: torch.Tensor, sigma: float) -> torch.Tensor:
    x = x.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(teacher.log_prob(x, sigma).sum(), x)
    return g


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 4.0])
def test_tweedie_ring(sigma):
    """denoise(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie), score by autograd."""
    teacher = GaussianMixtureTeacher.ring(8, std=0.1)
    g = torch.Generator().manual_seed(0)
    x = teacher.add_noise(teacher.sample_data(256, g), sigma, torch.randn(256, 2, generator=g))
    d = teacher.denoise(x, sigma).double()
    tweedie = x.double() + sigma**2 * _score(teacher, x, sigma)
    assert torch.allclose(d, tweedie, atol=2e-4 * max(1.0, sigma**2), rtol=1e-4), (d - tweedie).abs().max()
    # and it is not trivially the identity / the mean
    assert (d - x).abs().mean() > 1e-3 * sigma


def test_tweedie_image_shaped():
    teacher = GaussianMixtureTeacher.image_shaped(num_modes=3, shape=(1, 4, 4), std=0.2, seed=1)
    assert teacher.sample_shape == (1, 4, 4)
    g = torch.Generator().manual_seed(1)
    for sigma in (0.1, 0.7, 3.0):
        x = teacher.add_noise(teacher.sample_data(64, g), sigma, torch.randn(64, 1, 4, 4, generator=g))
        d = teacher.denoise(x, sigma)
        assert d.shape == x.shape
        tweedie = x.double() + sigma**2 * _score(teacher, x, sigma)
        assert torch.allclose(d.double(), tweedie, atol=3e-4 * max(1.0, sigma**2)), (d - tweedie).abs().max()


def test_posterior_mean_matches_monte_carlo_1d():
    """Binned Monte-Carlo: within each bin of x, the average x0 equals the average denoise(x)."""
    teacher = _mixture_1d()
    g = torch.Generator().manual_seed(0)
    n, sigma = 200_000, 0.5
    x0 = teacher.sample_data(n, g)
    x = teacher.add_noise(x0, sigma, torch.randn(n, 1, generator=g))
    d = teacher.denoise(x, sigma)
    wrong = teacher.denoise(x, 0.25)  # the denoiser at the wrong noise level must fail the same check
    edges = torch.linspace(-2.0, 3.0, 21)
    bins = torch.bucketize(x[:, 0], edges)
    checked, wrong_fails = 0, 0
    for b in bins.unique():
        m = bins == b
        if m.sum() < 3000:
            continue
        resid = x0[m, 0] - d[m, 0]
        se = resid.std() / math.sqrt(int(m.sum()))
        assert abs(float(resid.mean())) < 5 * float(se) + 1e-4, (float(b), float(resid.mean()), float(se))
        w_resid = x0[m, 0] - wrong[m, 0]
        wrong_fails += int(abs(float(w_resid.mean())) > 5 * float(w_resid.std() / math.sqrt(int(m.sum()))))
        checked += 1
    assert checked >= 10
    assert wrong_fails >= checked // 3


def test_posterior_mean_orthogonality_2d():
    """E[(x0 - D(x)) phi(x)] = 0 for every test function phi (the defining property of E[x0|x])."""
    teacher = GaussianMixtureTeacher.ring(6, std=0.15)
    g = torch.Generator().manual_seed(3)
    n, sigma = 100_000, 0.4
    x0 = teacher.sample_data(n, g)
    x = teacher.add_noise(x0, sigma, torch.randn(n, 2, generator=g))
    feats = torch.stack(
        [x[:, 0], x[:, 1], x[:, 0] * x[:, 1], torch.sin(3 * x[:, 0]), torch.cos(3 * x[:, 1])], 1
    )

    def max_z(d):
        prod = (x0 - d)[:, :, None] * feats[:, None, :]  # (n, 2, F)
        return float((prod.mean(0) / (prod.std(0) / math.sqrt(n))).abs().max())

    assert max_z(teacher.denoise(x, sigma)) < 4.5
    assert max_z(teacher.denoise(x, 0.8 * sigma)) > 10  # a wrong denoiser is detected
    # the exact denoiser also has the smallest mean squared error
    mse = ((x0 - teacher.denoise(x, sigma)) ** 2).mean()
    assert mse < ((x0 - teacher.denoise(x, 0.8 * sigma)) ** 2).mean()


def test_class_conditional_masking_and_null_class():
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.5]])
    teacher = GaussianMixtureTeacher(means, 0.2, torch.tensor([0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=g)
    for k in range(3):
        single = GaussianMixtureTeacher(means[k : k + 1], 0.2)
        for sigma in (0.1, 1.0):
            cond = teacher.encode_conditions(torch.full((32,), k))
            assert torch.allclose(teacher.denoise(x, sigma, cond), single.denoise(x, sigma), atol=1e-6)
    null = teacher.null_condition(32)
    assert torch.equal(null["class_labels"], torch.full((32,), 3))
    for sigma in (0.1, 1.0):
        assert torch.allclose(teacher.denoise(x, sigma, null), teacher.denoise(x, sigma), atol=1e-7)
    # mixed labels in one batch
    labels = torch.tensor([0, 1, 2, 3] * 8)
    d = teacher.denoise(x, 0.5, {"class_labels": labels})
    for k in range(3):
        m = labels == k
        single = GaussianMixtureTeacher(means[k : k + 1], 0.2)
        assert torch.allclose(d[m], single.denoise(x[m], 0.5), atol=1e-6)
    assert torch.allclose(d[labels == 3], teacher.denoise(x[labels == 3], 0.5), atol=1e-6)
    # conditional data sampling respects the labels; the null class draws from the whole mixture
    s = teacher.sample_data(32, g, {"class_labels": labels})
    assert (teacher.mode_assignment(s[labels < 3]) == labels[labels < 3]).all()


def test_cfg_is_affine_in_x0():
    teacher = GaussianMixtureTeacher.ring(4, std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g)
    cond = teacher.encode_conditions(torch.arange(16) % 4)
    for w in (1.0, 2.5, 7.0):
        u = teacher.denoise(x, 0.7, teacher.null_condition(16), guidance_scale=1.0)
        c = teacher.denoise(x, 0.7, cond, guidance_scale=1.0)
        assert torch.allclose(teacher.denoise(x, 0.7, cond, guidance_scale=w), u + w * (c - u), atol=1e-6)
    # the default guidance scale is used when none is passed
    teacher.guidance_scale = 3.0
    assert torch.allclose(teacher.denoise(x, 0.7, cond), u + 3.0 * (c - u), atol=1e-6)


def test_limits_of_the_denoiser():
    teacher = GaussianMixtureTeacher.image_shaped(num_modes=4, shape=(1, 4, 4), std=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    x0 = teacher.sample_data(32, g)
    # tiny noise: identity (up to the shrinkage s^2/(s^2+sigma^2))
    assert torch.allclose(teacher.denoise(x0, 1e-4), x0, atol=1e-5)
    # huge noise: the mixture mean
    far = teacher.add_noise(x0, 1e4, torch.randn(x0.shape, generator=g))
    mix_mean = (teacher.weights[:, None] * teacher.means).sum(0).reshape(1, 1, 4, 4)
    assert torch.allclose(teacher.denoise(far, 1e4), mix_mean.expand_as(x0), atol=1e-3)


def test_noise_helpers():
    teacher = GaussianMixtureTeacher.ring(8)
    sig = karras_sigmas(1000)
    assert torch.all(sig[1:] > sig[:-1])
    assert math.isclose(teacher.sigma_min, 0.002, rel_tol=1e-4) and math.isclose(
        teacher.sigma_max, 80.0, rel_tol=1e-4
    )
    assert teacher.num_train_timesteps == 1000
    assert torch.equal(teacher.sigma_at(torch.tensor([0, 999])), teacher.sigmas[[0, 999]])
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(teacher.add_noise(x0, s, eps), x0 + s[:, None] * eps)
    assert torch.allclose(teacher.noise_to_input(eps, 2.0), 2.0 * eps)  # VE: z * sigma
    z = teacher.prior_sample(4096, torch.Generator().manual_seed(0))
    assert z.shape == (4096, 2) and abs(float(z.std()) - 80.0) < 3.0


def test_distance_separates_true_samples_from_noise():
    teacher = GaussianMixtureTeacher.ring(8, std=0.05)
    g = torch.Generator().manual_seed(0)
    labels = teacher.random_raw_conditions(4000, g)
    cond = teacher.encode_conditions(labels)
    real = teacher.sample_data(4000, g, cond)
    good = teacher.distance(real, cond)
    assert 0.7 < good["mode_dist"] < 1.2  # E|eps|/sqrt(d) for d=2 is ~0.89
    assert good["coverage"] == 1.0 and good["class_match"] == 1.0
    bad = teacher.distance(torch.randn(4000, 2, generator=g) * 2)
    assert bad["mode_dist"] > 5 and bad["nll"] > good["nll"] + 5
    # mode collapse: all samples on one mode -> coverage 1/8
    collapsed = teacher.sample_data(1000, g, {"class_labels": torch.zeros(1000, dtype=torch.long)})
    assert teacher.distance(collapsed)["coverage"] == pytest.approx(1 / 8)
    # wrong classes are detected
    shifted = teacher.distance(real, {"class_labels": (labels + 1) % 8})
    assert shifted["class_match"] == 0.0


def test_trainable_copy_mlp_fits_the_teacher():
    teacher = GaussianMixtureTeacher.ring(8, std=0.05)
    torch.manual_seed(0)
    net = teacher.trainable_copy(hidden=128, fit_steps=600, seed=0)
    assert isinstance(net, MLPDenoiser)
    params = list(net.parameters())
    assert params and all(p.requires_grad for p in params)
    assert list(teacher.parameters()) == []  # the analytic teacher has nothing to train
    g = torch.Generator().manual_seed(5)
    labels = teacher.random_raw_conditions(2048, g)
    cond = {"class_labels": torch.where(torch.rand(2048, generator=g) < 0.2, 8, labels)}
    x0 = teacher.sample_data(2048, g, cond)
    sigma = torch.exp(torch.empty(2048).uniform_(math.log(0.1), math.log(2.0), generator=g))
    x = teacher.add_noise(x0, sigma, torch.randn(2048, 2, generator=g))
    with torch.no_grad():
        target = teacher.denoise(x, sigma, cond, guidance_scale=1.0)
        err = (net.denoise(x, sigma, cond, guidance_scale=1.0) - target).pow(2).sum(1).mean().sqrt()
        trivial = (x - target).pow(2).sum(1).mean().sqrt()  # the identity denoiser (skip connection only)
        target_spread = (target - target.mean(0)).pow(2).sum(1).mean().sqrt()
    assert float(err) < 0.1 * float(target_spread), (float(err), float(target_spread))
    assert float(err) < 0.1 * float(trivial)


def test_learned_score_teacher_is_accurate_on_data_and_measures_exactly():
    """score: learned fits a network on noisy data only: close to the exact denoiser where noised data
    lives, further off it (the score mismatch DisBack targets); distances stay exact."""
    from stepdistill.teachers.analytic import LearnedScoreTeacher, MLPDenoiser

    params = {"mixture": "ring", "num_modes": 8, "std": 0.05, "conditional": False}
    t = GaussianMixtureTeacher.from_params({**params, "score": "learned", "score_fit_steps": 400})
    exact = GaussianMixtureTeacher.from_params(params)
    assert isinstance(t, LearnedScoreTeacher)
    g = torch.Generator().manual_seed(0)
    data = t.sample_data(1000, g)
    off = torch.randn(1000, 2, generator=g) * 1.5
    sigma = 0.1
    on_err = t.score_error(data + sigma * torch.randn(data.shape, generator=g), sigma)
    off_err = t.score_error(off, sigma)
    assert on_err < 0.5 * off_err, (on_err, off_err)
    assert t.distance(data) == exact.distance(data)
    copy = t.trainable_copy()
    assert isinstance(copy, MLPDenoiser) and all(p.requires_grad for p in copy.parameters())
    s = torch.full((4,), 0.3)
    torch.testing.assert_close(copy.denoise_raw(data[:4], s, None), t.denoise_raw(data[:4], s, None))
    assert not any(p.requires_grad for p in t.parameters())
    with pytest.raises(ValueError, match="score must be exact"):
        GaussianMixtureTeacher.from_params({**params, "score": "fitted"})
    with pytest.raises(ValueError, match="needs teacher.params.score: learned"):
        GaussianMixtureTeacher.from_params({**params, "score_fit_steps": 10})
