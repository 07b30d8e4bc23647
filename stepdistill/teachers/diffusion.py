"""Adapter: any diffusers denoiser (UNet2DModel, UNet2DConditionModel, Transformer2DModel/DiT,
...) plus its noise schedule, seen through the sigma-language teacher contract.

Conversions (the only place they happen in the package), with ``x`` the VE-space sample
``x0 + sigma eps``:

* VP schedules (``alphas_cumprod``; DDPM/DDIM/SD/SDXL/DiT): ``sigma_t = sqrt((1 - abar_t) / abar_t)``,
  network input ``x_vp = x * sqrt(abar) = x / sqrt(1 + sigma^2)`` at timestep ``t``;
  x0 from the output ``o``: epsilon ``(x_vp - sqrt(1-abar) o) / sqrt(abar)``,
  v_prediction ``sqrt(abar) x_vp - sqrt(1-abar) o``, sample ``o``.
* Flow matching (``x_t = (1-t) x0 + t eps``, velocity ``v = eps - x0``): ``sigma = t / (1 - t)``,
  input ``x / (1 + sigma)`` at timestep ``N t`` (``N = num_train_timesteps``, 1000 for SD3/Flux),
  x0 = ``x_t - t v``.  Flow teachers are recognised by ``prediction_type="flow"``, by a
  ``FlowMatch*`` scheduler class, by ``prediction_type="flow_prediction"`` (DPM-Solver/UniPC flow
  configs) or by a config that has ``shift`` and no ``beta_*`` keys (``FlowMatchEulerDiscreteScheduler().config``).

Noise levels between training timesteps map to fractional timesteps by interpolating
``log sigma`` (k-diffusion's ``sigma_to_t``), so samplers may query any sigma.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from .base import Cond, DiffusionTeacher, append_dims, cond_cat, cond_to, freeze

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: diffusers schedulers by short name, for multi-step teacher sampling
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


class TeacherLoadError(InputError):
    """A teacher folder or configuration cannot be used; the message says why and what to do."""


#: the teacher families :meth:`DiffusersTeacher.from_pretrained` loads (named by every refusal)
SUPPORTED_FAMILIES = (
    "supported: UNet2DModel (DDPM/ADM-style, unconditional or class-conditional), "
    "UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL base), Transformer2DModel/DiTTransformer2DModel "
    "(class-conditional DiT), SD3Transformer2DModel (SD3/SD3.5), FluxTransformer2DModel (FLUX.1)"
)


def teacher_family(path, index: dict, cls_name: str) -> str:
    """generic | sdxl | sd3 | flux for a pipeline folder's ``model_index.json`` whose denoiser class
    is ``cls_name``; any other family raises a one-line :class:`TeacherLoadError`."""
    pipe = index.get("_class_name") or "this pipeline"
    if cls_name == "UNet2DConditionModel":
        if _component(index, "text_encoder_2"):
            if not _component(index, "text_encoder"):
                raise TeacherLoadError(
                    f"{path}: {pipe} has only text_encoder_2 (an SDXL refiner, aesthetic-score time ids), "
                    f"which is not a supported teacher; {SUPPORTED_FAMILIES}"
                )
            return "sdxl"
        return "generic"
    if cls_name in ("UNet2DModel", "Transformer2DModel", "DiTTransformer2DModel"):
        if cls_name != "UNet2DModel" and _component(index, "text_encoder"):
            raise TeacherLoadError(
                f"{path}: {pipe} is a text-conditional {cls_name} (PixArt-style), which is not a supported "
                f"teacher; {SUPPORTED_FAMILIES}"
            )
        return "generic"
    if cls_name == "SD3Transformer2DModel":
        return "sd3"
    if cls_name == "FluxTransformer2DModel":
        return "flux"
    raise TeacherLoadError(f"{path}: {pipe} ({cls_name}) is not a supported teacher family; {SUPPORTED_FAMILIES}")


def _scheduler_config_dict(scheduler_config: Any) -> dict:
    """Accept a config dict / FrozenDict or a scheduler object; keep the class name when known."""
    if hasattr(scheduler_config, "config") and not isinstance(scheduler_config, dict):
        cfg = dict(scheduler_config.config)
        cfg.setdefault("_class_name", type(scheduler_config).__name__)
        return cfg
    return dict(scheduler_config)


def _is_flow_config(cfg: dict) -> bool:
    if "FlowMatch" in str(cfg.get("_class_name", "")):
        return True
    if cfg.get("prediction_type") == "flow_prediction" or cfg.get("use_flow_sigmas"):
        return True
    # FlowMatchEulerDiscreteScheduler().config carries no _class_name; it has `shift` and no betas
    return "shift" in cfg and not any(
        k in cfg for k in ("beta_start", "beta_end", "beta_schedule", "trained_betas")
    )


def _vp_alphas_cumprod(scheduler_config: dict) -> Tensor:
    from diffusers import DDPMScheduler

    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "rescale_betas_zero_snr",
    )
    kw = {k: scheduler_config[k] for k in keys if k in scheduler_config and scheduler_config[k] is not None}
    sched = DDPMScheduler(**kw)
    return sched.alphas_cumprod.clone().float()


class DiffusersTeacher(DiffusionTeacher):
    """A diffusers denoiser + noise schedule as a :class:`DiffusionTeacher`.

    Args:
        model: the diffusers network (UNet2DModel, UNet2DConditionModel, Transformer2DModel, ...).
        scheduler_config: the pipeline's scheduler config (dict); gives the noise schedule and,
            unless ``prediction_type`` is given, the parametrisation.
        prediction_type: epsilon | v_prediction | sample | flow.
        num_classes: class-conditional models: number of real classes; the null class used for
            guidance is index ``num_classes`` (the teacher must have been trained with it).
        text_encoder / tokenizer: text-conditional models; ``null_prompt`` is "empty" (SD 1.x/2.x:
            embedding of "") or "zeros" (SDXL-style all-zero embeddings).
        vae: latent models; ``decode`` maps latents to images with ``vae.config.scaling_factor``.
        sample_shape: (C, H, W) of the denoised space; inferred from the model config if omitted.
        flow_shift: flow teachers: the timestep shift of the training grid (default: the scheduler
            config's ``shift``; resolution-dependent teachers such as Flux pass ``exp(mu)``).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict,
        prediction_type: str | None = None,
        num_classes: int | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        vae: nn.Module | None = None,
        null_prompt: str = "empty",
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float = 1.0,
        flow_shift: float | None = None,
    ):
        super().__init__()
        self.model = model
        self.scheduler_config = _scheduler_config_dict(scheduler_config)
        # an in-memory config lists the keys it took from defaults; from_config would then substitute the
        # *target* scheduler's defaults (e.g. DPM-Solver's timestep_spacing), unlike the saved config
        self.scheduler_config.pop("_use_default_values", None)
        pt = prediction_type
        if pt is None:
            pt = (
                "flow"
                if _is_flow_config(self.scheduler_config)
                else self.scheduler_config.get("prediction_type")
            )
        if pt in ("flow_prediction", "flow_matching"):
            pt = "flow"
        pt = pt or "epsilon"
        if pt not in PREDICTION_TYPES:
            raise TeacherLoadError(f"prediction_type must be one of {PREDICTION_TYPES}, got {pt!r}")
        self.prediction_type = pt
        self.num_classes = num_classes
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        if null_prompt not in ("empty", "zeros"):
            raise TeacherLoadError(f"null_prompt must be 'empty' or 'zeros', got {null_prompt!r}")
        self.null_prompt = null_prompt
        self.guidance_scale = guidance_scale
        n = int(self.scheduler_config.get("num_train_timesteps") or 1000)
        #: flow models take timestep ``t * flow_timestep_scale`` (diffusers: num_train_timesteps)
        self.flow_timestep_scale = float(n)
        self.flow_shift = 1.0
        if pt == "flow":
            shift = flow_shift
            if shift is None:
                shift = self.scheduler_config.get("shift")
            if shift is None:
                shift = self.scheduler_config.get("flow_shift", 1.0)
            self.flow_shift = float(shift)
            t = torch.arange(1, n + 1, dtype=torch.float64) / n
            t = self.flow_shift * t / (1 + (self.flow_shift - 1) * t)
            self.register_buffer("flow_t_exact", t.float(), persistent=False)
            t = t.clamp(max=1 - 1e-4)  # sigma = t/(1-t) is infinite at t = 1
            self.register_buffer("flow_t", t.float())
            self.register_buffer("sigmas", (t / (1 - t)).float())
            self.register_buffer("alphas_cumprod", torch.empty(0))
        else:
            ac = _vp_alphas_cumprod(self.scheduler_config)
            self.register_buffer("alphas_cumprod", ac)
            self.register_buffer("sigmas", ((1 - ac) / ac).sqrt())
        self.register_buffer("log_sigmas", self.sigmas.log())
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else self._infer_shape()
        for m in (text_encoder, vae):
            if m is not None:
                freeze(m)
        # one-row unconditional embedding, computed once (the text encoder is frozen); not a buffer
        self._null_cache: Tensor | None = None

    # -- construction ---------------------------------------------------------------------------
    def _infer_shape(self) -> tuple[int, ...]:
        cfg = getattr(self.model, "config", None) or {}
        ch = cfg.get("in_channels", 4)
        size = cfg.get("sample_size", 64)
        if isinstance(size, (list, tuple)):
            return (ch, int(size[0]), int(size[1]))
        return (ch, int(size), int(size))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        prediction_type: str | None = None,
        guidance_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        null_prompt: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> DiffusersTeacher:
        """Load a diffusers pipeline folder (or hub id when online) as a frozen teacher.

        Reads ``model_index.json``: the denoiser is the ``unet`` or ``transformer`` component,
        the noise schedule the ``scheduler`` config; ``text_encoder``/``tokenizer``/``vae`` are used
        when present, and a ``num_classes`` entry marks a class-conditional teacher (DiT-style
        transformers with ``num_embeds_ada_norm`` are recognised without it).  SDXL base folders
        (two text encoders) give a :class:`~stepdistill.teachers.sdxl.SDXLTeacher`, SD3 and FLUX.1
        folders a :class:`~stepdistill.teachers.flow_transformers.SD3Teacher` /
        :class:`~stepdistill.teachers.flow_transformers.FluxTeacher`; other families are refused
        (:data:`SUPPORTED_FAMILIES`).  ``sample_shape`` overrides the latent shape (resolution)
        inferred from the denoiser config.  Every problem with the folder raises
        :class:`TeacherLoadError` naming the path.
        """
        index, src, local = _read_index(path)
        denoiser_name, cls_name, model_cls = _denoiser_class(path, index, local)
        family = teacher_family(path, index, cls_name)
        if family == "flux":
            from .flow_transformers import check_flux_guidance_weights

            check_flux_guidance_weights(path, src, local)
        model = _load_component(
            path,
            denoiser_name,
            lambda: model_cls.from_pretrained(src, subfolder=denoiser_name, torch_dtype=dtype),
        )
        sched_cfg = _load_scheduler_config(path)
        sched_entry = _component(index, "scheduler")
        if sched_entry is not None:
            sched_cfg.setdefault("_class_name", sched_entry[1])
        if family != "generic":
            teacher = _family_class(family).from_folder(
                path, src, index, model, sched_cfg,
                prediction_type=prediction_type, guidance_scale=guidance_scale, dtype=dtype,
                null_prompt=null_prompt, sample_shape=sample_shape,
            )
            freeze(teacher.model)
            return teacher
        added = model.config.get("addition_embed_type") if cls_name == "UNet2DConditionModel" else None
        if added is not None:
            raise TeacherLoadError(
                f"{path}: a UNet2DConditionModel with addition_embed_type={added!r} outside an SDXL base "
                f"folder is not a supported teacher; {SUPPORTED_FAMILIES}"
            )
        text_encoder, tokenizer, vae = _load_text_and_vae(path, src, index, dtype)
        num_classes = index.get("num_classes")
        if num_classes is None:
            mc = model.config
            if mc.get("norm_type") == "ada_norm_zero" and mc.get("num_embeds_ada_norm"):
                num_classes = int(mc["num_embeds_ada_norm"])  # DiT: the label table's extra row is the null class
        if null_prompt is None:
            null_prompt = "zeros" if "XL" in str(index.get("_class_name", "")) else "empty"
        teacher = cls(
            model,
            sched_cfg,
            prediction_type=prediction_type,
            num_classes=int(num_classes) if num_classes is not None else None,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            null_prompt=null_prompt,
            guidance_scale=guidance_scale,
            sample_shape=sample_shape,
        )
        freeze(teacher.model)
        return teacher

    def trainable_copy(self) -> DiffusersTeacher:
        """A trainable deep copy of the denoiser sharing the frozen text encoder(s) / VAE.

        The copy's ``parameters()`` are exactly the copied network (float32, requires_grad, train
        mode); the text encoders and VAE are shared by reference, outside its module tree.  Train
        mode would switch on the network's own label dropout (diffusers' DiT drops 10% of the
        class labels at random); :func:`disable_label_dropout` turns it off, so a copy denoises
        exactly like the teacher until it is trained.
        """
        net = copy.deepcopy(self.model).float()
        net.requires_grad_(True)
        net.train()
        disable_label_dropout(net)
        new = type(self)(net, **self._copy_kwargs())
        # share (not copy) the frozen encoders; keep them out of the module tree so that the copy's
        # parameters() are exactly the trainable network
        object.__setattr__(new, "_shared", self._shared_parts())
        # buffers (sigmas, alphas_cumprod) were built on the CPU: follow the teacher's device
        return new.to(self.sigmas.device)

    def smaller_copy(self, width: float) -> DiffusersTeacher:
        """A freshly initialised trainable copy whose UNet has its channel counts scaled by ``width``
        (rounded to multiples of the norm groups): MSD's smaller students.  Same adapter (schedule,
        conditions, shared encoders) as :meth:`trainable_copy`; networks without
        ``block_out_channels`` are refused."""
        cfg = dict(self.model.config)
        if "block_out_channels" not in cfg:
            raise ValueError(f"width_multiplier < 1 needs a UNet with block_out_channels, got {type(self.model).__name__}")
        groups = cfg.get("norm_num_groups", 32) or 32
        cfg["block_out_channels"] = [max(groups, int(round(c * width / groups)) * groups) for c in cfg["block_out_channels"]]
        small = type(self.model).from_config(cfg)
        new = self.trainable_copy()  # same adapter, then swap the network
        new.model = small.float().train()
        return new

    def _copy_kwargs(self) -> dict:
        """Constructor arguments of a copy of this adapter around another network (encoders and
        VAE excluded: :meth:`_shared_parts` lends them)."""
        return dict(
            scheduler_config=self.scheduler_config,
            prediction_type=self.prediction_type,
            num_classes=self.num_classes,
            tokenizer=self.tokenizer,
            null_prompt=self.null_prompt,
            sample_shape=self.sample_shape,
            guidance_scale=self.guidance_scale,
            flow_shift=self.flow_shift if self.prediction_type == "flow" else None,
        )

    def _shared_parts(self) -> dict:
        return {"text_encoder": self._text_encoder(), "vae": self._vae()}

    def _shared_part(self, name: str):
        """A frozen component: the attribute itself, or the teacher's when this is a copy."""
        own = getattr(self, name, None)
        return own if own is not None else getattr(self, "_shared", {}).get(name)

    def _text_encoder(self):
        return (
            self.text_encoder
            if self.text_encoder is not None
            else getattr(self, "_shared", {}).get("text_encoder")
        )

    def _vae(self):
        return self.vae if self.vae is not None else getattr(self, "_shared", {}).get("vae")

    # -- memory: frozen parts in CPU memory ---------------------------------------------------------
    #: the frozen components :meth:`offload_frozen_parts` keeps in CPU memory
    FROZEN_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

    def offload_frozen_parts(self) -> DiffusersTeacher:
        """Keep the frozen text encoder(s) and VAE in CPU memory (``teacher.params.offload_frozen``):
        they leave the module tree, so ``.to(device)`` moves only the denoiser, and each moves to the
        device of its input for the duration of a call (text encoders through forward hooks, the VAE
        in :meth:`decode` / :meth:`encode`), then back.  Trades a host-to-device copy per call
        for their memory (SDXL's two encoders: ~1.6 GB in bf16) on the accelerator between calls."""
        for name in self.FROZEN_PARTS:
            m = self._modules.get(name)
            if m is None:
                continue
            del self._modules[name]
            object.__setattr__(self, name, m.to("cpu"))
            m._stepdistill_offloaded = True  # copies share the part (and its hooks)
            if name != "vae":
                m.register_forward_pre_hook(_onload_to_input_device, with_kwargs=True)
                m.register_forward_hook(_offload_to_cpu)
        self.offloaded = True
        return self

    def _vae_on(self, vae, device):
        """Context: the VAE on ``device`` for one call when the frozen parts are offloaded."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            if not getattr(vae, "_stepdistill_offloaded", False):
                yield
                return
            vae.to(device)
            try:
                yield
            finally:
                vae.to("cpu")

        return ctx()

    # -- features --------------------------------------------------------------------------------
    def bottleneck(self) -> tuple[nn.Module, Callable[[Any], Tensor]]:
        """Where feature-based heads (DMD2's GAN classifier) read this network: the module to hook
        and a function that turns that module's forward output into a (B, C, h, w) feature map.

        UNets: ``mid_block`` (already a map).  Token transformers (DiT; SD3/FLUX override the
        stream choice): the last transformer block's image tokens laid out on the patch grid.
        """
        model = self.model
        if getattr(model, "mid_block", None) is not None:
            return model.mid_block, _first_output
        blocks = getattr(model, "transformer_blocks", None)
        if blocks is None or not len(blocks):
            raise ValueError(f"cannot find a bottleneck in {type(model).__name__}")
        patch = int(model.config.get("patch_size") or 1)
        return blocks[-1], TokenGrid(self.sample_shape, patch, stream=None)

    # -- noise-level conversions ----------------------------------------------------------------
    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional training timestep index for each sigma (log-sigma interpolation).

        Exact at the training sigmas, monotone in between, clamped to [0, N-1] outside.
        """
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.float().clamp(min=1e-10).log().to(self.log_sigmas.device)
        ls = self.log_sigmas
        idx = torch.searchsorted(ls, log_sigma.contiguous()).clamp(1, ls.numel() - 1)
        lo, hi = ls[idx - 1], ls[idx]
        gap = hi - lo
        w = torch.where(gap > 0, (log_sigma - lo) / gap.clamp(min=1e-12), torch.ones_like(gap)).clamp(0, 1)
        return (idx - 1).float() + w

    def timestep_value(self, index) -> float:
        if self.prediction_type == "flow":
            return float(self.flow_t_exact[int(index)] * self.flow_timestep_scale)
        return float(index)

    def _native_timestep(self, sigma: Tensor) -> Tensor:
        if self.prediction_type == "flow":
            return sigma / (1 + sigma) * self.flow_timestep_scale
        return self.sigma_to_t(sigma)

    def input_scale(self, sigma: Tensor) -> Tensor:
        if self.prediction_type == "flow":
            return 1 / (1 + sigma)
        return 1 / (1 + sigma**2).sqrt()

    def noise_to_input(self, z: Tensor, sigma) -> Tensor:
        sigma = torch.as_tensor(sigma, device=z.device, dtype=z.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(z.shape[0])
        return z / append_dims(self.input_scale(sigma), z.ndim)

    # -- conditions -------------------------------------------------------------------------------
    def _null_text_embedding(self) -> Tensor:
        """(1, L, D) embedding of the empty prompt (or zeros of that shape), cached."""
        device = self.sigmas.device
        if self._null_cache is None:
            emb = self.encode_conditions([""])["encoder_hidden_states"]
            if self.null_prompt == "zeros":
                emb = torch.zeros_like(emb)
            self._null_cache = emb.detach()
        if self._null_cache.device != device:
            self._null_cache = self._null_cache.to(device)
        return self._null_cache

    def null_condition(self, batch_size: int) -> Cond | None:
        device = self.sigmas.device
        if self.num_classes is not None:
            return {
                "class_labels": torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
            }
        if self.tokenizer is not None:
            emb = self._null_text_embedding()
            return {"encoder_hidden_states": emb.expand(batch_size, -1, -1)}
        return None

    def null_condition_like(self, cond: Cond | None, batch_size: int) -> Cond | None:
        """:meth:`null_condition` completed with the keys of ``cond`` it lacks (e.g. SDXL's
        ``added_cond_kwargs``): with ``null_prompt="zeros"`` float tensors become zeros except
        ``time_ids`` (copied, as SDXL pipelines do); otherwise they are copied from ``cond``."""
        null = self.null_condition(batch_size)
        if null is None or not cond:
            return null
        return _fill_missing(null, cond, zeros=self.null_prompt == "zeros")

    def encode_conditions(self, raw) -> Cond | None:
        if raw is None:
            return None
        device = self.sigmas.device
        if self.num_classes is not None:
            labels = torch.as_tensor(raw, dtype=torch.long, device=device)
            if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
                raise ValueError(
                    f"class labels must lie in [0, {self.num_classes}] (the last one is the null class)"
                )
            return {"class_labels": labels}
        if self.tokenizer is not None:
            prompts = [raw] if isinstance(raw, str) else list(raw)
            te = self._text_encoder()
            if te is None:
                raise ValueError("this text-conditional teacher has no text encoder")
            max_len = self.tokenizer.model_max_length
            if max_len is None or max_len > 100_000:  # tokenizer saved without a length: use the encoder's
                max_len = getattr(getattr(te, "config", None), "max_position_embeddings", 77)
            tok = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=max_len,
                truncation=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                out = te(tok.input_ids.to(device))
            hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
            return {"encoder_hidden_states": hidden}
        raise ValueError("this teacher is unconditional; pass no conditions")

    def random_raw_conditions(self, n: int, generator: torch.Generator | None = None):
        if self.num_classes is not None:
            return torch.randint(0, self.num_classes, (n,), generator=generator, device="cpu")  # host data
        return None

    def _default_cond(self, cond: Cond | None, batch_size: int) -> Cond | None:
        """Conditional networks cannot run without a condition: None means unconditional."""
        if cond is None and (self.num_classes is not None or self.tokenizer is not None):
            return self.null_condition(batch_size)
        return cond

    # -- network evaluation -----------------------------------------------------------------------
    def _model_dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def _call_model(self, x_native: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        dtype = self._model_dtype()
        kwargs = cond_to(dict(cond or {}), x_native.device, dtype) or {}
        t = torch.as_tensor(t, device=x_native.device).float()
        if t.ndim == 0:
            t = t.expand(x_native.shape[0])
        out = self.model(x_native.to(dtype), timestep=t, return_dict=False, **kwargs)[0]
        c = x_native.shape[1]
        if out.shape[1] == 2 * c:  # learned variance (DiT / ADM): keep the mean prediction
            out = out[:, :c]
        return out.float()

    def native_output(
        self, x_native: Tensor, timestep: Tensor, cond: Cond | None, guidance_scale: float = 1.0
    ):
        """Raw network output with CFG, for diffusers schedulers (DDIM/DPM-Solver/Euler)."""
        timestep = torch.as_tensor(timestep, device=x_native.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x_native.shape[0])
        if guidance_scale == 1.0 or cond is None:  # no condition: the unconditional output, once
            return self._call_model(x_native, timestep, self._default_cond(cond, x_native.shape[0]))
        null = self.null_condition_like(cond, x_native.shape[0])
        if null is None:
            raise ValueError(f"{type(self).__name__} has no unconditional input; use guidance_scale=1")
        both = self._call_model(torch.cat([x_native] * 2), torch.cat([timestep] * 2), cond_cat(null, cond))
        u, c = both.chunk(2)
        return u + guidance_scale * (c - u)

    def output_to_x0(self, out: Tensor, x_native: Tensor, sigma: Tensor) -> Tensor:
        nd = x_native.ndim
        if self.prediction_type == "flow":
            t = append_dims(sigma / (1 + sigma), nd)
            return x_native - t * out
        abar = append_dims(1 / (1 + sigma**2), nd)
        if self.prediction_type == "epsilon":
            return (x_native - (1 - abar).sqrt() * out) / abar.sqrt()
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * x_native - (1 - abar).sqrt() * out
        return out  # sample

    def denoise(
        self,
        x: Tensor,
        sigma: Tensor | float,
        cond: Cond | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """As :meth:`DiffusionTeacher.denoise`; the unconditional branch also carries the keys of
        ``cond`` that :meth:`null_condition` lacks (SDXL ``added_cond_kwargs``)."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if w == 1.0 or cond is None:
            return self.denoise_raw(x, sigma, cond)
        null = self.null_condition_like(cond, x.shape[0])
        if null is None:
            raise ValueError(f"{type(self).__name__} has no unconditional input; use guidance_scale=1")
        both = self.denoise_raw(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat(null, cond))
        uncond, condx = both.chunk(2)
        return uncond + w * (condx - uncond)

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).float()
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        x_native = x.float() * append_dims(self.input_scale(sigma), x.ndim)
        cond = self._default_cond(cond, x.shape[0])
        out = self._call_model(x_native, self._native_timestep(sigma), cond)
        return self.output_to_x0(out, x_native, sigma).to(x.dtype)

    # -- latent space -----------------------------------------------------------------------------
    def decode(self, x0: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (``latents / scaling_factor + shift_factor`` through the VAE
        decoder).  Differentiable with respect to ``x0`` (the VAE itself is frozen)."""
        vae = self._vae()
        if vae is None:
            return x0
        sf = vae.config.get("scaling_factor", None) or 1.0
        shift = vae.config.get("shift_factor", None) or 0.0
        with self._vae_on(vae, x0.device):
            return vae.decode((x0 / sf + shift).to(vae.dtype), return_dict=False)[0].float()

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> latents (a posterior sample, ``(z - shift_factor) * scaling_factor``)."""
        vae = self._vae()
        if vae is None:
            return images
        sf = vae.config.get("scaling_factor", None) or 1.0
        shift = vae.config.get("shift_factor", None) or 0.0
        with torch.no_grad(), self._vae_on(vae, images.device):
            z = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator=generator).float()
        return (z - shift) * sf

    # -- multi-step sampling through any diffusers scheduler ---------------------------------------
    def make_scheduler(self, sampler: str = "ddim", **overrides):
        """A diffusers scheduler for this teacher's schedule and parametrisation.

        VP teachers: any VP scheduler (``ddim``, ``dpmsolver++``, ``euler``, ``heun``, ``ddpm``, ... or a
        class name).  Flow teachers: ``flow_euler`` (also chosen for ``ddim``/``euler``) and
        ``dpmsolver``/``dpmsolver++`` (DPM-Solver++ with ``use_flow_sigmas``).
        """
        import diffusers

        cfg = dict(self.scheduler_config)
        cfg.pop("_class_name", None)
        cfg.pop("_diffusers_version", None)
        if self.prediction_type == "flow":
            if sampler in ("ddim", "euler", "flow_euler", "FlowMatchEulerDiscreteScheduler"):
                cls_name = "FlowMatchEulerDiscreteScheduler"
                cfg["shift"] = self.flow_shift
                cfg.pop("prediction_type", None)
            elif sampler in ("dpmsolver", "dpmsolver++", "DPMSolverMultistepScheduler"):
                cls_name = "DPMSolverMultistepScheduler"
                cfg = {
                    "num_train_timesteps": int(self.flow_timestep_scale),
                    "prediction_type": "flow_prediction",
                    "use_flow_sigmas": True,
                    "flow_shift": self.flow_shift,
                    "algorithm_type": "dpmsolver++",
                }
            else:
                cls_name = SAMPLERS.get(sampler, sampler)
                if "FlowMatch" not in cls_name:
                    raise ValueError(
                        f"sampler {sampler!r} does not support flow-matching teachers; use flow_euler, "
                        "dpmsolver++ or a FlowMatch* scheduler class"
                    )
        else:
            cls_name = SAMPLERS.get(sampler, sampler)
            if "FlowMatch" in cls_name:
                raise ValueError(
                    f"sampler {sampler!r} is for flow-matching teachers; this teacher is {self.prediction_type}"
                )
            cfg["prediction_type"] = self.prediction_type
            if sampler in ("dpmsolver", "dpmsolver++"):
                cfg.setdefault("algorithm_type", "dpmsolver++")
        sched_cls = getattr(diffusers, cls_name, None)
        if sched_cls is None:
            raise ValueError(
                f"unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)} or a diffusers scheduler class"
            )
        cfg.update(overrides)
        return sched_cls.from_config(cfg)

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        cond: Cond | None = None,
        num_steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        scheduler_overrides: dict | None = None,
    ) -> Tensor:
        """Multi-step sampling with a diffusers scheduler; returns x0 in the teacher's sample space.

        ``noise`` (or ``n`` draws from ``generator``) is unit Gaussian noise, scaled by the
        scheduler's ``init_noise_sigma``.  The result is the last step's x0 prediction when the
        scheduler reports one (DDIM with ``set_alpha_to_one=False`` would otherwise stop at
        ``alphas_cumprod[0]``), else the final sample.
        """
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        sched = self.make_scheduler(sampler, **(scheduler_overrides or {}))
        device = self.sigmas.device
        set_kw: dict[str, Any] = {"device": device}
        if (
            sched.config.get("use_dynamic_shifting")
            and "mu" in inspect.signature(sched.set_timesteps).parameters
        ):
            # exponential time shift with mu = log(shift) equals the static shift the teacher uses
            set_kw["mu"] = math.log(self.flow_shift) if self.flow_shift > 0 else 0.0
        sched.set_timesteps(num_steps, **set_kw)
        if noise is None:
            if n is None:
                raise ValueError("pass n or noise")
            gen_device = generator.device if generator is not None else device
            noise = torch.randn((n, *self.sample_shape), generator=generator, device=gen_device)
        x = noise.to(device=device, dtype=torch.float32)
        cond = cond_to(cond, device)
        init_sigma = getattr(sched, "init_noise_sigma", 1.0)
        x = x * (init_sigma.to(device) if isinstance(init_sigma, Tensor) else float(init_sigma))
        step_params = inspect.signature(sched.step).parameters
        step_kw = {"generator": generator} if "generator" in step_params else {}
        timesteps = sched.timesteps
        for i, t in enumerate(timesteps):
            x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = self.native_output(x_in, t.to(device).float().expand(x.shape[0]), cond, w)
            res = sched.step(out, t, x, return_dict=True, **step_kw)
            x = res.prev_sample
            if i == len(timesteps) - 1:
                x0 = getattr(res, "pred_original_sample", None)
                if x0 is not None:
                    x = x0
        return x.float()



# ---------------------------------------------------------------------------------------------
# the steps of DiffusersTeacher.from_pretrained


def _read_index(path) -> tuple[dict, str, bool]:
    """``(model_index, source for from_pretrained, is_local)`` of a pipeline folder or hub id."""
    root = Path(path)
    local = root.exists()
    if local:
        if not root.is_dir():
            raise TeacherLoadError(f"{root} is a file, not a diffusers pipeline folder")
        index_file = root / "model_index.json"
        if not index_file.exists():
            raise TeacherLoadError(
                f"{root} is not a diffusers pipeline folder (no model_index.json). Point teacher.path at a "
                "folder written by `save_pretrained` or by `stepdistill teacher train`."
            )
        index = _read_json(index_file)
    else:
        try:
            from huggingface_hub import hf_hub_download

            index = json.loads(Path(hf_hub_download(str(path), "model_index.json")).read_text())
        except Exception as e:  # offline, or not a repo
            raise TeacherLoadError(
                f"teacher '{path}' is neither a local folder nor a reachable hub repo ({e}). "
                "Download it first (huggingface-cli download) and pass the local folder."
            ) from e
    if not isinstance(index, dict):
        raise TeacherLoadError(f"{path}: model_index.json must hold a JSON object")
    return index, str(root) if local else str(path), local


def _denoiser_class(path, index: dict, local: bool) -> tuple[str, str, type]:
    """``(component name, class name, diffusers class)`` of the folder's ``unet`` / ``transformer``."""
    import diffusers

    denoiser_name = next((n for n in ("unet", "transformer") if _component(index, n)), None)
    if denoiser_name is None:
        raise TeacherLoadError(f"{path}: model_index.json names no 'unet' or 'transformer' component")
    lib, cls_name = _component(index, denoiser_name)
    model_cls = getattr(diffusers, cls_name, None)
    if model_cls is None:
        raise TeacherLoadError(f"{path}: denoiser class {lib}.{cls_name} is not a diffusers model class")
    if local and not (Path(path) / denoiser_name).is_dir():
        raise TeacherLoadError(f"{path} has no '{denoiser_name}' folder although model_index.json names it")
    return denoiser_name, cls_name, model_cls


def _family_class(family: str):
    """The teacher class of a non-generic family (SDXL, SD3, FLUX.1)."""
    if family == "sdxl":
        from .sdxl import SDXLTeacher

        return SDXLTeacher
    from .flow_transformers import FluxTeacher, SD3Teacher

    return SD3Teacher if family == "sd3" else FluxTeacher


def _load_text_and_vae(path, src: str, index: dict, dtype: torch.dtype):
    """``(text_encoder, tokenizer, vae)`` of an SD-style folder (``None`` for absent parts)."""
    import diffusers

    text_encoder = tokenizer = vae = None
    if _component(index, "text_encoder"):
        import transformers

        te_name = _component(index, "text_encoder")[1]
        te_cls = getattr(transformers, te_name, None)
        tok_entry = _component(index, "tokenizer")
        tok_cls = getattr(transformers, tok_entry[1], None) if tok_entry else None
        if te_cls is None or tok_cls is None:
            raise TeacherLoadError(
                f"{path}: text encoder / tokenizer classes {te_name}, {tok_entry} are unknown "
                "to transformers (a text-conditional teacher needs both)"
            )
        text_encoder = _load_component(
            path, "text_encoder", lambda: te_cls.from_pretrained(src, subfolder="text_encoder", dtype=dtype)
        )
        tokenizer = _load_component(path, "tokenizer", lambda: tok_cls.from_pretrained(src, subfolder="tokenizer"))
    if _component(index, "vae"):
        vae_name = _component(index, "vae")[1]
        vae_cls = getattr(diffusers, vae_name, None)
        if vae_cls is None:
            raise TeacherLoadError(f"{path}: VAE class {vae_name} is not a diffusers model class")
        vae = _load_component(
            path, "vae", lambda: vae_cls.from_pretrained(src, subfolder="vae", torch_dtype=torch.float32)
        )
    return text_encoder, tokenizer, vae

def _component(index: dict, name: str) -> tuple[str, str] | None:
    """``model_index.json`` entry ``[library, class]`` or None when absent / null."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None or entry[1] is None:
        return None
    return entry[0], entry[1]


def load_folder_part(path, src: str, index: dict, name: str, dtype: torch.dtype = torch.float32, required: bool = True):
    """Load component ``name`` (a transformers text encoder / tokenizer or a diffusers VAE) of a
    pipeline folder by the class ``model_index.json`` names; None when absent and not required."""
    entry = _component(index, name)
    if entry is None:
        if required:
            raise TeacherLoadError(f"{path}: model_index.json names no '{name}' component, which this teacher family needs")
        return None
    lib, cls_name = entry
    import diffusers
    import transformers

    cls = getattr(transformers if lib == "transformers" else diffusers, cls_name, None)
    if cls is None:
        raise TeacherLoadError(f"{path}: component '{name}' has class {lib}.{cls_name}, which is not installed")
    if name.startswith("tokenizer"):
        return _load_component(path, name, lambda: cls.from_pretrained(src, subfolder=name))
    if lib == "transformers":
        return _load_component(path, name, lambda: cls.from_pretrained(src, subfolder=name, dtype=dtype))
    return _load_component(path, name, lambda: cls.from_pretrained(src, subfolder=name, torch_dtype=dtype))


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherLoadError(f"{f} is not valid JSON: {e}") from e
    except OSError as e:
        raise TeacherLoadError(f"cannot read {f}: {e}") from e


def _load_component(path, name: str, load):
    try:
        return load()
    except TeacherLoadError:
        raise
    except Exception as e:  # missing weights, corrupted files, incompatible configs
        raise TeacherLoadError(f"{path}: cannot load component '{name}' ({type(e).__name__}: {e})") from e


def _onload_to_input_device(module, args, kwargs):
    """Forward pre-hook of an offloaded frozen part: move it to its first tensor input's device."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            module.to(v.device)
            break


def _offload_to_cpu(module, args, output):
    module.to("cpu")


def _first_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class TokenGrid:
    """(B, N, D) image tokens (element ``stream`` of a block's tuple output) -> (B, D, h, w) on the
    patch grid of ``sample_shape`` (scaled to N tokens when the resolution differs)."""

    def __init__(self, sample_shape, patch: int, stream: int | None):
        self.h0, self.w0 = sample_shape[1] // patch, sample_shape[2] // patch
        self.stream = stream

    def __call__(self, output) -> Tensor:
        tokens = output[self.stream] if self.stream is not None else _first_output(output)
        b, n, d = tokens.shape
        h, w = self.h0, self.w0
        if h * w != n:
            k = math.sqrt(n / (h * w))
            h, w = round(h * k), round(w * k)
            if h * w != n:
                raise ValueError(f"{n} image tokens do not fit the {self.h0}x{self.w0} patch grid's aspect ratio")
        return tokens.transpose(1, 2).reshape(b, d, h, w)


def disable_label_dropout(module: nn.Module) -> nn.Module:
    """Switch off the class-label dropout of diffusers label embedders (DiT's ``LabelEmbedding``,
    ``class_dropout_prob`` 0.1), which is active whenever the module is in train mode.

    The null-class row of the embedding table stays (guidance uses it); only the random
    replacement of labels stops.  Returns ``module``.
    """
    for m in module.modules():
        if type(m).__name__ == "LabelEmbedding" and getattr(m, "dropout_prob", 0) > 0:
            m.dropout_prob = 0.0
    return module


def _fill_missing(null: Cond, cond: Cond, zeros: bool) -> Cond:
    out: Cond = dict(null)
    for k, v in cond.items():
        if k in out:
            if isinstance(v, dict) and isinstance(out[k], dict):
                out[k] = _fill_missing(out[k], v, zeros)
            continue
        if isinstance(v, dict):
            out[k] = _fill_missing({}, v, zeros)
        elif isinstance(v, Tensor) and zeros and v.is_floating_point() and k != "time_ids":
            out[k] = torch.zeros_like(v)
        else:
            out[k] = v
    return out


def _load_scheduler_config(path) -> dict:
    root = Path(path)
    f = root / "scheduler" / "scheduler_config.json"
    if f.exists():
        cfg = _read_json(f)
        if not isinstance(cfg, dict):
            raise TeacherLoadError(f"{f} must hold a JSON object")
        return cfg
    if root.exists():
        raise TeacherLoadError(
            f"{root} has no scheduler/scheduler_config.json; the teacher's noise schedule is unknown"
        )
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(str(path), "scheduler_config.json", subfolder="scheduler")).read_text()
        )
    except Exception as e:
        raise TeacherLoadError(f"teacher '{path}': cannot fetch scheduler/scheduler_config.json ({e})") from e


def numpy_seed_everything(seed: int) -> None:  # small helper for scripts
    np.random.seed(seed)
    torch.manual_seed(seed)
