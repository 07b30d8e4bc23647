"""Routed one-step / few-step pipeline for multi-student distillation (MSD, Song et al., ICML 2025).

K class-conditional students -- ``UNet2DModel`` s or DiTs (``Transformer2DModel`` /
``DiTTransformer2DModel``); they may differ in width, e.g. half-width students -- each serve a
disjoint group of classes; ``route[c]`` is the student for class ``c``.  Every image runs through
exactly one student, so the cost per image is that of a single one-step student.

Self-contained on purpose: this file imports only torch, numpy, PIL and diffusers, so that it can be
copied next to exported weights and loaded by plain diffusers::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2]).images

Layout of a saved folder (diffusers pipelines have a fixed set of named components while K varies,
so the K networks live in ONE component, a ``StudentBank`` container model)::

    model_index.json        _class_name ["multi_student", "MultiStudentPipeline"],
                            students ["multi_student", "StudentBank"], scheduler, (vae),
                            route, num_classes, timesteps
    multi_student.py        this file (the pipeline class, for trust_remote_code)
    students/config.json    {"student_configs": [<UNet2DModel config of student 0>, ...]}
    students/diffusion_pytorch_model.safetensors   keys students.<k>.<unet param>
    students/multi_student.py   this file again (diffusers loads a custom component's class from
                            the component's own folder)
    scheduler/              LCMScheduler (noise schedule, boundary scalings)

Sampling is exactly ``OneStepPipeline``'s (``LCMScheduler.step`` over the training-time timesteps,
LCM boundary scalings), i.e. the computation of ``stepdistill.students.Generator``.  At every step
each student runs once on its sub-batch; the scheduler step (x0 with the boundary scalings, fresh
noise between steps) runs on the whole batch in the caller's order.  Hence the noise an image gets
never depends on how the batch is split among students: with a list of generators, image ``i`` draws
its initial noise and its re-noising noise from ``generator[i]`` only; with one generator the draws
are those of ``OneStepPipeline`` for the same batch.
"""

from __future__ import annotations

import inspect
import json
import logging as _pylogging
import os
import shutil

import numpy as np
import torch
from diffusers import (
    ConfigMixin,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
    ModelMixin,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

_SCHEDULER_TIMESTEPS_KEY = "_stepdistill_timesteps"
_MODULE_FILE = "multi_student"  # name of this file in saved folders (root and students/)
_PIPELINE_CLASS = "MultiStudentPipeline"
_TEXT_PIPELINE_CLASS = "TextMultiStudentPipeline"
_STUDENT_CLASSES = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "Transformer2DModel": Transformer2DModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
}
#: class-conditional DiTs: called with ``timestep=`` / ``class_labels=`` keywords (a
#: ``Transformer2DModel`` reads a second positional argument as ``encoder_hidden_states``)
_DIT_CLASSES = ("Transformer2DModel", "DiTTransformer2DModel")
_BANK_CLASS = "StudentBank"
_BANK_COMPONENT = "students"


def _unet_config(unet) -> dict:
    """A student network's config as a JSON-friendly dict without diffusers' private ``_`` keys."""
    out = {}
    for key, value in dict(unet.config).items():
        if key.startswith("_"):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


