"""Fréchet distance maths, feature statistics and their files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.fid import FeatureStats, StatsAccumulator, frechet_distance, trace_sqrt_product_eigh
from stepdistill.eval.metrics import kid


def _spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = np.exp(rng.uniform(0, np.log(cond), d))
    return (q * w) @ q.T


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # isotropic: N(0, I) vs N(0, 4 I) in d dims -> d * (1 + 4 - 2 * 2) = d
    assert frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d, rel=1e-12)


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(1)
    d = 5
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T  # same eigenvectors -> commute
    mu = rng.standard_normal(d)
    expected = mu @ mu + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu, s1, np.zeros(d), s2) == pytest.approx(expected, rel=1e-9)


def test_non_commuting_2x2_independent():
    # For a 2x2 matrix M with non-negative eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([0.5, -1.0]), np.array([1.5, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert trace_sqrt_product_eigh(s1, s2) == pytest.approx(tr_sqrt, rel=1e-12)
    # by hand: |dmu|^2 = 2.5625, Tr = 3 + 4, Tr M = 4.44, det M = 1.51 * 2.84 = 4.2884,
    # Tr sqrt(M) = sqrt(4.44 + 2 * 2.07084) = 2.92945 -> 2.5625 + 7 - 5.8589 = 3.7036
    assert expected == pytest.approx(3.7036, abs=1e-3)


def test_general_matches_eigh_form_and_is_symmetric():
    rng = np.random.default_rng(2)
    d = 20
    s1, s2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    f12 = frechet_distance(mu1, s1, mu2, s2)
    f21 = frechet_distance(mu2, s2, mu1, s1)
    alt = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * trace_sqrt_product_eigh(s1, s2)
    assert f12 == pytest.approx(alt, rel=1e-8)
    assert f12 == pytest.approx(f21, rel=1e-8)
    assert f12 > 0


def test_identical_stats_give_zero_and_singular_is_finite():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 16))
    st = FeatureStats.from_features(x)
    assert abs(frechet_distance(st.mu, st.sigma, st.mu, st.sigma)) < 1e-8
    # rank-deficient covariances (fewer samples than dims): finite, non-negative-ish, no exception
    y = rng.standard_normal((5, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sy = FeatureStats.from_features(y)
        f = frechet_distance(sy.mu, sy.sigma, st.mu, st.sigma)
    assert np.isfinite(f) and f > 0


def test_shape_mismatch_is_input_error():
    with pytest.raises(EvalInputError, match="different detectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_accumulator_matches_numpy_cov():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1003, 9)) * 5 + 100  # large offset: tests the numerically careful merge
    acc = StatsAccumulator()
    for i in range(0, 1003, 97):
        acc.update(x[i : i + 97])
    st = acc.finalize()
    assert st.n == 1003
    np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)


def test_too_few_images():
    acc = StatsAccumulator()
    acc.update(np.ones((1, 4)))
    with pytest.raises(EvalInputError, match="too few"):
        acc.finalize(source="gen")
    with pytest.warns(RuntimeWarning, match="only 3 images for 4-dimensional"):
        FeatureStats.from_features(np.random.default_rng(0).standard_normal((3, 4)))
    with pytest.raises(EvalInputError, match="non-finite"):
        StatsAccumulator().update(np.array([[np.nan, 1.0]]))


def test_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    st = FeatureStats.from_features(rng.standard_normal((50, 6)), {"detector": {"name": "x"}, "n": 50})
    p = tmp_path / "sub" / "stats.npz"
    st.save(p)
    assert p.is_file() and not list(p.parent.glob(".tmp-*"))
    back = FeatureStats.load(p)
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)
    assert back.n == 50 and back.metadata == {"detector": {"name": "x"}, "n": 50}
    with np.load(p, allow_pickle=False) as z:  # metadata is a JSON string, no pickles
        assert json.loads(str(z["metadata"]))["n"] == 50
    # foreign stats (pytorch-fid style: only mu and sigma)
    q = tmp_path / "foreign.npz"
    np.savez(q, mu=st.mu, sigma=st.sigma)
    f = FeatureStats.load(q)
    assert f.n is None and f.metadata == {}
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(EvalInputError, match="not a statistics file"):
        FeatureStats.load(bad)


def test_kid_zero_for_same_distribution_and_positive_otherwise():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    c = rng.standard_normal((400, 8)) + 1.0
    same, _ = kid(a, b, num_subsets=20, subset_size=200)
    diff, _ = kid(a, c, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 and diff > 0.2
