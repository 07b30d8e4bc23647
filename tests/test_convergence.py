"""Each algorithm moves a generator toward a known Gaussian mixture, through the real training loop.

The analytic teacher's exact denoiser makes the distance exact: ``mode_dist`` is the mean
distance to the nearest mode in units of the mode std (about 1 on target; the initial one-step
generator collapses onto the mixture mean, about 14 here).
"""

from __future__ import annotations

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.run import build_teacher, run_distillation


def _distance(result, cfg, n=2000):
    teacher = build_teacher(cfg.teacher)
    gen = result["distiller"].generator_for_export()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = gen(torch.randn((n, *gen.sample_shape), generator=g), None)
    return teacher.distance(x)


def _initial_distance(cfg, n=2000):
    from stepdistill.algorithms import build

    teacher = build_teacher(cfg.teacher)
    d = build(cfg.algorithm.name, teacher, cfg.algorithm.params)
    gen = d.generator_for_export()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = gen(torch.randn((n, *gen.sample_shape), generator=g), None)
    return teacher.distance(x)


@pytest.mark.parametrize(
    "preset,steps,extra",
    [
        ("analytic/dmd2", 500, []),
        ("analytic/vsd", 500, []),
        ("analytic/boot", 400, []),
    ],
)
def test_generator_moves_toward_mixture(preset, steps, extra, tmp_path):
    cfg = load_config(preset, [f"train.max_steps={steps}", f"train.output_dir={tmp_path}", "train.progress=false",
                               "train.checkpoint_every_steps=100000", *extra])
    before = _initial_distance(cfg)
    result = run_distillation(cfg, export=False)
    after = _distance(result, cfg)
    assert before["mode_dist"] > 10, before
    # a clear margin: at least halve the distance to the modes and cover every mode
    assert after["mode_dist"] < 0.5 * before["mode_dist"], (before, after)
    assert after["coverage"] == 1.0, after
