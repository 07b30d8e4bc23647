"""VSD for one-step generation: SwiftBrush (Nguyen & Tran, CVPR 2024), from ProlificDreamer's
variational score distillation (Wang et al. 2023).  Image-free: only conditions are needed.

Per step (spec: shared/docs/research/algos_dmd2_vsd_disback.md §4.2), 1:1 schedule:

    x   = G(z, c)
    t   ~ U{20..980};  x_t = x + sigma_t eps
    g   = (1 - abar_t)(eps_teacher^w - eps_critic^w')   = sqrt(abar (1-abar)) (x0_critic - x0_teacher)
    L_G = 0.5 mean((x - sg(x - g))^2)
    L_C = abar_t' ||eps_critic(x_t', t', c') - eps||^2,  t' ~ U{0..999}, c' = null w.p. 0.1

The critic ("LoRA teacher") is a LoRA adapter on a copy of the teacher network (peft, through
diffusers' ``add_adapter``) or a full copy.  SwiftBrush applies the same CFG scale to the critic
as to the teacher; threestudio-style VSD uses none.  ``critic_guidance_scale`` makes that choice
explicit: ``null`` = same as the teacher (SwiftBrush), a number = that scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..teachers.base import DiffusionTeacher, append_dims, cond_index
from . import register
from .base import Distiller, LossOutput
from .common import (
    GeneratorOptions,
    MemoryOptions,
    critic_denoising_loss,
    default_weighting,
    enable_gradient_checkpointing,
    frac_to_index,
    generate_cached,
    make_generator,
    sample_timestep_indices,
)


@dataclass
class VSDConfig(GeneratorOptions, MemoryOptions):
    generator_timesteps: list = field(default_factory=lambda: [999])
    min_step_frac: float = 0.02
    max_step_frac: float = 0.98
    guidance_scale: float | None = None  # CFG on the teacher; None = teacher's default (SwiftBrush: 4.5)
    critic_guidance_scale: float | None = None  # None = same as the teacher's (SwiftBrush); 1.0 = no CFG
    critic: str = "lora"  # lora | full
    lora_rank: int = 64
    lora_alpha: float = 108.0
    lora_targets: list = field(default_factory=lambda: ["to_q", "to_v"])  # SwiftBrush: q and v projections
    critic_weighting: str | None = None  # None = teacher's own parametrisation, times abar (SwiftBrush)
    cond_dropout: float = 0.1  # critic: condition replaced by the null condition
    update_ratio: int = 1  # critic updates per generator update
    generator_lr: float = 1e-6
    critic_lr: float = 1e-3


def add_lora(denoiser: DiffusionTeacher, rank: int, alpha: float, targets: list[str]) -> DiffusionTeacher:
    """Freeze ``denoiser``'s network and attach a trainable peft LoRA adapter to ``targets``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.functional import set_requires_grad

    model = getattr(denoiser, "model", denoiser)
    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    try:
        inject_adapter_in_model(cfg, model, adapter_name="default")
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(f"LoRA targets {targets} not found in {type(model).__name__} ({e}); candidates: {names}") from e
    set_requires_grad(model, "default")  # the adapter's tensors train; the frozen base stays frozen
    return denoiser


@register
class VSD(Distiller):
    name = "vsd"
    paper = "Nguyen & Tran, SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation, CVPR 2024"
    Config = VSDConfig

    def __init__(self, teacher: DiffusionTeacher, config: VSDConfig):
        super().__init__(teacher, config)
        c = config
        if c.critic not in ("lora", "full"):
            raise ValueError(f"algorithm.params.critic must be 'lora' or 'full', got {c.critic!r}")
        self.generator = make_generator(teacher, [int(t) for t in c.generator_timesteps], lora=c.generator_lora)
        critic = teacher.trainable_copy()
        if c.critic == "lora":
            critic = add_lora(critic, c.lora_rank, c.lora_alpha, c.lora_targets)
        self.critic = critic
        self.weighting = c.critic_weighting or default_weighting(teacher)
        self.min_step = frac_to_index(teacher, c.min_step_frac)
        self.max_step = frac_to_index(teacher, c.max_step_frac)
        enable_gradient_checkpointing(self, c.gradient_checkpointing)

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic}

    def lr_defaults(self) -> dict[str, float]:
        return {"generator": self.config.generator_lr, "critic": self.config.critic_lr}

    def phase(self, step: int) -> list[str]:
        r = self.config.update_ratio
        return ["generator", "critic"] if step % r == 0 else ["critic"]

    def generator_for_export(self):
        return self.generator

    def _teacher_w(self) -> float:
        w = self.config.guidance_scale
        return self.teacher.guidance_scale if w is None else w

    def _critic_w(self) -> float:
        w = self.config.critic_guidance_scale
        return self._teacher_w() if w is None else w

    def _sample(self, batch, cache, grad):
        return generate_cached(self.teacher, self.generator, batch, cache, grad)

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        if group == "generator":
            x, cond = self._sample(batch, cache, grad=True)
            n = x.shape[0]
            idx = sample_timestep_indices(n, self.min_step, self.max_step, device=x.device)
            sigma = self.teacher.sigmas[idx]
            with torch.no_grad():
                xt = self.teacher.add_noise(x.detach(), sigma)
                real = self.teacher.denoise(xt, sigma, cond, self._teacher_w())
                fake = self.critic.denoise(xt, sigma, cond, self._critic_w())
                # (1 - abar)(eps_T - eps_L) = sqrt(abar (1 - abar)) (x0_L - x0_T) = sigma/(1+sigma^2) (...)
                w = append_dims(sigma / (1 + sigma**2), x.ndim)
                grad = w * (fake - real)
            loss = self.surrogate_loss(x, grad)
            return LossOutput(loss, {"vsd": loss.detach(), "vsd_grad_norm": grad.flatten(1).norm(dim=1).mean().detach()})
        x, cond = self._sample(batch, cache, grad=False)
        n = x.shape[0]
        if cond is not None and self.config.cond_dropout > 0:
            drop = torch.rand(n, device=x.device) < self.config.cond_dropout
            null = self.teacher.null_condition(n)
            cond = _where_cond(drop, null, cond)
        idx = sample_timestep_indices(n, 0, self.teacher.num_train_timesteps - 1, device=x.device)
        sigma = self.teacher.sigmas[idx]
        loss = critic_denoising_loss(self.critic, x, cond, idx, self.weighting, extra_weight=1 / (1 + sigma**2))
        return LossOutput(loss, {"critic_dsm": loss.detach()})


def _where_cond(mask, a: dict, b: dict) -> dict:
    out = {}
    for k, vb in b.items():
        va = a[k]
        if isinstance(vb, torch.Tensor):
            m = mask.reshape(mask.shape + (1,) * (vb.ndim - 1)).to(vb.device)
            out[k] = torch.where(m, va.to(vb.device), vb)
        elif isinstance(vb, dict):
            out[k] = _where_cond(mask, va, vb)
        else:
            out[k] = vb
    return out


__all__ = ["VSD", "VSDConfig", "add_lora", "cond_index"]
