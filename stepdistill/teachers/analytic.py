"""Analytic Gaussian-mixture teacher with the exact denoiser.

Data: x0 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dimensions (2-D toys, or image-shaped (C, H, W)).
Noised: x = x0 + sigma eps ~ sum_k pi_k N(mu_k, (s_k^2 + sigma^2) I), so the posterior mean is

    E[x0 | x] = sum_k r_k(x) * (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)),
    r_k(x)   = softmax_k( log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I) ).

Class-conditional use: class ``k`` restricts the mixture to component k; the null class (index K)
is the whole mixture, so classifier-free guidance is well defined.  Because every quantity is
closed-form, algorithm tests can measure the exact distance between a generator and the target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Cond, DiffusionTeacher, append_dims


def karras_sigmas(n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5 noise levels, returned ascending (index 0 = sigma_min)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return (inv**rho).flip(0).float()


class GaussianMixtureTeacher(DiffusionTeacher):
    """Exact denoiser of an isotropic Gaussian mixture (see module docstring)."""

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float = 0.05,
        weights: Tensor | None = None,
        sample_shape: tuple[int, ...] | None = None,
        sigmas: Tensor | None = None,
        guidance_scale: float = 1.0,
        conditional: bool = True,
    ):
        super().__init__()
        self.conditional = conditional
        means = torch.as_tensor(means, dtype=torch.float32)
        k = means.shape[0]
        flat = means.reshape(k, -1)
        stds = torch.as_tensor(stds, dtype=torch.float32).expand(k).clone()
        weights = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-5:
            raise ValueError("mixture weights must be non-negative and sum to 1")
        self.register_buffer("means", flat)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights)
        self.register_buffer("sigmas", karras_sigmas() if sigmas is None else torch.as_tensor(sigmas).float())
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else tuple(means.shape[1:])
        self.num_classes = k
        self.guidance_scale = guidance_scale

    # -- construction helpers -----------------------------------------------------------------
    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 1.0, std: float = 0.05, **kw) -> GaussianMixtureTeacher:
        """The classic 2-D ring of Gaussians."""
        ang = torch.arange(num_modes) * (2 * math.pi / num_modes)
        means = torch.stack([radius * ang.cos(), radius * ang.sin()], 1)
        return cls(means, std, **kw)

    @classmethod
    def grid(cls, side: int = 5, spacing: float = 0.5, std: float = 0.04, **kw) -> GaussianMixtureTeacher:
        ax = (torch.arange(side) - (side - 1) / 2) * spacing
        means = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
        return cls(means, std, **kw)

    @classmethod
    def image_shaped(
        cls, num_modes: int = 4, shape: tuple[int, int, int] = (1, 8, 8), std: float = 0.1, seed: int = 0, **kw
    ) -> GaussianMixtureTeacher:
        """Image-shaped mixture: each mode is a random +-0.8 pattern; noise level per pixel ``std``."""
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand((num_modes, *shape), generator=g) > 0.5).float() * 1.6 - 0.8
        return cls(means, std, **kw)

    @classmethod
    def from_params(cls, params: dict) -> GaussianMixtureTeacher | LearnedScoreTeacher:
        """Build from ``teacher.params``: ``mixture`` (ring | grid | image) and its arguments, plus
        ``score: exact`` (default) or ``score: learned`` (``score_hidden``, ``score_fit_steps``,
        ``score_seed``: see :class:`LearnedScoreTeacher`)."""
        params = dict(params)
        kind = params.pop("mixture", "ring")
        gs = params.pop("guidance_scale", 1.0)
        score = params.pop("score", "exact")
        learned = {k: params.pop(f"score_{k}") for k in ("hidden", "fit_steps", "seed") if f"score_{k}" in params}
        params.setdefault("conditional", True)
        if kind == "ring":
            mixture = cls.ring(guidance_scale=gs, **params)
        elif kind == "grid":
            mixture = cls.grid(guidance_scale=gs, **params)
        elif kind == "image":
            if "shape" in params:
                params["shape"] = tuple(params["shape"])
            mixture = cls.image_shaped(guidance_scale=gs, **params)
        else:
            raise ValueError(f"teacher.params.mixture must be ring | grid | image, got {kind!r}")
        if score == "exact":
            if learned:
                raise ValueError(f"teacher.params.score_{next(iter(learned))} needs teacher.params.score: learned")
            return mixture
        if score == "learned":
            return LearnedScoreTeacher(mixture, **learned)
        raise ValueError(f"teacher.params.score must be exact | learned, got {score!r}")

    # -- contract -------------------------------------------------------------------------------
    def null_condition(self, batch_size: int) -> Cond:
        return {"class_labels": torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.means.device)}

    def encode_conditions(self, raw) -> Cond | None:
        if raw is None:
            return None
        return {"class_labels": torch.as_tensor(raw, dtype=torch.long, device=self.means.device)}

    def random_raw_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Component ids drawn by weight; None for an unconditional mixture (``conditional=False``)."""
        if not self.conditional:
            return None
        return torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)  # host data

    def _component_logits(self, x_flat: Tensor, sigma: Tensor) -> Tensor:
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2  # (B, K)
        d = x_flat.shape[1]
        sq = torch.cdist(x_flat.double(), self.means.double()) ** 2  # (B, K)
        logits = self.weights.log()[None] - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return logits

    def _mask(self, logits: Tensor, cond: Cond | None) -> Tensor:
        if cond is None or "class_labels" not in cond:
            return logits
        labels = cond["class_labels"].to(logits.device)
        keep = torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1), self.num_classes).bool()
        keep = keep | (labels == self.num_classes)[:, None]  # null class: whole mixture
        return logits.masked_fill(~keep, float("-inf"))

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        b = x.shape[0]
        xf = x.reshape(b, -1).double()
        sigma = sigma.to(x.device).double().reshape(b)
        r = self._mask(self._component_logits(xf, sigma), cond).softmax(1)  # (B, K)
        s2 = self.stds.double()[None] ** 2
        shrink = s2 / (s2 + sigma[:, None] ** 2)  # (B, K)
        mu = self.means.double()
        # sum_k r_k (mu_k + shrink_k (x - mu_k))
        post = (r[:, :, None] * (mu[None] + shrink[:, :, None] * (xf[:, None] - mu[None]))).sum(1)
        return post.to(x.dtype).reshape(x.shape)

    # -- exact quantities for tests and benchmarks ------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
        if cond is not None and "class_labels" in cond:
            labels = cond["class_labels"].cpu()
            comp = labels.clone()
            null = labels == self.num_classes
            if null.any():
                comp[null] = torch.multinomial(self.weights.cpu(), int(null.sum()), True, generator=generator)
        else:
            comp = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.means.shape[1]), generator=generator)
        x = self.means.cpu()[comp] + self.stds.cpu()[comp, None] * eps
        return x.reshape(n, *self.sample_shape).to(self.means.device)

    def log_prob(self, x0: Tensor, sigma: float = 0.0) -> Tensor:
        """Exact log-density of the (noised, at ``sigma``) mixture; per sample."""
        b = x0.shape[0]
        s = torch.full((b,), float(sigma), device=x0.device)
        return self._component_logits(x0.reshape(b, -1).to(self.means.device), s).logsumexp(1).float()

    def mode_assignment(self, x0: Tensor) -> Tensor:
        b = x0.shape[0]
        return torch.cdist(x0.reshape(b, -1).to(self.means.device), self.means).argmin(1)

    def distance(self, x0: Tensor, cond: Cond | None = None) -> dict[str, float]:
        """How far generated samples are from the mixture, measured exactly.

        ``mode_dist``: mean distance to the nearest mode, in units of the mode std (1-ish when on
        target); ``nll``: mean negative log-likelihood; ``coverage``: fraction of modes that hold at
        least half their expected share; ``class_match``: for conditional samples, the fraction
        landing on their own mode.
        """
        b = x0.shape[0]
        flat = x0.reshape(b, -1).to(self.means.device).float()
        d = torch.cdist(flat, self.means)
        nearest = d.argmin(1)
        dim = flat.shape[1]
        mode_dist = (d.min(1).values / (self.stds[nearest] * math.sqrt(dim))).mean()
        counts = torch.bincount(nearest, minlength=self.num_classes).float() / b
        coverage = (counts >= 0.5 * self.weights).float().mean()
        out = {
            "mode_dist": float(mode_dist),
            "nll": float(-self.log_prob(flat).mean() / dim),
            "coverage": float(coverage),
        }
        if cond is not None and "class_labels" in cond:
            labels = cond["class_labels"].to(nearest.device)
            real = labels < self.num_classes
            if real.any():
                out["class_match"] = float((nearest[real] == labels[real]).float().mean())
        return out

    def trainable_copy(self, hidden: int = 128, fit_steps: int = 800, seed: int = 0) -> MLPDenoiser:
        """A trainable network that starts as (an approximation of) this teacher.

        There are no teacher weights to copy, so an MLP denoiser is fitted to the exact denoiser
        by regression over all training noise levels; this plays the role that "a copy of the
        teacher UNet" plays for network teachers (critic / generator initialisation).  The fit is
        done once per (hidden, fit_steps, seed) and deep-copied afterwards.
        """
        import copy

        key = (hidden, fit_steps, seed)
        cache = self.__dict__.setdefault("_fitted_copies", {})
        if key not in cache:
            with torch.random.fork_rng(devices=[]):  # same fit whatever the caller's RNG state
                torch.manual_seed(seed)
                net = MLPDenoiser(self, hidden=hidden)
            net.fit_to(self, steps=fit_steps, seed=seed)
            cache[key] = net
        net = copy.deepcopy(cache[key])
        net.requires_grad_(True)
        return net


    def smaller_copy(self, width: float) -> MLPDenoiser:
        """A freshly initialised MLP denoiser with the hidden width of :meth:`trainable_copy`'s
        scaled by ``width`` (at least 8): MSD's smaller students."""
        return _smaller_mlp(self, self.trainable_copy(), width)


