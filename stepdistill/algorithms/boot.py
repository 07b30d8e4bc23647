"""BOOT: data-free distillation of diffusion models with bootstrapping
(Gu et al., ICML 2024, arXiv 2306.05544).  Spec: shared/docs/research/algos_boot_dd_msd.md §1.

The student ``g(eps, t, c)`` always reads the pure noise ``eps`` and predicts the *signal*
``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's DDIM trajectory started at ``x_T = eps``.
In sigma language (``x = y + sigma eps``, ``lambda_t = -log(alpha_t / sigma^{VP}_t) = log sigma_t``)
one exact DDIM step from t to s < t is

    y_s = y_t + delta (f(y_t + sigma_t eps, t) - y_t),      delta = 1 - exp(lambda_s - lambda_t) = 1 - sigma_s / sigma_t

so the bootstrapping loss regresses the student at s onto one teacher DDIM step from the
student's own (stop-gradient) estimate at t, weighted by 1/delta^2 (a finite-difference
derivative matching), plus a boundary loss at the noise end, ``g(eps, T) = f(eps, T)``.
Guidance is applied inside the teacher target.  No data is used at any point.

Inference queries the student at a small timestep (``query_timestep``; default index 20, where
the diffusers ``LCMScheduler`` boundary scalings are identity to ~1e-5 and ``y`` equals the
trajectory's x0 up to a 2% step), so the exported pipeline is the stock one-step sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..teachers.base import DiffusionTeacher, append_dims
from . import register
from .base import Distiller, LossOutput
from .common import (
    GeneratorOptions,
    MemoryOptions,
    batch_size_of,
    draw_conditions,
    enable_gradient_checkpointing,
    make_generator,
)


@dataclass
class BOOTConfig(GeneratorOptions, MemoryOptions):
    step_size: int = 50  # Delta: s = t - step_size on the 1000-step index grid (T/Delta = 20 DDIM steps)
    query_timestep: int = 20  # timestep index the exported one-step student is evaluated at ("t ~ 0")
    guidance_scale: float | None = None  # CFG inside the teacher target; None = teacher's default
    boundary_weight: float = 1.0  # weight of L_BC = ||g(eps, T) - f(eps, T)||^2
    max_delta_weight: float = 1e4  # cap on 1/delta^2 (guards tiny steps at the noise end)
    generator_lr: float = 2e-5


@register
class BOOT(Distiller):
    name = "boot"
    paper = "Gu et al., BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping, ICML 2024"
    Config = BOOTConfig
    needs_data = False

    def __init__(self, teacher: DiffusionTeacher, config: BOOTConfig):
        super().__init__(teacher, config)
        c = config
        n = teacher.num_train_timesteps
        if not 1 <= c.step_size < n:
            raise ValueError(f"algorithm.params.step_size must lie in [1, {n - 1}]")
        if not 0 <= c.query_timestep < n - c.step_size:
            raise ValueError("algorithm.params.query_timestep must lie below T - step_size")
        self.generator = make_generator(teacher, [c.query_timestep], lora=c.generator_lora)
        # BOOT's student predicts the signal y_t directly (the paper's teachers are signal-prediction
        # models): with the teacher's eps/v parametrisation the output at small t is ~ its pure-noise
        # input and the network cannot express y.  The exported LCMScheduler gets prediction_type=sample.
        self.generator.denoiser.prediction_type = "sample"
        self.T = n - 1
        enable_gradient_checkpointing(self, c.gradient_checkpointing)

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def lr_defaults(self) -> dict[str, float]:
        return {"generator": self.config.generator_lr}

    def generator_for_export(self):
        return self.generator

    # -- the time-conditioned student ---------------------------------------------------------
    def student(self, eps: torch.Tensor, idx: torch.Tensor, cond) -> torch.Tensor:
        """y_t = g(eps, t, c) at per-sample timestep indices; identical to the exported
        generator's computation when ``idx == query_timestep``."""
        den = self.generator.denoiser
        return self.generator.denoise_at(den.noise_to_input(eps, den.sigmas[idx]), idx, cond)

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        c = self.config
        teacher = self.teacher
        n = batch_size_of(batch)
        device = teacher.sigmas.device
        cond = draw_conditions(teacher, batch, n)
        eps = torch.randn((n, *teacher.sample_shape), device=device)
        t = torch.randint(c.query_timestep + c.step_size, self.T + 1, (n,), device=device)
        s = t - c.step_size
        sig_t, sig_s = teacher.sigmas[t], teacher.sigmas[s]
        delta = 1 - sig_s / sig_t  # 1 - exp(lambda_s - lambda_t)
        y_s = self.student(eps, s, cond)
        with torch.no_grad():
            y_t = self.student(eps, t, cond)
            x_t = y_t + append_dims(sig_t, eps.ndim) * eps
            f = teacher.denoise(x_t, sig_t, cond, c.guidance_scale)
            target = y_t + append_dims(delta, eps.ndim) * (f - y_t)
        w = (1 / delta**2).clamp(max=c.max_delta_weight)
        l_bs = (w * ((y_s - target) ** 2).flatten(1).mean(1)).mean()
        loss = l_bs
        logs = {"bootstrap": l_bs.detach()}
        if c.boundary_weight > 0:
            tt = torch.full((n,), self.T, device=device)
            y_T = self.student(eps, tt, cond)
            with torch.no_grad():
                sig_T = teacher.sigmas[tt]
                f_T = teacher.denoise(teacher.noise_to_input(eps, sig_T), sig_T, cond, c.guidance_scale)
            l_bc = ((y_T - f_T) ** 2).flatten(1).mean(1).mean()
            loss = loss + c.boundary_weight * l_bc
            logs["boundary"] = l_bc.detach()
        return LossOutput(loss, logs)

