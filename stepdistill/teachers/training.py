"""Training a diffusers teacher from data (the embedded digits teacher).

Denoising score matching in the model's own parametrisation (epsilon / v_prediction / sample),
DDPM-style: ``t ~ U{0..T-1}``, ``x_t = sqrt(abar) x0 + sqrt(1-abar) eps``, MSE to the target, with
condition dropout to the null class so that classifier-free guidance works.  This module defines
the model (:class:`UNetSpec`, :func:`build_unet`, :func:`build_scheduler`); the training task
(``DenoiserTraining``, a single-group task for the generic trainer: checkpoints, exact resume, EMA,
logging, sample grids) lives in :mod:`stepdistill.training.tasks`, above the teacher layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
