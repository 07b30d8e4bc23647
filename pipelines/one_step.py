"""One-step / few-step pipeline for distilled ``UNet2DModel`` students (pixel or latent space).

Self-contained on purpose: this file imports only torch, numpy, PIL and diffusers, so that it can
be copied next to exported weights and loaded by plain diffusers::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2]).images

Sampling is exactly ``LCMScheduler.step`` over the training-time timesteps (``[899]``,
``[999, 749, 499, 249]``, ...): the student predicts x0 (with the LCM boundary scalings), and
between steps the scheduler re-noises it with fresh noise drawn from ``generator``.  This is the
computation of ``stepdistill.students.Generator``, so given the same noise (and the same seeded
``torch.Generator`` for multi-step students) the pipeline returns the training-time output.

The training-time timesteps and the number of classes live in the pipeline config
(``model_index.json`` keys ``timesteps`` and ``num_classes``); exported scheduler configs also carry
them as ``_stepdistill_timesteps`` (a private key: diffusers loads it silently and keeps it).
"""

from __future__ import annotations

import inspect
import json
import logging as _pylogging
import os
import shutil

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

_SCHEDULER_TIMESTEPS_KEY = "_stepdistill_timesteps"


def _to_images(x: torch.Tensor, output_type: str):
    """[-1, 1] NCHW -> images in [0, 1] as "pt" (NCHW), "np" (NHWC) or "pil" (grey for 1 channel)."""
    image = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    if output_type != "pil":
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    uint8 = (array * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in uint8]
    return [Image.fromarray(a) for a in uint8]


