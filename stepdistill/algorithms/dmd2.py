"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

Per generator update (spec: shared/docs/research/algos_dmd2_vsd_disback.md §3):

    x   = G(z, c)                                  (backward simulation for multi-step students)
    t   ~ U{min_step..max_step};  x_t = x + sigma_t eps
    g   = (D_fake(x_t) - D_real^w(x_t)) / mean_CHW |x - D_real^w(x_t)|        (no grad; CFG w on real only)
    L_G = 0.5 mean((x - sg(x - g))^2) + lambda_G softplus(-D(x_t'))             (GAN through the critic)

Per critic update, on x.detach():

    L_C = denoising loss of the fake score on generator samples (teacher's own parametrisation)
          + lambda_D [softplus(D(fake_t')) + softplus(-D(real_t'))]

Two time-scale update rule: the critic updates every step, the generator every ``update_ratio``
steps (and the critic also on those).  Optional stages before DMD: a regression warm-start on
teacher (noise, ODE sample) pairs (DMD v1 / DMD2-SDXL; MSE here, LPIPS needs downloaded weights)
and a critic-only warm-up.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..teachers.base import DiffusionTeacher, cond_index
from . import register
from .base import Distiller, LossOutput
from .common import (
    DEFAULT_LORA_TARGETS,
    BottleneckFeatures,
    GANHead,
    GeneratorLoRA,
    GeneratorOptions,
    MemoryOptions,
    RegressionPairs,
    add_generator_lora,
    batch_size_of,
    checkpointing_off,
    critic_denoising_loss,
    default_weighting,
    enable_gradient_checkpointing,
    frac_to_index,
    frozen,
    gan_feature_shape,
    generate_cached,
    make_generator,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    per_sample_mean_abs,
    sample_timestep_indices,
)


@dataclass
class DMD2Config(GeneratorOptions, MemoryOptions):
    generator_timesteps: list = field(default_factory=lambda: [999])  # descending; >1 = multi-step student
    backward_simulation: bool = True  # multi-step: train on the student's own rollouts (paper §3.6)
    min_step_frac: float = 0.02  # DM timestep range: indices 20..980 of 1000
    max_step_frac: float = 0.98
    real_guidance_scale: float | None = None  # CFG on the teacher ("real") score; None = teacher's default
    update_ratio: int = 5  # critic updates per generator update (TTUR): 5 ImageNet/SDXL, 10 SD1.5
    critic_weighting: str | None = None  # epsilon | v_prediction | sample | edm; None = teacher's own
    gan_weight_g: float = 0.0  # lambda_G (3e-3 ImageNet, 1e-3 SD1.5 stage 2, 5e-3 SDXL); 0 disables
    gan_weight_d: float = 0.01  # lambda_D (1e-2 in every released config); used when gan_weight_g > 0
    gan_max_step_frac: float = 1.0  # GAN inputs noised at t ~ U{0..frac*T-1}
    critic_warmup_steps: int = 0  # critic-only steps before the first generator update
    regression_steps: int = 0  # generator-only regression warm-start steps (0 disables)
    regression_pairs: int = 0  # number of teacher (noise, sample) pairs
    regression_sampler: str = "ddim"
    regression_sampler_steps: int = 10
    regression_lr_scale: float = 1.0  # generator lr multiplier during the regression stage
    regression_prompts: str | list | None = None  # text teachers: prompt file / list of the pairs (None = run's source)
    regression_seed: int = 1234  # noise (and class labels) of the pairs
    regression_shard_size: int = 256  # pairs per shard file
    regression_batch_size: int = 32  # teacher samples per generation call
    pairs_dir: str | None = None  # pair-set root; None = $STEPDISTILL_CACHE/regression-pairs
    generator_lr: float = 1e-5
    critic_lr: float = 1e-4
    # memory and compute levers (docs/training.md "Memory and compute levers")
    critic_lora: dict | None = None  # {rank, alpha, target_modules, dropout}: LoRA fake score on the teacher's weights
    no_grad_outside_phase: bool = True  # generator phase: no weight gradients for the critic (GAN term)
    gan_stop_at_bottleneck: bool = True  # GAN forwards stop at the bottleneck the head reads


@register
class DMD2(Distiller):
    name = "dmd2"
    paper = "Yin et al., Improved Distribution Matching Distillation for Fast Image Synthesis, NeurIPS 2024"
    Config = DMD2Config

    def __init__(self, teacher: DiffusionTeacher, config: DMD2Config):
        super().__init__(teacher, config)
        c = config
        if c.update_ratio < 1:
            raise ValueError("algorithm.params.update_ratio must be >= 1")
        if not 0 <= c.min_step_frac <= c.max_step_frac <= 1:
            raise ValueError("need 0 <= min_step_frac <= max_step_frac <= 1")
        if c.regression_steps > 0 and c.regression_pairs <= 0:
            raise ValueError("regression_steps > 0 needs regression_pairs > 0 (teacher noise-image pairs)")
        self.generator = make_generator(teacher, [int(t) for t in c.generator_timesteps], lora=c.generator_lora)
        self.critic = self._make_critic(teacher, c.critic_lora)  # the fake score
        self.weighting = c.critic_weighting or default_weighting(teacher)
        self.min_step = frac_to_index(teacher, c.min_step_frac)
        self.max_step = frac_to_index(teacher, c.max_step_frac)
        self.use_gan = c.gan_weight_g > 0
        self.critic_group = nn.ModuleDict({"score": self.critic})
        if self.use_gan:
            self.features = BottleneckFeatures(self.critic, stop=c.gan_stop_at_bottleneck)
            example = teacher.null_condition(1)
            self.critic_group["gan_head"] = GANHead(gan_feature_shape(self.critic, self.features, example))
        self._regression: RegressionPairs | None = None  # made on first use, on the teacher's device
        enable_gradient_checkpointing(self, c.gradient_checkpointing)

    @staticmethod
    def _make_critic(teacher: DiffusionTeacher, spec: dict | None) -> DiffusionTeacher:
        """The fake score: a full trainable copy, or (``critic_lora``) a LoRA adapter whose frozen
        base weights are the teacher's own tensors, in the teacher's dtype (one copy of the base in
        memory, as SwiftBrush's LoRA teacher; the adapter trains in float32)."""
        critic = teacher.trainable_copy()
        if spec is None:
            return critic
        from ..config import from_dict

        lora = from_dict(GeneratorLoRA, spec, prefix="algorithm.params.critic_lora.")
        net = getattr(teacher, "model", None)
        if not isinstance(net, nn.Module) or not isinstance(getattr(critic, "model", None), nn.Module):
            raise ValueError(f"algorithm.params.critic_lora needs a diffusers teacher network; {type(teacher).__name__} has none")
        if lora.rank < 1:
            raise ValueError(f"algorithm.params.critic_lora.rank must be >= 1, got {lora.rank}")
        if lora.target_modules is None:
            lora.target_modules = list(DEFAULT_LORA_TARGETS)
        dtype = next(net.parameters()).dtype
        critic.model.to(dtype)  # same dtype as the teacher, so that the base tensors can be shared
        add_generator_lora(critic, lora, share_with=net)
        for name, p in critic.model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        return critic

    # -- regression pairs -------------------------------------------------------------------------
    def regression_pairs(self) -> RegressionPairs:
        """The regression set, its missing shards generated now (on the teacher's current device;
        this process's share first).  Text teachers: the prompts come from
        ``regression_prompts`` or the run's prompt source (:meth:`build_source`), sampled with CFG
        ``real_guidance_scale``."""
        if self._regression is None:
            c = self.config
            source = getattr(self, "condition_source", None)
            if c.regression_prompts is not None:
                from ..data.sources import PromptSource

                source = PromptSource(c.regression_prompts, seed=c.regression_seed)
            text = self.teacher.random_raw_conditions(1, torch.Generator().manual_seed(0)) is None
            self._regression = RegressionPairs(
                self.teacher, c.regression_pairs, num_steps=c.regression_sampler_steps, sampler=c.regression_sampler,
                guidance_scale=c.real_guidance_scale, seed=c.regression_seed, shard_size=c.regression_shard_size,
                batch_size=c.regression_batch_size, root=c.pairs_dir, prompt_source=source if text else None,
            )
        return self._regression.ensure()

    def on_step_begin(self, step: int, is_main: bool) -> None:
        if self.config.regression_steps > 0 and self.stage(step)[0] == "regression":
            self.regression_pairs()

    # -- interface ----------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic_group}

    def lr_defaults(self) -> dict[str, float]:
        return {"generator": self.config.generator_lr, "critic": self.config.critic_lr}

    def lr_scale(self, step: int, group: str) -> float:
        if group == "generator" and step < self.config.regression_steps:
            return self.config.regression_lr_scale
        return 1.0

    def stage(self, step: int) -> tuple[str, int]:
        c = self.config
        if step < c.regression_steps:
            return "regression", step
        step -= c.regression_steps
        if step < c.critic_warmup_steps:
            return "critic_warmup", step
        return "dmd", step - c.critic_warmup_steps

    def phase(self, step: int) -> list[str]:
        stage, s = self.stage(step)
        if stage == "regression":
            return ["generator"]
        if stage == "critic_warmup":
            return ["critic"]
        return ["generator", "critic"] if s % self.config.update_ratio == 0 else ["critic"]

    def generator_for_export(self):
        return self.generator

    # -- losses ---------------------------------------------------------------------------------
    def _generate(self, batch: dict, step: int, cache: dict, grad: bool):
        """Generator sample for this step (cached so that both phases see the same x)."""
        gen = self.generator

        def rollout(z, cond):
            if gen.num_steps > 1 and self.config.backward_simulation:
                return self._backward_simulation(z, cond, step)
            return gen(z, cond, num_steps=gen.num_steps)

        return generate_cached(self.teacher, gen, batch, cache, grad, rollout)

    def _backward_simulation(self, z, cond, step):
        """DMD2 §3.6: roll the current student out k steps without grad (k shared across ranks,
        drawn from the step number), re-noise with fresh noise, then one step with grad."""
        gen = self.generator
        k = int(torch.randint(0, gen.num_steps, (1,), generator=torch.Generator().manual_seed(step), device="cpu"))
        x = gen.start(z)
        if k > 0:
            with torch.no_grad():
                x0 = gen(z, cond, num_steps=k)
                x = gen.renoise(x0, k, torch.randn_like(x0))
        return gen.denoise_step(x, k, cond)

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        stage, _ = self.stage(step)
        if group == "generator":
            if stage == "regression":
                return self._regression_loss(batch)
            return self._generator_loss(batch, step, cache)
        return self._critic_loss(batch, step, cache)

    def _regression_loss(self, batch: dict) -> LossOutput:
        p = self.regression_pairs()
        n = batch_size_of(batch)
        device = self.teacher.sigmas.device
        idx = torch.randint(0, p.num_rows, (n,), device="cpu")  # host indices: rows are read from disk
        noise, x0, raw = p.rows(idx, device)
        cond = self.teacher.encode_conditions(raw) if raw is not None else None
        x = self.generator(noise, cond)
        loss = torch.nn.functional.mse_loss(x, x0)
        return LossOutput(loss, {"regression": loss.detach()})

    def _generator_loss(self, batch, step, cache) -> LossOutput:
        c = self.config
        x, cond = self._generate(batch, step, cache, grad=True)
        n = x.shape[0]
        idx = sample_timestep_indices(n, self.min_step, self.max_step, device=x.device)
        sigma = self.teacher.sigmas[idx]
        with torch.no_grad():
            xt = self.teacher.add_noise(x.detach(), sigma)
            real = self.teacher.denoise(xt, sigma, cond, c.real_guidance_scale)
            fake = self.critic.denoise(xt, sigma, cond, guidance_scale=1.0)
            grad = (fake - real) / per_sample_mean_abs(x.detach() - real).clamp_min(1e-8)
        dm = self.surrogate_loss(x, grad)
        logs = {"dm": dm.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().detach()}
        loss = dm
        if self.use_gan:
            gidx = sample_timestep_indices(n, 0, frac_to_index(self.teacher, c.gan_max_step_frac), device=x.device)
            gs = self.teacher.sigmas[gidx]
            # the gradient reaches x through the critic; its weights get none (they would be discarded)
            # (a checkpointed critic runs this forward whole: recomputing it in backward, after the
            # weights are trainable again, would save other tensors)
            freeze = c.no_grad_outside_phase
            with frozen(self.critic_group) if freeze else nullcontext(), \
                    checkpointing_off(self.critic_group) if freeze else nullcontext():
                feat = self.features(self.critic, self.critic.add_noise(x, gs), gs, cond)
                g_gan = nonsaturating_g_loss(self.critic_group["gan_head"](feat))
            loss = loss + c.gan_weight_g * g_gan
            logs["gan_g"] = g_gan.detach()
        return LossOutput(loss, logs)

    def _critic_loss(self, batch, step, cache) -> LossOutput:
        c = self.config
        x, cond = self._generate(batch, step, cache, grad=False)
        n = x.shape[0]
        idx = sample_timestep_indices(n, 0, self.teacher.num_train_timesteps - 1, device=x.device)
        fake_loss = critic_denoising_loss(self.critic, x, cond, idx, self.weighting)
        logs = {"critic_dsm": fake_loss.detach()}
        loss = fake_loss
        if self.use_gan:
            real = batch.get("real")
            if real is None:
                raise ValueError("DMD2 with gan_weight_g > 0 needs real data: set train.dataset")
            real = real.to(x.device)
            encode = getattr(self.teacher, "encode", None)
            if encode is not None:
                real = encode(real)
            real_raw = batch.get("real_raw_cond", batch.get("raw_cond"))  # labels of the real images
            real_cond = self.teacher.encode_conditions(real_raw) if real_raw is not None else cond
            top = frac_to_index(self.teacher, c.gan_max_step_frac)
            head = self.critic_group["gan_head"]
            i_f = sample_timestep_indices(n, 0, top, device=x.device)
            i_r = sample_timestep_indices(real.shape[0], 0, top, device=x.device)
            s_f, s_r = self.teacher.sigmas[i_f], self.teacher.sigmas[i_r]
            lf = head(self.features(self.critic, self.critic.add_noise(x, s_f), s_f, cond))
            lr = head(self.features(self.critic, self.critic.add_noise(real, s_r), s_r, real_cond))
            d = nonsaturating_d_loss(lr, lf)
            loss = loss + c.gan_weight_d * d
            logs.update(gan_d=d.detach(), d_real=lr.mean().detach(), d_fake=lf.mean().detach())
        return LossOutput(loss, logs)


__all__ = ["DMD2", "DMD2Config", "cond_index"]
