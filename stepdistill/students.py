"""One-step and few-step generators.

A generator is a trainable denoiser (usually a copy of the teacher network, wrapped by the same
adapter) evaluated at fixed training timesteps.  Sampling is exactly what diffusers'
``LCMScheduler`` does with ``timesteps=[t_1, ..., t_k]`` (descending):

    x = z                                   # unit noise in the network's native space
    for each t_i:
        x0 = c_out(t_i) * x0_hat(x, t_i) + c_skip(t_i) * x         # LCM boundary condition
        x  = sqrt(abar_{t_{i+1}}) x0 + sqrt(1 - abar_{t_{i+1}}) eps   # fresh noise, not after the last

so the exported stock pipeline (``StableDiffusionPipeline`` + ``LCMScheduler``) or the package's
``OneStepPipeline`` reproduces the training-time generator.  In sigma language (see
``teachers/base.py``) re-noising is ``x = x0 + sigma_{i+1} eps`` and the native input is
``teacher.noise_to_input(z, sigma)``.

The LCM boundary scalings (``c_skip = 0.25 / ((10 t)^2 + 0.25)``) are ~1e-8 away from identity at
the timesteps we use; they are applied anyway so that equality with the pipeline is exact, not
approximate.  ``c_skip`` multiplies the network's own input, computed by the adapter
(``input_scale``: ``x / sqrt(1 + sigma^2)`` for VP, ``x / (1 + sigma)`` for flow matching; it was the
VP input for every teacher).  :func:`~stepdistill.algorithms.common.make_generator` gives flow students
``boundary="none"`` (their stock scheduler has no boundary condition); at flow timesteps (>= 1) an
``"lcm"`` boundary moves x0 by at most ``c_skip <= 2.5e-3`` times the input.

Which timesteps: :func:`stepdistill.algorithms.common.make_generator` lowers a requested timestep at
which the teacher's x0 conversion is ill-posed (epsilon teachers near the end of the schedule) to
the noisiest well-posed one, so that one preset (``[999]``) transfers across parametrisations and
schedules (``docs/algorithms.md``, "Teachers of any parametrisation").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .teachers.base import Cond, DiffusionTeacher, append_dims


def lcm_boundary_scalings(timestep: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip, c_out of diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class Generator(nn.Module):
    """``generator(noise, cond) -> x0`` at fixed training timestep indices.

    Args:
        denoiser: trainable denoiser in sigma language (a teacher copy, LoRA-adapted or smaller).
        timesteps: training timestep indices, descending (``[999]``, ``[899]``, ``[999, 749, 499, 249]``).
        boundary: ``"lcm"`` applies the LCMScheduler boundary condition (VP students exported with
            LCMScheduler); ``"none"`` returns the denoiser output unchanged (analytic / EDM students).
    """

    def __init__(self, denoiser: DiffusionTeacher, timesteps: Sequence[int] = (999,), boundary: str = "lcm"):
        super().__init__()
        timesteps = [int(t) for t in timesteps]
        if not timesteps:
            raise InputError("algorithm.params.generator_timesteps is empty; a generator needs at least one timestep, e.g. [999]")
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise InputError(f"algorithm.params.generator_timesteps must be strictly descending (e.g. [999, 499]), got {timesteps}")
        n = denoiser.num_train_timesteps
        if not all(0 <= t < n for t in timesteps):
            raise InputError(f"algorithm.params.generator_timesteps must lie in [0, {n - 1}] (the teacher's training steps), got {timesteps}")
        if boundary not in ("lcm", "none"):
            raise InputError(f"boundary must be 'lcm' or 'none', got {boundary!r}")
        self.denoiser = denoiser
        self.timesteps = timesteps
        self.boundary = boundary

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser.sample_shape

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def sigma(self, step: int) -> Tensor:
        return self.denoiser.sigma_at(self.timesteps[step])

    def start(self, z: Tensor) -> Tensor:
        """VE-space input of the first step for unit noise ``z``."""
        return self.denoiser.noise_to_input(z, self.sigma(0))

    def denoise_step(self, x: Tensor, step: int, cond: Cond | None) -> Tensor:
        """x0 from the VE-space sample ``x`` at the generator's ``step``-th timestep (one NFE)."""
        index = torch.full((x.shape[0],), self.timesteps[step], dtype=torch.long, device=x.device)
        return self.denoise_at(x, index, cond)

    def denoise_at(self, x: Tensor, index: Tensor, cond: Cond | None) -> Tensor:
        """x0 at arbitrary per-sample training timestep indices, with the same boundary condition
        (time-conditioned students such as BOOT's query the network at many t)."""
        sigma = self.denoiser.sigmas[index.to(self.denoiser.sigmas.device)].to(x.device)
        x0 = self.denoiser.denoise(x, sigma, cond, guidance_scale=1.0)
        if self.boundary == "lcm":
            t = torch.tensor([self.denoiser.timestep_value(int(i)) for i in index], dtype=torch.float32,
                             device=x.device)
            c_skip, c_out = lcm_boundary_scalings(t)
            native = x * append_dims(self._input_scale(sigma.to(x.dtype)), x.ndim)  # the network's input
            x0 = append_dims(c_out, x.ndim) * x0 + append_dims(c_skip, x.ndim) * native
        return x0

    def _input_scale(self, sigma: Tensor) -> Tensor:
        """Scale from the VE sample to the network's input (the sample LCMScheduler's c_skip mixes
        in): the adapter's own ``input_scale`` (VP: ``1 / sqrt(1 + sigma^2)``), VP when it has none."""
        scale = getattr(self.denoiser, "input_scale", None)
        return scale(sigma) if callable(scale) else 1 / (1 + sigma**2).sqrt()

    def renoise(self, x0: Tensor, step: int, noise: Tensor) -> Tensor:
        """Fresh-noise re-noising to the ``step``-th timestep (LCM multi-step sampling)."""
        return self.denoiser.add_noise(x0, self.sigma(step).expand(x0.shape[0]), noise)

    def forward(
        self,
        z: Tensor,
        cond: Cond | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run ``num_steps`` (default: all) generator steps from unit noise ``z``.

        Fresh noise between steps is drawn with ``generator`` in the same order as
        ``LCMScheduler.step`` draws it, so pipeline and generator agree for a seeded generator.
        """
        k = self.num_steps if num_steps is None else num_steps
        x = self.start(z)
        x0 = x
        for i in range(k):
            x0 = self.denoise_step(x, i, cond)
            if i + 1 < k:
                x = self.renoise(x0, i + 1, self.step_noise(x0, generator))
        return x0

    def step_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fresh noise for re-noising ``x0``, drawn in the layout the stock pipeline's scheduler draws
        it: ``randn(x0.shape)`` (``LCMScheduler.step``, SD3's stochastic flow-match step), except for
        teachers whose network sees packed tokens (FLUX: ``pack`` / ``unpack``), where the pipeline's
        scheduler draws ``randn`` of the packed shape, unpacked here."""
        pack, unpack = getattr(self.denoiser, "pack", None), getattr(self.denoiser, "unpack", None)
        # draw where the generator lives (the sample grid's seeded CPU generator), then move
        gdev = generator.device if generator is not None else x0.device
        if callable(pack) and callable(unpack) and x0.ndim == 4:
            h, w = x0.shape[-2:]
            shape = pack(x0[:1]).shape[1:]
            noise = torch.randn((x0.shape[0], *shape), generator=generator, device=gdev, dtype=x0.dtype)
            return unpack(noise.to(x0.device), h, w)
        return torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