class MLPDenoiser(DiffusionTeacher):
    """Small EDM-preconditioned MLP denoiser for vector / tiny image data.

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, class)  with sigma_data = data std.
    """

    def __init__(self, like: GaussianMixtureTeacher, hidden: int = 128, sigma_data: float | None = None):
        super().__init__()
        self.sample_shape = like.sample_shape
        self.num_classes = like.num_classes
        self.register_buffer("sigmas", like.sigmas.clone())
        dim = int(torch.tensor(like.sample_shape).prod())
        if sigma_data is None:
            with torch.no_grad():
                sigma_data = float(like.sample_data(4096, torch.Generator().manual_seed(0)).std())
        self.sigma_data = sigma_data
        #: "edm": D = c_skip x + c_out F (Karras et al.);  "sample": D = sigma_data * F (signal
        #: prediction, used by BOOT's student which reads pure noise at every t)
        self.prediction_type = "edm"
        self.class_emb = nn.Embedding(like.num_classes + 1, hidden)
        self.noise_emb = nn.Sequential(nn.Linear(16, hidden), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.body = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )

    def null_condition(self, batch_size: int) -> Cond:
        return {"class_labels": torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.sigmas.device)}

    def encode_conditions(self, raw) -> Cond | None:
        if raw is None:
            return None
        return {"class_labels": torch.as_tensor(raw, dtype=torch.long, device=self.sigmas.device)}

    def _fourier(self, c_noise: Tensor) -> Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(100.0), 8, device=c_noise.device))
        arg = c_noise[:, None] * freqs[None]
        return torch.cat([arg.sin(), arg.cos()], 1)

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        b = x.shape[0]
        sd = self.sigma_data
        sigma = sigma.to(x.device, x.dtype).reshape(b)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        labels = cond["class_labels"] if cond and "class_labels" in cond else self.null_condition(b)["class_labels"]
        h = self.inp(x.reshape(b, -1) * c_in[:, None]) + self.noise_emb(self._fourier(c_noise)) + self.class_emb(labels)
        f = self.body(h).reshape(x.shape)
        if self.prediction_type == "sample":
            return sd * f
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f

    def noise_to_input(self, z: Tensor, sigma) -> Tensor:
        """Unit noise as the network's native input: ``c_in x = z``, i.e. ``x = z sqrt(sigma^2 + sigma_data^2)``."""
        sigma = torch.as_tensor(sigma, device=z.device, dtype=z.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(z.shape[0])
        return z * append_dims((sigma**2 + self.sigma_data**2).sqrt(), z.ndim)

    def fit_to(self, teacher: DiffusionTeacher, steps: int = 1500, batch: int = 256, seed: int = 0, lr: float = 2e-3):
        """Regress onto the teacher's denoiser at data-noised points (EDM loss weighting)."""
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            labels = torch.multinomial(teacher.weights.cpu(), batch, replacement=True, generator=g)
            drop = torch.rand(batch, generator=g) < 0.2
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            cond = {"class_labels": labels}
            x0 = teacher.sample_data(batch, g, cond)
            idx = torch.randint(0, teacher.num_train_timesteps, (batch,), generator=g)
            sigma = teacher.sigmas[idx]
            x = teacher.add_noise(x0, sigma, torch.randn(x0.shape, generator=g))
            with torch.no_grad():
                target = teacher.denoise_raw(x, sigma, cond)
            pred = self.denoise_raw(x, sigma, cond)
            w = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
            loss = (append_dims(w, x.ndim) * (pred - target) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return self


def _smaller_mlp(like, full: MLPDenoiser, width: float) -> MLPDenoiser:
    """A fresh MLPDenoiser shaped like ``like`` with ``full``'s hidden width scaled by ``width``."""
    return MLPDenoiser(like, hidden=max(8, int(full.inp.out_features * width)))


_LEARNED_SCORES: dict = {}


def _mixture_key(m: GaussianMixtureTeacher) -> tuple:
    return tuple(t.detach().cpu().numpy().tobytes() for t in (m.means, m.stds, m.weights)) + (m.conditional,)


class LearnedScoreTeacher(DiffusionTeacher):
    """A Gaussian mixture whose *score* comes from a network fitted on noisy data only.

    Like a trained diffusion model, the network is accurate where noised data lives and
    extrapolates elsewhere — at small sigma, away from the modes, where a young generator's samples
    are.  That is the "score mismatch" DisBack is designed for, which the exact teacher does not
    have.  Everything that measures samples (``distance``, ``log_prob``, ``sample_data``) still uses
    the exact mixture, so distances stay exact.  ``trainable_copy`` copies the fitted network (the
    analogue of copying a teacher UNet).
    """

    def __init__(self, mixture: GaussianMixtureTeacher, hidden: int = 128, fit_steps: int = 3000, seed: int = 1):
        super().__init__()
        key = (_mixture_key(mixture), hidden, fit_steps, seed)
        cache = _LEARNED_SCORES  # one fit per mixture and settings in a process (benchmarks rebuild teachers)
        if key not in cache:
            with torch.random.fork_rng(devices=[]):  # same fit whatever the caller's RNG state
                torch.manual_seed(seed)
                net = MLPDenoiser(mixture, hidden=hidden)
            net.fit_to(mixture, steps=fit_steps, seed=seed)
            net.requires_grad_(False)
            net.eval()
            cache[key] = net
        self.net = cache[key]
        object.__setattr__(self, "mixture", mixture)  # outside the module tree: not a parameter holder
        # a buffer, so that it follows .to(device) (the mixture itself stays outside the module tree)
        self.register_buffer("sigmas", mixture.sigmas.clone(), persistent=False)
        self.sample_shape = mixture.sample_shape
        self.num_classes = mixture.num_classes
        self.conditional = mixture.conditional
        self.guidance_scale = mixture.guidance_scale

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        return self.net.denoise_raw(x, sigma, cond)

    def null_condition(self, batch_size: int) -> Cond:
        return self.mixture.null_condition(batch_size)

    def encode_conditions(self, raw) -> Cond | None:
        return self.mixture.encode_conditions(raw)

    def random_raw_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        return self.mixture.random_raw_conditions(n, generator)

    def sample_data(self, n: int, generator: torch.Generator | None = None, cond: Cond | None = None) -> Tensor:
        return self.mixture.sample_data(n, generator, cond)

    def distance(self, x0: Tensor, cond: Cond | None = None) -> dict[str, float]:
        return self.mixture.distance(x0, cond)

    def log_prob(self, x0: Tensor, sigma: float = 0.0) -> Tensor:
        return self.mixture.log_prob(x0, sigma)

    def score_error(self, x: Tensor, sigma: float) -> float:
        """RMS gap between the learned and the exact denoiser at points ``x`` and noise ``sigma``."""
        s = torch.full((x.shape[0],), float(sigma), device=x.device)
        with torch.no_grad():
            gap = self.denoise_raw(x, s, None) - self.mixture.denoise_raw(x, s, None)
        return float(gap.pow(2).mean().sqrt())

    def smaller_copy(self, width: float) -> MLPDenoiser:
        """A freshly initialised MLP denoiser, the fitted network's hidden width scaled by ``width``."""
        full = self.trainable_copy()
        return _smaller_mlp(full, full, width)

    def trainable_copy(self) -> MLPDenoiser:
        import copy

        net = copy.deepcopy(self.net)
        net.requires_grad_(True)
        net.train()
        return net
