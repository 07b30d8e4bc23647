"""The teacher trainers as training tasks: a diffusers UNet denoiser, a VQ tokenizer and an
autoregressive language model.

They are :class:`~stepdistill.training.task.TrainingTask` s (not distillation algorithms: no
teacher, not registered), so the generic trainer (checkpoints, exact resume, EMA, logging, sample
grids) trains them unchanged.  The models they train are defined in the teacher layer
(:mod:`stepdistill.teachers.training`, :mod:`stepdistill.teachers.autoregressive`), which imports
nothing from here: the layering is ``teachers`` / ``data`` < ``training`` < ``algorithms``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..teachers.autoregressive import LMSpec, VQSpec, VQTrainSpec, build_vqvae
from ..teachers.training import UNetSpec, build_scheduler, build_unet
from .task import LossOutput, TrainingTask

__all__ = ["DenoiserTraining", "VQTraining", "ARLMTraining"]


class DenoiserTraining(TrainingTask):
    """Single-group 'algorithm': train a UNet2DModel teacher by denoising score matching."""

    name = "teacher-dsm"
    paper = "Ho et al. 2020 (DDPM); Salimans & Ho 2022 (v-prediction); Ho & Salimans 2022 (CFG)"
    Config = UNetSpec
    needs_data = True

    def __init__(self, spec: UNetSpec, unet: nn.Module | None = None):
        super().__init__()
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
        return LossOutput(loss, {"dsm": loss.detach()})

    def as_teacher(self):
        """The network being trained, wrapped as a sampling teacher."""
        from ..teachers.diffusion import DiffusersTeacher

        return DiffusersTeacher(self.unet, dict(self.scheduler.config), num_classes=self.config.num_classes)

    def sample_images(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """DDIM-10 samples of classes ``0, 1, 2, ...`` cycling."""
        teacher = self.as_teacher()
        labels = torch.arange(n) % self.config.num_classes
        was = self.unet.training
        self.unet.eval()
        x = teacher.sample(n, teacher.encode_conditions(labels), num_steps=10, sampler="ddim", generator=generator)
        self.unet.train(was)
        return x.clamp(-1, 1)

    def export(self, output_dir, *, ema_state=None, extra=None, overwrite=False) -> Path:
        """A diffusers class-conditional pipeline folder (EMA weights loaded into the UNet first)."""
        import shutil

        from ..export import export_teacher_pipeline

        if ema_state is not None:
            self.unet.load_state_dict(ema_state)
        output_dir = Path(output_dir)
        if output_dir.exists() and overwrite:
            shutil.rmtree(output_dir)
        return export_teacher_pipeline(self.unet, self.scheduler, self.config.num_classes, output_dir)


class VQTraining(TrainingTask):
    """Single-group 'algorithm': VQ-VAE training of the tokenizer on images.

    Loss: ``mse(decode(quantize(encode(x))), x) + commitment_weight * vq_loss`` with the
    straight-through estimator (diffusers' ``VectorQuantizer``, legacy weighting
    ``||sg(z_q) - z||^2 + 0.25 ||z_q - sg(z)||^2``).  Dead codes (unused by the ~B*h*w latents of
    the current batch) are re-initialised to random latents of the batch every
    ``restart_every_steps`` steps until ``restart_until_steps`` -- the standard remedy for codebook
    collapse with small codebooks; deterministic under the loop's per-step seeding, so resume stays
    exact.
    """

    name = "teacher-vq"
    paper = "van den Oord et al. 2017 (VQ-VAE); Esser et al. 2021 (VQGAN, the diffusers VQModel)"
    Config = VQTrainSpec
    needs_data = True

    def __init__(self, spec: VQSpec, train_spec: VQTrainSpec, vqvae: nn.Module | None = None):
        super().__init__()
        self.config = train_spec
        self.spec = spec
        self.vqvae = vqvae if vqvae is not None else build_vqvae(spec)

    def trainable(self) -> dict[str, nn.Module]:
        return {"vqvae": self.vqvae}

    def lr_defaults(self) -> dict[str, float]:
        return {"vqvae": self.config.lr}

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        x = batch["real"]
        vq = self.vqvae
        z = vq.encode(x).latents
        c = self.config
        if c.restart_every_steps and step < c.restart_until_steps and step % c.restart_every_steps == 0:
            self._restart_dead_codes(z.detach())
        quant, vq_loss, info = vq.quantize(z)
        idx = info[2].reshape(-1)
        dec = vq.decoder(vq.post_quant_conv(quant))
        recon = F.mse_loss(dec, x)
        loss = recon + c.commitment_weight * vq_loss
        used = torch.unique(idx).numel()
        return LossOutput(
            loss, {"recon": recon.detach(), "vq": vq_loss.detach(), "codes_used": float(used)}
        )

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor) -> None:
        emb = self.vqvae.quantize.embedding.weight
        flat = z.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        idx = torch.cdist(flat, emb).argmin(-1)
        counts = torch.bincount(idx, minlength=emb.shape[0])
        dead = (counts == 0).nonzero().flatten()
        if dead.numel() == 0:
            return
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        jitter = 0.01 * flat.std() * torch.randn(dead.numel(), emb.shape[1], device=flat.device)
        emb[dead] = flat[pick] + jitter


class ARLMTraining(TrainingTask):
    """Single-group 'algorithm': next-token cross-entropy of the causal LM on tokenised images.

    Batches: ``real`` = token indices (B, n) (raster order), ``raw_cond`` = class ids.  The class
    prefix is replaced by the null class with probability ``cond_dropout`` (classifier-free
    guidance).  Cross-entropy over the codebook logits only (class tokens are never predicted).
    """

    name = "teacher-ar-lm"
    paper = "Sun et al. 2024 (LlamaGen); Ho & Salimans 2022 (CFG)"
    Config = LMSpec
    needs_data = True

    def __init__(self, spec: LMSpec, transformer: nn.Module, codebook_size: int, num_classes: int,
                 make_teacher: Callable[[], nn.Module] | None = None):
        super().__init__()
        self.config = spec
        self.transformer = transformer
        self.codebook_size = int(codebook_size)
        self.num_classes = int(num_classes)
        self._make_teacher = make_teacher  # () -> ARTeacher around this transformer (grids, export)

    def trainable(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer}

    def lr_defaults(self) -> dict[str, float]:
        return {"transformer": 1e-3}

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        tokens = batch["real"].long()
        labels = torch.as_tensor(batch["raw_cond"], device=tokens.device).long()
        b = tokens.shape[0]
        drop = torch.rand(b, device=tokens.device) < self.config.cond_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        ids = torch.cat([(labels + self.codebook_size)[:, None], tokens[:, :-1]], 1)
        logits = self.transformer(input_ids=ids, use_cache=False).logits[..., : self.codebook_size]
        loss = F.cross_entropy(logits.reshape(-1, self.codebook_size).float(), tokens.reshape(-1))
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens).float().mean()
        return LossOutput(loss, {"ce": loss.detach(), "token_acc": acc})

    def sample_images(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Decoded samples of classes ``0, 1, 2, ...`` cycling (needs ``make_teacher``)."""
        if self._make_teacher is None:
            return None
        teacher = self._make_teacher()
        was = self.transformer.training
        self.transformer.eval()
        x = teacher.sample(class_labels=torch.arange(n) % self.num_classes, generator=generator, decode=True)
        self.transformer.train(was)
        return x