class StudentBank(ModelMixin, ConfigMixin):
    r"""K students in one diffusers model (one pipeline component, one weights file).

    Args:
        student_configs: one network config (dict) per student; the students may differ in
            width/depth but share ``in_channels`` and ``sample_size``.
        student_class: the students' diffusers class: ``UNet2DModel``, ``UNet2DConditionModel``,
            ``Transformer2DModel`` or ``DiTTransformer2DModel`` (class-conditional DiT).

    ``bank(sample, timestep, k, class_labels=...)`` runs student ``k`` (going through the bank's own
    ``forward`` keeps ``enable_model_cpu_offload`` hooks working).
    """

    @register_to_config
    def __init__(self, student_configs: list, student_class: str = "UNet2DModel"):
        super().__init__()
        if not student_configs:
            raise ValueError("a StudentBank needs at least one student config")
        if student_class not in _STUDENT_CLASSES:
            raise ValueError(f"student_class must be one of {sorted(_STUDENT_CLASSES)}, got {student_class!r}")
        net_cls = _STUDENT_CLASSES[student_class]
        self.students = nn.ModuleList([net_cls.from_config(dict(cfg)) for cfg in student_configs])
        first = self.students[0].config
        for k, net in enumerate(self.students):
            if net.config.in_channels != first.in_channels or net.config.sample_size != first.sample_size:
                raise ValueError(
                    f"student {k} has in_channels={net.config.in_channels}, sample_size={net.config.sample_size}; "
                    f"student 0 has in_channels={first.in_channels}, sample_size={first.sample_size}: "
                    "all students must generate the same sample shape"
                )

    @classmethod
    def from_unets(cls, unets) -> StudentBank:
        """Wrap existing student networks of one class (their modules are used as they are, not copied)."""
        unets = list(unets)
        kind = type(unets[0]).__name__ if unets else "UNet2DModel"
        for k, net in enumerate(unets):
            if type(net).__name__ != kind or kind not in _STUDENT_CLASSES:
                raise TypeError(
                    f"student {k} is a {type(net).__name__}; a StudentBank holds students of one class, "
                    f"one of {', '.join(_STUDENT_CLASSES)}"
                )
        with torch.device("meta"):  # build the config-only skeleton without allocating weights
            bank = cls(student_configs=[_unet_config(net) for net in unets], student_class=kind)
        bank.students = nn.ModuleList(unets)
        return bank

    @property
    def num_students(self) -> int:
        return len(self.students)

    def forward(self, sample, timestep, student: int, class_labels=None, encoder_hidden_states=None,
                return_dict: bool = False):
        net = self.students[int(student)]
        if type(net).__name__ in _DIT_CLASSES:
            t = torch.as_tensor(timestep, device=sample.device)
            if t.ndim == 0:
                t = t.expand(sample.shape[0])
            out = net(sample, timestep=t, class_labels=class_labels, return_dict=False)[0]
            return out if not return_dict else {"sample": out}
        if isinstance(net, UNet2DConditionModel):
            out = net(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            return out if not return_dict else {"sample": out}
        if not net.config.get("num_class_embeds"):
            class_labels = None
        out = net(sample, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
        return out if not return_dict else {"sample": out}


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


def _check_route(route, num_students: int) -> list[int]:
    if route is None:
        raise ValueError("a MultiStudentPipeline needs route (class -> student index), got None")
    try:
        route = [int(k) for k in route]
    except (TypeError, ValueError) as e:
        raise ValueError(f"route must be a list of student indices (one per class), got {route!r}") from e
    if not route:
        raise ValueError("route is empty: it needs one student index per class")
    bad = [c for c, k in enumerate(route) if not 0 <= k < num_students]
    if bad:
        raise ValueError(
            f"route sends classes {bad} to students {[route[c] for c in bad]}, but there are only "
            f"{num_students} students (indices 0..{num_students - 1})"
        )
    return route


# -- prompt routing (text-conditional MSD) ------------------------------------------------------
def pooled_prompt_embeddings(tokenizer, text_encoder, prompts, batch_size: int = 256) -> torch.Tensor:
    """The pooled text embedding of each prompt, float32 (N, D) on the CPU: the stock text encoder's
    ``pooler_output`` (CLIP: the final-layer-normed EOS token; ``text_embeds`` of projection models),
    for prompts tokenised as the SD pipelines do (padded to ``model_max_length``).  MSD partitions
    prompts by these embeddings at training time and routes them at inference with the same code."""
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    max_len = tokenizer.model_max_length
    if max_len is None or max_len > 100_000:  # tokenizer saved without a length: use the encoder's
        max_len = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", 77)
    device = next(text_encoder.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[s : s + batch_size], padding="max_length", max_length=max_len, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            res = text_encoder(ids)
            pooled = getattr(res, "pooler_output", None)
            if pooled is None:
                pooled = getattr(res, "text_embeds", None)
            if pooled is None:  # tuple outputs: (last_hidden_state, pooled, ...)
                pooled = res[1] if isinstance(res, (tuple, list)) and len(res) > 1 else res[0].mean(1)
            out.append(pooled.float().cpu())
    return torch.cat(out)


def route_by_embedding(embeddings: torch.Tensor, centroids) -> list[int]:
    """Student of each pooled embedding: the nearest centroid (Euclidean; ties to the lower index)."""
    c = torch.as_tensor(centroids, dtype=torch.float32)
    return torch.cdist(embeddings.float().reshape(len(embeddings), -1), c).argmin(1).tolist()


def route_prompts(prompts, table: dict | None, centroids, tokenizer=None, text_encoder=None) -> list[int]:
    """Student of each prompt: ``table[prompt]`` for the prompts the partition was made from (the
    balanced k-means assignment), else the nearest centroid of its pooled embedding."""
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    table = table or {}
    out = [table.get(p) for p in prompts]
    missing = [i for i, k in enumerate(out) if k is None]
    if missing:
        if tokenizer is None or text_encoder is None:
            raise ValueError(f"prompt {prompts[missing[0]]!r} is not in the routing table and no text encoder was given")
        emb = pooled_prompt_embeddings(tokenizer, text_encoder, [prompts[i] for i in missing])
        for i, k in zip(missing, route_by_embedding(emb, centroids)):
            out[i] = int(k)
    return [int(k) for k in out]


class MultiStudentPipeline(DiffusionPipeline):
    r"""Pipeline for multi-student (MSD) one-/few-step students distilled by stepdistill.

    Components:
        students ([`StudentBank`]): the K class-conditional students (``UNet2DModel`` s or DiTs;
            a DiT's learned-variance half is dropped); each may predict epsilon, v or x0 (the
            scheduler's ``prediction_type``, shared by all).
        scheduler ([`LCMScheduler`]): the noise schedule and the boundary scalings.
        vae ([`AutoencoderKL`], optional): for latent-space students; x0 is decoded with
            ``vae.config.scaling_factor``.

    Config (``model_index.json``):
        route: ``route[c]`` is the student for class ``c`` (``len(route) == num_classes``).
        num_classes: number of classes (``len(route)``).
        timesteps: training-time timesteps, descending (the default sampling schedule).
    """

    model_cpu_offload_seq = "students->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        students,
        scheduler,
        vae=None,
        route: list[int] | None = None,
        timesteps: list[int] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.register_modules(students=students, scheduler=scheduler, vae=vae)
        route = _check_route(route, len(students.students))
        if num_classes is not None and int(num_classes) != len(route):
            raise ValueError(f"num_classes={num_classes} but route has {len(route)} entries (one per class)")
        if timesteps is None:
            timesteps = scheduler.config.get(_SCHEDULER_TIMESTEPS_KEY) if scheduler is not None else None
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
        self.register_to_config(route=route, timesteps=timesteps, num_classes=len(route))

    # -- routing --------------------------------------------------------------------------------
    @property
    def num_students(self) -> int:
        return len(self.students.students)

    @property
    def route(self) -> list[int]:
        """``route[c]``: the student index that generates class ``c``."""
        return list(self.config.route)

    @property
    def classes(self) -> list[list[int]]:
        """``classes[k]``: the classes student ``k`` generates."""
        return [[c for c, s in enumerate(self.route) if s == k] for k in range(self.num_students)]

    def student_for(self, class_label: int) -> int:
        return self.route[int(class_label)]

    # -- saving / loading -----------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file as ``multi_student.py`` (in the folder
        and in ``students/``) and the list-form class names in ``model_index.json``, so the saved
        folder loads again with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
        (With ``push_to_hub=True`` the upload happens before these edits; upload the folder instead.)"""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        source = os.path.abspath(__file__)
        for target in (
            os.path.join(save_directory, f"{_MODULE_FILE}.py"),
            os.path.join(save_directory, _BANK_COMPONENT, f"{_MODULE_FILE}.py"),
        ):
            if os.path.abspath(target) != source:
                shutil.copyfile(source, target)
        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        if type(self).__name__ in (_PIPELINE_CLASS, _TEXT_PIPELINE_CLASS):  # user subclasses keep their own name
            index["_class_name"] = [_MODULE_FILE, type(self).__name__]
        index[_BANK_COMPONENT] = [_MODULE_FILE, _BANK_CLASS]
        with open(index_file, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        return out

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Saved folders name the classes in list form (``["multi_student", ...]``) for
        ``trust_remote_code`` loading.  When this class itself loads such a folder, use this class and
        this module's ``StudentBank`` instead of the folder's copies (no remote code needed)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline:
            if isinstance(config.get("_class_name"), (list, tuple)):
                config["_class_name"] = cls.__name__
            bank = config.get(_BANK_COMPONENT)
            if isinstance(bank, (list, tuple)) and list(bank) == [_MODULE_FILE, _BANK_CLASS]:
                # an already imported module: diffusers (0.42.1+) resolves it from sys.modules
                config[_BANK_COMPONENT] = [StudentBank.__module__, _BANK_CLASS]
        return out

    # -- sampling -------------------------------------------------------------------------------
    # Copied from stepdistill.pipelines.one_step.OneStepPipeline._set_timesteps
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

    def _labels(self, class_labels, batch_size, num_images_per_prompt, device) -> torch.Tensor:
        num_classes = len(self.config.route)
        if class_labels is None:
            # deterministic default that does not consume the noise generator: 0, 1, 2, ...
            labels = torch.arange(batch_size) % num_classes
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"class labels must lie in [0, {num_classes - 1}] (every class is routed to a student; "
                f"there is no null class), got {labels.tolist()}"
            )
        return labels.repeat_interleave(num_images_per_prompt).to(device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 1,
        num_images_per_prompt: int = 1,
    ):
        r"""Generate images; each image's class picks its student (``route[class]``).

        Args:
            class_labels: class ids (int, list or tensor); ``None`` gives ``batch_size`` images of
                classes ``0, 1, 2, ...``.  Images come back in this order.
            num_inference_steps: ``None`` runs the training-time timesteps; ``k <= len(timesteps)``
                runs their first ``k``; larger values use the scheduler's own schedule.
            timesteps: explicit descending timesteps (override everything else).
            generator: a ``torch.Generator`` or a list with one per image (in ``class_labels``
                order); image ``i`` then draws its initial noise and its between-step noise from
                ``generator[i]`` alone, whichever student serves it and however the batch is made up.
            latents: initial unit noise, shape ``(batch, C, H, W)`` in ``class_labels`` order.
            output_type: ``"pil"`` (grey PIL for 1-channel models), ``"np"`` (NHWC in [0, 1]),
                ``"pt"`` (NCHW in [0, 1]) or ``"latent"`` (the raw x0, unclamped, before any VAE).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            batch_size: number of images when ``class_labels`` is ``None``.
            num_images_per_prompt: images per class label.
        """
        device = self._execution_device
        labels = self._labels(class_labels, batch_size, num_images_per_prompt, device)
        # the noise is drawn for the whole batch in caller order, BEFORE routing
        sample = self._initial_sample(labels.shape[0], generator, latents, device)
        route = torch.tensor(self.config.route, dtype=torch.long)[labels.cpu()]

        def student(k, x, t, idx):
            pred = self.students(x, t, k, class_labels=labels[idx])
            if pred.shape[1] == 2 * x.shape[1]:  # learned variance: keep the mean prediction
                pred = pred[:, : x.shape[1]]
            return pred

        x0 = self._denoise(sample, route, student, num_inference_steps, timesteps, generator, device)
        return self._output(x0, output_type, return_dict)

    # -- the steps shared with TextMultiStudentPipeline -----------------------------------------
    def _initial_sample(self, n, generator, latents, device) -> torch.Tensor:
        """Unit noise for ``n`` images (``latents`` if given), scaled by the scheduler."""
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image")
        cfg = self.students.students[0].config
        size = cfg.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (n, cfg.in_channels, height, width)
        dtype = self.students.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def _denoise(self, sample, route, student, num_inference_steps, timesteps, generator, device):
        """The sampling loop: at each timestep every student ``k`` evaluates its own images
        (``student(k, x, t, idx)``, one network evaluation per image), then LCMScheduler steps the
        whole batch (elementwise per image: x0 with the boundary scalings, re-noised with fresh
        noise -- per image generator when a list -- unless last)."""
        groups = []  # (student, indices of its images in caller order)
        for k in range(self.num_students):
            idx = (route == k).nonzero().flatten()
            if idx.numel():
                groups.append((k, idx.to(device)))
        schedule = self._set_timesteps(num_inference_steps, timesteps, device)
        step_kwargs = _step_kwargs(self.scheduler, generator)
        for t in self.progress_bar(schedule):
            model_input = self.scheduler.scale_model_input(sample, t)
            out = torch.empty_like(sample)
            for k, idx in groups:
                out[idx] = student(k, model_input[idx], t, idx).to(out.dtype)
            sample = self.scheduler.step(out, t, sample, return_dict=False, **step_kwargs)[0]
        return sample

    def _output(self, x0, output_type, return_dict):
        """x0 -> images (through the VAE when there is one) in ``output_type``."""
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


class TextMultiStudentPipeline(MultiStudentPipeline):
    r"""Pipeline for text-conditional multi-student (MSD) students distilled by stepdistill.

    Components:
        students ([`StudentBank`]): K ``UNet2DConditionModel`` students.
        scheduler ([`LCMScheduler`]): the noise schedule and the boundary scalings.
        text_encoder / tokenizer: the teacher's (CLIP) text encoder: its hidden states condition the
            students, its pooled output routes the prompt.
        vae ([`AutoencoderKL`], optional): latent students are decoded with ``vae.config.scaling_factor``.

    Config: ``route_prompts`` / ``route_students`` (the training partition: prompt -> student),
    ``centroids`` (K pooled-embedding centres: any other prompt goes to the nearest), ``timesteps``.
    Every image runs through exactly one student; the noise is drawn for the whole batch before routing.
    """

    model_cpu_offload_seq = "text_encoder->students->vae"
    _optional_components = ["vae"]

    def __init__(self, students, scheduler, text_encoder, tokenizer, vae=None, route_prompts=None,
                 route_students=None, centroids=None, timesteps=None):
        DiffusionPipeline.__init__(self)
        self.register_modules(students=students, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              vae=vae)
        k = len(students.students)
        if centroids is None or len(centroids) != k:
            raise ValueError(f"a TextMultiStudentPipeline needs one centroid per student ({k}), got "
                             f"{None if centroids is None else len(centroids)}")
        route_prompts = [str(p) for p in (route_prompts or [])]
        route_students = [int(s) for s in (route_students or [])]
        if len(route_prompts) != len(route_students) or any(not 0 <= s < k for s in route_students):
            raise ValueError("route_prompts and route_students must pair each prompt with a student in 0..K-1")
        if timesteps is None:
            timesteps = scheduler.config.get(_SCHEDULER_TIMESTEPS_KEY) if scheduler is not None else None
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
        self.register_to_config(route_prompts=route_prompts, route_students=route_students,
                                centroids=[[float(v) for v in c] for c in centroids], timesteps=timesteps)

    @property
    def route(self) -> dict:
        return dict(zip(self.config.route_prompts, self.config.route_students))

    def student_for_prompts(self, prompts) -> list[int]:
        return route_prompts(prompts, self.route, self.config.centroids, self.tokenizer, self.text_encoder)

    def encode_prompt(self, prompts, device) -> torch.Tensor:
        """The text encoder's last hidden states, prompts padded to ``model_max_length`` (as in training)."""
        max_len = self.tokenizer.model_max_length
        if max_len is None or max_len > 100_000:
            max_len = getattr(self.text_encoder.config, "max_position_embeddings", 77)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        out = self.text_encoder(ids)
        return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        **unused,
    ):
        """``prompt`` -> images; ``num_inference_steps`` / ``timesteps`` default to the training-time
        timesteps.  Guidance is distilled into the students (no CFG at inference)."""
        for key in unused:
            if key not in ("guidance_scale", "negative_prompt"):
                raise TypeError(f"TextMultiStudentPipeline.__call__ got an unexpected argument {key!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty")
        prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]
        device = self._execution_device
        sample = self._initial_sample(len(prompts), generator, latents, device)
        hidden = self.encode_prompt(prompts, device).to(self.students.dtype)
        route = torch.tensor(self.student_for_prompts(prompts), dtype=torch.long)

        def student(k, x, t, idx):
            return self.students(x, t, k, encoder_hidden_states=hidden[idx])

        x0 = self._denoise(sample, route, student, num_inference_steps, timesteps, generator, device)
        return self._output(x0, output_type, return_dict)
