"""The teacher contract: one noise-level language for every diffusion teacher.

Everything inside stepdistill speaks k-diffusion / EDM "variance exploding" language:

    x = x0 + sigma * eps,        denoise(x, sigma, cond) -> x0_hat

Adapters convert at the boundary and nowhere else.  A VP model (diffusers DDPM-style schedule,
``alphas_cumprod``) sees ``x_vp = x / sqrt(1 + sigma^2)`` at timestep ``t`` with
``sigma_t = sqrt((1 - abar_t) / abar_t)``; a flow-matching model sees ``x_fm = x / (1 + sigma)`` at
``t = sigma / (1 + sigma)``.  Because the conversion is exact, an algorithm written once in sigma
language is the paper's algorithm for every parametrisation.

Conditions are dicts of batched tensors passed to the network as keyword arguments
(``{"class_labels": LongTensor}``, ``{"encoder_hidden_states": ...}``, SDXL's
``{"encoder_hidden_states": ..., "added_cond_kwargs": {...}}``).  ``null_condition(n)`` gives the
unconditional input for classifier-free guidance (null class, empty-prompt embedding, zeros).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

Cond = dict[str, Any]


def cond_batch_size(cond: Cond | None) -> int | None:
    if not cond:
        return None
    for v in cond.values():
        if isinstance(v, Tensor):
            return v.shape[0]
        if isinstance(v, dict):
            n = cond_batch_size(v)
            if n is not None:
                return n
    return None


def cond_cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions along the batch dimension (for batched CFG)."""
    out: Cond = {}
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, Tensor):
            out[k] = torch.cat([va, vb.to(va.device)], 0)
        elif isinstance(va, dict):
            out[k] = cond_cat(va, vb)
        else:
            out[k] = va
    return out


def cond_index(cond: Cond | None, index: Tensor | slice) -> Cond | None:
    """Select rows of every tensor in a condition."""
    if cond is None:
        return None
    out: Cond = {}
    for k, v in cond.items():
        if isinstance(v, Tensor):
            out[k] = v[index]
        elif isinstance(v, dict):
            out[k] = cond_index(v, index)
        else:
            out[k] = v
    return out


