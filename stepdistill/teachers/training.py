"""Training a diffusers teacher from data (the embedded digits teacher).

Denoising score matching in the model's own parametrisation (epsilon / v_prediction / sample),
DDPM-style: ``t ~ U{0..T-1}``, ``x_t = sqrt(abar) x0 + sqrt(1-abar) eps``, MSE to the target, with
condition dropout to the null class so that classifier-free guidance works.  Written as a
``Distiller`` with a single group so that the generic trainer (checkpoints, exact resume, EMA,
logging, sample grids) is reused unchanged; it is not registered as a distillation algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.base import Distiller, LossOutput


@dataclass
class UNetSpec:
    """Architecture of the class-conditional UNet2DModel teacher (diffusers)."""

    sample_size: int = 8
    in_channels: int = 1
    block_out_channels: list = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention: bool = True  # attention in the lowest-resolution block
    norm_num_groups: int = 8
    num_classes: int = 10
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # see docs: well-posed x0 at t = 999, unlike epsilon
    num_train_timesteps: int = 1000
    cond_dropout: float = 0.1


def build_unet(spec: UNetSpec):
    from diffusers import UNet2DModel

    n = len(spec.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if spec.attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=spec.norm_num_groups,
        num_class_embeds=spec.num_classes + 1,  # last index = null class (CFG)
        attention_head_dim=8,
    )


def build_scheduler(spec: UNetSpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        prediction_type=spec.prediction_type,
        clip_sample=False,
    )


class DenoiserTraining(Distiller):
    """Single-group 'algorithm': train a UNet2DModel teacher by denoising score matching."""

    name = "teacher-dsm"
    paper = "Ho et al. 2020 (DDPM); Salimans & Ho 2022 (v-prediction); Ho & Salimans 2022 (CFG)"
    Config = UNetSpec
    needs_data = True

    def __init__(self, spec: UNetSpec, unet: nn.Module | None = None):
        nn.Module.__init__(self)
        self.config = spec
        self.unet = unet if unet is not None else build_unet(spec)
        self.scheduler = build_scheduler(spec)

    def trainable(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def lr_defaults(self) -> dict[str, float]:
        return {"unet": 2e-3}

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        x0 = batch["real"]
        labels = batch["raw_cond"]
        b = x0.shape[0]
        device = x0.device
        spec = self.config
        t = torch.randint(0, spec.num_train_timesteps, (b,), device=device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        labels = torch.as_tensor(labels, device=device).long()
        drop = torch.rand(b, device=device) < spec.cond_dropout
        labels = torch.where(drop, torch.full_like(labels, spec.num_classes), labels)
        pred = self.unet(xt, t, class_labels=labels, return_dict=False)[0]
        if spec.prediction_type == "epsilon":
            target = noise
        elif spec.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        elif spec.prediction_type == "sample":
            target = x0
        else:
            raise ValueError(f"unsupported prediction_type {spec.prediction_type!r} for teacher training")
        loss = F.mse_loss(pred.float(), target.float())
        return LossOutput(loss, {"dsm": float(loss.detach())})

    def generator_for_export(self):
        raise NotImplementedError("teacher training exports with stepdistill.export.export_teacher_pipeline")
