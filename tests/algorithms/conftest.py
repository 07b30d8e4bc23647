"""Fixtures of the per-algorithm tests: cheap teachers (the analytic ring with its fitted copies
from a 200-step fit, the tiny VQ + LM teacher).  ``tests/conftest.py`` (one torch thread, isolated
cache) applies here too; the helpers shared by these files live in ``support.py``.
"""

from __future__ import annotations

import pytest
import torch

from stepdistill.teachers.analytic import GaussianMixtureTeacher


@pytest.fixture(scope="session")
def teacher():
    t = GaussianMixtureTeacher.ring(8, std=0.05)
    t.trainable_copy(fit_steps=200)  # warm the fitted-copy cache used below
    return t


@pytest.fixture(scope="session")
def ar_teacher():
    """The tiny VQ + causal-LM teacher of ``tests/test_autoregressive.py`` (same specs and init)."""
    from stepdistill.teachers.autoregressive import ARTeacher, LMSpec, VQSpec, build_transformer, build_vqvae

    vq_spec = VQSpec(block_out_channels=[8, 8], latent_channels=4, vq_embed_dim=2, num_vq_embeddings=8,
                     norm_num_groups=4)
    torch.manual_seed(0)
    vq = build_vqvae(vq_spec)
    with torch.no_grad():  # spread the codebook (diffusers initialises it to +-1/V)
        vq.quantize.embedding.weight.normal_()
    lm = build_transformer(LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                           vq_spec.num_vq_embeddings, 10, 16)
    with torch.no_grad():  # sharper logits than the default init, so filters and CFG matter
        lm.lm_head.weight.mul_(20.0)
    return ARTeacher(vq, lm, num_classes=10, guidance_scale=1.5, top_k=6).eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _fast_copies(monkeypatch):
    """Networks copied from the analytic teacher come from the cheap 200-step fit."""
    orig = GaussianMixtureTeacher.trainable_copy

    def fast(self, hidden=128, fit_steps=200, seed=0):
        return orig(self, hidden=hidden, fit_steps=200, seed=seed)

    monkeypatch.setattr(GaussianMixtureTeacher, "trainable_copy", fast)
