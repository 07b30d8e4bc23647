"""VSD (SwiftBrush): the gradient vanishes at an exact critic, and its weighting is SwiftBrush's eps form."""

from __future__ import annotations

import torch
from support import Exact, fast_build, make_batch


def test_vsd_gradient_vanishes_when_critic_equals_teacher(teacher):
    d = fast_build("vsd", teacher, critic_guidance_scale=1.0, guidance_scale=1.0)
    d.critic = Exact(teacher)
    torch.manual_seed(0)
    out = d.loss(make_batch(teacher), 0, "generator", {})
    assert float(out.loss) == 0.0


def test_vsd_weighting_equals_swiftbrush_eps_form():
    """sigma/(1+sigma^2) (x0_L - x0_T) == (1 - abar)(eps_T - eps_L) for VP teachers."""
    sigma = torch.tensor([0.1, 1.0, 7.0])
    abar = 1 / (1 + sigma**2)
    x_t = torch.randn(3, 4)
    x0_t, x0_l = torch.randn(3, 4), torch.randn(3, 4)
    eps = lambda x0: (x_t - x0) / sigma[:, None]  # noqa: E731  (VE form; same eps as VP)
    lhs = (sigma / (1 + sigma**2))[:, None] * (x0_l - x0_t)
    rhs = (1 - abar)[:, None] * (eps(x0_t) - eps(x0_l)) * (1 + sigma**2).sqrt()[:, None] * abar.sqrt()[:, None]
    # the factor sqrt(abar)*sqrt(1+sigma^2) == 1: VP and VE eps agree
    torch.testing.assert_close(lhs, rhs)
