"""Multi-step pipeline for class-conditional (or unconditional) ``UNet2DModel`` diffusion models.

This is the pipeline of stepdistill's embedded teacher (the class-conditional digits UNet).
Self-contained on purpose: it imports only torch, numpy, PIL and diffusers, so that it can be
copied next to exported weights and loaded by plain diffusers::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=2.0).images

Class conditioning follows the classifier-free-guidance convention of stepdistill: the UNet has
``num_class_embeds = num_classes + 1`` and the last index ``num_classes`` is the null class.
Guidance is batched ``[uncond, cond]`` and combined as ``uncond + w (cond - uncond)``;
``guidance_scale=1`` runs the conditional model alone.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


# Copied from stepdistill.pipelines.one_step._to_images
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


# Copied from stepdistill.pipelines.one_step._step_kwargs
def _step_kwargs(scheduler, generator) -> dict:
    """Pass ``generator`` to ``scheduler.step`` when it takes one (stochastic schedulers)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


# Copied from stepdistill.pipelines.one_step._class_labels
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


class ClassConditionalPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with any diffusers scheduler and classifier-free guidance.

    Components:
        unet ([`UNet2DModel`]): ``num_class_embeds = num_classes + 1`` (last index = null class), or
            an unconditional UNet (``num_classes=None``).
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver++, Euler, ...).

    Config:
        num_classes: number of real classes (``None`` for unconditional models).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, num_classes: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if num_classes is None and unet is not None and unet.config.get("num_class_embeds"):
            num_classes = int(unet.config.num_class_embeds) - 1
        self.register_to_config(num_classes=num_classes)

    # Copied from stepdistill.pipelines.one_step.OneStepPipeline.save_pretrained with one_step->class_conditional, OneStepPipeline->ClassConditionalPipeline
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file as ``class_conditional.py`` and the list-form
        ``_class_name`` in ``model_index.json``, so the saved folder loads again with
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.  (With
        ``push_to_hub=True`` the upload happens before these two edits; upload the folder instead.)"""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if type(self) is ClassConditionalPipeline:
            target = os.path.join(save_directory, "class_conditional.py")
            source = os.path.abspath(__file__)
            if os.path.abspath(target) != source:
                shutil.copyfile(source, target)
            index_file = os.path.join(save_directory, "model_index.json")
            with open(index_file, encoding="utf-8") as f:
                index = json.load(f)
            index["_class_name"] = ["class_conditional", "ClassConditionalPipeline"]
            with open(index_file, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        return out

    # Copied from stepdistill.pipelines.one_step.OneStepPipeline.load_config with one_step->class_conditional, OneStepPipeline->ClassConditionalPipeline
    @classmethod
    def load_config(cls, *args, **kwargs):
        """Exported folders name the pipeline class in list form (``["class_conditional", "ClassConditionalPipeline"]``)
        for ``trust_remote_code`` loading; when this class itself is asked to load such a folder,
        use this class instead of the folder's copy of the code (no remote code needed)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = cls.__name__
        return out

    def _set_timesteps(self, num_inference_steps, timesteps, device):
        if timesteps is not None:
            if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"{type(self.scheduler).__name__} does not accept custom timesteps; "
                    "pass num_inference_steps or use a scheduler that does (e.g. DDPMScheduler, LCMScheduler)"
                )
            self.scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Generate images.

        Args:
            class_labels: class ids (int, list or tensor); ``None`` gives ``batch_size`` images of
                classes ``0, 1, 2, ...`` (unconditional models: must be ``None``).
            batch_size: number of images when ``class_labels`` is ``None``.
            num_images_per_prompt: images per class label.
            num_inference_steps: number of sampler steps.
            timesteps: custom descending timesteps (schedulers whose ``set_timesteps`` takes them).
            guidance_scale: classifier-free guidance weight ``w`` (1 = no guidance).
            generator: a ``torch.Generator`` or a list with one per image.
            latents: initial unit noise ``(batch, C, H, W)``; scaled by ``init_noise_sigma``.
            output_type: ``"pil"`` (grey PIL for 1-channel models), ``"np"`` (NHWC in [0, 1]),
                ``"pt"`` (NCHW in [0, 1]) or ``"latent"`` (the raw final sample, unclamped).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
        """
        device = self._execution_device
        num_classes = self.config.get("num_classes")
        labels, n = _class_labels(class_labels, batch_size, num_images_per_prompt, num_classes, device)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image")
        do_cfg = guidance_scale != 1.0 and labels is not None
        if do_cfg:
            null = torch.full_like(labels, num_classes)
            cfg_labels = torch.cat([null, labels])

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
            if do_cfg:
                out = self.unet(torch.cat([model_input] * 2), t, class_labels=cfg_labels, return_dict=False)[
                    0
                ]
            else:
                out = self.unet(model_input, t, class_labels=labels, return_dict=False)[0]
            if out.shape[1] == 2 * sample.shape[1]:  # learned variance: keep the mean prediction
                out = out[:, : sample.shape[1]]
            out = out.float()
            if do_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(out, t, sample, return_dict=False, **step_kwargs)[0]

        image = sample if output_type == "latent" else _to_images(sample.float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