def _step_kwargs(scheduler, generator) -> dict:
    """Pass ``generator`` to ``scheduler.step`` when it takes one (stochastic schedulers)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _class_labels(class_labels, batch_size, num_images_per_prompt, num_classes, device):
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("this pipeline's model is unconditional; do not pass class_labels")
        return None, batch_size * num_images_per_prompt
    if class_labels is None:
        # deterministic default that does not consume the noise generator: 0, 1, 2, ...
        labels = torch.arange(batch_size) % num_classes
    else:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(
            f"class labels must lie in [0, {num_classes - 1}] (or {num_classes}, the null class), "
            f"got {labels.tolist()}"
        )
    labels = labels.repeat_interleave(num_images_per_prompt).to(device)
    return labels, labels.shape[0]


class OneStepPipeline(DiffusionPipeline):
    r"""Pipeline for one-/few-step students distilled by stepdistill.

    Components:
        unet ([`UNet2DModel`]): the student, class-conditional (``num_class_embeds = num_classes + 1``)
            or unconditional; it may predict epsilon, v or x0 (the scheduler's ``prediction_type``).
        scheduler ([`LCMScheduler`]): carries the noise schedule and the boundary scalings.
        vae ([`AutoencoderKL`], optional): for latent-space students; x0 is decoded with
            ``vae.config.scaling_factor``.

    Config:
        timesteps: training-time timesteps, descending (default sampling schedule).
        num_classes: number of real classes (``None`` for unconditional students).
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self, unet, scheduler, vae=None, timesteps: list[int] | None = None, num_classes: int | None = None
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        if timesteps is None:
            timesteps = scheduler.config.get(_SCHEDULER_TIMESTEPS_KEY) if scheduler is not None else None
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
        if num_classes is None and unet is not None and unet.config.get("num_class_embeds"):
            num_classes = int(unet.config.num_class_embeds) - 1
        self.register_to_config(timesteps=timesteps, num_classes=num_classes)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file as ``one_step.py`` and the list-form
        ``_class_name`` in ``model_index.json``, so the saved folder loads again with
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.  (With
        ``push_to_hub=True`` the upload happens before these two edits; upload the folder instead.)"""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if type(self) is OneStepPipeline:
            target = os.path.join(save_directory, "one_step.py")
            source = os.path.abspath(__file__)
            if os.path.abspath(target) != source:
                shutil.copyfile(source, target)
            index_file = os.path.join(save_directory, "model_index.json")
            with open(index_file, encoding="utf-8") as f:
                index = json.load(f)
            index["_class_name"] = ["one_step", "OneStepPipeline"]
            with open(index_file, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        return out

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Exported folders name the pipeline class in list form (``["one_step", "OneStepPipeline"]``)
        for ``trust_remote_code`` loading; when this class itself is asked to load such a folder,
        use this class instead of the folder's copy of the code (no remote code needed)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = cls.__name__
        return out

    def _set_timesteps(self, num_inference_steps, timesteps, device):
        recorded = self.config.get("timesteps")
        if timesteps is None and num_inference_steps is None:
            timesteps = recorded
            if timesteps is None:
                num_inference_steps = 1
        elif timesteps is None and recorded is not None and num_inference_steps <= len(recorded):
            # the first k training-time steps: what Generator(num_steps=k) computes
            timesteps = list(recorded[:num_inference_steps])
        # LCMScheduler warns when a custom schedule does not start at T-1 or leaves its
        # `original_inference_steps` grid; a distilled student's training timesteps are deliberate.
        lcm_logger = _pylogging.getLogger("diffusers.schedulers.scheduling_lcm")
        level = lcm_logger.level
        lcm_logger.setLevel(_pylogging.ERROR)
        try:
            if timesteps is not None:
                self.scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
            else:
                self.scheduler.set_timesteps(num_inference_steps, device=device)
        finally:
            lcm_logger.setLevel(level)
        return self.scheduler.timesteps

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
    ):
        r"""Generate images.

        Args:
            class_labels: class ids (int, list or tensor) for class-conditional students; ``None``
                gives ``batch_size`` images of classes ``0, 1, 2, ...``.
            batch_size: number of images when ``class_labels`` is ``None``.
            num_inference_steps: ``None`` runs the training-time timesteps; ``k <= len(timesteps)``
                runs their first ``k``; larger values use the scheduler's own schedule.
            timesteps: explicit descending timesteps (override everything else).
            generator: a ``torch.Generator`` or a list with one per image; draws the initial noise
                (unless ``latents`` is given) and the fresh noise between steps.
            latents: initial unit noise, shape ``(batch, C, H, W)``.
            output_type: ``"pil"`` (grey PIL for 1-channel models), ``"np"`` (NHWC in [0, 1]),
                ``"pt"`` (NCHW in [0, 1]) or ``"latent"`` (the raw x0, unclamped, before any VAE).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            num_images_per_prompt: images per class label.
        """
        device = self._execution_device
        num_classes = self.config.get("num_classes")
        labels, n = _class_labels(class_labels, batch_size, num_images_per_prompt, num_classes, device)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image")
        cfg = self.unet.config
        size = cfg.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (n, cfg.in_channels, height, width)
        dtype = self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        sample = latents * self.scheduler.init_noise_sigma

        schedule = self._set_timesteps(num_inference_steps, timesteps, device)
        step_kwargs = _step_kwargs(self.scheduler, generator)
        for t in self.progress_bar(schedule):
            model_input = self.scheduler.scale_model_input(sample, t)
            out = self.unet(model_input, t, class_labels=labels, return_dict=False)[0]
            if out.shape[1] == 2 * sample.shape[1]:  # learned variance: keep the mean prediction
                out = out[:, : sample.shape[1]]
            # LCMScheduler: x0 with the boundary scalings; re-noised with fresh noise unless last
            sample = self.scheduler.step(out, t, sample, return_dict=False, **step_kwargs)[0]
        x0 = sample

        if output_type == "latent":
            image = x0
        else:
            if self.vae is not None:
                sf = self.vae.config.get("scaling_factor", 1.0)
                x0 = self.vae.decode(x0.to(self.vae.dtype) / sf, return_dict=False)[0]
            image = _to_images(x0.float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
