"""BOOT: data-free, its bootstrapped target is one exact DDIM step, the query-timestep student is the export."""

from __future__ import annotations

import torch
from support import fast_build


class _NoData(dict):
    """A batch that fails loudly if an algorithm touches real data."""

    def __getitem__(self, key):
        if key == "real":
            raise AssertionError("data-free algorithm read batch['real']")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "real":
            raise AssertionError("data-free algorithm read batch['real']")
        return super().get(key, default)


def test_boot_never_touches_data(teacher):
    d = fast_build("boot", teacher)
    assert d.needs_data is False
    out = d.loss(_NoData(raw_cond=teacher.random_raw_conditions(8), batch_size=8), 0, "generator", {})
    assert torch.isfinite(out.loss)


def test_boot_target_is_one_exact_ddim_step():
    """The bootstrapped target equals one DDIM step (diffusers DDIMScheduler, eta=0) of the teacher
    from the student's own re-noised estimate, mapped back to signal space; delta = 1 - sigma_s/sigma_t."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from stepdistill.algorithms.boot import BOOT, BOOTConfig
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.teachers.training import UNetSpec, build_unet

    torch.manual_seed(0)
    spec = UNetSpec(block_out_channels=[8, 16], norm_num_groups=4, prediction_type="epsilon")
    sched_cfg = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon").config)
    teacher = DiffusersTeacher(build_unet(spec), sched_cfg, num_classes=10)
    boot = BOOT(teacher, BOOTConfig(step_size=50))
    eps = torch.randn(3, 1, 8, 8)
    cond = teacher.encode_conditions([1, 2, 3])
    t = torch.tensor([950, 500, 120])
    s = t - 50
    with torch.no_grad():
        y_t = boot.student(eps, t, cond)
        sig_t, sig_s = teacher.sigmas[t], teacher.sigmas[s]
        f = teacher.denoise(y_t + sig_t[:, None, None, None] * eps, sig_t, cond)
        delta = 1 - sig_s / sig_t
        target = y_t + delta[:, None, None, None] * (f - y_t)
        # reference: diffusers DDIM in VP space
        ddim = DDIMScheduler.from_config(sched_cfg, clip_sample=False)
        ddim.set_timesteps(20)  # 1000 // 20 = 50 = step size
        ab = ddim.alphas_cumprod
        for i in range(3):
            a_t, a_s = ab[t[i]], ab[s[i]]
            x_vp = a_t.sqrt() * y_t[i : i + 1] + (1 - a_t).sqrt() * eps[i : i + 1]
            eps_hat = teacher.model(x_vp, t[i : i + 1], class_labels=cond["class_labels"][i : i + 1]).sample
            x_s = ddim.step(eps_hat, int(t[i]), x_vp).prev_sample
            y_s = (x_s - (1 - a_s).sqrt() * eps[i : i + 1]) / a_s.sqrt()
            torch.testing.assert_close(target[i : i + 1], y_s, rtol=1e-3, atol=1e-3)
            # delta closed form: 1 - exp(lambda_s - lambda_t), lambda = -log(alpha / sigma_vp)
            lam = lambda a: -torch.log(a.sqrt() / (1 - a).sqrt())  # noqa: E731
            torch.testing.assert_close(delta[i], 1 - torch.exp(lam(a_s) - lam(a_t)), rtol=1e-4, atol=1e-6)


def test_boot_student_at_query_timestep_is_exported_generator(teacher):
    d = fast_build("boot", teacher)
    eps = torch.randn(5, 2)
    cond = teacher.encode_conditions(torch.arange(5))
    with torch.no_grad():
        a = d.student(eps, torch.full((5,), d.config.query_timestep), cond)
        b = d.generator_for_export()(eps, cond)
    torch.testing.assert_close(a, b)