def cond_to(cond: Cond | None, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond | None:
    if cond is None:
        return None
    out: Cond = {}
    for k, v in cond.items():
        if isinstance(v, Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[k] = v
        elif isinstance(v, dict):
            out[k] = cond_to(v, device, dtype)
        else:
            out[k] = v
    return out


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor (B,) so that it broadcasts against a (B, ...) tensor."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


class DiffusionTeacher(nn.Module, ABC):
    """A frozen diffusion model seen through the sigma-language contract.

    Subclasses implement :meth:`denoise_raw` (one network evaluation, no guidance) and the
    condition helpers; guidance, noising and timestep bookkeeping live here.
    """

    #: noise levels the teacher was trained on, ascending; index i is "timestep index" i
    #: (for a diffusers VP schedule, index i is diffusers timestep i).
    sigmas: Tensor
    #: shape of one sample (C, H, W) or (D,) in the space the teacher denoises (latents for LDMs)
    sample_shape: tuple[int, ...]
    #: default classifier-free guidance scale (1.0 = none)
    guidance_scale: float = 1.0
    #: True when the guidance scale is an input of the network (guidance-distilled teachers such as
    #: FLUX.1-dev): ``denoise(..., guidance_scale=w)`` passes ``w`` in the condition's ``"guidance"``
    #: entry in one network call and never evaluates an unconditional branch (there is no true CFG)
    embedded_guidance: bool = False

    # -- noise levels --------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.numel())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_at(self, index: Tensor | int) -> Tensor:
        """sigma for integer timestep indices (0 = least noise)."""
        index = torch.as_tensor(index, device=self.sigmas.device).long()
        return self.sigmas[index]

    def add_noise(self, x0: Tensor, sigma: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = torch.randn_like(x0)
        sigma = torch.as_tensor(sigma, device=x0.device, dtype=x0.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(x0.shape[0])
        return x0 + append_dims(sigma, x0.ndim) * noise

    # -- conditions ----------------------------------------------------------------------------
    @abstractmethod
    def null_condition(self, batch_size: int) -> Cond | None:
        """The unconditional input for classifier-free guidance (None for unconditional models)."""

    def encode_conditions(self, raw: list | Tensor | None) -> Cond | None:
        """Turn raw conditions (class ids, prompts) into the network's condition dict."""
        if raw is None:
            return None
        raise NotImplementedError(f"{type(self).__name__} does not take conditions")

    def random_raw_conditions(self, n: int, generator: torch.Generator | None = None) -> list | Tensor | None:
        """Draw raw conditions uniformly (class-conditional teachers); None when the teacher
        needs a prompt source (text) or is unconditional."""
        return None

    # -- denoising -----------------------------------------------------------------------------
    @abstractmethod
    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        """One network evaluation: x0_hat for VE-space ``x`` at per-sample ``sigma`` (B,)."""

    def denoise(
        self,
        x: Tensor,
        sigma: Tensor | float,
        cond: Cond | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """x0_hat with classifier-free guidance ``uncond + w (cond - uncond)`` in x0 space.

        (CFG on x0 equals CFG on eps / score at the same sigma: the maps are affine in x0_hat.)
        """
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if self.embedded_guidance:
            cond = dict(cond) if cond else dict(self.null_condition(x.shape[0]) or {})
            cond["guidance"] = torch.full((x.shape[0],), float(w), device=x.device)
            return self.denoise_raw(x, sigma, cond)
        if w == 1.0 or cond is None:
            return self.denoise_raw(x, sigma, cond)
        null = self.null_condition(x.shape[0])
        if null is None:
            raise ValueError(f"{type(self).__name__} has no unconditional input; use guidance_scale=1")
        both = self.denoise_raw(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat(null, cond))
        uncond, condx = both.chunk(2)
        return uncond + w * (condx - uncond)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None, guidance_scale=None):
        return self.denoise(x, sigma, cond, guidance_scale)

    # -- sampling ------------------------------------------------------------------------------
    def prior_sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Noise at the largest training sigma: ``sigma_max * N(0, I)``."""
        device = device or self.sigmas.device
        z = torch.randn((n, *self.sample_shape), generator=generator, device=device)
        return z * self.sigma_max

    def noise_to_input(self, z: Tensor, sigma: Tensor | float) -> Tensor:
        """The VE-space point that corresponds to feeding unit noise ``z`` as the network's native
        input at ``sigma`` (how one-step generators and stock one-step pipelines start).

        VE-native networks: ``z * sigma``.  VP adapters override this with ``z * sqrt(1 + sigma^2)``
        (the model input is ``z`` itself, as in DMD2/SwiftBrush and diffusers' LCMScheduler).
        """
        sigma = torch.as_tensor(sigma, device=z.device, dtype=z.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(z.shape[0])
        return z * append_dims(sigma, z.ndim)

    def timestep_value(self, index: int) -> float:
        """The value the exported pipeline's scheduler uses for training timestep ``index``."""
        return float(index)

    def decode(self, x0: Tensor) -> Tensor:
        """Map the teacher's sample space to images in [-1, 1] (identity for pixel teachers)."""
        return x0


class DelegatingTeacher(DiffusionTeacher):
    """A teacher that forwards everything to ``inner``; subclasses override what they change
    (DisBack swaps the denoiser for a path node, MSD hands out a smaller trainable network)."""

    def __init__(self, inner: DiffusionTeacher):
        super().__init__()
        self.inner = inner
        self.sample_shape = inner.sample_shape
        self.guidance_scale = inner.guidance_scale
        self.embedded_guidance = inner.embedded_guidance

    @property
    def sigmas(self) -> Tensor:
        """The inner teacher's noise levels, read through: they follow ``.to(device)`` (a plain
        attribute copied at construction would stay on the CPU)."""
        return self.inner.sigmas

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["inner"], name)

    def null_condition(self, batch_size: int) -> Cond | None:
        return self.inner.null_condition(batch_size)

    def encode_conditions(self, raw):
        return self.inner.encode_conditions(raw)

    def random_raw_conditions(self, n, generator=None):
        return self.inner.random_raw_conditions(n, generator)

    def noise_to_input(self, z, sigma):
        return self.inner.noise_to_input(z, sigma)

    def timestep_value(self, index):
        return self.inner.timestep_value(index)

    def decode(self, x0):
        return self.inner.decode(x0)

    def trainable_copy(self):
        return self.inner.trainable_copy()

    def denoise_raw(self, x, sigma, cond):
        return self.inner.denoise_raw(x, sigma, cond)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
